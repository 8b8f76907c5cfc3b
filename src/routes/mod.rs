//! The endpoints, one file per group, and the OpenAPI document that describes them.

pub mod fibonacci;
pub mod openapi;
pub mod probes;
