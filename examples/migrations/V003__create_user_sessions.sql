-- Sessions of logged-in users. The table is new and empty, so its foreign key is
-- validated instantly; on an existing table it would be added NOT VALID first.
-- belay:tables=user_sessions
CREATE TABLE user_sessions (
    id          uuid        PRIMARY KEY,
    user_id     bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CHECK (expires_at > created_at)
);
