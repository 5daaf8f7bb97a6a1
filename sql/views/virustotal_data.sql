-- VirusTotal: the newest lookup of each observable.
CREATE VIEW virustotal_data AS
SELECT observable, kind, found, sha256, md5, url, domain, ip, names, type_tags, type_description,
       first_submission, last_submission, last_analysis, malicious, suspicious, harmless, undetected,
       reputation, threat_label, threat_categories, threat_families, sandbox_verdicts, sigma_hits,
       country, asn, as_owner, batch_id, raw_ref, fetched_at
FROM (
  SELECT *, row_number() OVER (PARTITION BY observable ORDER BY fetched_at DESC, batch_id DESC) AS rn
  FROM virustotal_lookup_log
) v
WHERE rn = 1;
