-- belay:no-transaction
DROP INDEX CONCURRENTLY IF EXISTS user_sessions_user_id_idx;
