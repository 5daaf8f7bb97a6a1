-- title: Threats by country
-- description: Countries targeted by OTX pulses and countries of VirusTotal IP addresses.
-- chart: map x=country y=items
SELECT country, source, count(*) AS items
FROM (
  SELECT unnest(targeted_countries) AS country, 'otx' AS source FROM otx_data
  UNION ALL
  SELECT country, 'virustotal' AS source FROM virustotal_data WHERE found AND country IS NOT NULL
) c
GROUP BY 1, 2
ORDER BY items DESC, country, source;
