-- order-service keeps orders only as events (crates/es-postgres migrations);
-- read models arrive with their own migrations. This marks the service schema
-- baseline so later migrations have a predecessor.
SELECT 1;
