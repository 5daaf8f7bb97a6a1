-- ATT&CK techniques a TAXII report or indicator states: attack-patterns the report refers to, those
-- an indicator `indicates` (or a report `uses`), and the object's own mitre-attack references.
CREATE VIEW taxii_techniques AS
WITH patterns AS (
  SELECT object_id, upper(id) AS technique_id
  FROM (SELECT object_id, unnest(attack_ids) AS id FROM taxii_data
        WHERE type = 'attack-pattern' AND NOT coalesce(revoked, false)) p
),
refs AS (
  SELECT object_id, unnest(object_refs) AS ref FROM taxii_data WHERE type = 'report'
),
stated AS (
  SELECT r.object_id, p.technique_id FROM refs r JOIN patterns p ON p.object_id = r.ref
  UNION
  SELECT r.source_ref, p.technique_id FROM taxii_data r JOIN patterns p ON p.object_id = r.target_ref
  WHERE r.type = 'relationship' AND r.relationship_type IN ('indicates', 'uses')
  UNION
  SELECT object_id, upper(id) FROM (SELECT object_id, unnest(attack_ids) AS id FROM taxii_data
                                    WHERE type IN ('report', 'indicator')) o
)
SELECT object_id, technique_id FROM stated
-- Techniques and sub-techniques only (not tactics TA…, groups G…, software S…).
WHERE technique_id LIKE 'T____' OR technique_id LIKE 'T____.___';
