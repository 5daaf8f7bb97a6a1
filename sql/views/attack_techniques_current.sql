-- Active (not revoked, not deprecated) techniques and sub-techniques of the newest release per domain.
CREATE VIEW attack_techniques_current AS
SELECT t.*
FROM mitre_attack_techniques t
JOIN attack_versions_current v ON t.domain = v.domain AND t.attack_version = v.attack_version
WHERE NOT t.revoked AND NOT t.deprecated;
