//! PeerAuthentication (`security.istio.io` v1beta1/v1): inbound mTLS mode for workloads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::FieldPath;
use crate::resource::{IgnoredStatus, ObjectMeta};
use crate::validate::Report;

/// A PeerAuthentication object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthentication {
    /// `security.istio.io/v1beta1` or `v1`, as written.
    pub api_version: String,
    /// Always `PeerAuthentication`.
    pub kind: String,
    /// Name, namespace, labels, annotations.
    pub metadata: ObjectMeta,
    /// Selector and modes.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
    #[serde(default, skip_serializing)]
    status: IgnoredStatus,
}

/// `spec` of a PeerAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; absent means the whole namespace (or mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Mode for all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerMtls>,
    /// Per workload (container) port overrides; needs a selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u32, PeerMtls>,
}

/// Label selector for workloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// `mtls`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerMtls {
    /// The mode; absent is `UNSET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
}

/// `mtls.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope (PERMISSIVE at the top).
    Unset,
    /// Plaintext only.
    Disable,
    /// Plaintext or mTLS.
    Permissive,
    /// mTLS required.
    Strict,
}

// === validation ===

impl PeerAuthenticationSpec {
    pub(crate) fn validate(&self, report: &mut Report, path: &FieldPath) {
        if let Some(selector) = &self.selector {
            report.labels(
                &path.field("selector").field("matchLabels"),
                &selector.match_labels,
            );
        }
        let has_selector = self
            .selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty());
        if !self.port_level_mtls.is_empty() && !has_selector {
            report.invalid(
                &path.field("portLevelMtls"),
                "portLevelMtls requires a workload selector (selector.matchLabels)",
            );
        }
        for port in self.port_level_mtls.keys() {
            report.port(
                &path.field("portLevelMtls").key(&port.to_string()),
                i64::from(*port),
            );
        }
    }
}
