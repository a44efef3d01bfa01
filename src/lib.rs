//! Segue: a realtime hub that keeps a listener's devices in step.
//!
//! Modules, in the direction data flows:
//!
//! * [`settings`]: typed, layered configuration (defaults, `SEGUE_CONFIG` file, environment).
//! * [`startup`]: builds every part and binds the listener; [`startup::Application`].
//! * [`http`]: the REST API (accounts, catalog, health), the socket upgrade, extractors.
//! * [`realtime`]: the Phoenix socket's actors: connection, user session, hub, relay, presence.
//! * [`presence`]: device entries, the presence registry (in-process or Redis), Phoenix
//!   presence views and diffs, play counting.
//! * [`bus`]: the bus between replicas (in-process or Redis pub/sub).
//! * [`auth`]: password hashing, access tokens, refresh-token sessions.
//! * [`domain`]: values parsed once at the edge (`Handle`, `DeviceId`, `TrackId`, …).
//! * [`abuse`]: who the client is, the rate-limit rules, violations and address blocks.
//! * [`ratelimit`]: the limiter port (GCRA in process, or in Redis).
//! * [`cache`]: cache-aside in Redis for hot data several replicas read.
//! * [`jobs`]: background jobs (the port and its in-process implementation so far).
//! * [`store`]: the system of record, Diesel on PostgreSQL or SQLite.
//! * [`redis`]: the Redis pool (the bus and hot store once configured).
//! * [`tcp`]: the TCP stream under every connection, which a socket closed for not reading
//!   aborts at once.
//! * [`telemetry`]: logs and Prometheus metrics.
//! * [`error`]: the one HTTP error type.
//! * [`demo`]: the demo catalog behind `segue seed-demo`.
//!
//! ```text
//! client ─HTTP─▶ http (parse, authenticate) ─▶ store (Diesel) ─▶ PostgreSQL | SQLite
//!   │                 └─▶ auth (argon2, JWT, refresh families)
//!   └─WS─▶ realtime: Connection ─▶ Hub ─▶ UserSession ─▶ Connection(s) ─▶ devices
//!            │                     └─▶ bus ─▶ other replicas' Relay ─▶ Hub ─▶ …
//!            └─▶ Presence ─▶ presence registry (in-process | Redis), then bus
//! ```
//!
//! Dependencies point the way data flows: `http` → `realtime` → `store` / `bus`; nothing in
//! `store` or `bus` imports `realtime` or `http`.

#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod abuse;
pub mod artwork;
pub mod auth;
pub mod backups;
pub mod blobs;
pub mod bus;
pub mod cache;
pub mod clock;
pub mod demo;
pub mod domain;
pub mod error;
pub mod exports;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod presence;
pub mod ratelimit;
pub mod realtime;
pub mod redis;
pub mod settings;
pub mod startup;
pub mod store;
pub mod tcp;
pub mod telemetry;
pub mod upkeep;
