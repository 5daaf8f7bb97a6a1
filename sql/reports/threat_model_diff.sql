-- title: Threat-model changes
-- description: Techniques new, rising, fading or gone between the last two threat-model runs.
-- chart: hbar y=score_after
WITH runs AS (SELECT DISTINCT run_id FROM threat_model),
ranked AS (SELECT run_id, row_number() OVER (ORDER BY run_id DESC) AS k FROM runs),
b AS (SELECT tm.* FROM threat_model tm JOIN ranked r ON tm.run_id = r.run_id AND r.k = 1),
a AS (SELECT tm.* FROM threat_model tm JOIN ranked r ON tm.run_id = r.run_id AND r.k = 2),
j AS (
  SELECT coalesce(b.technique_id, a.technique_id) AS technique_id,
         coalesce(b.technique_name, a.technique_name) AS technique_name,
         a.score AS score_before, b.score AS score_after,
         coalesce(a.evidence_count, 0) AS evidence_before, coalesce(b.evidence_count, 0) AS evidence_after
  FROM b FULL OUTER JOIN a ON a.technique_id = b.technique_id
)
SELECT CASE
         WHEN score_before IS NULL THEN 'new'
         WHEN score_after IS NULL THEN 'gone'
         WHEN score_after >= score_before * 1.25 OR (evidence_after > evidence_before AND score_after > score_before) THEN 'rising'
         WHEN score_after <= score_before * 0.8 THEN 'fading'
         ELSE 'steady'
       END AS change,
       technique_id, technique_name,
       round(score_before, 3) AS score_before, round(score_after, 3) AS score_after,
       evidence_before, evidence_after
FROM j
WHERE (SELECT count(*) FROM runs) >= 2
ORDER BY CASE change WHEN 'new' THEN 0 WHEN 'rising' THEN 1 WHEN 'fading' THEN 2 WHEN 'gone' THEN 3 ELSE 4 END,
         score_after DESC NULLS LAST, technique_id;
