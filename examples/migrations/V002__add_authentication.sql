-- Authentication columns. Nullable, or with constant defaults: PostgreSQL adds them
-- without rewriting the table, so the ACCESS EXCLUSIVE lock is held for milliseconds —
-- and belay's short lock_timeout keeps the app's queries from queueing behind it.
-- belay:tables=users
ALTER TABLE users
    ADD COLUMN password_hash         text,
    ADD COLUMN last_login            timestamptz,
    ADD COLUMN failed_login_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN account_locked_until  timestamptz;
