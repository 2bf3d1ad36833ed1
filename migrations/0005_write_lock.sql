-- The maintenance write lock: proxies are told at once when it changes, and poll as a fallback.
CREATE FUNCTION notify_maintenance() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gitfleet_maintenance', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER maintenance_notify AFTER UPDATE ON maintenance
    FOR EACH ROW EXECUTE FUNCTION notify_maintenance();
