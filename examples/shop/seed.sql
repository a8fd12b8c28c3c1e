-- The shop as it runs today, before belay manages its schema: accounts, their orders, and
-- the table the application logs failed checkouts to (which the demo's probe watches).
CREATE TABLE accounts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts (id),
    total_cents integer NOT NULL CHECK (total_cents > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_account_id_idx ON orders (account_id);
CREATE TABLE checkout_errors (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    message text NOT NULL
);
INSERT INTO accounts (email, name) VALUES
    ('ada@example.com', 'Ada Lovelace'),
    ('grace@example.com', 'Grace Hopper'),
    ('alan@example.com', 'Alan Turing'),
    ('edsger@example.com', 'Edsger Dijkstra'),
    ('barbara@example.com', 'Barbara Liskov');
INSERT INTO orders (account_id, total_cents)
SELECT 1 + g % 5, 500 + (g * 731) % 9000 FROM generate_series(1, 40) g;
