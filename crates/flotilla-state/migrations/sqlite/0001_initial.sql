-- The first schema: deployments, their machines with facts, builds/generations, the ledger,
-- and a lock per deployment.
CREATE TABLE deployments (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    file        TEXT,
    description TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE machines (
    id            INTEGER PRIMARY KEY,
    deployment_id INTEGER NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    platform      TEXT NOT NULL,
    platform_spec TEXT NOT NULL,   -- JSON, the checked `platform` option
    tags          TEXT NOT NULL,   -- JSON list of strings
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    UNIQUE (deployment_id, name)
);

CREATE TABLE facts (
    machine_id INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,      -- JSON
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (machine_id, key)
);

-- A toplevel built for a machine, and (once activated) the generation it became there.
CREATE TABLE generations (
    id           INTEGER PRIMARY KEY,
    machine_id   INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    number       INTEGER,          -- the agent's generation number, NULL until activated
    toplevel     TEXT NOT NULL,
    drv          TEXT,
    status       TEXT NOT NULL,    -- built | active | superseded | failed | rolled-back
    built_at     INTEGER NOT NULL,
    activated_at INTEGER
);
CREATE INDEX generations_machine ON generations (machine_id, built_at);

-- The ledger. It names its deployment by name, not by key, so it outlives `delete`.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY,
    deployment TEXT NOT NULL,
    machine    TEXT,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    status     TEXT NOT NULL,
    message    TEXT NOT NULL DEFAULT '',
    details    TEXT               -- JSON
);
CREATE INDEX events_deployment ON events (deployment, at);

CREATE TABLE locks (
    deployment_id INTEGER PRIMARY KEY REFERENCES deployments(id) ON DELETE CASCADE,
    holder        TEXT NOT NULL,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    since         INTEGER NOT NULL
);
