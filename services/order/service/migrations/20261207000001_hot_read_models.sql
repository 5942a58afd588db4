-- Every event changes an order's status, so an index on it made every
-- orders_by_user update a non-HOT one: a new tuple and three new index
-- entries per event (measured: 0 of 31,625 updates HOT). ListOrders reads a
-- user's orders newest first on orders_by_user_list_idx and filters the
-- status on the way, so the status index only served that filter.
DROP INDEX IF EXISTS orders_by_user_status_idx;

-- Room on each page for the updated tuple: an update whose new version
-- fits on the same page (and changes no indexed column) is HOT, with no
-- index entry written at all. Applies to pages written from now on.
ALTER TABLE orders_by_user SET (fillfactor = 80);
ALTER TABLE order_summary SET (fillfactor = 80);
