-- title: Top mapped techniques with evidence
-- description: The newest threat-model snapshot, strongest techniques first, with the item that scored highest for each.
-- chart: hbar y=score
WITH latest AS (SELECT max(run_id) AS run_id FROM threat_model),
best AS (
  SELECT m.technique_id, t.title, m.score, m.method,
         row_number() OVER (PARTITION BY m.technique_id ORDER BY m.score DESC, t.item_id) AS rn
  FROM mapped_threat_data m
  JOIN threat_intelligence_data t ON m.item_id = t.item_id AND m.item_version = t.item_version
)
SELECT * FROM (
SELECT tm.technique_id, tm.technique_name, tm.tactic, tm.evidence_count, tm.distinct_sources,
       round(tm.score, 3) AS score, b.title AS top_evidence, b.method AS top_method
FROM threat_model tm
JOIN latest l ON tm.run_id = l.run_id
LEFT JOIN best b ON b.technique_id = tm.technique_id AND b.rn = 1
) r
ORDER BY score DESC, technique_id
LIMIT 50;
