//! DestinationRule (`networking.istio.io` v1alpha3/v1beta1/v1): subsets and traffic policy for a host.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::error::{FieldPath, Problem};
use crate::host;
use crate::resource::{IgnoredStatus, ObjectMeta};
use crate::validate::Report;
use crate::virtual_service::{PortSelector, validate_export_to};

type Unimplemented = Option<serde_json::Value>;

/// A DestinationRule object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRule {
    /// `networking.istio.io/v1alpha3`, `v1beta1` or `v1`, as written.
    pub api_version: String,
    /// Always `DestinationRule`.
    pub kind: String,
    /// Name, namespace, labels, annotations.
    pub metadata: ObjectMeta,
    /// Host, subsets, traffic policy.
    #[serde(default)]
    pub spec: DestinationRuleSpec,
    #[serde(default, skip_serializing)]
    status: IgnoredStatus,
}

/// `spec` of a DestinationRule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The service host (short name or FQDN).
    #[serde(default)]
    pub host: String,
    /// Policy for all traffic to the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named groups of endpoints by label.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// Namespaces the rule is visible to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    workload_selector: Unimplemented,
}

/// A named subset of a service's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    /// Subset name (DNS-1123 label), referenced by `destination.subset`.
    #[serde(default)]
    pub name: String,
    /// Endpoint labels that select the subset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Overrides the host-level policy for this subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Load balancing, connection pool, outlier detection and TLS for a destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Load balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Circuit-breaker limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Ejection of failing endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Client-side TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTlsSettings>,
    /// Per-port overrides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tunnel: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proxy_protocol: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_budget: Unimplemented,
}

/// A per-port traffic policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The service port (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
    /// Load balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Circuit-breaker limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Ejection of failing endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Client-side TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTlsSettings>,
}

/// `loadBalancer`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    /// The algorithm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simple: Option<SimpleLb>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    consistent_hash: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    locality_lb_setting: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    warmup_duration_secs: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    warmup: Unimplemented,
}

/// `loadBalancer.simple`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Istio's default: least request.
    Unspecified,
    /// Deprecated alias of `LEAST_REQUEST`.
    LeastConn,
    /// Random endpoint.
    Random,
    /// Connect to the original destination address, no balancing.
    Passthrough,
    /// Round robin.
    RoundRobin,
    /// Fewest active requests (power of two choices).
    LeastRequest,
}

/// `connectionPool`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPoolSettings {
    /// TCP limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpSettings>,
    /// HTTP limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSettings>,
}

/// `connectionPool.tcp`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpSettings {
    /// Maximum connections to the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    /// Connect timeout (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// Close connections older than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<Duration>,
    /// Close connections idle this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tcp_keepalive: Unimplemented,
}

/// `connectionPool.http`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpSettings {
    /// Maximum queued requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<i64>,
    /// Maximum active requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<i64>,
    /// Requests per connection; 1 disables keep-alive, 0 is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<i64>,
    /// Maximum concurrent retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<i64>,
    /// Idle timeout for upstream connections (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// HTTP/2 upgrade policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// Use the client's HTTP version upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_client_protocol: Option<bool>,
    /// Maximum concurrent streams per HTTP/2 connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<i64>,
}

/// `connectionPool.http.h2UpgradePolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    /// Mesh default.
    Default,
    /// Keep HTTP/1.1.
    DoNotUpgrade,
    /// Upgrade to HTTP/2.
    Upgrade,
}

/// `outlierDetection`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx before ejection (0 disables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx_errors: Option<i64>,
    /// Consecutive 502/503/504 before ejection (0 disables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<i64>,
    /// Consecutive local-origin failures (needs `splitExternalLocalOriginErrors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failures: Option<i64>,
    /// Count local-origin failures separately.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_external_local_origin_errors: Option<bool>,
    /// Analysis interval (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// Minimum ejection time (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    /// Maximum share of endpoints ejected (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i64>,
    /// Below this share of healthy endpoints, ejection stops (panic mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_health_percent: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    consecutive_errors: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outlier_detection_http_error_codes: Unimplemented,
}

/// `tls` (ClientTLSSettings).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientTlsSettings {
    /// The TLS mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TlsMode>,
    /// Client certificate file for `MUTUAL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    /// Private key file for `MUTUAL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// CA bundle file to verify the server (`SIMPLE`/`MUTUAL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    /// Accepted server SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// SNI to send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credential_name: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    insecure_skip_verify: Unimplemented,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_crl: Unimplemented,
}

/// `tls.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// Plaintext.
    Disable,
    /// One-way TLS origination.
    Simple,
    /// mTLS with user-supplied certificates.
    Mutual,
    /// mTLS with the mesh identity.
    IstioMutual,
}

// === validation ===

impl DestinationRuleSpec {
    pub(crate) fn validate(&self, report: &mut Report, path: &FieldPath) {
        if self.host.is_empty() {
            report.push(&path.field("host"), Problem::required(""));
        } else if let Err(message) = host::check(&self.host, true) {
            report.invalid(&path.field("host"), message);
        }
        report.not_implemented(&path.field("workloadSelector"), &self.workload_selector, "");
        if let Some(policy) = &self.traffic_policy {
            policy.validate(report, &path.field("trafficPolicy"));
        }
        let mut names = BTreeSet::new();
        for (i, subset) in self.subsets.iter().enumerate() {
            let at = path.field("subsets").index(i);
            if subset.name.is_empty() {
                report.push(
                    &at.field("name"),
                    Problem::required("subset name cannot be empty"),
                );
            } else {
                report.dns1123_label(&at.field("name"), &subset.name);
                if !names.insert(subset.name.as_str()) {
                    report.invalid(
                        &at.field("name"),
                        format!(
                            "duplicate subset name {:?}: subset names must be unique",
                            subset.name
                        ),
                    );
                }
            }
            report.labels(&at.field("labels"), &subset.labels);
            if let Some(policy) = &subset.traffic_policy {
                policy.validate(report, &at.field("trafficPolicy"));
            }
        }
        validate_export_to(report, &path.field("exportTo"), &self.export_to);
    }
}

impl TrafficPolicy {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        report.not_implemented(&path.field("tunnel"), &self.tunnel, "");
        report.not_implemented(&path.field("proxyProtocol"), &self.proxy_protocol, "");
        report.not_implemented(&path.field("retryBudget"), &self.retry_budget, "");
        let empty = self.load_balancer.is_none()
            && self.connection_pool.is_none()
            && self.outlier_detection.is_none()
            && self.tls.is_none()
            && self.port_level_settings.is_empty()
            && self.tunnel.is_none()
            && self.proxy_protocol.is_none()
            && self.retry_budget.is_none();
        if empty {
            report.invalid(path, "traffic policy must have at least one field");
        }
        validate_policy_parts(
            report,
            path,
            &self.load_balancer,
            &self.connection_pool,
            &self.outlier_detection,
            &self.tls,
        );
        let mut ports = BTreeSet::new();
        for (i, port_policy) in self.port_level_settings.iter().enumerate() {
            let at = path.field("portLevelSettings").index(i);
            match port_policy.port.as_ref().and_then(|p| p.number) {
                Some(number) => {
                    report.port(&at.field("port").field("number"), number);
                    if !ports.insert(number) {
                        report.invalid(
                            &at.field("port").field("number"),
                            format!("duplicate port {number} in portLevelSettings"),
                        );
                    }
                }
                None => report.push(&at.field("port").field("number"), Problem::required("")),
            }
            if port_policy.load_balancer.is_none()
                && port_policy.connection_pool.is_none()
                && port_policy.outlier_detection.is_none()
                && port_policy.tls.is_none()
            {
                report.invalid(&at, "port traffic policy must have at least one field");
            }
            validate_policy_parts(
                report,
                &at,
                &port_policy.load_balancer,
                &port_policy.connection_pool,
                &port_policy.outlier_detection,
                &port_policy.tls,
            );
        }
    }
}

fn validate_policy_parts(
    report: &mut Report,
    path: &FieldPath,
    load_balancer: &Option<LoadBalancerSettings>,
    connection_pool: &Option<ConnectionPoolSettings>,
    outlier_detection: &Option<OutlierDetection>,
    tls: &Option<ClientTlsSettings>,
) {
    if let Some(lb) = load_balancer {
        let at = path.field("loadBalancer");
        report.not_implemented(&at.field("consistentHash"), &lb.consistent_hash, "");
        report.not_implemented(&at.field("localityLbSetting"), &lb.locality_lb_setting, "");
        report.not_implemented(
            &at.field("warmupDurationSecs"),
            &lb.warmup_duration_secs,
            "",
        );
        report.not_implemented(&at.field("warmup"), &lb.warmup, "");
    }
    if let Some(pool) = connection_pool {
        pool.validate(report, &path.field("connectionPool"));
    }
    if let Some(outlier) = outlier_detection {
        outlier.validate(report, &path.field("outlierDetection"));
    }
    if let Some(tls) = tls {
        tls.validate(report, &path.field("tls"));
    }
}

impl ConnectionPoolSettings {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        if self.tcp.is_none() && self.http.is_none() {
            report.invalid(path, "connection pool must have at least one field");
        }
        if let Some(tcp) = &self.tcp {
            let at = path.field("tcp");
            report.not_implemented(&at.field("tcpKeepalive"), &tcp.tcp_keepalive, "");
            report.not_implemented_if(
                &at.field("maxConnectionDuration"),
                tcp.max_connection_duration.is_some(),
                "",
            );
            report.non_negative(&at.field("maxConnections"), tcp.max_connections);
            report.duration(&at.field("connectTimeout"), &tcp.connect_timeout);
            report.duration(
                &at.field("maxConnectionDuration"),
                &tcp.max_connection_duration,
            );
            report.duration(&at.field("idleTimeout"), &tcp.idle_timeout);
        }
        if let Some(http) = &self.http {
            let at = path.field("http");
            for (field, value) in [
                ("http1MaxPendingRequests", http.http1_max_pending_requests),
                ("http2MaxRequests", http.http2_max_requests),
                ("maxRequestsPerConnection", http.max_requests_per_connection),
                ("maxRetries", http.max_retries),
                ("maxConcurrentStreams", http.max_concurrent_streams),
            ] {
                report.non_negative(&at.field(field), value);
            }
            report.duration(&at.field("idleTimeout"), &http.idle_timeout);
            for (field, set) in [
                (
                    "maxConcurrentStreams",
                    http.max_concurrent_streams.is_some(),
                ),
                ("useClientProtocol", http.use_client_protocol.is_some()),
                (
                    "h2UpgradePolicy",
                    http.h2_upgrade_policy
                        .is_some_and(|p| p != H2UpgradePolicy::Default),
                ),
            ] {
                report.not_implemented_if(&at.field(field), set, "");
            }
        }
    }
}

impl OutlierDetection {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        report.not_implemented(
            &path.field("consecutiveErrors"),
            &self.consecutive_errors,
            "deprecated in Istio; use consecutive5xxErrors",
        );
        report.not_implemented(
            &path.field("outlierDetectionHttpErrorCodes"),
            &self.outlier_detection_http_error_codes,
            "",
        );
        for (field, value) in [
            ("consecutive5xxErrors", self.consecutive_5xx_errors),
            ("consecutiveGatewayErrors", self.consecutive_gateway_errors),
            (
                "consecutiveLocalOriginFailures",
                self.consecutive_local_origin_failures,
            ),
        ] {
            report.non_negative(&path.field(field), value);
        }
        if self.consecutive_local_origin_failures.is_some()
            && self.split_external_local_origin_errors != Some(true)
        {
            report.invalid(
                &path.field("consecutiveLocalOriginFailures"),
                "consecutiveLocalOriginFailures is only valid when splitExternalLocalOriginErrors is true",
            );
        }
        report.duration(&path.field("interval"), &self.interval);
        report.duration(&path.field("baseEjectionTime"), &self.base_ejection_time);
        for (field, value) in [
            ("maxEjectionPercent", self.max_ejection_percent),
            ("minHealthPercent", self.min_health_percent),
        ] {
            if let Some(value) = value {
                report.range(&path.field(field), value, 0, 100);
            }
        }
    }
}

impl ClientTlsSettings {
    fn validate(&self, report: &mut Report, path: &FieldPath) {
        report.not_implemented(&path.field("credentialName"), &self.credential_name, "");
        report.not_implemented(
            &path.field("insecureSkipVerify"),
            &self.insecure_skip_verify,
            "",
        );
        report.not_implemented(&path.field("caCrl"), &self.ca_crl, "");
        // TLS origination with the user's certificates (to a server outside the mesh) is not in
        // the data-plane model: the sidecar speaks mesh mTLS (ISTIO_MUTUAL, or auto mTLS) or
        // forwards what the application sent (DISABLE). Translation used to turn SIMPLE and MUTUAL
        // into DISABLE, i.e. plaintext where the user asked for TLS.
        let origination = match self.mode {
            Some(TlsMode::Simple) => Some("SIMPLE"),
            Some(TlsMode::Mutual) => Some("MUTUAL"),
            Some(TlsMode::Disable | TlsMode::IstioMutual) | None => None,
        };
        if let Some(name) = origination {
            report.push(
                &path.field("mode"),
                Problem::not_implemented(format!(
                    "mode {name} (TLS origination to a server outside the mesh); implemented: ISTIO_MUTUAL, DISABLE"
                )),
            );
        }
        for (field, set) in [
            ("clientCertificate", self.client_certificate.is_some()),
            ("privateKey", self.private_key.is_some()),
            ("caCertificates", self.ca_certificates.is_some()),
        ] {
            report.not_implemented_if(
                &path.field(field),
                set,
                "certificate files are for modes SIMPLE and MUTUAL",
            );
        }
        // With ISTIO_MUTUAL the sidecar checks the endpoint's SPIFFE identity from the registry
        // and sends no SNI of the user's choosing.
        report.not_implemented_if(
            &path.field("subjectAltNames"),
            !self.subject_alt_names.is_empty(),
            "the endpoint's SPIFFE identity is what is verified",
        );
        report.not_implemented_if(&path.field("sni"), self.sni.is_some(), "");
    }
}
