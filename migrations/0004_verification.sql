-- Verification, reconciliation and the figures behind `admin status`.

-- A replica's generation can be unknown: the verifier found it missing on its node, or holding
-- refs that differ from the other replicas of its generation. Such a replica is never up to date,
-- so nothing reads from it or writes through it until a replication brings it back.
ALTER TABLE replicas ALTER COLUMN generation DROP NOT NULL;
ALTER TABLE replicas
    -- When the verifier found no repository on the node; cleared when a copy is recorded.
    ADD COLUMN missing_since     timestamptz,
    -- Not at the repository's generation. Kept by the triggers below, never by hand, so the
    -- replicas that need work can be found and counted through a small partial index.
    ADD COLUMN stale             boolean     NOT NULL DEFAULT false,
    -- The verification lease: the worker checking this replica now, and until when.
    ADD COLUMN verify_owner      text,
    ADD COLUMN verify_expires_at timestamptz;

-- The verifier takes the replicas verified longest ago (never verified first).
CREATE INDEX replicas_by_verification ON replicas (verified_at NULLS FIRST);
-- What needs repair, and what waits for its first verification, per storage.
CREATE INDEX replicas_stale ON replicas (storage) WHERE stale;
CREATE INDEX replicas_unverified ON replicas (storage) WHERE verified_at IS NULL;

-- A replica's staleness is computed when its generation is written...
CREATE FUNCTION replica_stale() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.stale := NEW.generation IS DISTINCT FROM
        (SELECT r.generation FROM repositories r WHERE r.id = NEW.repository_id);
    IF NEW.generation IS NOT NULL THEN
        NEW.missing_since := NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER replicas_stale BEFORE INSERT OR UPDATE OF generation ON replicas
    FOR EACH ROW EXECUTE FUNCTION replica_stale();

-- ... and again when the repository's generation moves, at the end of the statement, when the
-- replicas written in the same statement are visible too.
CREATE FUNCTION repository_generation_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE replicas p SET stale = (p.generation IS DISTINCT FROM NEW.generation)
    WHERE p.repository_id = NEW.id
      AND p.stale IS DISTINCT FROM (p.generation IS DISTINCT FROM NEW.generation);
    RETURN NULL;
END
$$;
CREATE TRIGGER repositories_generation AFTER INSERT OR UPDATE OF generation ON repositories
    FOR EACH ROW EXECUTE FUNCTION repository_generation_moved();

-- Proxies cache what reads depend on. A replica change that leaves its generation alone
-- (verification stamps and leases, staleness) does not notify.
CREATE OR REPLACE FUNCTION notify_routing() RETURNS trigger LANGUAGE plpgsql AS $$
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
        -- PL/pgSQL does not short-circuit: OLD.generation is read only on replicas.
        IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'replicas' THEN
            IF OLD.generation IS NOT DISTINCT FROM NEW.generation THEN
                RETURN NULL;
            END IF;
        END IF;
        changed := NEW.repository_id;
    END IF;
    PERFORM pg_notify('gitfleet_routing', changed::text);
    RETURN NULL;
END
$$;

-- Counts kept as rows are added and removed, so that status and metrics never count a
-- million rows. Each count is split over 16 shards (by repository id), so that concurrent
-- creations rarely wait on the same counter row; a reader sums the shards.
CREATE TABLE replica_totals (
    storage  text    NOT NULL,
    shard    integer NOT NULL,
    replicas bigint  NOT NULL,
    PRIMARY KEY (storage, shard)
);
CREATE TABLE repository_totals (
    virtual_storage text    NOT NULL,
    shard           integer NOT NULL,
    repositories    bigint  NOT NULL,
    PRIMARY KEY (virtual_storage, shard)
);

-- Counter rows are taken in key order, so two statements never wait on each other in a cycle.
CREATE FUNCTION count_replicas() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO replica_totals AS t (storage, shard, replicas)
        SELECT storage, (repository_id % 16)::integer, count(*) FROM changed
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (storage, shard) DO UPDATE SET replicas = t.replicas + EXCLUDED.replicas;
    ELSE
        INSERT INTO replica_totals AS t (storage, shard, replicas)
        SELECT storage, (repository_id % 16)::integer, -count(*) FROM changed
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (storage, shard) DO UPDATE SET replicas = t.replicas + EXCLUDED.replicas;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER replicas_added AFTER INSERT ON replicas
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION count_replicas();
CREATE TRIGGER replicas_removed AFTER DELETE ON replicas
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION count_replicas();

CREATE FUNCTION count_repositories() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO repository_totals AS t (virtual_storage, shard, repositories)
        SELECT virtual_storage, (id % 16)::integer, count(*) FROM changed
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (virtual_storage, shard)
            DO UPDATE SET repositories = t.repositories + EXCLUDED.repositories;
    ELSE
        INSERT INTO repository_totals AS t (virtual_storage, shard, repositories)
        SELECT virtual_storage, (id % 16)::integer, -count(*) FROM changed
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (virtual_storage, shard)
            DO UPDATE SET repositories = t.repositories + EXCLUDED.repositories;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER repositories_added AFTER INSERT ON repositories
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION count_repositories();
CREATE TRIGGER repositories_removed AFTER DELETE ON repositories
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION count_repositories();

INSERT INTO replica_totals (storage, shard, replicas)
SELECT storage, (repository_id % 16)::integer, count(*) FROM replicas GROUP BY 1, 2;
INSERT INTO repository_totals (virtual_storage, shard, repositories)
SELECT virtual_storage, (id % 16)::integer, count(*) FROM repositories GROUP BY 1, 2;
UPDATE replicas p SET stale = true
FROM repositories r WHERE r.id = p.repository_id AND p.generation <> r.generation;

-- A repository's own replication factor; NULL follows its virtual storage's.
ALTER TABLE repositories ADD COLUMN replication_factor integer CHECK (replication_factor > 0);

-- Each storage's identity: a random id its node keeps in the storage directory. A different id
-- means the directory was wiped or replaced, and every replica on it is verified again first.
CREATE TABLE storage_identities (
    storage    text        PRIMARY KEY,
    storage_id text        NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now(),
    -- When the id last changed; NULL while it is the first one seen.
    changed_at timestamptz
);

-- What the verifier found, per storage, since it began.
CREATE TABLE storage_verifications (
    storage          text        PRIMARY KEY,
    last_verified_at timestamptz,
    verified         bigint      NOT NULL DEFAULT 0,
    missing          bigint      NOT NULL DEFAULT 0,
    diverged         bigint      NOT NULL DEFAULT 0,
    errors           bigint      NOT NULL DEFAULT 0,
    last_error       text
);

-- The reconciler's place in its sweep over the repositories, and its last round.
CREATE TABLE reconciler (
    singleton     boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    cursor        bigint      NOT NULL DEFAULT 0,
    last_round_at timestamptz,
    sweeps        bigint      NOT NULL DEFAULT 0
);
INSERT INTO reconciler DEFAULT VALUES;

-- Running jobs per target, for the per-target concurrency limit.
CREATE INDEX jobs_running_by_target ON jobs (target_storage) WHERE state = 'running';
-- A repository's jobs, for `admin replicas` and the reconciler's look at recent dead jobs.
CREATE INDEX jobs_by_repository ON jobs (repository_id, target_storage);
-- The last job that started and the last that finished: whether the queue moves at all.
CREATE INDEX jobs_by_start ON jobs (started_at);
CREATE INDEX jobs_by_finish ON jobs (finished_at);
