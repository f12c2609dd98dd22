-- The deployer host holding a local or qemu machine (its root, its GC roots); NULL for the rest.
ALTER TABLE machines ADD COLUMN host TEXT;
