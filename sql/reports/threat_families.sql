-- title: Threat types and families
-- description: Current threat items by kind and malware family or threat label.
-- chart: hbar y=items
SELECT kind, coalesce(family, '(unknown)') AS family, count(*) AS items
FROM threat_intelligence_data
GROUP BY 1, 2
ORDER BY items DESC, kind, family;
