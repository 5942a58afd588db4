-- Failed sign-ins per email (known or not, so throttling reveals nothing).
CREATE TABLE login_throttle (
    email            text        PRIMARY KEY,
    failures         integer     NOT NULL,
    window_started   timestamptz NOT NULL,
    locked_until     timestamptz
);
