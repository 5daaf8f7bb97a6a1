-- Procedure examples of the newest release per domain whose technique is active.
CREATE VIEW attack_procedures_current AS
SELECT p.*
FROM mitre_attack_procedures p
JOIN attack_techniques_current t
  ON p.domain = t.domain AND p.attack_version = t.attack_version AND p.technique_ref = t.stix_id;
