-- A push whose pack is on its way to the replicas. It is recorded before the first byte leaves
-- the proxy, with no lease: the replicas keep the pack in git's quarantine and move no ref
-- until the push becomes a write intent under the repository's lease. A row whose proxy died
-- is deleted by recovery once it expires; nothing on a replica ever changed for it.
CREATE TABLE pending_writes (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    repository_id    bigint      NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    owner            text        NOT NULL,
    -- The gRPC method of the write.
    rpc              text        NOT NULL,
    -- The commands the client announced: [{"ref": ..., "old": ..., "new": ...}, ...]
    ref_updates      jsonb       NOT NULL,
    -- The replicas the pack is sent to: assigned and reachable when it started.
    target_storages  text[]      NOT NULL,
    base_generation  bigint      NOT NULL,
    expires_at       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pending_writes_by_repository ON pending_writes (repository_id);
CREATE INDEX pending_writes_by_expiry ON pending_writes (expires_at);

-- A repository a push created (push-to-create) before its first write committed. If that push
-- fails, and no other push is under way, the repository is deleted again: a failed push leaves
-- nothing behind. The first committed write clears it.
ALTER TABLE repositories ADD COLUMN awaiting_first_push boolean NOT NULL DEFAULT false;

-- The refs checksum of the repository's generation (see src/git/checksum.rs): recorded by each
-- commit, a push's computed from the refs it moved. NULL when not known.
ALTER TABLE repositories ADD COLUMN refs_checksum text;
