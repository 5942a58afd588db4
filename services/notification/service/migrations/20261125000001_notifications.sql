CREATE TABLE notifications (
    -- Paging key (newest first).
    seq          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           uuid        NOT NULL UNIQUE,
    user_id      uuid        NOT NULL,
    event_id     uuid        NOT NULL,
    event_type   text        NOT NULL,
    channel      text        NOT NULL,
    subject      text        NOT NULL,
    body         text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Exactly once per (event, channel): a redelivered event changes nothing.
    CONSTRAINT notifications_event_channel_key UNIQUE (event_id, channel)
);

CREATE INDEX notifications_user_seq_idx ON notifications (user_id, seq DESC);
