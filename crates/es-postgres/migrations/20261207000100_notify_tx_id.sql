-- The wake-up names the transaction that appended: a follower handed a read
-- made by another follower (es_postgres::tail::SharedReads) takes it only if
-- the read's horizon is past that transaction, i.e. the read saw its commit.
CREATE OR REPLACE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('events_appended', pg_current_xact_id()::text);
    RETURN NULL;
END;
$$;
