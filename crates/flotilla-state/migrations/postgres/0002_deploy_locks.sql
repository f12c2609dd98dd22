-- As migrations/sqlite/0002_deploy_locks.sql.
DROP TABLE locks;
CREATE TABLE locks (
    deployment TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    host       TEXT NOT NULL,
    pid        BIGINT NOT NULL,
    pid_start  BIGINT NOT NULL,
    command    TEXT NOT NULL,
    since      BIGINT NOT NULL
);
