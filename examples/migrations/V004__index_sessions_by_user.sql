-- belay:no-transaction
-- Built CONCURRENTLY so writes to user_sessions continue while it builds; that cannot
-- run inside a transaction, so belay records this migration as running first and marks
-- it done after, and drops the INVALID index a failed build would leave behind.
CREATE INDEX CONCURRENTLY IF NOT EXISTS user_sessions_user_id_idx
    ON user_sessions (user_id);
