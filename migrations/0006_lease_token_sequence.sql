-- Repository lease tokens come from one sequence, so a token is higher than every token taken
-- before it on any repository. A node keeps the highest token it accepted per replica (its
-- fence); a replica adopted under a new repository row (track-repository, a restore from
-- quarantine) keeps the fence of its former life, and every new lease must still pass it.
CREATE SEQUENCE repository_lease_tokens;
SELECT setval('repository_lease_tokens', COALESCE((SELECT max(lease_token) FROM repositories), 0) + 1);
