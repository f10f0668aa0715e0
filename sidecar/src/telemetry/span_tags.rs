//! The tags Istio's sidecars put on their spans, so that a trace in Jaeger or Tempo reads as an
//! Istio trace: searches on `istio.canonical_service`, `upstream_cluster`, `response_flags` or
//! `guid:x-request-id` find weft's spans too. Values are strings, as Envoy writes them.
//!
//! Three groups, built where their facts are known: the sidecar's own ([`Static`], once at start,
//! sent once per export as resource attributes rather than on every span: they never change, and
//! a copy per span cost a traced request more than the rest of its span), the request's head
//! ([`request`], by the stage that starts the span), and the outcome ([`outcome`], when the record
//! is finished). Only sampled requests pay for any of them. OTel's HTTP conventions add only
//! `http.response.status_code` (an integer); Istio's names carry the rest (`http.method`,
//! `http.url`), as Istio's own spans do.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::attribute::{self, Attributes, Value};
use super::record::Flags;

/// `W3C tracestate`: carried to the app untouched, and onto the span.
pub const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// The sidecar's own tags, the same on every span it makes.
#[derive(Debug, Clone, Default)]
pub struct Static {
    tags: Arc<[(&'static str, String)]>,
}

/// Who this sidecar is, for [`Static::new`].
#[derive(Debug)]
pub struct Node<'a> {
    /// Pod IP.
    pub ip: IpAddr,
    /// Pod name.
    pub pod: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Istio's canonical service of the workload.
    pub canonical_service: &'a str,
    /// Its canonical revision.
    pub canonical_revision: &'a str,
    /// The mesh id (Istio's default: the trust domain).
    pub mesh_id: &'a str,
}

impl Static {
    /// Istio's per-proxy tags: `node_id` as Envoy's node id
    /// (`sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`), the mesh id, and the workload's
    /// canonical service, revision and namespace.
    pub fn new(node: &Node<'_>) -> Self {
        let Node {
            ip,
            pod,
            namespace,
            canonical_service,
            canonical_revision,
            mesh_id,
        } = node;
        let tags: Vec<(&'static str, String)> = vec![
            ("component", "proxy".into()),
            (
                "node_id",
                format!("sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"),
            ),
            ("istio.mesh_id", (*mesh_id).to_string()),
            ("istio.canonical_service", (*canonical_service).to_string()),
            (
                "istio.canonical_revision",
                (*canonical_revision).to_string(),
            ),
            ("istio.namespace", (*namespace).to_string()),
        ];
        Self { tags: tags.into() }
    }

    /// The tags.
    pub fn tags(&self) -> &[(&'static str, String)] {
        &self.tags
    }
}

/// A span name as Istio's: `<host>:<port>/*`.
pub fn operation(host: &str, port: u16) -> String {
    let mut name = String::with_capacity(host.len() + ":65535/*".len());
    name.push_str(host);
    name.push(':');
    attribute::push_decimal(&mut name, u64::from(port));
    name.push_str("/*");
    name
}

/// `service.name` as Istio sets it: `<canonical service>.<namespace>`.
pub fn service_name(canonical_service: &str, namespace: &str) -> String {
    format!("{canonical_service}.{namespace}")
}

/// The request's tags, from its head as this hop sends it on: `authority` and `path` after any
/// rewrite.
pub fn request(parts: &http::request::Parts, authority: &str, path: &str) -> Attributes {
    let header = |name: http::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| Value::Text(v.to_owned()))
    };
    let mut tags = Vec::with_capacity(16);
    tags.push(("http.method", attribute::method(&parts.method)));
    let mut url = String::with_capacity("http://".len() + authority.len() + path.len());
    url.push_str("http://");
    url.push_str(authority);
    url.push_str(path);
    tags.push(("http.url", Value::Text(url)));
    tags.push((
        "http.protocol",
        Value::Static(match parts.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }),
    ));
    if let Some(ua) = header(http::header::USER_AGENT) {
        tags.push(("user_agent", ua));
    }
    if let Some(id) = header(super::trace::X_REQUEST_ID) {
        tags.push(("guid:x-request-id", id));
    }
    tags
}

/// The caller's `tracestate`, when it sent one (all values joined, as W3C allows several).
pub fn trace_state(headers: &http::HeaderMap) -> Option<String> {
    let mut values = headers
        .get_all(TRACESTATE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    let mut state = first.trim().to_owned();
    for more in values {
        state.push(',');
        state.push_str(more.trim());
    }
    Some(state)
}

/// What the request came to, as Istio's tags: status, flags, sizes, the upstream cluster and the
/// downstream peer; `error` on a 5xx or no answer, as Envoy marks such spans.
pub struct Outcome<'a> {
    /// The status the caller got (0: none).
    pub code: u16,
    /// Envoy's response flags.
    pub flags: Flags,
    /// Request body bytes.
    pub request_size: u64,
    /// Response body bytes.
    pub response_size: u64,
    /// The upstream cluster (`outbound|...` or `inbound|<port>||`).
    pub cluster: Option<&'a str>,
    /// The downstream peer.
    pub peer: Option<SocketAddr>,
}

/// Appends [`Outcome`]'s tags to `tags`.
pub fn outcome(tags: &mut Attributes, o: &Outcome<'_>) {
    tags.push(("http.status_code", Value::Number(u64::from(o.code))));
    tags.push(("response_flags", Value::Flags(o.flags)));
    tags.push(("request_size", Value::Number(o.request_size)));
    tags.push(("response_size", Value::Number(o.response_size)));
    if let Some(cluster) = o.cluster {
        tags.push(("upstream_cluster", Value::Text(cluster.to_owned())));
    }
    tags.push(("downstream_cluster", Value::Static("-")));
    if let Some(peer) = o.peer {
        tags.push(("peer.address", Value::Ip(peer.ip())));
    }
    if super::trace::is_error(o.code) {
        tags.push(("error", Value::Static("true")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(tags: &'a [(&'static str, String)], key: &str) -> Option<&'a str> {
        tags.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    fn tag(tags: &Attributes, key: &str) -> Option<String> {
        tags.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_text())
    }

    #[test]
    fn a_request_and_its_outcome_carry_istios_tags() {
        let (parts, ()) = http::Request::get("/headers")
            .header("user-agent", "curl/8")
            .header("x-request-id", "abc")
            .body(())
            .unwrap()
            .into_parts();
        let mut tags = request(&parts, "httpbin:8000", "/headers?show_env=1");
        assert_eq!(tag(&tags, "http.method").as_deref(), Some("GET"));
        assert_eq!(
            tag(&tags, "http.url").as_deref(),
            Some("http://httpbin:8000/headers?show_env=1")
        );
        assert_eq!(tag(&tags, "http.protocol").as_deref(), Some("HTTP/1.1"));
        assert_eq!(tag(&tags, "user_agent").as_deref(), Some("curl/8"));
        assert_eq!(tag(&tags, "guid:x-request-id").as_deref(), Some("abc"));
        let mut flags = Flags::default();
        flags.set(Flags::UF);
        outcome(
            &mut tags,
            &Outcome {
                code: 503,
                flags,
                request_size: 3,
                response_size: 19,
                cluster: Some("outbound|8000|v1|httpbin.default.svc.cluster.local"),
                peer: Some("10.0.0.7:40000".parse().unwrap()),
            },
        );
        assert_eq!(tag(&tags, "http.status_code").as_deref(), Some("503"));
        assert_eq!(tag(&tags, "response_flags").as_deref(), Some("UF"));
        assert_eq!(tag(&tags, "request_size").as_deref(), Some("3"));
        assert_eq!(tag(&tags, "response_size").as_deref(), Some("19"));
        assert_eq!(
            tag(&tags, "upstream_cluster").as_deref(),
            Some("outbound|8000|v1|httpbin.default.svc.cluster.local")
        );
        assert_eq!(tag(&tags, "peer.address").as_deref(), Some("10.0.0.7"));
        assert_eq!(tag(&tags, "error").as_deref(), Some("true"));
    }

    #[test]
    fn the_proxy_names_itself_as_envoy_does() {
        let s = Static::new(&Node {
            ip: "10.0.0.7".parse().unwrap(),
            pod: "sleep-1",
            namespace: "default",
            canonical_service: "sleep",
            canonical_revision: "latest",
            mesh_id: "cluster.local",
        });
        assert_eq!(
            get(s.tags(), "node_id"),
            Some("sidecar~10.0.0.7~sleep-1.default~default.svc.cluster.local")
        );
        assert_eq!(get(s.tags(), "istio.canonical_service"), Some("sleep"));
        assert_eq!(get(s.tags(), "istio.namespace"), Some("default"));
        assert_eq!(get(s.tags(), "component"), Some("proxy"));
        assert_eq!(service_name("httpbin", "default"), "httpbin.default");
        assert_eq!(
            operation("httpbin.default.svc.cluster.local", 8000),
            "httpbin.default.svc.cluster.local:8000/*"
        );
        assert_eq!(operation("a", 0), "a:0/*");
        assert_eq!(operation("a", 65535), "a:65535/*");
    }

    #[test]
    fn tracestate_is_read_whole() {
        let mut h = http::HeaderMap::new();
        assert_eq!(trace_state(&h), None);
        h.append(
            TRACESTATE,
            http::HeaderValue::from_static("congo=t61rcWkgMzE"),
        );
        h.append(
            TRACESTATE,
            http::HeaderValue::from_static("rojo=00f067aa0ba902b7"),
        );
        assert_eq!(
            trace_state(&h).as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
    }
}
