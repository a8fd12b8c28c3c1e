ALTER TABLE accounts DROP COLUMN phone;
