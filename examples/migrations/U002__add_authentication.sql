-- belay:tables=users
ALTER TABLE users
    DROP COLUMN account_locked_until,
    DROP COLUMN failed_login_attempts,
    DROP COLUMN last_login,
    DROP COLUMN password_hash;
