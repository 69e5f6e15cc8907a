-- An org's finished tasks by state, newest first: listing tasks in one terminal state (say
-- the few `canceled` among many `succeeded`) seeks here instead of walking the org's whole
-- history. Written once per task, when it ends; queued and in-flight states are listed
-- from their own partial indexes.
CREATE INDEX tasks_finished ON tasks(org_id, state, id) WHERE expires_at IS NOT NULL;
