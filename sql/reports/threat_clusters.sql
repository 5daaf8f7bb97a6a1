-- title: Threat clusters
-- description: The newest 5,000 current threat items laid out by the similarity of their text (mapping-model sentence vectors reduced to two dimensions by PCA), coloured by the technique each maps to most strongly.
-- chart: scatter project=text series=technique
WITH best AS (
  SELECT item_id, item_version, technique_id, technique_name, score,
         row_number() OVER (PARTITION BY item_id, item_version ORDER BY score DESC, technique_id) AS rn
  FROM mapped_threat_data
)
SELECT t.item_id,
       t.source,
       t.title,
       b.technique_id || ' ' || coalesce(b.technique_name, '') AS technique,
       round(b.score, 3) AS score,
       t.text
FROM threat_intelligence_data t
JOIN best b ON b.item_id = t.item_id AND b.item_version = t.item_version AND b.rn = 1
ORDER BY t.observed_at DESC NULLS LAST, t.item_id
LIMIT 5000;
