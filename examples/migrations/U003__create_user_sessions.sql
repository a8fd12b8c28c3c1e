-- belay:tables=user_sessions
DROP TABLE user_sessions;
