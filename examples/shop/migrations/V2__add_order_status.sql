-- Release 1.2: orders get a status. A constant default: no table rewrite, but ALTER TABLE
-- still needs a brief ACCESS EXCLUSIVE lock on orders.
ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'paid';
