//! `otlp-sink`: a minimal OTLP trace receiver that behaves like Jaeger's OTLP ingest (gRPC on one port,
//! HTTP/protobuf `POST /v1/traces` on another) and writes every span it receives as one JSON line to
//! stdout. The e2e tests and the local demo use it where a Jaeger would stand (none can be installed
//! here); point sidecars at a real Jaeger with the same `OTEL_EXPORTER_OTLP_ENDPOINT`.
//!
//! Usage: `otlp-sink [--grpc 127.0.0.1:4317] [--http 127.0.0.1:4318]`. Prints `http listening on ADDR`
//! then `listening on ADDR` (the gRPC one) on stderr-free stdout before the span lines.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Prints each span of a request as a JSON line.
fn emit(req: &ExportTraceServiceRequest) {
    let mut out = std::io::stdout().lock();
    for rs in &req.resource_spans {
        let attrs = |kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]| {
            kvs.iter()
                .map(|kv| {
                    let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(any_value::Value::StringValue(s)) => serde_json::json!(s),
                        Some(any_value::Value::IntValue(i)) => serde_json::json!(i),
                        Some(any_value::Value::BoolValue(b)) => serde_json::json!(b),
                        Some(any_value::Value::DoubleValue(d)) => serde_json::json!(d),
                        _ => serde_json::Value::Null,
                    };
                    (kv.key.clone(), v)
                })
                .collect::<serde_json::Map<_, _>>()
        };
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                let line = serde_json::json!({
                    "trace_id": hex(&s.trace_id),
                    "span_id": hex(&s.span_id),
                    "parent_span_id": hex(&s.parent_span_id),
                    "name": s.name,
                    "trace_state": s.trace_state,
                    "kind": match s.kind { 2 => "server", 3 => "client", _ => "other" },
                    "service": resource.get("service.name").cloned().unwrap_or_default(),
                    "resource": resource,
                    "attributes": attrs(&s.attributes),
                    "events": s.events.iter().map(|e| serde_json::json!({
                        "name": e.name,
                        "attributes": attrs(&e.attributes),
                    })).collect::<Vec<_>>(),
                    "duration_us": s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano) / 1000,
                });
                let _ = writeln!(out, "{line}");
            }
        }
    }
    let _ = out.flush();
}

struct Sink;

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        emit(request.get_ref());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn http_export(
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, hyper::Error> {
    let ok = req.method() == http::Method::POST && req.uri().path() == "/v1/traces";
    let body = req.into_body().collect().await?.to_bytes();
    let status = match (ok, ExportTraceServiceRequest::decode(body)) {
        (true, Ok(r)) => {
            emit(&r);
            http::StatusCode::OK
        }
        _ => http::StatusCode::BAD_REQUEST,
    };
    let mut resp = http::Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    Ok(resp)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut grpc: SocketAddr = "127.0.0.1:4317".parse()?;
    let mut http_addr: SocketAddr = "127.0.0.1:4318".parse()?;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().context("flag without a value")?;
        match a.as_str() {
            "--grpc" => grpc = v.parse().context("--grpc")?,
            "--http" => http_addr = v.parse().context("--http")?,
            other => {
                anyhow::bail!("unknown flag {other}; usage: otlp-sink [--grpc ADDR] [--http ADDR]")
            }
        }
    }
    let http_l = tokio::net::TcpListener::bind(http_addr)
        .await
        .context("bind --http")?;
    let grpc_l = tokio::net::TcpListener::bind(grpc)
        .await
        .context("bind --grpc")?;
    println!("http listening on {}", http_l.local_addr()?);
    println!("listening on {}", grpc_l.local_addr()?);
    std::io::stdout().flush()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = http_l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(http_export))
                    .await;
            });
        }
    });
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc_l))
        .await
        .context("gRPC server")?;
    Ok(())
}
