//! An inbound request on its way to the app: the caller's identity stamped on it ([`Caller`]), the
//! server span, then the app on `127.0.0.1` ([`super::app`]); one [`Record`] for metrics, access
//! log and span.

use std::net::SocketAddr;

use http::{Request, Response};
use tokio::net::TcpStream;

use super::Inbound;
use super::app::AppError;
use crate::errors::{ProxyError, rescue};
use crate::http::body::Body;
use crate::http::headers::{check_framing, strip_hop_by_hop};
use crate::inbound::identity::Caller;
use crate::snapshot::Snapshot;
use crate::telemetry::Reporter;
use crate::telemetry::attribute::Value;
use crate::telemetry::record::{Record, SpanFacts};
use crate::telemetry::span_tags;
use crate::telemetry::trace::{Hop, ensure_request_id};

impl Inbound {
    /// Handles one request from a peer (or a plaintext client) end to end; never fails (errors
    /// become responses).
    pub(super) async fn handle(
        &self,
        req: Request<Body>,
        app_port: u16,
        conn: &Caller,
    ) -> Response<Body> {
        let snapshot = self.snapshots.borrow().clone();
        let (parts, body) = req.into_parts();
        let mut record = Record::start(Reporter::Destination, &self.sinks, &parts);
        record.downstream = Some(conn.peer);
        record.source = Some(conn.source.clone());
        record.destination = Some(self.sinks.metrics.this_destination.clone());
        record.mtls = conn.identity.is_some();
        record.route = Some("default");
        let result = self
            .forward(
                &snapshot,
                Request::from_parts(parts, body),
                app_port,
                conn,
                &mut record,
            )
            .await;
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(peer = %conn.peer, error = %e, "inbound request failed");
                record.flags.set(e.flag());
                rescue(&e)
            }
        };
        record.cluster = Some(&conn.cluster);
        record.answer(resp)
    }

    async fn forward<'s>(
        &self,
        snapshot: &'s Snapshot,
        req: Request<Body>,
        app_port: u16,
        conn: &Caller,
        record: &mut Record<'s>,
    ) -> Result<Response<Body>, ProxyError> {
        check_framing(req.headers()).map_err(ProxyError::BadRequest)?;
        let (mut parts, body) = req.into_parts();
        // An HTTP/2 request from a peer sidecar carries the host in :authority; the app speaks
        // HTTP/1.1 and needs it as Host.
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        let upgrade = crate::http::tunnel::is_upgrade(&parts.headers).then(|| {
            parts
                .headers
                .get(http::header::UPGRADE)
                .cloned()
                .unwrap_or_else(|| http::HeaderValue::from_static("websocket"))
        });
        strip_hop_by_hop(&mut parts.headers);
        let h2_app = conn.stamp(&mut parts.headers);
        record.set_protocol(if h2_app { "HTTP/2" } else { "HTTP/1.1" });
        let app_addr = SocketAddr::from(([127, 0, 0, 1], app_port));
        record.upstream_host = Some(app_addr);
        if let Some(host) = authority.as_deref() {
            let host = crate::route::split_authority(host, app_port)
                .0
                .to_ascii_lowercase();
            record.service = snapshot
                .routes
                .service_by_host(&host)
                .and_then(|s| snapshot.labels.service(s.index))
                .cloned();
        }
        record.authority = authority;
        if let Some(protocol) = upgrade {
            let authority = record.authority.clone();
            return Box::pin(self.upgrade_app(parts, body, protocol, authority, app_port)).await;
        }
        // Room for what this hop adds (XFCC, Host, request id, five trace headers): one growth of
        // the map instead of several. (http's limit, 32,768 entries, is far above what the 64 KiB
        // header-list limit or hyper's 100 headers let in, so this cannot be refused in practice.)
        let _ = parts.headers.try_reserve(8);
        if let Some(a) = record
            .authority
            .as_deref()
            .and_then(|a| http::HeaderValue::from_str(a).ok())
        {
            parts.headers.insert(http::header::HOST, a);
        }
        // The server span: the caller's sidecar sent its client span as parent; a caller outside the
        // mesh gets a new trace started here. The app sees this span's context.
        let hop = Hop::from_request(&parts.headers, snapshot.routes.tracing.sampling_percent);
        ensure_request_id(&mut parts.headers);
        record.note_request_id(&parts.headers);
        hop.inject(&mut parts.headers);
        if self.sinks.tracer.enabled() && hop.sampled {
            let service = self.sinks.service_name(&snapshot.routes);
            let authority = record.authority.as_deref().unwrap_or_default();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut attributes = span_tags::request(&parts, authority, path);
            attributes.push(("server.port", Value::Number(u64::from(app_port))));
            if let Some(c) = &conn.identity {
                attributes.push(("weft.peer.identity", Value::Text(c.to_string())));
            }
            record.span = Some(Box::new(SpanFacts {
                hop,
                name: inbound_span_name(&snapshot.routes, authority, app_port),
                service,
                attributes,
                trace_state: span_tags::trace_state(&parts.headers),
            }));
        }
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(conn.app_authority.clone());
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        let uri = http::Uri::from_parts(uri)
            .map_err(|_| ProxyError::BadRequest("unrepresentable request URI"))?;
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.headers_mut() = parts.headers;
        // Boxed so that this future (moved on every request) does not carry the exchange's state.
        let mut resp = Box::pin(self.app.send(app_addr, out, h2_app))
            .await
            .map_err(app_error)?;
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp)
    }
}

impl Inbound {
    /// An upgrade request (WebSocket and the like), its identity headers already set: sent to the
    /// app on a connection of its own, spliced with the caller's after `101`.
    async fn upgrade_app(
        &self,
        mut parts: http::request::Parts,
        body: Body,
        protocol: http::HeaderValue,
        authority: Option<String>,
        app_port: u16,
    ) -> Result<Response<Body>, ProxyError> {
        let downstream = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(ProxyError::BadRequest("this connection cannot be upgraded"))?;
        let app_addr = SocketAddr::from(([127, 0, 0, 1], app_port));
        let app = TcpStream::connect(app_addr).await.map_err(|e| {
            app_error(AppError::Connect {
                addr: app_addr,
                reason: e.to_string(),
            })
        })?;
        let headers = &mut parts.headers;
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        headers.insert(http::header::UPGRADE, protocol);
        if let Some(a) = authority
            .as_deref()
            .and_then(|a| http::HeaderValue::from_str(a).ok())
        {
            headers.insert(http::header::HOST, a);
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let mut req = Request::new(body);
        *req.method_mut() = parts.method;
        *req.uri_mut() = http::Uri::from(path);
        *req.headers_mut() = parts.headers;
        crate::http::tunnel::upgrade_over(app, req, downstream)
            .await
            .map_err(|e| {
                app_error(AppError::Exchange {
                    addr: app_addr,
                    reason: e.to_string(),
                    reset: false,
                })
            })
    }
}

/// What a failed request to the app becomes, as Envoy's inbound answers (all 503): an HTTP/2
/// stream the app reset before its response headers is "upstream reset before headers" (flag UR),
/// a connection the app closed or broke before answering is "upstream connection termination"
/// (UC), and a connection never made is a connect failure (UF). The reason is the whole cause
/// chain: hyper's own text for a reset is only "http2 error", the reset's reason is in its source.
fn app_error(e: AppError) -> ProxyError {
    match e {
        AppError::Exchange {
            reason,
            reset: true,
            ..
        } => ProxyError::UpstreamReset(reason),
        AppError::Connect { addr, reason } => {
            ProxyError::Connect(crate::upstream::UpstreamError::Connect { addr, reason })
        }
        AppError::Exchange { addr, reason, .. } => ProxyError::UpstreamClosed(
            crate::upstream::UpstreamError::Closed { addr, reason }.to_string(),
        ),
    }
}

/// The server span's name as Istio's: `<Service FQDN>:<port>/*` for the Service the caller
/// addressed (its Host), else `<authority>/*`, else `inbound|<app port>`.
fn inbound_span_name(routes: &crate::route::RouteTable, authority: &str, app_port: u16) -> String {
    if authority.is_empty() {
        return format!("inbound|{app_port}");
    }
    let (host, port) = crate::route::split_authority(authority, 80);
    let svc = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        routes.service_by_host(&host.to_ascii_lowercase())
    } else {
        routes.service_by_host(host)
    };
    match svc {
        Some(svc) => span_tags::operation(&svc.hostname, port),
        None => {
            let mut name = String::with_capacity(authority.len() + 2);
            name.push_str(authority);
            name.push_str("/*");
            name
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::discovery as pb;

    #[test]
    fn the_server_span_is_named_for_the_service_the_caller_addressed() {
        let routes = crate::route::RouteTable::try_from(pb::ProxyConfig {
            mesh: Some(pb::MeshSettings {
                trust_domain: "cluster.local".into(),
                mirror_shadow_suffix: true,
            }),
            services: vec![pb::OutboundService {
                hostname: "httpbin.default.svc.cluster.local".into(),
                aliases: vec!["httpbin".into(), "httpbin.default".into()],
                namespace: "default".into(),
                name: "httpbin".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap();
        let name = |authority| inbound_span_name(&routes, authority, 80);
        let fqdn = "httpbin.default.svc.cluster.local:8000/*";
        assert_eq!(name("httpbin:8000"), fqdn);
        assert_eq!(name("HTTPBin.Default:8000"), fqdn, "hosts are case-blind");
        assert_eq!(
            name("httpbin"),
            "httpbin.default.svc.cluster.local:80/*",
            "the default port"
        );
        assert_eq!(name("elsewhere:9000"), "elsewhere:9000/*");
        assert_eq!(name(""), "inbound|80");
    }
}
