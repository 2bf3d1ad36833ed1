-- A removal carries a fencing token taken when its repository row was deleted, from the same
-- sequence as every lease. The node refuses it on a replica whose fence a newer token raised (a
-- replica adopted since), so a removal that reaches its node late removes nothing it should not.
ALTER TABLE jobs ADD COLUMN fence_token bigint;
