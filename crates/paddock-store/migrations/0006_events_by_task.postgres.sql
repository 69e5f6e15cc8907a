-- A task's events keyed by (task_id, id), the order they are read in: the primary key
-- replaces the (task_id, id) index, one index fewer to write per event. (SQLite also
-- clusters the table on it: see the .sqlite.sql twin.)
ALTER TABLE task_events DROP CONSTRAINT task_events_pkey;
ALTER TABLE task_events ADD PRIMARY KEY (task_id, id);
DROP INDEX task_events_task;
