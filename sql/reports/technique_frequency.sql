-- title: Technique frequency
-- description: How many current threat items point at each ATT&CK technique (model and source-stated evidence), and from how many sources.
-- chart: hbar y=items
SELECT m.technique_id,
       max(m.technique_name) AS technique_name,
       max(m.tactic) AS tactic,
       count(DISTINCT m.item_id) AS items,
       count(DISTINCT m.source) AS sources,
       round(avg(m.score), 3) AS avg_score,
       count(DISTINCT m.item_id) AS score
FROM mapped_threat_data m
JOIN threat_intelligence_data t ON m.item_id = t.item_id AND m.item_version = t.item_version
GROUP BY m.technique_id
ORDER BY items DESC, m.technique_id;
