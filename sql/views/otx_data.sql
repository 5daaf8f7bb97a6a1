-- OTX pulses: the newest version of each pulse received (a revised pulse replaces its older row).
CREATE VIEW otx_data AS
SELECT pulse_id, name, description, author, created, modified, revision, tlp, tags, reference_urls,
       targeted_countries, industries, malware_families, adversary, attack_ids, indicator_count,
       batch_id, raw_ref, ingested_at
FROM (
  SELECT *, row_number() OVER (
      PARTITION BY pulse_id
      ORDER BY modified DESC NULLS LAST, revision DESC NULLS LAST, batch_id DESC) AS rn
  FROM otx_pulse_log
) v
WHERE rn = 1;
