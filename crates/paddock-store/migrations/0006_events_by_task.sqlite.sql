-- A task's events, stored in the order they are read (by task, then id): one B-tree instead
-- of three (the rowid table, the primary key on id and the (task_id, id) index), so a claim's
-- `dispatched` event writes one WAL frame instead of three. Ids stay UUIDv7, unique per task.
CREATE TABLE task_events_by_task (
    task_id TEXT NOT NULL,
    id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (task_id, id)
) WITHOUT ROWID;
INSERT INTO task_events_by_task (task_id, id, attempt, name, payload, created_at)
    SELECT task_id, id, attempt, name, payload, created_at FROM task_events;
DROP TABLE task_events;
ALTER TABLE task_events_by_task RENAME TO task_events;
