-- title: Threats over time
-- description: Current threat items per week of observation, per source.
-- chart: line x=week y=items series=source
SELECT date_trunc('week', observed_at) AS week, source, count(*) AS items
FROM threat_intelligence_data
WHERE observed_at IS NOT NULL
GROUP BY 1, 2
ORDER BY 1, 2;
