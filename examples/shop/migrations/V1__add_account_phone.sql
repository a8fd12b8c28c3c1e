-- Release 1.1: accounts may leave a phone number.
ALTER TABLE accounts ADD COLUMN phone text;
