-- Watchers used to read every announced notification back by id: one
-- statement per notification per replica with a watcher. The trigger now
-- announces the whole record on `notification_recorded_v2` (or, when it is
-- too large for a NOTIFY payload, its user and id only, to be read back).
-- `notification_recorded` keeps its `user:id` payload for replicas of the
-- previous release during a rolling upgrade; it goes in the next one.
CREATE OR REPLACE FUNCTION notifications_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    whole text := json_build_object(
        'seq', NEW.seq, 'id', NEW.id, 'user_id', NEW.user_id, 'event_id', NEW.event_id,
        'event_type', NEW.event_type, 'channel', NEW.channel, 'subject', NEW.subject,
        'body', NEW.body, 'occurred_at', NEW.occurred_at, 'created_at', NEW.created_at)::text;
BEGIN
    IF octet_length(whole) > 7000 THEN
        whole := json_build_object('user_id', NEW.user_id, 'id', NEW.id)::text;
    END IF;
    PERFORM pg_notify('notification_recorded_v2', whole);
    PERFORM pg_notify('notification_recorded', NEW.user_id::text || ':' || NEW.id::text);
    RETURN NULL;
END;
$$;
