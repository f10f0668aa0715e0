//! One export attempt over OTLP/gRPC (tonic) or OTLP/HTTP (hyper, protobuf or JSON), with TLS to the
//! collector, and what its answer means: accepted (maybe partially), retry (maybe after a delay the
//! collector asked for), or failed for good.
//!
//! weft owns this part rather than `opentelemetry-otlp`'s `SpanExporter`: 0.33 neither reads
//! `OTEL_EXPORTER_OTLP_CERTIFICATE` nor hands a gRPC partial success back to its caller (it only logs
//! it), and the retry rules below need the status details (`RetryInfo`) and `Retry-After`.
//!
//! Retryable (the OTLP specification's "Failures" sections): gRPC `CANCELLED`, `DEADLINE_EXCEEDED`,
//! `ABORTED`, `OUT_OF_RANGE`, `UNAVAILABLE`, `DATA_LOSS`, and `RESOURCE_EXHAUSTED` only when the status
//! carries `google.rpc.RetryInfo` (the server says it can recover); HTTP 429, 502, 503, 504; a
//! connection that fails or times out. Everything else drops the batch.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceResponse,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, ClientTlsConfig};

use super::config::{Config, Protocol};
use crate::telemetry::trace::{self, Span};

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A certificate or key file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{0}: no PEM certificate or key in it")]
    Pem(PathBuf),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The endpoint was refused by the gRPC client.
    #[error("endpoint: {0}")]
    Endpoint(#[from] tonic::transport::Error),
}

/// What one attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// The collector took the request; `partial` when it rejected some spans.
    Accepted(Option<ExportTracePartialSuccess>),
    /// Worth another try (after `after`, when the collector said so).
    Retry {
        /// The collector's requested delay.
        after: Option<Duration>,
        /// For the log.
        why: String,
    },
    /// Not worth another try: the batch is dropped.
    Failed(String),
}

/// Largest response body read (a partial-success message is small).
const MAX_RESPONSE: usize = 64 * 1024;

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// A connected (lazily) transport to the collector.
pub struct Wire {
    transport: Transport,
    headers: HeaderMap,
    timeout: Duration,
    gzip: bool,
}

// One per sidecar, made once: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Transport {
    Grpc(tonic::client::Grpc<Channel>),
    Http {
        client: HttpClient,
        url: http::Uri,
        json: bool,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, WireError> {
    std::fs::read(path).map_err(|source| WireError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The roots to trust: `_CERTIFICATE`'s, else the system's.
fn roots(certificate: Option<&Path>) -> Result<rustls::RootCertStore, WireError> {
    let mut roots = rustls::RootCertStore::empty();
    match certificate {
        Some(path) => {
            let pem = read(path)?;
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .filter_map(Result::ok)
                .collect();
            if certs.is_empty() {
                return Err(WireError::Pem(path.to_owned()));
            }
            for c in certs {
                roots.add(c)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's root certificates");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system roots for the OTLP collector");
        }
    }
    Ok(roots)
}

fn http_tls(cfg: &Config) -> Result<rustls::ClientConfig, WireError> {
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots(cfg.certificate.as_deref())?);
    Ok(match &cfg.client_identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
                .filter_map(Result::ok)
                .collect();
            if chain.is_empty() {
                return Err(WireError::Pem(cert.clone()));
            }
            let key = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|_| WireError::Pem(key.clone()))?;
            builder.with_client_auth_cert(chain, key)?
        }
    })
}

fn grpc_tls(cfg: &Config) -> Result<ClientTlsConfig, WireError> {
    let mut tls = ClientTlsConfig::new();
    tls = match &cfg.certificate {
        Some(path) => tls.ca_certificate(tonic::transport::Certificate::from_pem(read(path)?)),
        None => tls.with_native_roots(),
    };
    if let Some((cert, key)) = &cfg.client_identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ));
    }
    Ok(tls)
}

impl Wire {
    /// Sets up the transport (no connection is made until the first export). Must run inside a
    /// Tokio runtime.
    pub fn new(cfg: &Config) -> Result<Self, WireError> {
        let https = cfg.endpoint.starts_with("https://");
        let transport = match cfg.protocol {
            Protocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())?
                    .connect_timeout(cfg.timeout.min(Duration::from_secs(5)));
                if https {
                    endpoint = endpoint.tls_config(grpc_tls(cfg)?)?;
                }
                let mut client = tonic::client::Grpc::new(endpoint.connect_lazy())
                    .accept_compressed(CompressionEncoding::Gzip);
                if cfg.gzip {
                    client = client.send_compressed(CompressionEncoding::Gzip);
                }
                Transport::Grpc(client)
            }
            Protocol::HttpProtobuf | Protocol::HttpJson => {
                let url = cfg
                    .endpoint
                    .parse::<http::Uri>()
                    .map_err(|e| WireError::Tls(rustls::Error::General(e.to_string())))?;
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(http_tls(cfg)?)
                    .https_or_http()
                    .enable_http1()
                    .enable_http2()
                    .build();
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build(connector);
                Transport::Http {
                    client,
                    url,
                    json: cfg.protocol == Protocol::HttpJson,
                }
            }
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            headers.append(k.clone(), v.clone());
        }
        Ok(Self {
            transport,
            headers,
            timeout: cfg.timeout,
            gzip: cfg.gzip,
        })
    }

    /// The batch as the bytes every attempt sends: encoded (and compressed, over HTTP) once, so
    /// that a retry costs no copy of the batch. Protobuf is written directly (`protobuf`); JSON
    /// goes through the OTLP types' serde form.
    pub fn prepare(
        &self,
        batch: &[Span],
        resource: &[(&'static str, String)],
    ) -> Result<Bytes, String> {
        let body = match &self.transport {
            Transport::Http { json: true, .. } => {
                serde_json::to_vec(&trace::request(batch, resource))
                    .map_err(|e| format!("JSON encoding: {e}"))?
            }
            _ => super::protobuf::request(batch, resource),
        };
        match &self.transport {
            Transport::Http { .. } if self.gzip => gzip(&body)
                .map(Bytes::from)
                .map_err(|e| format!("gzip: {e}")),
            _ => Ok(Bytes::from(body)),
        }
    }

    /// One attempt with a [`Wire::prepare`]d batch, bounded by the per-attempt timeout.
    pub async fn send(&self, payload: &Bytes) -> Sent {
        match tokio::time::timeout(self.timeout, self.attempt(payload)).await {
            Ok(sent) => sent,
            Err(_) => Sent::Retry {
                after: None,
                why: format!("no answer within {:?}", self.timeout),
            },
        }
    }

    async fn attempt(&self, payload: &Bytes) -> Sent {
        match &self.transport {
            Transport::Grpc(client) => {
                let mut request = tonic::Request::from_parts(
                    tonic::metadata::MetadataMap::from_headers(self.headers.clone()),
                    Default::default(),
                    Encoded(payload.clone()),
                );
                request.set_timeout(self.timeout);
                let mut client = client.clone();
                if let Err(e) = client.ready().await {
                    return Sent::Retry {
                        after: None,
                        why: format!("connection: {e}"),
                    };
                }
                let codec =
                    tonic_prost::ProstCodec::<Encoded, ExportTraceServiceResponse>::default();
                let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
                match client.unary(request, path, codec).await {
                    Ok(resp) => Sent::Accepted(resp.into_inner().partial_success),
                    Err(status) => grpc_verdict(&status),
                }
            }
            Transport::Http { client, url, json } => {
                let mut r = http::Request::post(url.clone());
                if let Some(h) = r.headers_mut() {
                    h.clone_from(&self.headers);
                    h.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static(if *json {
                            "application/json"
                        } else {
                            "application/x-protobuf"
                        }),
                    );
                    if self.gzip {
                        h.insert(
                            http::header::CONTENT_ENCODING,
                            HeaderValue::from_static("gzip"),
                        );
                    }
                    h.insert(
                        http::header::USER_AGENT,
                        HeaderValue::from_static(concat!(
                            "weft-sidecar/",
                            env!("CARGO_PKG_VERSION")
                        )),
                    );
                }
                let r = match r.body(Full::new(payload.clone())) {
                    Ok(r) => r,
                    Err(e) => return Sent::Failed(format!("request: {e}")),
                };
                let resp = match client.request(r).await {
                    Ok(resp) => resp,
                    Err(e) => {
                        return Sent::Retry {
                            after: None,
                            why: format!("connection: {e}"),
                        };
                    }
                };
                let status = resp.status();
                let retry_after = resp.headers().get(http::header::RETRY_AFTER).cloned();
                let json_reply = resp
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
                let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                if status.is_success() {
                    Sent::Accepted(partial_success(&body, json_reply))
                } else {
                    http_verdict(status, retry_after.as_ref(), SystemTime::now())
                }
            }
        }
    }
}

/// The OTLP/gRPC method.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// An `ExportTraceServiceRequest` already encoded: tonic's prost codec writes its bytes as they
/// are, so a retried batch is sent again without being copied or encoded again.
#[derive(Debug, Clone, Default, PartialEq)]
struct Encoded(Bytes);

impl prost::Message for Encoded {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Never decoded (it is only sent); skipping keeps the trait's contract.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(body)?;
    enc.finish()
}

/// The partial success in an OTLP/HTTP reply body (protobuf, or JSON when the reply says so); an
/// empty or unreadable body is a full success (the specification: the client must not retry it).
fn partial_success(body: &[u8], json: bool) -> Option<ExportTracePartialSuccess> {
    if body.is_empty() {
        return None;
    }
    if json {
        // Read by hand: the JSON mapping sends int64 as a string, but collectors also send numbers,
        // and the generated serde types accept only one form.
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let p = v.get("partialSuccess")?;
        let rejected_spans = match p.get("rejectedSpans") {
            Some(serde_json::Value::String(s)) => s.parse().unwrap_or(0),
            Some(n) => n.as_i64().unwrap_or(0),
            None => 0,
        };
        let error_message = p
            .get("errorMessage")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        return Some(ExportTracePartialSuccess {
            rejected_spans,
            error_message,
        });
    }
    let resp: ExportTraceServiceResponse = prost::Message::decode(body).ok()?;
    resp.partial_success
}

// `google.rpc.Status` and `google.rpc.RetryInfo`, the two messages read from a gRPC error's details.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// The `RetryInfo` delay in a gRPC status's details (`grpc-status-details-bin`), if any.
fn retry_info(details: &[u8]) -> Option<Duration> {
    let status: RpcStatus = prost::Message::decode(details).ok()?;
    status.details.iter().find_map(|d| {
        if d.type_url.rsplit('/').next() != Some("google.rpc.RetryInfo") {
            return None;
        }
        let info: RetryInfo = prost::Message::decode(d.value.as_slice()).ok()?;
        let delay = info.retry_delay.unwrap_or_default();
        Some(Duration::new(
            u64::try_from(delay.seconds).unwrap_or(0),
            u32::try_from(delay.nanos).unwrap_or(0),
        ))
    })
}

/// What a gRPC error status means for the batch.
pub fn grpc_verdict(status: &tonic::Status) -> Sent {
    use tonic::Code;
    let why = format!("gRPC {:?}: {}", status.code(), status.message());
    let info = retry_info(status.details());
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => Sent::Retry { after: info, why },
        // Only a server that says when it can take more is retried: without RetryInfo the quota is
        // not expected to recover soon (the specification's rule).
        Code::ResourceExhausted if info.is_some() => Sent::Retry { after: info, why },
        _ => Sent::Failed(why),
    }
}

/// `Retry-After`: delay-seconds or an HTTP date.
fn retry_after(v: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// What a non-2xx OTLP/HTTP status means for the batch.
pub fn http_verdict(status: StatusCode, after: Option<&HeaderValue>, now: SystemTime) -> Sent {
    let why = format!("HTTP {status}");
    match status.as_u16() {
        429 | 502 | 503 | 504 => Sent::Retry {
            after: after.and_then(|v| retry_after(v, now)),
            why,
        },
        _ => Sent::Failed(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    #[test]
    fn an_encoded_batch_goes_out_as_the_request_it_was() {
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span {
                        name: "n".into(),
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let bytes = Bytes::from(prost::Message::encode_to_vec(&req));
        let sent = prost::Message::encode_to_vec(&Encoded(bytes.clone()));
        assert_eq!(sent, bytes.as_ref());
        let back: ExportTraceServiceRequest = prost::Message::decode(sent.as_slice()).unwrap();
        assert_eq!(back, req);
    }

    fn status_with_retry_info(code: tonic::Code, delay: Option<(i64, i32)>) -> tonic::Status {
        let details = delay.map(|(seconds, nanos)| Any {
            type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
            value: prost::Message::encode_to_vec(&RetryInfo {
                retry_delay: Some(ProtoDuration { seconds, nanos }),
            }),
        });
        let status = RpcStatus {
            code: code as i32,
            message: "busy".into(),
            details: details.into_iter().collect(),
        };
        tonic::Status::with_details(
            code,
            "busy",
            Bytes::from(prost::Message::encode_to_vec(&status)),
        )
    }

    #[test]
    fn grpc_codes_are_classified_as_the_specification_says() {
        use tonic::Code::*;
        for code in [
            Cancelled,
            DeadlineExceeded,
            Aborted,
            OutOfRange,
            Unavailable,
            DataLoss,
        ] {
            assert!(
                matches!(
                    grpc_verdict(&tonic::Status::new(code, "x")),
                    Sent::Retry { after: None, .. }
                ),
                "{code:?}"
            );
        }
        for code in [
            Unknown,
            InvalidArgument,
            NotFound,
            AlreadyExists,
            PermissionDenied,
            FailedPrecondition,
            Unimplemented,
            Internal,
            Unauthenticated,
            ResourceExhausted,
        ] {
            assert!(
                matches!(
                    grpc_verdict(&tonic::Status::new(code, "x")),
                    Sent::Failed(_)
                ),
                "{code:?}"
            );
        }
        // RESOURCE_EXHAUSTED with RetryInfo: retried after the server's delay.
        assert!(matches!(
            grpc_verdict(&status_with_retry_info(ResourceExhausted, Some((2, 500_000_000)))),
            Sent::Retry { after: Some(d), .. } if d == Duration::from_millis(2500)
        ));
        assert!(matches!(
            grpc_verdict(&status_with_retry_info(Unavailable, Some((1, 0)))),
            Sent::Retry { after: Some(d), .. } if d == Duration::from_secs(1)
        ));
        // Details without RetryInfo do not make RESOURCE_EXHAUSTED retryable.
        assert!(matches!(
            grpc_verdict(&status_with_retry_info(ResourceExhausted, None)),
            Sent::Failed(_)
        ));
    }

    #[test]
    fn http_statuses_and_retry_after() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for code in [429, 502, 503, 504] {
            let s = StatusCode::from_u16(code).unwrap();
            assert!(matches!(
                http_verdict(s, None, now),
                Sent::Retry { after: None, .. }
            ));
        }
        for code in [400, 401, 403, 404, 413, 500, 501] {
            let s = StatusCode::from_u16(code).unwrap();
            assert!(
                matches!(http_verdict(s, None, now), Sent::Failed(_)),
                "{code}"
            );
        }
        let secs = HeaderValue::from_static("7");
        assert!(matches!(
            http_verdict(StatusCode::TOO_MANY_REQUESTS, Some(&secs), now),
            Sent::Retry { after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        let date =
            HeaderValue::from_str(&httpdate::fmt_http_date(now + Duration::from_secs(30))).unwrap();
        assert!(matches!(
            http_verdict(StatusCode::SERVICE_UNAVAILABLE, Some(&date), now),
            Sent::Retry { after: Some(d), .. } if d == Duration::from_secs(30)
        ));
        // A date in the past: retry now; garbage: the exporter's own backoff.
        let past =
            HeaderValue::from_str(&httpdate::fmt_http_date(now - Duration::from_secs(30))).unwrap();
        assert!(matches!(
            http_verdict(StatusCode::SERVICE_UNAVAILABLE, Some(&past), now),
            Sent::Retry {
                after: Some(Duration::ZERO),
                ..
            }
        ));
        let junk = HeaderValue::from_static("soon");
        assert!(matches!(
            http_verdict(StatusCode::BAD_GATEWAY, Some(&junk), now),
            Sent::Retry { after: None, .. }
        ));
    }

    #[tokio::test]
    async fn unreadable_or_empty_tls_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here").unwrap();
        let mut warnings = Vec::new();
        for protocol in ["grpc", "http/protobuf"] {
            let env = |k: &str| match k {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("https://127.0.0.1:4317".to_owned()),
                "OTEL_EXPORTER_OTLP_PROTOCOL" => Some(protocol.to_owned()),
                _ => None,
            };
            let cfg = Config::from_env(env, &mut warnings).unwrap();
            assert!(Wire::new(&cfg).is_ok(), "system roots: {protocol}");
            let missing = Config {
                certificate: Some(dir.path().join("missing.pem")),
                ..cfg.clone()
            };
            assert!(matches!(Wire::new(&missing), Err(WireError::Read { .. })));
            let no_key = Config {
                client_identity: Some((empty.clone(), dir.path().join("missing-key.pem"))),
                ..cfg.clone()
            };
            assert!(Wire::new(&no_key).is_err(), "{protocol}");
        }
        // The HTTP side parses the PEM itself (tonic hands it to rustls at the first handshake).
        let http = Config::from_env(
            |k| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "https://c:4318".to_owned()),
            &mut warnings,
        )
        .unwrap();
        let empty_roots = Config {
            certificate: Some(empty.clone()),
            ..http.clone()
        };
        assert!(matches!(Wire::new(&empty_roots), Err(WireError::Pem(_))));
        let empty_client = Config {
            client_identity: Some((empty.clone(), empty.clone())),
            ..http
        };
        assert!(matches!(Wire::new(&empty_client), Err(WireError::Pem(_))));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn http_partial_success_in_protobuf_and_json_replies() {
        let resp = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 3,
                error_message: "too old".into(),
            }),
        };
        let pb = prost::Message::encode_to_vec(&resp);
        assert_eq!(partial_success(&pb, false), resp.partial_success);
        let json = br#"{"partialSuccess":{"rejectedSpans":"3","errorMessage":"too old"}}"#;
        assert_eq!(partial_success(json, true), resp.partial_success);
        let json = br#"{"partialSuccess":{"rejectedSpans":3,"errorMessage":"too old"}}"#;
        assert_eq!(partial_success(json, true), resp.partial_success);
        assert_eq!(partial_success(b"", false), None);
        assert_eq!(partial_success(b"{}", true), None);
        assert_eq!(partial_success(b"\xff\xff", false), None);
    }
}
