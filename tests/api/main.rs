//! Integration tests: the real app on port 0, driven over real sockets.

mod helpers;

mod api;
mod auth;
mod cache;
mod cluster;
mod config;
mod docs;
mod hygiene;
mod jwks;
mod observability;
mod ratelimit;
mod settings;
mod shutdown;
mod tracing;
