-- Leases: the lock's holder renews it; one not renewed for the lease's length is expired.
ALTER TABLE locks ADD COLUMN renewed_at INTEGER NOT NULL DEFAULT 0;
