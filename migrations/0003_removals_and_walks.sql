-- Removal jobs and the storage walker.

-- A removal job outlives its repository row, so it carries the replica path it removes.
ALTER TABLE jobs ADD COLUMN replica_path text;

-- One row per storage the walker has visited: the lease that keeps two walkers off the same
-- storage, and what the last finished walk found and did.
CREATE TABLE storage_walks (
    storage          text        PRIMARY KEY,
    lease_owner      text,
    -- The fencing token of the walk in progress; it only grows.
    lease_token      bigint      NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    duration_seconds double precision,
    -- Replicas on the storage.
    seen             bigint      NOT NULL DEFAULT 0,
    -- Replica paths no repository row references.
    untracked        bigint      NOT NULL DEFAULT 0,
    -- Replicas of repositories that are not assigned to the storage.
    extra            bigint      NOT NULL DEFAULT 0,
    quarantined      bigint      NOT NULL DEFAULT 0,
    purged           bigint      NOT NULL DEFAULT 0,
    errors           bigint      NOT NULL DEFAULT 0,
    last_error       text,
    -- Finished walks, ever.
    walks            bigint      NOT NULL DEFAULT 0
);
