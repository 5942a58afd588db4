-- The event store, which is also the outbox (see docs/adr/0003-events-table-is-the-outbox.md).

CREATE TABLE events (
    -- Assigned at insert, visible at commit: NOT commit-ordered. Never page on it alone.
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Id of the writing transaction. Every transaction below
    -- pg_snapshot_xmin(pg_current_snapshot()) has finished, so a cursor on
    -- (tx_id, position) read below that horizon never skips a late commit.
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    event_id        uuid        NOT NULL UNIQUE,
    stream_id       text        NOT NULL,
    version         bigint      NOT NULL CHECK (version > 0),
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL CHECK (schema_version > 0),
    payload         jsonb       NOT NULL,
    occurred_at     timestamptz NOT NULL,
    correlation_id  uuid        NOT NULL,
    causation_id    uuid        NOT NULL,
    actor           text        NOT NULL,
    traceparent     text,
    -- Optimistic concurrency: two writers of the same version, one wins.
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
);

CREATE INDEX events_tx_position_idx ON events (tx_id, position);

-- Command idempotency: a retried command with the same key returns the
-- original result and appends nothing.
CREATE TABLE idempotency_keys (
    key          text        PRIMARY KEY,
    stream_id    text        NOT NULL,
    version      bigint      NOT NULL,
    position     bigint      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Where each relay (events -> JetStream) has got to.
CREATE TABLE outbox_checkpoints (
    name        text        PRIMARY KEY,
    tx_id       xid8        NOT NULL,
    position    bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Wake relays at commit (NOTIFY is delivered on commit only). They also poll,
-- so a lost notification costs latency, never events.
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('events_appended', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify_trigger
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify();
