//! fibonacci-api: exact Fibonacci numbers over HTTP, built as a production service.
//!
//! The crate map. The modules depend one way: the HTTP layer on the state, the state on
//! the domain; the domain knows nothing of HTTP.
//!
//! - Start-up: [`config`] (every setting, declared once), [`startup`] (build, serve,
//!   drain: [`Application`] is the seam for `main` and the tests), [`telemetry`] (logs,
//!   traces), [`shutdown`] (lifecycle phases, signals), [`healthcheck`] (the probe
//!   subcommand).
//! - HTTP layer, [`http`]: the accept loop and its per-connection limits, the router, the
//!   observation and admission layers, the endpoints and the one error type.
//! - State, [`state`]: what every request shares.
//! - Domain: [`fib`] (the computation), [`input`] (parsing `n`), [`cache`] (memory →
//!   Redis → computation), [`ratelimit`] (per-client windows, in Redis or in process),
//!   [`auth`] (optional JWTs), [`redis_client`] (the Redis connection) and [`breaker`]
//!   (its circuit breaker), [`metrics`] (the registry and the contract's names).
#![forbid(unsafe_code)]

pub mod auth;
pub mod breaker;
pub mod cache;
pub mod config;
pub mod fib;
pub mod healthcheck;
pub mod http;
pub mod input;
pub mod metrics;
pub mod ratelimit;
pub mod redis_client;
pub mod shutdown;
pub mod startup;
pub mod state;
pub mod telemetry;

pub use startup::{Application, Stopped};
