-- As migrations/sqlite/0004_machine_host.sql.
ALTER TABLE machines ADD COLUMN host TEXT;
