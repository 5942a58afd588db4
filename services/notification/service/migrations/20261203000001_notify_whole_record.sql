-- Watchers used to read every announced notification back by id: one
-- statement per notification per replica with a watcher. The trigger now
-- announces the whole record on `notification_recorded_v2` (or, when it is
-- too large for a NOTIFY payload, its user and id only, to be read back),
-- once per statement over all its rows rather than once per row.
-- `notification_recorded` keeps its `user:id` payload for replicas of the
-- previous release during a rolling upgrade; it goes in the next one.
DROP TRIGGER notifications_notify_trigger ON notifications;
DROP FUNCTION notifications_notify();

CREATE FUNCTION notifications_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notification_recorded_v2',
                      CASE WHEN octet_length(whole) > 7000
                           THEN json_build_object('user_id', r.user_id, 'id', r.id)::text
                           ELSE whole END),
            pg_notify('notification_recorded', r.user_id::text || ':' || r.id::text)
    FROM (SELECT i.user_id, i.id, json_build_object(
                     'seq', i.seq, 'id', i.id, 'user_id', i.user_id, 'event_id', i.event_id,
                     'event_type', i.event_type, 'channel', i.channel, 'subject', i.subject,
                     'body', i.body, 'occurred_at', i.occurred_at, 'created_at', i.created_at)::text AS whole
          FROM inserted i ORDER BY i.seq) AS r;
    RETURN NULL;
END;
$$;

CREATE TRIGGER notifications_notify_trigger
    AFTER INSERT ON notifications
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notifications_notify();
