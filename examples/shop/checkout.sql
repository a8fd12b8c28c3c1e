-- One checkout of the application's new release, run every 250 ms by the demo from its
-- own connection. With release 1.3 (orders.coupon_code exists) checkout applies a coupon,
-- and its coupon code path is broken: the order is written, and so is an error. On the
-- old schema it takes the old path and succeeds. The order comes first, so a checkout
-- racing the undo of coupon_code fails as a whole instead of logging a stray error.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = 'public' AND table_name = 'orders' AND column_name = 'coupon_code') THEN
        INSERT INTO orders (account_id, total_cents, coupon_code) VALUES (2, 4500, 'WINTER10');
        INSERT INTO checkout_errors (message) VALUES ('checkout: coupon WINTER10 applied twice');
    ELSE
        INSERT INTO orders (account_id, total_cents) VALUES (2, 4500);
    END IF;
END $$;
