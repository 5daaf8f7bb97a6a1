-- Indicators of the current version of each OTX pulse.
CREATE VIEW otx_indicators AS
SELECT i.pulse_id, i.indicator_id, i.type, i.indicator, i.title, i.description, i.created,
       i.expiration, i.is_active, i.role
FROM otx_indicator_log i
JOIN otx_data p
  ON i.pulse_id = p.pulse_id AND i.batch_id = p.batch_id
 AND i.pulse_modified IS NOT DISTINCT FROM p.modified;
