-- Read models (CQRS). Rows carry the projection generation they belong to:
-- queries read the live generation, a rebuild fills the next one beside it.

-- One row per order, everything GetOrder answers.
CREATE TABLE order_summary (
    generation         integer     NOT NULL,
    order_id           uuid        NOT NULL,
    user_id            uuid        NOT NULL,
    status             text        NOT NULL,
    currency           text        NOT NULL,
    total_minor        bigint      NOT NULL,
    items              jsonb       NOT NULL,
    shipping_address   jsonb,
    payment_reference  text,
    carrier            text,
    tracking_number    text,
    cancel_reason      text,
    version            bigint      NOT NULL,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    PRIMARY KEY (generation, order_id)
);

-- A user's orders, newest first (order ids are UUIDv7: time-ordered).
CREATE TABLE orders_by_user (
    generation   integer     NOT NULL,
    user_id      uuid        NOT NULL,
    order_id     uuid        NOT NULL,
    status       text        NOT NULL,
    currency     text        NOT NULL,
    total_minor  bigint      NOT NULL,
    item_count   bigint      NOT NULL,
    version      bigint      NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (generation, order_id)
);

CREATE INDEX orders_by_user_list_idx ON orders_by_user (generation, user_id, order_id DESC);
CREATE INDEX orders_by_user_status_idx ON orders_by_user (generation, user_id, status, order_id DESC);
