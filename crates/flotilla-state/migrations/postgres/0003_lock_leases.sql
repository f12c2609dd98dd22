-- As migrations/sqlite/0003_lock_leases.sql.
ALTER TABLE locks ADD COLUMN renewed_at BIGINT NOT NULL DEFAULT 0;
