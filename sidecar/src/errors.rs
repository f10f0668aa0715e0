//! Proxy errors and the one place they become responses (linkerd's "rescue"): each maps to a status
//! and a short reason in the `x-weft-error` header, so a caller can tell a mesh failure from its
//! upstream's answer.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::http::body::Body;
use crate::telemetry::record::Flags;
use crate::upstream::UpstreamError;

pub use crate::http::headers::ERROR_HEADER;

/// Why the proxy answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No Service for this destination/authority.
    #[error("no service for {0}")]
    NoService(String),
    /// The Service has routes but none matched.
    #[error("no route matched")]
    NoRoute,
    /// No config from pilot yet.
    #[error("no config from pilot yet")]
    NoConfig,
    /// The cluster has no endpoints (e.g. a subset no workload matches, or no DestinationRule defines).
    #[error("no healthy endpoint in {0}")]
    NoEndpoint(String),
    /// Connecting failed.
    #[error("{0}")]
    Connect(UpstreamError),
    /// The upstream reset the stream before sending response headers (Envoy's "upstream reset
    /// before headers").
    #[error("upstream reset before response headers: {0}")]
    UpstreamReset(String),
    /// The upstream's connection ended before response headers (Envoy's "upstream connection
    /// termination", flag UC).
    #[error("upstream connection terminated before response headers: {0}")]
    UpstreamClosed(String),
    /// The upstream timed out.
    #[error("upstream timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Malformed or ambiguous request framing (smuggling shapes).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A connection aimed back at the proxy itself.
    #[error("request loops back to the proxy")]
    Loop,
    /// The cluster's connection pool is full (circuit breaker).
    #[error("upstream overflow: {0} has no room")]
    Overflow(String),
    /// Fault injection abort.
    #[error("fault filter abort")]
    FaultAbort(u16),
}

impl ProxyError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ProxyError::NoService(_) | ProxyError::NoRoute => S::NOT_FOUND,
            // Envoy answers a connect failure 503 too ("upstream connect error or
            // disconnect/reset before headers", flag UF); 502 is for upstream protocol errors.
            ProxyError::NoConfig
            | ProxyError::NoEndpoint(_)
            | ProxyError::UpstreamReset(_)
            | ProxyError::UpstreamClosed(_)
            | ProxyError::Overflow(_)
            | ProxyError::Connect(_) => S::SERVICE_UNAVAILABLE,
            ProxyError::Timeout(_) => S::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => S::BAD_REQUEST,
            ProxyError::Loop => S::LOOP_DETECTED,
            ProxyError::FaultAbort(code) => S::from_u16(*code).unwrap_or(S::SERVICE_UNAVAILABLE),
        }
    }
}

impl ProxyError {
    /// Envoy's response flag for this failure.
    pub fn flag(&self) -> Flags {
        match self {
            ProxyError::NoService(_) | ProxyError::NoRoute => Flags::NR,
            ProxyError::NoConfig => Flags::NC,
            ProxyError::NoEndpoint(_) => Flags::UH,
            ProxyError::Connect(_) => Flags::UF,
            ProxyError::UpstreamReset(_) => Flags::UR,
            ProxyError::UpstreamClosed(_) => Flags::UC,
            ProxyError::Overflow(_) => Flags::UO,
            ProxyError::Timeout(_) => Flags::UT,
            ProxyError::BadRequest(_) => Flags::DPE,
            ProxyError::FaultAbort(_) => Flags::FI,
            ProxyError::Loop => Flags::default(),
        }
    }
}

/// Turns an error into the response the caller gets.
pub fn rescue(err: &ProxyError) -> http::Response<Body> {
    let status = err.status();
    let reason = err.to_string();
    let body = Full::new(Bytes::from(format!("{reason}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = http::Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&reason) {
        headers.insert(ERROR_HEADER, v);
    }
    resp
}

/// The answer to a request whose chunked body the guard cut short: 400, whatever the upstream made
/// of the truncated request (it would otherwise be a 502 blaming the upstream).
pub fn refused_body(
    verdict: &crate::http::h1::framing::Findings,
) -> Option<http::Response<crate::http::body::Body>> {
    let reason = verdict.body_refused()?;
    let mut resp = rescue(&ProxyError::BadRequest(reason));
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status_and_reason_header() {
        let cases = [
            (ProxyError::NoRoute, 404),
            (ProxyError::NoService("x:1".into()), 404),
            (ProxyError::NoEndpoint("outbound|8000|v3|h".into()), 503),
            (ProxyError::NoConfig, 503),
            (
                ProxyError::UpstreamReset("stream error received".into()),
                503,
            ),
            (ProxyError::Timeout(std::time::Duration::from_secs(1)), 504),
            (
                ProxyError::Connect(UpstreamError::Connect {
                    addr: "127.0.0.1:1".parse().unwrap(),
                    reason: "refused".into(),
                }),
                503,
            ),
            (
                ProxyError::BadRequest("both Content-Length and Transfer-Encoding"),
                400,
            ),
            (ProxyError::FaultAbort(418), 418),
        ];
        for (err, code) in cases {
            let resp = rescue(&err);
            assert_eq!(resp.status().as_u16(), code, "{err}");
            assert_eq!(
                resp.headers()[ERROR_HEADER].to_str().unwrap(),
                err.to_string()
            );
        }
    }
}
