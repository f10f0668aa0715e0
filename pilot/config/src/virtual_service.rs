//! VirtualService (`networking.istio.io` v1alpha3/v1beta1/v1): HTTP routing rules for a set of hosts.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::error::FieldPath;
use crate::host;
use crate::resource::{IgnoredStatus, ObjectMeta};
use crate::validate::Report;

pub mod mirror_compare;

type Unimplemented = Option<serde_json::Value>;

/// A VirtualService object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualService {
    /// `networking.istio.io/v1alpha3`, `v1beta1` or `v1`, as written.
    pub api_version: String,
    /// Always `VirtualService`.
    pub kind: String,
    /// Name, namespace, labels, annotations.
    pub metadata: ObjectMeta,
    /// The routing rules.
    #[serde(default)]
    pub spec: VirtualServiceSpec,
    #[serde(default, skip_serializing)]
    status: IgnoredStatus,
}

/// `spec` of a VirtualService.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Hosts the rules apply to (short names, FQDNs or `*.` wildcards).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Gateways; only the sidecar gateway `mesh` is implemented.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Ordered HTTP rules: the first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
    /// Namespaces the rule is visible to (`.` = own, `*` = all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tcp: Unimplemented,
}

/// One HTTP rule (`HTTPRoute`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRoute {
    /// Rule name, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Match blocks, ORed; an empty list matches everything.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<HttpRouteDestination>,
    /// Redirect instead of routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<HttpRedirect>,
    /// URI/authority rewrite before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<HttpRewrite>,
    /// Request timeout; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retry policy; absent means the mesh default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetry>,
    /// Fault injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFaultInjection>,
    /// Legacy single mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Destination>,
    /// Share of traffic sent to `mirror` (absent = 100%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<Percent>,
    /// Deprecated integer form of `mirrorPercentage`.
    #[serde(
        default,
        alias = "mirror_percent",
        skip_serializing_if = "Option::is_none"
    )]
    pub mirror_percent: Option<i64>,
    /// Multiple mirrors, each with its own percentage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// Header operations for all destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delegate: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cors_policy: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    direct_response: Unimplemented,
}

/// Match conditions of one block; all set conditions must hold (`HTTPMatchRequest`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatchRequest {
    /// Match name, for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Path match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    /// Scheme match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    /// Method match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// Authority (Host) match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// Header matches by lowercase name; `{}` tests presence.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    /// Destination port of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Applies the rule only to client workloads with these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// Applies the rule only to clients in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// Query parameter matches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Case-insensitive `uri` exact/prefix matching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_uri_case: Option<bool>,
    /// Headers that must not match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gateways: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stat_prefix: Unimplemented,
}

/// One of `exact`, `prefix` or `regex` (RE2, full match). All empty is valid only for header
/// presence checks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StringMatch {
    /// Exact, case-sensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// Prefix, case-sensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// RE2-style regular expression matching the whole value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// The one condition a [`StringMatch`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringMatchKind<'a> {
    /// Exact value.
    Exact(&'a str),
    /// Prefix.
    Prefix(&'a str),
    /// Whole-value regex.
    Regex(&'a str),
    /// Nothing set: presence only.
    Present,
}

impl StringMatch {
    /// The condition, assuming the object validated (exactly one or none set).
    pub fn kind(&self) -> StringMatchKind<'_> {
        match (&self.exact, &self.prefix, &self.regex) {
            (Some(v), _, _) => StringMatchKind::Exact(v),
            (None, Some(v), _) => StringMatchKind::Prefix(v),
            (None, None, Some(v)) => StringMatchKind::Regex(v),
            (None, None, None) => StringMatchKind::Present,
        }
    }
}

/// A weighted destination (`HTTPRouteDestination`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteDestination {
    /// Where to send.
    pub destination: Destination,
    /// Relative weight 0-100; ignored when it is the only destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    /// Header operations for this destination only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

/// A service (and optionally subset and port) to send to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Destination {
    /// Service host, short or FQDN; see [`crate::host::expand`].
    #[serde(default)]
    pub host: String,
    /// Subset name defined by a DestinationRule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Service port; needed when the Service has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

/// A port by number.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSelector {
    /// Port number 1-65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
}

/// A percentage 0-100 with fractions (`{value: 12.5}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Percent {
    /// The percentage.
    #[serde(default)]
    pub value: f64,
}

/// One of several mirrors (`HTTPMirrorPolicy`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMirrorPolicy {
    /// Mirror target (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    /// Share mirrored (absent = 100%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

/// Request and response header operations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Headers {
    /// Applied to the request before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOperations>,
    /// Applied to the response before returning it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperations>,
}

/// Set, add (append) and remove header operations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderOperations {
    /// Overwrite these headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Append to these headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Remove these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// URI and authority rewrite (`HTTPRewrite`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRewrite {
    /// Replaces the matched prefix (or the whole path for exact/regex matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// New Host/:authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Regex-based path rewrite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// `uriRegexRewrite`: RE2 `match` and a `rewrite` with `\1`-style groups.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegexRewrite {
    /// Pattern.
    #[serde(default, rename = "match")]
    pub pattern: String,
    /// Replacement.
    #[serde(default)]
    pub rewrite: String,
}

/// Redirect response (`HTTPRedirect`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRedirect {
    /// New path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// New authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// New port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// `FROM_PROTOCOL_DEFAULT` or `FROM_REQUEST_PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derive_port: Option<DerivePort>,
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// 301 (default), 302, 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix_rewrite: Unimplemented,
}

/// How a redirect picks its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DerivePort {
    /// 80 for http, 443 for https.
    FromProtocolDefault,
    /// The port of the original request.
    FromRequestPort,
}

/// Retry policy (`HTTPRetry`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRetry {
    /// Number of retries (not counting the first try); 0 disables retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i64>,
    /// Timeout per try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Comma list of Envoy retry conditions and status codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<String>,
    /// Retry in other localities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_remote_localities: Option<bool>,
    /// Avoid hosts already tried (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ignore_previous_hosts: Option<bool>,
    /// Base backoff interval (default 25ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
}

/// Fault injection (`HTTPFaultInjection`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpFaultInjection {
    /// Delay before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer with an error instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// `fault.delay`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    /// How long to delay (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_delay: Option<Duration>,
    /// Share of requests delayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage, used when `percentage` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exponential_delay: Unimplemented,
}

/// `fault.abort`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    /// HTTP status to answer with (200-599).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i64>,
    /// Share of requests aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    /// Deprecated integer percentage, used when `percentage` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grpc_status: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http2_error: Unimplemented,
}

/// Envoy retry conditions Istio accepts in `retryOn` (`ValidateHTTPRetry`).
const RETRY_ON_POLICIES: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

// === validation ===

impl VirtualServiceSpec {
    pub(crate) fn validate(&self, report: &mut Report, path: &FieldPath) {
        if self.hosts.is_empty() {
            report.push(
                &path.field("hosts"),
                crate::error::Problem::required(
                    "at least one host; delegate VirtualServices without hosts are not implemented by weft yet",
                ),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, host) in self.hosts.iter().enumerate() {
            let at = path.field("hosts").index(i);
            if let Err(message) = host::check(host, true) {
                report.invalid(&at, message);
            } else if !seen.insert(host.to_ascii_lowercase()) {
                report.invalid(&at, format!("duplicate host {host:?} in virtual service"));
            }
        }
        for (i, gateway) in self.gateways.iter().enumerate() {
            if gateway != "mesh" {
                report.push(
                    &path.field("gateways").index(i),
                    crate::error::Problem::not_implemented(format!(
                        "only the sidecar gateway \"mesh\" is implemented, got {gateway:?}"
                    )),
                );
            }
        }
        report.not_implemented(
            &path.field("tls"),
            &self.tls,
            "only http routes are implemented",
        );
        report.not_implemented(
            &path.field("tcp"),
            &self.tcp,
            "only http routes are implemented",
        );
        if self.http.is_empty() {
            report.push(
                &path.field("http"),
                crate::error::Problem::required("at least one http route"),
            );
        }
        for (i, route) in self.http.iter().enumerate() {
            route.validate(report, &path.field("http").index(i));
        }
        validate_export_to(report, &path.field("exportTo"), &self.export_to);
    }
}

/// `exportTo` entries: `.`, `*`, `~` or a namespace name. Translation shows every rule to every
/// namespace (Istio's default, `*`), so a list without `*` would be silently widened: refused.
pub(crate) fn validate_export_to(report: &mut Report, path: &FieldPath, export_to: &[String]) {
    for (i, entry) in export_to.iter().enumerate() {
        if entry != "." && entry != "*" && entry != "~" {
            report.dns1123_label(&path.index(i), entry);
        }
    }
    report.not_implemented_if(
        path,
        !export_to.is_empty() && !export_to.iter().any(|e| e == "*"),
        "every rule is visible in every namespace; only \"*\" is implemented",
    );
}

impl HttpRoute {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        report.not_implemented(&path.field("delegate"), &self.delegate, "");
        report.not_implemented(&path.field("corsPolicy"), &self.cors_policy, "");
        report.not_implemented(&path.field("directResponse"), &self.direct_response, "");
        for (i, m) in self.matches.iter().enumerate() {
            m.validate(report, &path.field("match").index(i));
        }

        if self.redirect.is_some() {
            for (field, set) in [
                ("route", !self.route.is_empty()),
                ("fault", self.fault.is_some()),
                ("rewrite", self.rewrite.is_some()),
            ] {
                if set {
                    report.invalid(
                        &path.field(field),
                        format!("HTTP route cannot contain both {field} and redirect"),
                    );
                }
            }
        } else if self.route.is_empty() {
            report.push(
                &path.field("route"),
                crate::error::Problem::required("an HTTP rule needs route or redirect"),
            );
        }
        if let Some(redirect) = &self.redirect {
            redirect.validate(report, &path.field("redirect"));
        }

        let routes = path.field("route");
        for (i, destination) in self.route.iter().enumerate() {
            let at = routes.index(i);
            destination
                .destination
                .validate(report, &at.field("destination"));
            // Weights are relative since Istio 1.15 (each destination gets weight/sum), so there is
            // no upper bound and no need to sum to 100; only negative values are invalid.
            report.non_negative(&at.field("weight"), destination.weight);
            if let Some(headers) = &destination.headers {
                headers.validate(report, &at.field("headers"));
            }
        }
        if self.route.len() > 1 {
            let total: i64 = self.route.iter().filter_map(|d| d.weight).sum();
            if total == 0 {
                report.invalid(
                    &routes,
                    "total destination weight is 0: with more than one destination, give at least one a weight above 0",
                );
            }
        }

        if let Some(rewrite) = &self.rewrite {
            rewrite.validate(report, &path.field("rewrite"));
        }
        report.duration(&path.field("timeout"), &self.timeout);
        if let Some(retries) = &self.retries {
            retries.validate(report, &path.field("retries"));
        }
        if let Some(fault) = &self.fault {
            fault.validate(report, &path.field("fault"));
        }
        self.validate_mirrors(report, path);
        if let Some(headers) = &self.headers {
            headers.validate(report, &path.field("headers"));
        }
    }

    fn validate_mirrors(&self, report: &mut Report, path: &FieldPath) {
        if let Some(mirror) = &self.mirror {
            mirror.validate(report, &path.field("mirror"));
        }
        if self.mirror.is_some() && !self.mirrors.is_empty() {
            report.invalid(
                &path.field("mirrors"),
                "HTTP route cannot contain both mirror and mirrors",
            );
        }
        if let Some(percentage) = &self.mirror_percentage {
            report.percent(
                &path.field("mirrorPercentage").field("value"),
                percentage.value,
            );
        }
        if let Some(percent) = self.mirror_percent {
            report.range(&path.field("mirrorPercent"), percent, 0, 100);
        }
        if self.mirror_percentage.is_some() && self.mirror_percent.is_some() {
            report.invalid(
                &path.field("mirrorPercent"),
                "set only one of mirrorPercentage and the deprecated mirrorPercent",
            );
        }
        for (i, policy) in self.mirrors.iter().enumerate() {
            let at = path.field("mirrors").index(i);
            match &policy.destination {
                Some(destination) => destination.validate(report, &at.field("destination")),
                None => report.push(
                    &at.field("destination"),
                    crate::error::Problem::required("destination is required for mirrors"),
                ),
            }
            if let Some(percentage) = &policy.percentage {
                report.percent(&at.field("percentage").field("value"), percentage.value);
            }
        }
    }
}

impl HttpMatchRequest {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        if let Some(uri) = &self.uri {
            uri.validate(report, &path.field("uri"), true);
        }
        for (field, value) in [
            ("scheme", &self.scheme),
            ("method", &self.method),
            ("authority", &self.authority),
        ] {
            if let Some(m) = value {
                m.validate(report, &path.field(field), false);
            }
        }
        for (field, map) in [
            ("headers", &self.headers),
            ("withoutHeaders", &self.without_headers),
        ] {
            for (name, m) in map {
                let at = path.field(field).key(name);
                if name.is_empty()
                    || name
                        .chars()
                        .any(|c| c.is_ascii_uppercase() || c.is_whitespace())
                {
                    report.invalid(
                        &at,
                        format!("header name {name:?} must be non-empty lowercase without spaces"),
                    );
                }
                m.validate_allow_empty(report, &at);
            }
        }
        // The data-plane model can say "header absent" but not "header absent or not matching".
        for (name, m) in &self.without_headers {
            report.not_implemented_if(
                &path.field("withoutHeaders").key(name),
                m.kind() != StringMatchKind::Present,
                "withoutHeaders with a value; only {} (the header must be absent) is implemented",
            );
        }
        for (name, m) in &self.query_params {
            m.validate_allow_empty(report, &path.field("queryParams").key(name));
        }
        if let Some(port) = self.port {
            report.port(&path.field("port"), port);
        }
        report.labels(&path.field("sourceLabels"), &self.source_labels);
        if let Some(namespace) = &self.source_namespace {
            report.dns1123_label(&path.field("sourceNamespace"), namespace);
        }
        for (i, gateway) in self.gateways.iter().enumerate() {
            if gateway != "mesh" {
                report.push(
                    &path.field("gateways").index(i),
                    crate::error::Problem::not_implemented(
                        "only the sidecar gateway \"mesh\" is implemented",
                    ),
                );
            }
        }
        report.not_implemented(&path.field("statPrefix"), &self.stat_prefix, "");
    }
}

impl StringMatch {
    fn set_count(&self) -> usize {
        [&self.exact, &self.prefix, &self.regex]
            .iter()
            .filter(|v| v.is_some())
            .count()
    }

    /// For uri/scheme/method/authority: exactly one of exact, prefix, regex.
    fn validate(&self, report: &mut Report, path: &FieldPath, allow_empty_prefix: bool) {
        if self.set_count() == 0 {
            report.invalid(path, "set one of exact, prefix or regex");
            return;
        }
        self.validate_allow_empty(report, path);
        let empty = |v: &Option<String>| v.as_deref() == Some("");
        if empty(&self.exact) || empty(&self.regex) || (!allow_empty_prefix && empty(&self.prefix))
        {
            report.invalid(path, "match value must not be empty");
        }
    }

    /// For headers/queryParams: at most one; none means "present".
    fn validate_allow_empty(&self, report: &mut Report, path: &FieldPath) {
        if self.set_count() > 1 {
            report.invalid(path, "set only one of exact, prefix or regex");
        }
        if let Some(pattern) = &self.regex {
            report.regex(&path.field("regex"), pattern);
        }
    }
}

impl Destination {
    pub(crate) fn validate(&self, report: &mut Report, path: &FieldPath) {
        if self.host.is_empty() {
            report.push(&path.field("host"), crate::error::Problem::required(""));
        } else if let Err(message) = host::check(&self.host, false) {
            report.invalid(&path.field("host"), message);
        }
        if let Some(subset) = &self.subset {
            if subset.is_empty() {
                report.invalid(&path.field("subset"), "subset name cannot be empty");
            } else {
                report.dns1123_label(&path.field("subset"), subset);
            }
        }
        if let Some(number) = self.port.as_ref().and_then(|p| p.number) {
            report.port(&path.field("port").field("number"), number);
        }
    }
}

impl Headers {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        for (field, ops) in [("request", &self.request), ("response", &self.response)] {
            let Some(ops) = ops else { continue };
            let at = path.field(field);
            for (op, map) in [("set", &ops.set), ("add", &ops.add)] {
                for name in map.keys() {
                    if name.is_empty() || name.chars().any(char::is_whitespace) {
                        report.invalid(
                            &at.field(op).key(name),
                            format!("header name {name:?} must be non-empty without spaces"),
                        );
                    }
                }
            }
            for (i, name) in ops.remove.iter().enumerate() {
                if name.is_empty() {
                    report.invalid(
                        &at.field("remove").index(i),
                        "header name must not be empty",
                    );
                }
            }
        }
    }
}

impl HttpRewrite {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        if self.uri.is_some() && self.uri_regex_rewrite.is_some() {
            report.invalid(
                path,
                "rewrite may only contain one of uri or uriRegexRewrite",
            );
        }
        if self.uri.is_none() && self.uri_regex_rewrite.is_none() && self.authority.is_none() {
            report.invalid(
                path,
                "rewrite must specify uri, uriRegexRewrite or authority",
            );
        }
        if let Some(regex) = &self.uri_regex_rewrite {
            report.not_implemented_if(
                &path.field("uriRegexRewrite"),
                true,
                "the data-plane model has no regex rewrite; use uri",
            );
            report.regex(
                &path.field("uriRegexRewrite").field("match"),
                &regex.pattern,
            );
        }
    }
}

impl HttpRedirect {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        report.not_implemented(&path.field("prefixRewrite"), &self.prefix_rewrite, "");
        if self.uri.is_none()
            && self.authority.is_none()
            && self.scheme.is_none()
            && self.port.is_none()
            && self.derive_port.is_none()
        {
            report.invalid(
                path,
                "redirect must specify uri, authority, scheme, port or derivePort",
            );
        }
        if self.port.is_some() && self.derive_port.is_some() {
            report.invalid(path, "set only one of port and derivePort");
        }
        if let Some(port) = self.port {
            report.port(&path.field("port"), port);
        }
        if let Some(scheme) = &self.scheme
            && scheme != "http"
            && scheme != "https"
        {
            report.invalid(
                &path.field("scheme"),
                format!("scheme must be http or https, got {scheme:?}"),
            );
        }
        if let Some(code) = self.redirect_code
            && ![301, 302, 303, 307, 308].contains(&code)
        {
            report.invalid(
                &path.field("redirectCode"),
                format!("redirect code must be one of 301, 302, 303, 307, 308, got {code}"),
            );
        }
    }
}

impl HttpRetry {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        report.non_negative(&path.field("attempts"), self.attempts);
        if self.attempts == Some(0)
            && (self.per_try_timeout.is_some()
                || self.retry_on.is_some()
                || self.retry_remote_localities.is_some())
        {
            report.invalid(
                &path.field("attempts"),
                "http retry policy configured when attempts are set to 0 (disabled)",
            );
        }
        report.duration(&path.field("perTryTimeout"), &self.per_try_timeout);
        report.duration(&path.field("backoff"), &self.backoff);
        // What weft's sidecar does is Istio's default for these two (no localities; a retry goes
        // to another endpoint when there is one), so only other values are refused.
        report.not_implemented_if(
            &path.field("retryRemoteLocalities"),
            self.retry_remote_localities == Some(true),
            "weft has no localities; only false is implemented",
        );
        report.not_implemented_if(
            &path.field("retryIgnorePreviousHosts"),
            self.retry_ignore_previous_hosts == Some(false),
            "a retry always prefers another endpoint; only true is implemented",
        );
        if let Some(retry_on) = &self.retry_on {
            for token in retry_on.split(',').map(str::trim) {
                let is_status = token
                    .parse::<u16>()
                    .is_ok_and(|code| (100..=599).contains(&code));
                if !is_status && !RETRY_ON_POLICIES.contains(&token) {
                    report.invalid(
                        &path.field("retryOn"),
                        format!(
                            "{token:?} is not a valid retryOn policy: use an HTTP status code or one of {}",
                            RETRY_ON_POLICIES.join(", ")
                        ),
                    );
                }
            }
        }
    }
}

impl HttpFaultInjection {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        if self.delay.is_none() && self.abort.is_none() {
            report.invalid(
                path,
                "HTTP fault injection must have an abort and/or a delay",
            );
        }
        if let Some(delay) = &self.delay {
            let at = path.field("delay");
            report.not_implemented(&at.field("exponentialDelay"), &delay.exponential_delay, "");
            match &delay.fixed_delay {
                Some(_) => report.duration(&at.field("fixedDelay"), &delay.fixed_delay),
                None if delay.exponential_delay.is_none() => {
                    report.push(&at.field("fixedDelay"), crate::error::Problem::required(""));
                }
                None => {}
            }
            validate_fault_percent(report, &at, &delay.percentage, delay.percent);
        }
        if let Some(abort) = &self.abort {
            let at = path.field("abort");
            report.not_implemented(&at.field("grpcStatus"), &abort.grpc_status, "");
            report.not_implemented(&at.field("http2Error"), &abort.http2_error, "");
            match abort.http_status {
                Some(status) if !(200..=599).contains(&status) => report.invalid(
                    &at.field("httpStatus"),
                    format!("HTTP status {status} is not in range 200-599"),
                ),
                Some(_) => {}
                None if abort.grpc_status.is_none() && abort.http2_error.is_none() => {
                    report.push(&at.field("httpStatus"), crate::error::Problem::required(""));
                }
                None => {}
            }
            validate_fault_percent(report, &at, &abort.percentage, abort.percent);
        }
    }
}

fn validate_fault_percent(
    report: &mut Report,
    path: &FieldPath,
    percentage: &Option<Percent>,
    percent: Option<i64>,
) {
    if let Some(percentage) = percentage {
        report.percent(&path.field("percentage").field("value"), percentage.value);
    }
    if let Some(percent) = percent {
        report.range(&path.field("percent"), percent, 0, 100);
    }
}
