-- Deployment locks keyed by name: the first deploy of a deployment takes its lock before the
-- deployment has a row. The process start time tells a live holder from a reused pid.
DROP TABLE locks;
CREATE TABLE locks (
    deployment TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,    -- user@host
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    pid_start  INTEGER NOT NULL, -- the holder's start time (clock ticks since boot), 0 if unknown
    command    TEXT NOT NULL,
    since      INTEGER NOT NULL
);
