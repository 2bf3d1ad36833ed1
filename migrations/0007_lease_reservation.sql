-- A replication waiting for a busy repository's lease reserves it: while the reservation
-- lasts (it is renewed by every attempt, and lapses within a second of the last), writes do not
-- take the lease, so the replication gets it as soon as the write holding it ends, instead of
-- racing a stream of writers for it.
ALTER TABLE repositories
    ADD COLUMN lease_reserved_by text,
    ADD COLUMN lease_reserved_until timestamptz;
