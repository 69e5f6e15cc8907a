-- The claim picks the oldest queued tasks of an org by (created_at, id). With the index on
-- (org_id, state, created_at) alone, SQLite sorted every queued row of the org in a temporary
-- B-tree to find them (O(queue) per claim); with id in the index the order is the index's.
CREATE INDEX tasks_queue_order ON tasks(org_id, state, created_at, id);
DROP INDEX tasks_queue;
