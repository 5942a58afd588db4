-- Sign-in throttling by scope (ADR 0012): a fixed number of hashed buckets
-- per scope, so the table is bounded whatever callers send. Replaces the
-- per-email lock table `login_throttle` (which locked owners out and grew
-- per random email); that table stays until the next release, so replicas
-- of the previous version keep working during a rolling update.

CREATE TABLE sign_in_throttle (
    bucket          bigint      PRIMARY KEY,  -- scope << 32 | keyed hash mod buckets
    free_failures   integer     NOT NULL,     -- the scope's allowance before backoff
    failures        integer     NOT NULL,
    last_failure    timestamptz,
    blocked_until   timestamptz,
    last_success    timestamptz,              -- account-from-address scope: a known address
    success_tag     text                      -- which (email, address) succeeded: a full keyed hash
);
