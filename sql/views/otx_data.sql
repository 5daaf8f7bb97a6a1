-- OTX pulses: the newest version of each pulse received (a revised pulse replaces its older row).
-- The newest version is chosen over the key columns alone and joined back to the log, so no sort
-- or hash table holds the pulses' text ((pulse_id, modified, batch_id) is unique in the log: a run
-- stores a pulse version once).
CREATE VIEW otx_data AS
SELECT l.pulse_id, l.name, l.description, l.author, l.created, l.modified, l.revision, l.tlp, l.tags,
       l.reference_urls, l.targeted_countries, l.industries, l.malware_families, l.adversary,
       l.attack_ids, l.indicator_count, l.batch_id, l.raw_ref, l.ingested_at
FROM (
  SELECT pulse_id, modified, batch_id
  FROM (
    SELECT pulse_id, modified, batch_id, row_number() OVER (
        PARTITION BY pulse_id
        ORDER BY modified DESC NULLS LAST, revision DESC NULLS LAST, batch_id DESC) AS rn
    FROM otx_pulse_log
  ) k
  WHERE rn = 1
) newest
JOIN otx_pulse_log l
  ON l.pulse_id = newest.pulse_id AND l.batch_id = newest.batch_id
 AND l.modified IS NOT DISTINCT FROM newest.modified;
