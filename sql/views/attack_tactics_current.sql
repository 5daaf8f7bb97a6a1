-- Tactics of the newest release per domain, in matrix order.
CREATE VIEW attack_tactics_current AS
SELECT t.*
FROM mitre_attack_tactics t
JOIN attack_versions_current v ON t.domain = v.domain AND t.attack_version = v.attack_version
WHERE NOT t.revoked AND NOT t.deprecated;
