-- The request an idempotency key first came with (a hash): a retry must
-- match it; the same key with another request is refused. Keys stored
-- before this column existed have none and match any request.
ALTER TABLE idempotency_keys ADD COLUMN fingerprint text;
