-- The job queue that workers run: a dead state for jobs out of attempts, postponement that does
-- not spend attempts (a node that is down), a rerun flag for work merged into a running job,
-- and the times operators and metrics need.

ALTER TABLE jobs DROP CONSTRAINT jobs_state_check;
UPDATE jobs SET state = 'dead' WHERE state = 'failed';
ALTER TABLE jobs ADD CONSTRAINT jobs_state_check
    CHECK (state IN ('queued', 'running', 'done', 'dead', 'cancelled'));

ALTER TABLE jobs
    -- Times the job waited for a node that was down. Counts its backoff without spending
    -- its attempts.
    ADD COLUMN postponed   integer     NOT NULL DEFAULT 0,
    -- Set when the same work was enqueued while the job ran: it runs once more when done.
    ADD COLUMN rerun       boolean     NOT NULL DEFAULT false,
    -- What a running job last reported doing.
    ADD COLUMN progress    text,
    ADD COLUMN started_at  timestamptz,
    ADD COLUMN finished_at timestamptz;

-- Running jobs by lease expiry: a crashed worker's jobs are taken over from here.
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'running';
-- The operator's listing and the metrics, by state.
CREATE INDEX jobs_by_state ON jobs (state, kind);

-- Workers wait on this channel instead of polling hard: the payload is the kind of a job that
-- became ready (new, retried, released). A job whose run_after is in the future is found by
-- the workers' slower poll.
CREATE FUNCTION notify_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'queued' AND NEW.run_after <= now() THEN
        PERFORM pg_notify('gitfleet_jobs', NEW.kind);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE OF state, run_after ON jobs
    FOR EACH ROW EXECUTE FUNCTION notify_jobs();
