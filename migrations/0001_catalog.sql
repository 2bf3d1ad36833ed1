-- The catalog: which repositories exist, where their replicas live and how current each one is,
-- the writes in flight, and the repair work queued for the worker.

-- One row per repository. Ids come from an identity sequence and are never reused, and the
-- replica path on the nodes is derived from the id, so a path that is removed and created again
-- never meets the old repository's leftovers, and a rename touches only this row.
CREATE TABLE repositories (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    virtual_storage  text        NOT NULL,
    relative_path    text        NOT NULL,
    replica_path     text        NOT NULL UNIQUE,
    -- Counts the acknowledged writes. A replica is up to date when it holds this generation.
    generation       bigint      NOT NULL DEFAULT 0 CHECK (generation >= 0),
    -- The replica a caller gets when it asks for the primary.
    primary_storage  text        NOT NULL,
    -- The write lease: only its owner writes, and lease_token (the fencing token) only grows.
    lease_owner      text,
    lease_token      bigint      NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (virtual_storage, relative_path)
);

-- Which storages should hold a repository: as many as its virtual storage's replication factor.
CREATE TABLE assignments (
    repository_id bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    storage       text   NOT NULL,
    PRIMARY KEY (repository_id, storage)
);

-- The replicas known to exist, and the last generation each is known to hold.
CREATE TABLE replicas (
    repository_id bigint      NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    storage       text        NOT NULL,
    generation    bigint      NOT NULL CHECK (generation >= 0),
    verified_at   timestamptz,
    PRIMARY KEY (repository_id, storage)
);
CREATE INDEX replicas_by_storage ON replicas (storage);

-- A write recorded before it is sent to any replica. The row lives while the write is in
-- flight; one that outlives its lease is an interrupted write for recovery to finish.
CREATE TABLE write_intents (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    repository_id    bigint      NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    owner            text        NOT NULL,
    fencing_token    bigint      NOT NULL,
    lease_expires_at timestamptz NOT NULL,
    -- The gRPC method of the write.
    rpc              text        NOT NULL,
    -- The generation the write starts from.
    base_generation  bigint      NOT NULL,
    -- [{"ref": "refs/heads/main", "old": "<oid>", "new": "<oid>"}, ...]
    ref_updates      jsonb       NOT NULL,
    target_storages  text[]      NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX write_intents_by_repository ON write_intents (repository_id);
CREATE INDEX write_intents_by_expiry ON write_intents (lease_expires_at);

-- Repair and housekeeping work. No foreign key to repositories: a job may outlive the row
-- (cleaning the replicas of a removed repository), and checks the catalog when it runs.
CREATE TABLE jobs (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             text        NOT NULL,
    repository_id    bigint      NOT NULL,
    source_storage   text,
    target_storage   text        NOT NULL,
    state            text        NOT NULL DEFAULT 'queued'
                                 CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts         integer     NOT NULL DEFAULT 0,
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_token      bigint      NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- At most one active job per (kind, repository, target).
CREATE UNIQUE INDEX jobs_one_active ON jobs (kind, repository_id, target_storage)
    WHERE state IN ('queued', 'running');
CREATE INDEX jobs_ready ON jobs (run_after) WHERE state = 'queued';

-- Cluster-wide switches. Exactly one row.
CREATE TABLE maintenance (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    write_lock boolean     NOT NULL DEFAULT false,
    reason     text,
    changed_by text,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO maintenance DEFAULT VALUES;

-- Proxies cache routing state and drop a repository's entry when it is notified here. Taking
-- or renewing a write lease changes nothing a read depends on, so it does not notify.
CREATE FUNCTION notify_routing() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed bigint;
BEGIN
    IF TG_TABLE_NAME = 'repositories' THEN
        IF TG_OP = 'DELETE' THEN
            changed := OLD.id;
        ELSIF TG_OP = 'UPDATE'
              AND OLD.generation = NEW.generation
              AND OLD.relative_path = NEW.relative_path
              AND OLD.virtual_storage = NEW.virtual_storage
              AND OLD.primary_storage = NEW.primary_storage THEN
            RETURN NULL;
        ELSE
            changed := NEW.id;
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        changed := OLD.repository_id;
    ELSE
        changed := NEW.repository_id;
    END IF;
    PERFORM pg_notify('gitfleet_routing', changed::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER repositories_notify AFTER INSERT OR UPDATE OR DELETE ON repositories
    FOR EACH ROW EXECUTE FUNCTION notify_routing();
CREATE TRIGGER replicas_notify AFTER INSERT OR UPDATE OR DELETE ON replicas
    FOR EACH ROW EXECUTE FUNCTION notify_routing();
CREATE TRIGGER assignments_notify AFTER INSERT OR UPDATE OR DELETE ON assignments
    FOR EACH ROW EXECUTE FUNCTION notify_routing();
