-- STIX objects pulled from TAXII 2.1 collections: the newest version of each object received (a
-- revised object replaces its older row; an object seen in two collections is one row).
CREATE VIEW taxii_data AS
SELECT collection, object_id, type, spec_version, created, modified, name, description, labels, types,
       pattern, pattern_type, valid_from, published, object_refs, relationship_type, source_ref,
       target_ref, attack_ids, created_by_ref, confidence, revoked, object, batch_id, raw_ref, ingested_at
FROM (
  SELECT *, row_number() OVER (
      PARTITION BY object_id
      ORDER BY modified DESC NULLS LAST, batch_id DESC, collection) AS rn
  FROM taxii_object_log
) v
WHERE rn = 1;
