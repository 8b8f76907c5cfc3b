//! Traces from the real binary to an in-process OTLP receiver, over gRPC and over
//! HTTP/protobuf: span shape, continued `traceparent`, sampling, the flush at shutdown,
//! and the trace id on log lines.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{body::Bytes, routing::post, Router};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use prost::Message;

use crate::helpers::spawn_binary;

type Spans = Arc<Mutex<Vec<Span>>>;

fn collect(spans: &Spans, request: ExportTraceServiceRequest) {
    let mut all = spans.lock().unwrap();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            all.extend(scope.spans);
        }
    }
}

struct GrpcReceiver(Spans);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        collect(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn grpc_receiver() -> (SocketAddr, Spans) {
    let spans = Spans::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(GrpcReceiver(spans.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, spans)
}

async fn http_receiver() -> (SocketAddr, Spans) {
    let spans = Spans::default();
    let sink = spans.clone();
    let router = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| async move {
            let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            collect(&sink, request);
            ExportTraceServiceResponse::default().encode_to_vec()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr, spans)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        a.value.as_ref()?.value.as_ref().map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            Value::BoolValue(b) => b.to_string(),
            Value::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
    })
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends one traced request and one untraced, stops the service, and checks the spans.
async fn traced_request_round_trip(
    protocol: &str,
    receiver: (SocketAddr, Spans),
    rust_log: &str,
) -> Vec<String> {
    let (addr, spans) = receiver;
    let service = spawn_binary(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
        ("OTEL_SERVICE_NAME", "fib-under-test".into()),
        // Export only at shutdown, so the test sees the flush after the drain.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".into()),
        // Sample nothing on our own, but follow a sampled parent.
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()),
        ("OTEL_TRACES_SAMPLER_ARG", "0".into()),
        ("RUST_LOG", rust_log.into()),
    ])
    .await;
    let client = reqwest::Client::new();
    let traced = client
        .get(format!("{}/fibonacci?n=321", service.base()))
        .header("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01"))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(traced.status(), 200);
    let untraced = client
        .get(format!("{}/fibonacci?n=5", service.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(untraced.status(), 200);
    assert!(
        spans.lock().unwrap().is_empty(),
        "nothing exported before shutdown (batch delay)"
    );

    let (status, lines) = service.terminate();
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
    let spans = spans.lock().unwrap().clone();
    let server = spans
        .iter()
        .find(|s| s.name == "GET /fibonacci")
        .unwrap_or_else(|| {
            panic!(
                "{protocol}: no server span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
    assert_eq!(
        hex(&server.trace_id),
        TRACE_ID,
        "continues the incoming trace"
    );
    assert_eq!(
        hex(&server.parent_span_id),
        PARENT_ID,
        "child of the caller's span"
    );
    assert_eq!(server.kind, 2, "SPAN_KIND_SERVER");
    for (key, value) in [
        ("http.request.method", "GET"),
        ("http.route", "/fibonacci"),
        ("url.path", "/fibonacci"),
        ("http.response.status_code", "200"),
        ("client.address", "127.0.0.1"),
        ("http.request.header.x-request-id", "req-42"),
    ] {
        assert_eq!(
            attribute(server, key).as_deref(),
            Some(value),
            "{protocol}: {key}"
        );
    }
    for child in ["cache.memory", "fibonacci.compute"] {
        let span = spans
            .iter()
            .find(|s| s.name == child)
            .unwrap_or_else(|| panic!("{protocol}: no {child} span"));
        assert_eq!(
            hex(&span.trace_id),
            TRACE_ID,
            "{child} is in the same trace"
        );
        assert_eq!(
            attribute(span, "n").as_deref(),
            Some("321"),
            "{child} carries n"
        );
    }
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) == TRACE_ID),
        "the unparented request was not sampled (ratio 0)"
    );
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_arrive_over_grpc_even_with_logs_at_warn() {
    traced_request_round_trip("grpc", grpc_receiver().await, "warn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_arrive_over_http_and_log_lines_carry_the_trace_id() {
    let lines = traced_request_round_trip("http/protobuf", http_receiver().await, "info").await;
    let request_line = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| {
            l["message"] == "request" && l["route"] == "/fibonacci" && l["trace_id"] == TRACE_ID
        })
        .unwrap_or_else(|| panic!("no request log line with the trace id in {lines:#?}"));
    assert_eq!(request_line["status"], 200);
    assert_eq!(request_line["span_id"].as_str().map(str::len), Some(16));
}

/// Every export the binary makes to an OTLP/HTTP receiver, whole (resources included).
async fn export_receiver() -> (SocketAddr, Arc<Mutex<Vec<ExportTraceServiceRequest>>>) {
    let exports = Arc::new(Mutex::new(Vec::new()));
    let sink = exports.clone();
    let router = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| async move {
            let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            sink.lock().unwrap().push(request);
            ExportTraceServiceResponse::default().encode_to_vec()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr, exports)
}

/// The resource attributes of what the binary exported with `env`, after one request.
async fn exported_resources(env: &[(&str, String)]) -> Vec<(String, String)> {
    let (addr, exports) = export_receiver().await;
    let mut env = env.to_vec();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")));
    let service = spawn_binary(&env).await;
    let response = reqwest::get(format!("{}/fibonacci?n=3", service.base()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, _) = service.terminate();
    assert!(status.success());
    let exports = exports.lock().unwrap();
    exports
        .iter()
        .flat_map(|e| &e.resource_spans)
        .filter_map(|r| r.resource.as_ref())
        .flat_map(|r| &r.attributes)
        .filter_map(|a| match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(v) => Some((a.key.clone(), v.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_settings_change_what_is_exported() {
    let named = exported_resources(&[
        ("OTEL_SERVICE_NAME", "fib-renamed".into()),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=test".into(),
        ),
    ])
    .await;
    assert!(
        named.contains(&("service.name".into(), "fib-renamed".into())),
        "OTEL_SERVICE_NAME: {named:?}"
    );
    assert!(
        named.contains(&("deployment.environment".into(), "test".into())),
        "OTEL_RESOURCE_ATTRIBUTES: {named:?}"
    );
    let default = exported_resources(&[]).await;
    assert!(
        default.contains(&("service.name".into(), "fibonacci-api".into())),
        "unnamed, the crate's name: {default:?}"
    );
    let disabled = exported_resources(&[("OTEL_SDK_DISABLED", "true".into())]).await;
    assert!(
        disabled.is_empty(),
        "OTEL_SDK_DISABLED=true exports nothing: {disabled:?}"
    );
}
