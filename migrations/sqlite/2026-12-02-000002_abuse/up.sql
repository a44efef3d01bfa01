-- Client addresses refused before any work (an IPv4 address, or an IPv6 /64), until `until`.
CREATE TABLE ip_blocks (
    address TEXT PRIMARY KEY NOT NULL,
    until TIMESTAMP NOT NULL,
    reason TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE INDEX ip_blocks_until ON ip_blocks (until);

-- One row per account created, per device key it was created from (`id:<device_id>`,
-- `fp:<device_fingerprint>`), for the per-device registration limit.
CREATE TABLE device_registrations (
    device_key TEXT NOT NULL,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (device_key, user_id)
);
CREATE INDEX device_registrations_recent ON device_registrations (device_key, created_at);
