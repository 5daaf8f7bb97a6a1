-- title: Tactic coverage
-- description: Per tactic of the mapping domain's newest ATT&CK release, how many of its techniques the current intel touches.
-- chart: bar x=tactic_name y=coverage_pct
WITH seen AS (
  SELECT DISTINCT m.technique_id
  FROM mapped_threat_data m
  JOIN threat_intelligence_data t ON m.item_id = t.item_id AND m.item_version = t.item_version
)
SELECT tt.domain, tt.tactic, tt.tactic_name,
       count(DISTINCT tt.technique_id) AS techniques,
       count(DISTINCT s.technique_id) AS techniques_seen,
       round(100.0 * count(DISTINCT s.technique_id) / count(DISTINCT tt.technique_id), 1) AS coverage_pct
FROM attack_technique_tactics tt
LEFT JOIN seen s ON s.technique_id = tt.technique_id
GROUP BY tt.domain, tt.tactic, tt.tactic_name, tt.matrix_order
ORDER BY tt.domain, tt.matrix_order;
