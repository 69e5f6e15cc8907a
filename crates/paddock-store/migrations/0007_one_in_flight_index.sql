-- The tasks in flight in one partial index, by agent and lease, instead of two (by agent; by
-- lease): a claim and a result each write one index page fewer. An agent's lookups use its
-- prefix; the lost-lease sweep and the org cap read the whole index, which holds only the
-- tasks in flight (bounded by the connected agents' slots).
DROP INDEX tasks_in_flight;
DROP INDEX tasks_leases;
CREATE INDEX tasks_in_flight ON tasks(agent_id, lease_expires_at) WHERE state IN ('dispatched', 'running');
