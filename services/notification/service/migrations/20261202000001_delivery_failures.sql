-- Failed attempts per (consumer, event): the poison-message limit counts
-- these, not JetStream's deliveries, which include the times a message
-- only waited for its order's previous event (issue 13). A row lives only
-- while a message is failing.
CREATE TABLE delivery_failures (
    consumer    text        NOT NULL,
    event_id    uuid        NOT NULL,
    failures    integer     NOT NULL,
    last_error  text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
