-- Where notifications go, and what keeps them in order.

-- Email addresses, learned from user.created (this service never asks
-- user-service).
CREATE TABLE recipients (
    user_id     uuid        PRIMARY KEY,
    email       text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Webhook endpoints registered by users.
CREATE TABLE webhooks (
    id          uuid        PRIMARY KEY,
    user_id     uuid        NOT NULL,
    url         text        NOT NULL,
    secret      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);
CREATE INDEX webhooks_user_idx ON webhooks (user_id) WHERE deleted_at IS NULL;

-- Per order, the last event version whose notifications are done (delivered
-- or dead-lettered): a later event waits for its predecessor.
CREATE TABLE order_progress (
    order_id      uuid   PRIMARY KEY,
    last_version  bigint NOT NULL
);

-- Where each notification went (email address, URL).
ALTER TABLE notifications ADD COLUMN target text;

-- Live watchers (WatchNotifications) are woken on every replica.
CREATE FUNCTION notifications_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notification_recorded', NEW.user_id::text || ':' || NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER notifications_notify_trigger
    AFTER INSERT ON notifications
    FOR EACH ROW EXECUTE FUNCTION notifications_notify();
