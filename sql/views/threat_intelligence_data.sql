-- One row per threat item (current version) from every feed: the text the mapper reads and the facts
-- reports group by. item_version changes when the source revises the item.
CREATE VIEW threat_intelligence_data AS
SELECT 'otx:' || pulse_id AS item_id,
       CAST(modified AS VARCHAR) AS item_version,
       'otx' AS source,
       'pulse' AS kind,
       name AS title,
       concat_ws('. ', name, description, array_to_string(tags, ', ')) AS text,
       coalesce(modified, created) AS observed_at,
       array_element(targeted_countries, 1) AS country,
       coalesce(array_element(malware_families, 1), adversary) AS family,
       tags,
       raw_ref
FROM otx_data
UNION ALL
SELECT 'vt:' || kind || ':' || observable,
       CAST(fetched_at AS VARCHAR),
       'virustotal',
       kind,
       coalesce(threat_label, array_element(names, 1), observable),
       concat_ws('. ', threat_label, array_to_string(sigma_hits, '. '),
                 array_to_string(sandbox_verdicts, '. '), array_to_string(type_tags, ', ')),
       coalesce(last_analysis, fetched_at),
       country,
       coalesce(array_element(threat_families, 1), threat_label),
       type_tags,
       raw_ref
FROM virustotal_data
WHERE found
UNION ALL
SELECT 'taxii:' || object_id,
       CAST(coalesce(modified, created) AS VARCHAR),
       'taxii',
       type,
       coalesce(name, object_id),
       concat_ws('. ', name, description, array_to_string(labels, ', ')),
       coalesce(modified, published, created),
       CAST(NULL AS VARCHAR),
       CAST(NULL AS VARCHAR),
       labels,
       raw_ref
FROM taxii_data
WHERE type IN ('report', 'indicator') AND NOT coalesce(revoked, false);
