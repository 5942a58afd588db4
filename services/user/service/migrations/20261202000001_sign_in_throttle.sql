-- Sign-in throttling by scope (ADR 0012): a fixed number of hashed buckets
-- per scope, so the table is bounded whatever callers send. Replaces the
-- per-email lock table (which locked owners out and grew per random email).
DROP TABLE login_throttle;

CREATE TABLE sign_in_throttle (
    bucket          bigint      PRIMARY KEY,  -- scope << 32 | keyed hash mod buckets
    free_failures   integer     NOT NULL,     -- the scope's allowance before backoff
    failures        integer     NOT NULL,
    last_failure    timestamptz,
    blocked_until   timestamptz,
    last_success    timestamptz               -- account-from-address scope: a known address
);
