-- Failed attempts per (consumer, event): the poison-message limit counts
-- these, not JetStream's deliveries, which include the times a message
-- only waited for its order's previous event (issue 13). A row lives only
-- while a message is failing or waiting; rows a crash left behind are
-- pruned after a week (the streams keep messages that long).
CREATE TABLE delivery_failures (
    consumer    text        NOT NULL,
    event_id    uuid        NOT NULL,
    failures    integer     NOT NULL,
    last_error  text        NOT NULL,
    -- When it first had to wait for its order's previous event, if it did:
    -- the wait limit counts from here, not from when it was published (a
    -- backlog is not waiting).
    first_waited_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
