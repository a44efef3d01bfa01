//! Segue: a realtime hub that keeps a listener's devices in step.
//!
//! Modules, in the direction data flows:
//!
//! * [`settings`]: typed, layered configuration (defaults, `SEGUE_CONFIG` file, environment).
//! * [`startup`]: builds every part and binds the listener; [`startup::Application`].
//! * [`http`]: the REST API (accounts, catalog, health) and its extractors.
//! * [`auth`]: password hashing, access tokens, refresh-token sessions.
//! * [`domain`]: values parsed once at the edge (`Handle`, `DeviceId`, `TrackId`, …).
//! * [`store`]: the system of record, Diesel on PostgreSQL or SQLite.
//! * [`redis`]: the Redis pool (the bus and hot store once configured).
//! * [`telemetry`]: logs and Prometheus metrics.
//! * [`error`]: the one HTTP error type.
//!
//! ```text
//! client ─HTTP─▶ http (parse, authenticate) ─▶ store (Diesel) ─▶ PostgreSQL | SQLite
//!                     │
//!                     └─▶ auth (argon2, JWT, refresh families)
//! ```
//!
//! Dependencies point the way data flows: `http` → `auth` → `store`; nothing in `store`
//! imports `http`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]

pub mod auth;
pub mod domain;
pub mod error;
pub mod http;
pub mod redis;
pub mod settings;
pub mod startup;
pub mod store;
pub mod telemetry;
