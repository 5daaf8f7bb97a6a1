-- The newest state of each (target, delivery) in the push outbox: pending, delivered, failed, dead
-- or superseded, with attempts, the last error and when it was delivered.
CREATE VIEW integration_outbox AS
SELECT target, delivery_id, item_id, item_version, technique_id, method, payload_hash, status,
       attempts, last_error, next_attempt_at, delivered_at, updated_at, push_id
FROM (
    SELECT *, row_number() OVER (PARTITION BY target, delivery_id
                                 ORDER BY updated_at DESC, attempts DESC) AS rn
    FROM integration_outbox_log
) newest
WHERE rn = 1;
