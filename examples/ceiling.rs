//! The ceiling for the load benchmark: the same framework on the same runtime doing
//! nothing but returning the precomputed body of `/fibonacci?n=1000` (no middleware, no
//! parsing, no cache). The service's throughput is quoted as a ratio of this one's.
//!
//! `cargo run --release --example ceiling -- 127.0.0.1:5999`

use axum::{http::header, routing::get, Router};

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:5999".into());
    let body = format!(
        r#"{{"n":1000,"fibonacci":{}}}"#,
        fibonacci_api::fib::fibonacci_decimal(1000)
    );
    let body = bytes::Bytes::from(body);
    let app = Router::new().route(
        "/fibonacci",
        get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    axum::serve(listener, app).await.expect("serve");
}
