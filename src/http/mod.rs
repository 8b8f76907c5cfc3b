//! The HTTP layer: the accept loop ([`server`]), the router ([`router`]) and the layers
//! around the routes ([`observe`] on all, [`admit`] on the API), the endpoints ([`routes`]) and the one error type
//! ([`error`]). Everything here is about requests and responses; the state and the
//! domain below know nothing of it.

pub mod admit;
pub mod client;
pub mod error;
pub mod observe;
pub mod router;
pub mod routes;
pub mod server;

pub use router::{admin_router, router, router_with, Api};
