-- The newest ingested ATT&CK release per domain (numeric version order: 9.0 < 18.1).
CREATE VIEW attack_versions_current AS
SELECT domain, attack_version, collection, collection_modified, ingested_at
FROM (
    SELECT v.*,
           row_number() OVER (PARTITION BY domain ORDER BY attack_version_key(attack_version) DESC) AS rn
    FROM mitre_attack_versions v
) ranked
WHERE rn = 1;
