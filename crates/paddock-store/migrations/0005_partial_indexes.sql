-- Each index of `tasks` covers only the rows its queries look at, so a task's state changes
-- write fewer index pages: before, every transition rewrote an entry in four indexes keyed on
-- the state (or on columns a transition sets); now a submission touches the queue's index,
-- a claim moves the task from it to the in-flight ones, and a result leaves those for the
-- expiry index. (On SQLite each page written is a WAL frame; the round trip of a task wrote
-- 22 frames.)
--
-- Queued work, oldest first per org: claims, the queue-deadline sweep, orgs with work.
DROP INDEX tasks_queue_order;
CREATE INDEX tasks_queued ON tasks(org_id, created_at, id) WHERE state = 'queued';
-- In flight, by agent: an agent's running tasks, heartbeats extending their leases,
-- reconnects; the org cap counts its in-flight tasks from here too (bounded by the agents'
-- slots).
DROP INDEX tasks_agent;
CREATE INDEX tasks_in_flight ON tasks(agent_id) WHERE state IN ('dispatched', 'running');
-- Leases of the tasks in flight: the lost-agent sweep.
DROP INDEX tasks_state_lease;
CREATE INDEX tasks_leases ON tasks(lease_expires_at) WHERE state IN ('dispatched', 'running');
-- Finished tasks (every end sets the time to live): the purge, and the count by state for
-- the metrics (state is here so the count reads the index alone).
DROP INDEX tasks_expires;
CREATE INDEX tasks_expiring ON tasks(expires_at, state) WHERE expires_at IS NOT NULL;
-- An org's tasks, newest first (listing, with or without a state): written once per task.
CREATE INDEX tasks_org ON tasks(org_id, id);
