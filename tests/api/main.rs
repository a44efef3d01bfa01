//! Segue's integration tests: one binary, one module per area. Every store-backed test runs
//! on SQLite and on PostgreSQL (`on_both_backends!`), each with a database of its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod helpers;
mod phoenix;
#[path = "../support/wire.rs"]
mod wire;

mod accounts;
mod artwork;
mod backpressure;
mod backups;
mod blobs;
mod bus;
mod cache;
mod catalog;
mod cluster;
mod exports;
mod failures;
mod faults;
mod fuzz;
mod health;
mod ingest;
mod ingest_cluster;
mod ingest_trust;
mod jobs;
mod jobs_cluster;
mod phoenix_js;
mod presence;
mod queue;
mod queue_sync;
mod ratelimit;
mod settings;
mod socket;
mod web;
