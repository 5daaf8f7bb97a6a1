-- title: ATT&CK matrix
-- description: The mapping domain's ATT&CK matrix coloured by how many current threat items map to each technique (sub-techniques rolled up into their parent).
-- chart: heatmap x=technique_id y=items
SELECT m.technique_id,
       max(m.technique_name) AS technique_name,
       count(DISTINCT m.item_id) AS items,
       round(max(m.score), 3) AS best_score,
       count(DISTINCT m.item_id) AS score
FROM mapped_threat_data m
JOIN threat_intelligence_data t ON m.item_id = t.item_id AND m.item_version = t.item_version
GROUP BY m.technique_id
ORDER BY items DESC, m.technique_id;
