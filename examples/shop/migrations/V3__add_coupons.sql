-- Release 1.3: coupons, and the coupon an order was placed with.
CREATE TABLE coupons (
    code text PRIMARY KEY,
    percent_off integer NOT NULL CHECK (percent_off BETWEEN 1 AND 100)
);
INSERT INTO coupons (code, percent_off) VALUES ('WINTER10', 10), ('WELCOME5', 5);
ALTER TABLE orders ADD COLUMN coupon_code text REFERENCES coupons (code);
