//! When a failed try is sent again, and how long to wait first: Envoy's router retry semantics for
//! the `RetryPolicy` pilot sends (VirtualService `retries`, or Istio's default policy).
//!
//! `retry_on` is parsed once per push into [`RetryOn`] (a bit set and the retriable status codes);
//! an unknown token is an error, so the push is NACKed instead of a condition being ignored. The
//! request path describes how each try ended as an [`Attempt`], and [`Tries`] (one per request)
//! answers retry-after-a-backoff, no, or no-because-the-retries-ran-out (Envoy's flag URX).
//!
//! # Which condition covers which ending
//!
//! From Envoy's router (`source/common/router/retry_state_impl.cc`, `wouldRetryFromHeaders` and
//! `wouldRetryFromReset`; the docs are `configuration/http/http_filters/router_filter.rst`,
//! "x-envoy-retry-on" and "x-envoy-retry-grpc-on"). "started": some bytes of the request left for
//! an upstream in this try or an earlier one (Envoy's `upstream_request_started_`, sticky over the
//! tries of a request).
//!
//! | condition                    | matches                                                              |
//! |------------------------------|----------------------------------------------------------------------|
//! | `5xx`                        | any 5xx response; connect failure, refused stream, reset, per-try timeout |
//! | `gateway-error`              | 502, 503, 504; connect failure, refused stream, reset, per-try timeout |
//! | `reset`                      | connect failure, refused stream, reset, per-try timeout               |
//! | `reset-before-request`       | the same endings, only while the request has not started              |
//! | `connect-failure`            | connect failure (TCP connect, its timeout, TLS handshake)             |
//! | `refused-stream`             | HTTP/2 `REFUSED_STREAM`                                               |
//! | `retriable-4xx`              | 409                                                                   |
//! | `retriable-status-codes`     | the policy's codes and those of the request header `x-envoy-retriable-status-codes`; 425 only when the request has no `early-data` header, and then without a backoff |
//! | `retriable-headers`          | a response carrying a header named in the request header `x-envoy-retriable-header-names` (Istio has no field for a route's own list) |
//! | `envoy-ratelimited`          | a response with `x-envoy-ratelimited`; such a response is retried by nothing else |
//! | `http3-post-connect-failure` | never: weft speaks no HTTP/3 (accepted because Istio accepts it)       |
//! | `cancelled` (gRPC)           | `grpc-status: 1` in the response headers                              |
//! | `deadline-exceeded` (gRPC)   | `grpc-status: 4` in the response headers                              |
//! | `resource-exhausted` (gRPC)  | `grpc-status: 8` in the response headers                              |
//! | `internal` (gRPC)            | `grpc-status: 13` in the response headers                             |
//! | `unavailable` (gRPC)         | `grpc-status: 14` in the response headers                             |
//!
//! gRPC conditions read `grpc-status` from the response *headers* only, that is trailers-only
//! responses, as Envoy does ("gRPC status codes in trailers will not trigger retry logic"): by the
//! time trailers arrive the response is being streamed to the client. A try refused by the
//! cluster's own limits ([`Attempt::Overflow`], Envoy's reset reason `Overflow`) is never retried.
//!
//! Envoy honours the request headers read here only from internal clients (for a sidecar, the
//! pod's own application) and consumes them, with `x-envoy-retry-on`, `x-envoy-retry-grpc-on`,
//! `x-envoy-max-retries` and the others of its retry family: the request path should not forward
//! them upstream. weft reads only [`RETRIABLE_HEADER_NAMES`] and [`RETRIABLE_STATUS_CODES`].

use std::time::Duration;

use http::{HeaderMap, HeaderName};
use weft_proto::discovery as pb;

/// Envoy's default base interval of the retry backoff (`upstream.base_retry_backoff_ms`).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);

/// Request header naming response headers that make a response retriable (`retriable-headers`).
pub const RETRIABLE_HEADER_NAMES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-header-names");

/// Request header adding retriable status codes (`retriable-status-codes`).
pub const RETRIABLE_STATUS_CODES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-status-codes");

/// Response header set by a rate-limiting Envoy (`envoy-ratelimited`).
const RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");

/// Request header of a request received as TLS early data (RFC 8470): a 425 is not retried for it.
const EARLY_DATA: HeaderName = HeaderName::from_static("early-data");

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// A retry-on condition Envoy knows. The discriminant is the condition's bit in [`RetryOn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Condition {
    /// `5xx`.
    FiveXx = 1 << 0,
    /// `gateway-error`.
    GatewayError = 1 << 1,
    /// `reset`.
    Reset = 1 << 2,
    /// `reset-before-request`.
    ResetBeforeRequest = 1 << 3,
    /// `connect-failure`.
    ConnectFailure = 1 << 4,
    /// `envoy-ratelimited`.
    EnvoyRatelimited = 1 << 5,
    /// `retriable-4xx`.
    Retriable4xx = 1 << 6,
    /// `refused-stream`.
    RefusedStream = 1 << 7,
    /// `retriable-status-codes`.
    RetriableStatusCodes = 1 << 8,
    /// `retriable-headers`.
    RetriableHeaders = 1 << 9,
    /// `http3-post-connect-failure`: parsed, never matches (no HTTP/3 in weft).
    Http3PostConnectFailure = 1 << 10,
    /// gRPC `cancelled` (status 1).
    GrpcCancelled = 1 << 11,
    /// gRPC `deadline-exceeded` (status 4).
    GrpcDeadlineExceeded = 1 << 12,
    /// gRPC `resource-exhausted` (status 8).
    GrpcResourceExhausted = 1 << 13,
    /// gRPC `internal` (status 13).
    GrpcInternal = 1 << 14,
    /// gRPC `unavailable` (status 14).
    GrpcUnavailable = 1 << 15,
}

impl Condition {
    /// Every condition, in bit order.
    pub const ALL: [Condition; 16] = [
        Condition::FiveXx,
        Condition::GatewayError,
        Condition::Reset,
        Condition::ResetBeforeRequest,
        Condition::ConnectFailure,
        Condition::EnvoyRatelimited,
        Condition::Retriable4xx,
        Condition::RefusedStream,
        Condition::RetriableStatusCodes,
        Condition::RetriableHeaders,
        Condition::Http3PostConnectFailure,
        Condition::GrpcCancelled,
        Condition::GrpcDeadlineExceeded,
        Condition::GrpcResourceExhausted,
        Condition::GrpcInternal,
        Condition::GrpcUnavailable,
    ];

    /// The name Envoy and Istio use.
    pub fn name(self) -> &'static str {
        match self {
            Condition::FiveXx => "5xx",
            Condition::GatewayError => "gateway-error",
            Condition::Reset => "reset",
            Condition::ResetBeforeRequest => "reset-before-request",
            Condition::ConnectFailure => "connect-failure",
            Condition::EnvoyRatelimited => "envoy-ratelimited",
            Condition::Retriable4xx => "retriable-4xx",
            Condition::RefusedStream => "refused-stream",
            Condition::RetriableStatusCodes => "retriable-status-codes",
            Condition::RetriableHeaders => "retriable-headers",
            Condition::Http3PostConnectFailure => "http3-post-connect-failure",
            Condition::GrpcCancelled => "cancelled",
            Condition::GrpcDeadlineExceeded => "deadline-exceeded",
            Condition::GrpcResourceExhausted => "resource-exhausted",
            Condition::GrpcInternal => "internal",
            Condition::GrpcUnavailable => "unavailable",
        }
    }

    /// The condition named `name` (exact, as Envoy compares).
    pub fn from_name(name: &str) -> Option<Condition> {
        Condition::ALL.into_iter().find(|c| c.name() == name)
    }

    const fn bit(self) -> u32 {
        self as u32
    }
}

/// A `retry_on` entry that is neither a condition nor a status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetryOnError {
    /// The token, as pushed.
    #[error("unknown retry-on condition {0:?}")]
    Unknown(String),
}

/// Parsed `retry_on`: the conditions and the retriable status codes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryOn {
    bits: u32,
    codes: Box<[u16]>,
}

const GRPC_BITS: u32 = Condition::GrpcCancelled.bit()
    | Condition::GrpcDeadlineExceeded.bit()
    | Condition::GrpcResourceExhausted.bit()
    | Condition::GrpcInternal.bit()
    | Condition::GrpcUnavailable.bit();

/// What Envoy's decision would be, with the one distinction [`Tries`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    No,
    WithBackoff,
    /// Envoy's `RetryImmediately` (a 425 Too Early): no backoff, and the backoff does not grow.
    Immediately,
}

/// How one try ended, as the request path saw it.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    /// No connection: TCP connect failed or timed out, or the TLS handshake failed (Envoy's
    /// connection-failure reset reasons). Nothing of this try was sent.
    ConnectFailure,
    /// The peer reset the stream with HTTP/2 `REFUSED_STREAM`: it did not process the request. (A
    /// request that never left because its connection was already going away is no try at all:
    /// Envoy's pool would have handed it another connection, so send it again without spending a
    /// retry.)
    RefusedStream,
    /// The connection or stream broke after the try got a connection and before response headers
    /// (disconnect, `RST_STREAM` other than `REFUSED_STREAM`, protocol error).
    Reset,
    /// The per-try timeout fired before response headers (Envoy resets the try: reason `LocalReset`).
    PerTryTimeout,
    /// The cluster's own limits refused the try (circuit breaking, flag UO): never retried.
    Overflow,
    /// Response headers arrived.
    Response {
        /// Status code.
        status: u16,
        /// Response headers (a trailers-only gRPC response carries `grpc-status` here).
        headers: &'a HeaderMap,
    },
}

impl RetryOn {
    /// Parses pilot's `retry_on`: condition names and, as separate entries, numeric status codes.
    /// An entry may itself be a comma list; blanks around tokens and empty tokens are skipped, as
    /// Envoy splits its `retry_on` string.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<RetryOn, RetryOnError> {
        let mut bits = 0;
        let mut codes = Vec::new();
        for token in entries
            .iter()
            .flat_map(|e| e.as_ref().split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            if let Some(condition) = Condition::from_name(token) {
                bits |= condition.bit();
            } else if let Ok(code) = token.parse::<u16>() {
                if !codes.contains(&code) {
                    codes.push(code);
                }
            } else {
                return Err(RetryOnError::Unknown(token.to_string()));
            }
        }
        Ok(RetryOn {
            bits,
            codes: codes.into_boxed_slice(),
        })
    }

    /// Whether `condition` is on.
    pub fn has(&self, condition: Condition) -> bool {
        self.bits & condition.bit() != 0
    }

    /// The retriable status codes (they apply only with `retriable-status-codes`, as in Envoy).
    pub fn status_codes(&self) -> &[u16] {
        &self.codes
    }

    /// No condition is on: nothing is ever retried.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Whether a try that ended as `attempt` is retriable under these conditions (retries left
    /// aside). `request_started`: whether bytes of this request left for an upstream in this try
    /// or an earlier one (only `reset-before-request` reads it). `request_headers`: the request as
    /// the client sent it (`x-envoy-retriable-header-names`, `x-envoy-retriable-status-codes`,
    /// `early-data`).
    pub fn retriable(
        &self,
        attempt: &Attempt<'_>,
        request_started: bool,
        request_headers: &HeaderMap,
    ) -> bool {
        self.verdict(attempt, request_started, request_headers) != Verdict::No
    }

    fn verdict(
        &self,
        attempt: &Attempt<'_>,
        request_started: bool,
        request_headers: &HeaderMap,
    ) -> Verdict {
        match *attempt {
            Attempt::Response { status, headers } => {
                self.after_response(status, headers, request_headers)
            }
            Attempt::Overflow => Verdict::No,
            Attempt::ConnectFailure => {
                if self.has(Condition::ConnectFailure) {
                    Verdict::WithBackoff
                } else {
                    self.after_reset(false, request_started)
                }
            }
            Attempt::RefusedStream => self.after_reset(true, request_started),
            Attempt::Reset | Attempt::PerTryTimeout => self.after_reset(false, request_started),
        }
    }

    /// Envoy's `wouldRetryFromReset` after its connect-failure and HTTP/3 branches.
    fn after_reset(&self, refused_stream: bool, request_started: bool) -> Verdict {
        let matched = (self.has(Condition::ResetBeforeRequest) && !request_started)
            || self.bits
                & (Condition::Reset.bit()
                    | Condition::FiveXx.bit()
                    | Condition::GatewayError.bit())
                != 0
            || (refused_stream && self.has(Condition::RefusedStream));
        if matched {
            Verdict::WithBackoff
        } else {
            Verdict::No
        }
    }

    /// Envoy's `wouldRetryFromHeaders`, in its order.
    fn after_response(
        &self,
        status: u16,
        headers: &HeaderMap,
        request_headers: &HeaderMap,
    ) -> Verdict {
        if headers.contains_key(RATELIMITED) {
            return if self.has(Condition::EnvoyRatelimited) {
                Verdict::WithBackoff
            } else {
                Verdict::No
            };
        }
        if (self.has(Condition::FiveXx) && (500..600).contains(&status))
            || (self.has(Condition::GatewayError) && (502..=504).contains(&status))
            || (self.has(Condition::Retriable4xx) && status == 409)
        {
            return Verdict::WithBackoff;
        }
        if self.has(Condition::RetriableStatusCodes)
            && (self.codes.contains(&status) || header_lists_code(request_headers, status))
        {
            if status != 425 {
                return Verdict::WithBackoff;
            }
            // A request that came as early data gets its 425 back, so the client resends it
            // after its handshake (RFC 8470); otherwise this proxy resends it at once.
            if !request_headers.contains_key(EARLY_DATA) {
                return Verdict::Immediately;
            }
        }
        if self.has(Condition::RetriableHeaders) && names_a_header(request_headers, headers) {
            return Verdict::WithBackoff;
        }
        if self.bits & GRPC_BITS != 0 {
            let wanted = match grpc_status(headers) {
                Some(1) => Condition::GrpcCancelled,
                Some(4) => Condition::GrpcDeadlineExceeded,
                Some(8) => Condition::GrpcResourceExhausted,
                Some(13) => Condition::GrpcInternal,
                Some(14) => Condition::GrpcUnavailable,
                _ => return Verdict::No,
            };
            if self.has(wanted) {
                return Verdict::WithBackoff;
            }
        }
        Verdict::No
    }
}

/// `x-envoy-retriable-status-codes` lists `status` (a comma list; unparsable entries are skipped,
/// as Envoy does).
fn header_lists_code(request_headers: &HeaderMap, status: u16) -> bool {
    request_headers
        .get_all(RETRIABLE_STATUS_CODES)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|code| code.trim().parse::<u16>() == Ok(status))
}

/// The response carries a header that `x-envoy-retriable-header-names` names (case-insensitive;
/// `HeaderMap` lowercases a `&str` key on the stack).
fn names_a_header(request_headers: &HeaderMap, response_headers: &HeaderMap) -> bool {
    request_headers
        .get_all(RETRIABLE_HEADER_NAMES)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|name| !name.is_empty() && response_headers.contains_key(name))
}

/// `grpc-status` of a (trailers-only) response, as Envoy's `Grpc::Common::getGrpcStatus` reads it.
fn grpc_status(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(GRPC_STATUS)?.to_str().ok()?;
    value.trim().parse().ok()
}

/// A route's retry policy, converted once per push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Retries after the first try (Istio's `attempts`): at most `1 + attempts` tries.
    pub attempts: u32,
    /// Timeout of each try; `None`: only the route timeout bounds them.
    pub per_try_timeout: Option<Duration>,
    /// What is retried.
    pub retry_on: RetryOn,
    /// Base interval of the backoff (Envoy's default 25 ms unless the policy sets one).
    pub backoff_base: Duration,
}

impl Policy {
    /// From pilot's policy; `None` when `attempts` is 0 (retries disabled).
    pub fn from_pb(p: &pb::RetryPolicy) -> Result<Option<Policy>, RetryOnError> {
        if p.attempts == 0 {
            return Ok(None);
        }
        Ok(Some(Policy {
            attempts: p.attempts,
            per_try_timeout: (p.per_try_timeout_ms > 0)
                .then(|| Duration::from_millis(p.per_try_timeout_ms)),
            retry_on: RetryOn::parse(&p.retry_on)?,
            backoff_base: if p.backoff_base_ms > 0 {
                Duration::from_millis(p.backoff_base_ms)
            } else {
                DEFAULT_BACKOFF_BASE
            },
        }))
    }

    /// A fresh count of tries for one request.
    pub fn tries(&self) -> Tries {
        Tries {
            retries_left: self.attempts,
            backoffs: 0,
            started: false,
        }
    }
}

/// What to do after a try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the request again after waiting this long (on another endpoint where there is one).
    Retry(Duration),
    /// The try's outcome goes to the client.
    No,
    /// The try would be retried but the policy's retries are spent: the outcome goes to the client
    /// with Envoy's flag URX.
    LimitExceeded,
}

/// The retry state of one request: retries left, backoffs taken, whether the request has started.
#[derive(Debug, Clone)]
pub struct Tries {
    retries_left: u32,
    backoffs: u32,
    started: bool,
}

impl Tries {
    /// Decides after a try that ended as `attempt`. `sent_any`: whether bytes of the request
    /// (its head included) were written towards the upstream in this try. Envoy's
    /// `RetryStateImpl::shouldRetry`, without the cluster's retry circuit breaker.
    pub fn next(
        &mut self,
        policy: &Policy,
        attempt: &Attempt<'_>,
        sent_any: bool,
        request_headers: &HeaderMap,
    ) -> Decision {
        self.started |= sent_any;
        let verdict = policy
            .retry_on
            .verdict(attempt, self.started, request_headers);
        if verdict == Verdict::No {
            return Decision::No;
        }
        if self.retries_left == 0 {
            return Decision::LimitExceeded;
        }
        self.retries_left -= 1;
        match verdict {
            Verdict::Immediately => Decision::Retry(Duration::ZERO),
            _ => {
                let wait = backoff(policy.backoff_base, self.backoffs);
                self.backoffs += 1;
                Decision::Retry(wait)
            }
        }
    }

    /// Retries still allowed.
    pub fn retries_left(&self) -> u32 {
        self.retries_left
    }
}

/// The wait before a retry: Envoy's `JitteredExponentialBackOffStrategy` with its default cap of
/// ten times the base. `retry_number` counts the backoffs already taken (0 before the first
/// retry); the wait is uniform in whole milliseconds over `[0, min(base × 2^n, 10 × base))`, so
/// with 25 ms: 0–24, 0–49, 0–99, 0–199, then 0–249 ms. (Envoy's docs write `(2^N − 1)·B`; its code
/// draws from `[0, 2^N·B)`, which is followed here.) A base below 1 ms counts as 1 ms, as Envoy
/// The request headers the retry conditions read (`x-envoy-retriable-status-codes`,
/// `x-envoy-retriable-header-names`, `early-data`), copied out of a request's head: an empty map,
/// which allocates nothing, for a request that has none of them.
pub fn request_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [RETRIABLE_STATUS_CODES, RETRIABLE_HEADER_NAMES, EARLY_DATA] {
        for v in headers.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// rounds it up.
pub fn backoff(base: Duration, retry_number: u32) -> Duration {
    let base_ms = u64::try_from(base.as_nanos().div_ceil(1_000_000))
        .unwrap_or(u64::MAX)
        .max(1);
    let cap = base_ms.saturating_mul(10);
    let interval = 1u64
        .checked_shl(retry_number)
        .and_then(|factor| base_ms.checked_mul(factor))
        .map_or(cap, |i| i.min(cap));
    Duration::from_millis(fastrand::u64(0..interval))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn on(list: &[&str]) -> RetryOn {
        RetryOn::parse(list).unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn response(status: u16, headers: &HeaderMap) -> Attempt<'_> {
        Attempt::Response { status, headers }
    }

    /// `on` retries `status` (plain response, plain request).
    fn retries_status(on: &RetryOn, status: u16) -> bool {
        let h = HeaderMap::new();
        on.retriable(&response(status, &h), true, &h)
    }

    /// The endings that are not responses, with the request started or not.
    fn retries_ending(on: &RetryOn, attempt: Attempt<'_>, started: bool) -> bool {
        on.retriable(&attempt, started, &HeaderMap::new())
    }

    #[test]
    fn parses_conditions_and_codes() {
        let r = on(&[
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes",
            "503",
        ]);
        for c in [
            Condition::ConnectFailure,
            Condition::RefusedStream,
            Condition::GrpcUnavailable,
            Condition::GrpcCancelled,
            Condition::RetriableStatusCodes,
        ] {
            assert!(r.has(c), "{}", c.name());
        }
        assert!(!r.has(Condition::FiveXx));
        assert_eq!(r.status_codes(), &[503]);
        assert!(!r.is_empty());
    }

    #[test]
    fn every_condition_name_round_trips() {
        for c in Condition::ALL {
            assert_eq!(Condition::from_name(c.name()), Some(c));
            assert!(on(&[c.name()]).has(c));
            assert_eq!(c.bit().count_ones(), 1);
        }
        let all = Condition::ALL.iter().fold(0, |acc, c| acc | c.bit());
        assert_eq!(all.count_ones() as usize, Condition::ALL.len());
    }

    #[test]
    fn parses_comma_lists_blanks_and_duplicates() {
        let r = on(&[" 5xx , gateway-error,,", "503,503", ""]);
        assert!(r.has(Condition::FiveXx) && r.has(Condition::GatewayError));
        assert_eq!(r.status_codes(), &[503]);
        assert!(on(&[] as &[&str]).is_empty());
    }

    #[test]
    fn unknown_tokens_are_errors_naming_them() {
        assert_eq!(
            RetryOn::parse(&["5xx", "bogus"]),
            Err(RetryOnError::Unknown("bogus".into()))
        );
        // Names are exact, as Envoy compares them.
        assert_eq!(
            RetryOn::parse(&["5XX"]),
            Err(RetryOnError::Unknown("5XX".into()))
        );
        assert_eq!(
            RetryOn::parse(&["70000"]),
            Err(RetryOnError::Unknown("70000".into()))
        );
        assert_eq!(
            RetryOn::parse(&["-1"]),
            Err(RetryOnError::Unknown("-1".into()))
        );
        let message = RetryOn::parse(&["nope"]).unwrap_err().to_string();
        assert!(message.contains("\"nope\""), "{message}");
    }

    #[test]
    fn five_xx_covers_every_5xx_and_every_failure_without_a_response() {
        let r = on(&["5xx"]);
        for s in [500, 501, 502, 503, 504, 599] {
            assert!(retries_status(&r, s), "{s}");
        }
        for s in [200, 404, 409, 429, 499] {
            assert!(!retries_status(&r, s), "{s}");
        }
        for a in [
            Attempt::ConnectFailure,
            Attempt::RefusedStream,
            Attempt::Reset,
            Attempt::PerTryTimeout,
        ] {
            assert!(retries_ending(&r, a, true), "{a:?}");
        }
        assert!(!retries_ending(&r, Attempt::Overflow, false));
    }

    #[test]
    fn gateway_error_is_502_503_504_and_failures_without_a_response() {
        let r = on(&["gateway-error"]);
        for s in [502, 503, 504] {
            assert!(retries_status(&r, s), "{s}");
        }
        for s in [500, 501, 505, 409, 200] {
            assert!(!retries_status(&r, s), "{s}");
        }
        for a in [
            Attempt::ConnectFailure,
            Attempt::RefusedStream,
            Attempt::Reset,
            Attempt::PerTryTimeout,
        ] {
            assert!(retries_ending(&r, a, true), "{a:?}");
        }
    }

    #[test]
    fn reset_covers_failures_without_a_response_not_responses() {
        let r = on(&["reset"]);
        for a in [
            Attempt::ConnectFailure,
            Attempt::RefusedStream,
            Attempt::Reset,
            Attempt::PerTryTimeout,
        ] {
            assert!(retries_ending(&r, a, true), "{a:?}");
        }
        assert!(!retries_status(&r, 503));
        assert!(!retries_ending(&r, Attempt::Overflow, false));
    }

    #[test]
    fn reset_before_request_only_before_any_byte_left() {
        let r = on(&["reset-before-request"]);
        for a in [
            Attempt::ConnectFailure,
            Attempt::RefusedStream,
            Attempt::Reset,
            Attempt::PerTryTimeout,
        ] {
            assert!(retries_ending(&r, a, false), "{a:?}");
            assert!(!retries_ending(&r, a, true), "{a:?}");
        }
        assert!(!retries_status(&r, 503));
    }

    #[test]
    fn connect_failure_is_only_connect_failures() {
        let r = on(&["connect-failure"]);
        assert!(retries_ending(&r, Attempt::ConnectFailure, false));
        // Even after an earlier try sent the request.
        assert!(retries_ending(&r, Attempt::ConnectFailure, true));
        for a in [
            Attempt::RefusedStream,
            Attempt::Reset,
            Attempt::PerTryTimeout,
            Attempt::Overflow,
        ] {
            assert!(!retries_ending(&r, a, false), "{a:?}");
        }
        assert!(!retries_status(&r, 503));
    }

    #[test]
    fn refused_stream_is_only_refused_streams() {
        let r = on(&["refused-stream"]);
        assert!(retries_ending(&r, Attempt::RefusedStream, true));
        for a in [
            Attempt::ConnectFailure,
            Attempt::Reset,
            Attempt::PerTryTimeout,
        ] {
            assert!(!retries_ending(&r, a, false), "{a:?}");
        }
        assert!(!retries_status(&r, 503));
    }

    #[test]
    fn retriable_4xx_is_409_only() {
        let r = on(&["retriable-4xx"]);
        assert!(retries_status(&r, 409));
        for s in [400, 404, 408, 429, 500, 503] {
            assert!(!retries_status(&r, s), "{s}");
        }
        assert!(!retries_ending(&r, Attempt::Reset, true));
    }

    #[test]
    fn retriable_status_codes_only_listed_codes_and_only_with_the_condition() {
        let r = on(&["retriable-status-codes", "503", "418"]);
        assert!(retries_status(&r, 503));
        assert!(retries_status(&r, 418));
        for s in [500, 502, 504, 409] {
            assert!(!retries_status(&r, s), "{s}");
        }
        assert!(!retries_ending(&r, Attempt::Reset, true));
        // Codes without the condition do nothing, as in Envoy.
        assert!(!retries_status(&on(&["503"]), 503));
        // The condition without codes matches nothing.
        assert!(!retries_status(&on(&["retriable-status-codes"]), 503));
    }

    #[test]
    fn retriable_status_codes_from_the_request_header() {
        let r = on(&["retriable-status-codes"]);
        let req = headers(&[("x-envoy-retriable-status-codes", "504, 409,x")]);
        let plain = HeaderMap::new();
        assert!(r.retriable(&response(409, &plain), true, &req));
        assert!(r.retriable(&response(504, &plain), true, &req));
        assert!(!r.retriable(&response(503, &plain), true, &req));
        // Without the condition the header does nothing.
        assert!(!on(&["5xx"]).retriable(&response(409, &plain), true, &req));
    }

    #[test]
    fn too_early_is_retried_at_once_unless_the_request_was_early_data() {
        let policy = Policy {
            attempts: 3,
            per_try_timeout: None,
            retry_on: on(&["retriable-status-codes", "425"]),
            backoff_base: Duration::from_secs(60),
        };
        let plain = HeaderMap::new();
        let mut tries = policy.tries();
        assert_eq!(
            tries.next(&policy, &response(425, &plain), true, &plain),
            Decision::Retry(Duration::ZERO)
        );
        let early = headers(&[("early-data", "1")]);
        assert_eq!(
            policy
                .tries()
                .next(&policy, &response(425, &plain), true, &early),
            Decision::No
        );
    }

    #[test]
    fn retriable_headers_named_by_the_request() {
        let r = on(&["retriable-headers"]);
        let req = headers(&[(
            "x-envoy-retriable-header-names",
            "X-Upstream-Retry, x-try-again",
        )]);
        let retry = headers(&[("x-upstream-retry", "1")]);
        let again = headers(&[("x-try-again", "yes")]);
        let other = headers(&[("x-something", "1")]);
        assert!(r.retriable(&response(200, &retry), true, &req));
        assert!(r.retriable(&response(200, &again), true, &req));
        assert!(!r.retriable(&response(200, &other), true, &req));
        // Without the request header, or without the condition, nothing matches.
        assert!(!r.retriable(&response(200, &retry), true, &HeaderMap::new()));
        assert!(!on(&["5xx"]).retriable(&response(200, &retry), true, &req));
        assert!(!retries_ending(&r, Attempt::Reset, true));
    }

    #[test]
    fn envoy_ratelimited_wins_over_every_other_condition() {
        let limited = headers(&[("x-envoy-ratelimited", "true")]);
        let plain = HeaderMap::new();
        assert!(on(&["envoy-ratelimited"]).retriable(&response(429, &limited), true, &plain));
        // A rate-limited response is retried by nothing else, even a 503 under 5xx.
        let r = on(&["5xx", "retriable-status-codes", "429"]);
        assert!(!r.retriable(&response(503, &limited), true, &plain));
        assert!(!r.retriable(&response(429, &limited), true, &plain));
        assert!(!on(&["envoy-ratelimited"]).retriable(&response(429, &plain), true, &plain));
    }

    #[test]
    fn http3_post_connect_failure_never_matches() {
        let r = on(&["http3-post-connect-failure"]);
        assert!(r.has(Condition::Http3PostConnectFailure));
        for a in [
            Attempt::ConnectFailure,
            Attempt::RefusedStream,
            Attempt::Reset,
            Attempt::PerTryTimeout,
        ] {
            assert!(!retries_ending(&r, a, false), "{a:?}");
        }
        assert!(!retries_status(&r, 503));
    }

    #[test]
    fn grpc_conditions_read_grpc_status_from_response_headers() {
        let cases = [
            ("cancelled", "1"),
            ("deadline-exceeded", "4"),
            ("resource-exhausted", "8"),
            ("internal", "13"),
            ("unavailable", "14"),
        ];
        let plain = HeaderMap::new();
        for (name, code) in cases {
            let r = on(&[name]);
            let mut h = HeaderMap::new();
            h.insert(GRPC_STATUS, HeaderValue::from_static(code));
            assert!(r.retriable(&response(200, &h), true, &plain), "{name}");
            // The other gRPC codes do not match this condition.
            for (_, other) in cases.iter().filter(|(n, _)| *n != name) {
                let mut h = HeaderMap::new();
                h.insert(GRPC_STATUS, HeaderValue::from_static(other));
                assert!(
                    !r.retriable(&response(200, &h), true, &plain),
                    "{name} {other}"
                );
            }
            // No grpc-status (it would be in the trailers), OK, garbage: no retry.
            assert!(!r.retriable(&response(200, &plain), true, &plain), "{name}");
            for v in ["0", "x", "", "99"] {
                let mut h = HeaderMap::new();
                h.insert(GRPC_STATUS, HeaderValue::from_static(v));
                assert!(
                    !r.retriable(&response(200, &h), true, &plain),
                    "{name} {v:?}"
                );
            }
            // A gRPC condition is not a reset condition.
            assert!(!retries_ending(&r, Attempt::Reset, false), "{name}");
            assert!(
                !retries_ending(&r, Attempt::ConnectFailure, false),
                "{name}"
            );
        }
    }

    #[test]
    fn istio_default_policy() {
        let r = on(&[
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes",
            "503",
        ]);
        assert!(retries_status(&r, 503));
        assert!(!retries_status(&r, 500));
        assert!(!retries_status(&r, 502));
        assert!(retries_ending(&r, Attempt::ConnectFailure, false));
        assert!(retries_ending(&r, Attempt::RefusedStream, true));
        assert!(!retries_ending(&r, Attempt::Reset, true));
        assert!(!retries_ending(&r, Attempt::PerTryTimeout, true));
        let unavailable = headers(&[("grpc-status", "14")]);
        assert!(r.retriable(&response(200, &unavailable), true, &HeaderMap::new()));
    }

    #[test]
    fn nothing_on_retries_nothing() {
        let r = RetryOn::default();
        assert!(r.is_empty());
        assert!(!retries_status(&r, 503));
        assert!(!retries_ending(&r, Attempt::ConnectFailure, false));
    }

    #[test]
    fn policy_from_pb() {
        let pb = pb::RetryPolicy {
            attempts: 3,
            per_try_timeout_ms: 1500,
            retry_on: vec!["gateway-error".into()],
            backoff_base_ms: 0,
        };
        let p = Policy::from_pb(&pb).unwrap().unwrap();
        assert_eq!(p.attempts, 3);
        assert_eq!(p.per_try_timeout, Some(Duration::from_millis(1500)));
        assert!(p.retry_on.has(Condition::GatewayError));
        assert_eq!(p.backoff_base, DEFAULT_BACKOFF_BASE);

        let p = Policy::from_pb(&pb::RetryPolicy {
            per_try_timeout_ms: 0,
            backoff_base_ms: 100,
            ..pb.clone()
        })
        .unwrap()
        .unwrap();
        assert_eq!(p.per_try_timeout, None);
        assert_eq!(p.backoff_base, Duration::from_millis(100));

        let off = pb::RetryPolicy {
            attempts: 0,
            ..pb.clone()
        };
        assert_eq!(Policy::from_pb(&off), Ok(None));

        let bad = pb::RetryPolicy {
            retry_on: vec!["5xx".into(), "sometimes".into()],
            ..pb
        };
        assert_eq!(
            Policy::from_pb(&bad),
            Err(RetryOnError::Unknown("sometimes".into()))
        );
    }

    #[test]
    fn tries_count_retries_and_report_the_limit() {
        let policy = Policy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: on(&["5xx"]),
            backoff_base: Duration::from_millis(1),
        };
        let plain = HeaderMap::new();
        let mut tries = policy.tries();
        let ok = response(200, &plain);
        let bad = response(503, &plain);
        assert_eq!(tries.next(&policy, &ok, true, &plain), Decision::No);
        assert!(matches!(
            tries.next(&policy, &bad, true, &plain),
            Decision::Retry(_)
        ));
        assert_eq!(tries.retries_left(), 1);
        assert!(matches!(
            tries.next(&policy, &bad, true, &plain),
            Decision::Retry(_)
        ));
        assert_eq!(
            tries.next(&policy, &bad, true, &plain),
            Decision::LimitExceeded
        );
        // A success after the limit is still just the answer.
        assert_eq!(tries.next(&policy, &ok, true, &plain), Decision::No);
    }

    #[test]
    fn tries_remember_that_the_request_started() {
        let policy = Policy {
            attempts: 5,
            per_try_timeout: None,
            retry_on: on(&["reset-before-request", "retriable-status-codes", "503"]),
            backoff_base: Duration::from_millis(1),
        };
        let plain = HeaderMap::new();
        let mut tries = policy.tries();
        assert!(matches!(
            tries.next(&policy, &Attempt::ConnectFailure, false, &plain),
            Decision::Retry(_)
        ));
        // The second try sends the request and gets a 503: retried by the status code.
        assert!(matches!(
            tries.next(&policy, &response(503, &plain), true, &plain),
            Decision::Retry(_)
        ));
        // The third fails to connect, but the request has started (sticky, as Envoy's flag).
        assert_eq!(
            tries.next(&policy, &Attempt::ConnectFailure, false, &plain),
            Decision::No
        );
    }

    #[test]
    fn backoff_stays_in_envoys_bounds() {
        let base = Duration::from_millis(25);
        // Upper bounds (exclusive) per retry number: base × 2^n, capped at 10 × base.
        let bounds = [25u64, 50, 100, 200, 250, 250, 250];
        for (n, bound) in bounds.into_iter().enumerate() {
            let n = u32::try_from(n).unwrap();
            let samples: Vec<u64> = (0..5000)
                .map(|_| u64::try_from(backoff(base, n).as_millis()).unwrap())
                .collect();
            let max = samples.iter().copied().max().unwrap();
            let min = samples.iter().copied().min().unwrap();
            assert!(max < bound, "retry {n}: {max} >= {bound}");
            // Fully jittered: the whole range is used (5000 draws; missing the top or bottom
            // tenth has probability below 1e-200).
            assert!(max >= bound * 9 / 10, "retry {n}: max {max} of {bound}");
            assert!(min <= bound / 10, "retry {n}: min {min} of {bound}");
            let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
            let expected = (bound - 1) as f64 / 2.0;
            assert!(
                (mean - expected).abs() < expected * 0.1 + 1.0,
                "retry {n}: mean {mean}, expected {expected}"
            );
        }
    }

    #[test]
    fn backoff_edges() {
        // Huge retry numbers do not overflow: the cap applies.
        for n in [31, 63, 64, 1000, u32::MAX] {
            assert!(backoff(Duration::from_millis(25), n) < Duration::from_millis(250));
        }
        // A sub-millisecond base counts as 1 ms: the first wait is 0.
        assert_eq!(backoff(Duration::from_micros(10), 0), Duration::ZERO);
        assert_eq!(backoff(Duration::ZERO, 0), Duration::ZERO);
        // Whole milliseconds, as Envoy's timer.
        let d = backoff(Duration::from_millis(1000), 3);
        assert_eq!(d.subsec_nanos() % 1_000_000, 0);
        // An absurd base does not overflow.
        assert!(backoff(Duration::MAX, 5) < Duration::MAX);
    }

    #[test]
    fn tries_grow_the_backoff_per_backoff_taken() {
        let policy = Policy {
            attempts: 100,
            per_try_timeout: None,
            retry_on: on(&["5xx"]),
            backoff_base: Duration::from_millis(10),
        };
        let plain = HeaderMap::new();
        let bad = response(503, &plain);
        // Over many requests, the n-th retry's wait stays under min(10 × 2^n, 100) ms and the
        // largest waits reach close to it.
        let mut largest = [0u128; 6];
        for _ in 0..2000 {
            let mut tries = policy.tries();
            for (n, top) in largest.iter_mut().enumerate() {
                let Decision::Retry(wait) = tries.next(&policy, &bad, true, &plain) else {
                    panic!("retry {n} not granted");
                };
                let bound = (10u128 << n).min(100);
                assert!(wait.as_millis() < bound, "retry {n}: {wait:?}");
                *top = (*top).max(wait.as_millis());
            }
        }
        assert_eq!(largest, [9, 19, 39, 79, 99, 99]);
    }

    #[test]
    fn only_the_request_headers_retries_read_are_kept() {
        let h = headers(&[
            ("x-envoy-retriable-status-codes", "418"),
            ("user-agent", "curl"),
            ("early-data", "1"),
        ]);
        let kept = request_headers(&h);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[RETRIABLE_STATUS_CODES], "418");
        assert!(kept.contains_key(EARLY_DATA) && !kept.contains_key("user-agent"));
        assert!(request_headers(&headers(&[("user-agent", "curl")])).is_empty());
    }
}
