//! The supported kinds, object metadata, and the `Resource` enum that holds any one object.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::destination_rule::DestinationRule;
use crate::peer_authentication::PeerAuthentication;
use crate::pod::Pod;
use crate::service::Service;
use crate::virtual_service::VirtualService;

/// Human-readable list of what weft accepts, used in "unsupported kind" errors.
pub(crate) const SUPPORTED_KINDS: &str = "VirtualService and DestinationRule \
(networking.istio.io/v1alpha3, v1beta1, v1), PeerAuthentication (security.istio.io/v1beta1, v1), \
Service and Pod (v1)";

const NETWORKING_VERSIONS: &[&str] = &[
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
];
const SECURITY_VERSIONS: &[&str] = &["security.istio.io/v1beta1", "security.istio.io/v1"];
const CORE_VERSIONS: &[&str] = &["v1"];

/// Istio kinds that exist but that weft does not implement; named as such in errors.
const KNOWN_ISTIO_KINDS: &[&str] = &[
    "Gateway",
    "ServiceEntry",
    "Sidecar",
    "WorkloadEntry",
    "WorkloadGroup",
    "EnvoyFilter",
    "ProxyConfig",
    "AuthorizationPolicy",
    "RequestAuthentication",
    "Telemetry",
    "WasmPlugin",
];

/// A kind of object weft stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `networking.istio.io` VirtualService.
    VirtualService,
    /// `networking.istio.io` DestinationRule.
    DestinationRule,
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication,
    /// Kubernetes core `v1` Service.
    Service,
    /// Kubernetes core `v1` Pod: the platform's record of a workload (see [`crate::pod`]).
    Pod,
}

impl Kind {
    /// Every kind, in a stable order.
    pub const ALL: [Kind; 5] = [
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::PeerAuthentication,
        Kind::Service,
        Kind::Pod,
    ];

    /// Resolves a kubectl-style name: singular, plural, short name or kind, case-insensitive,
    /// optionally with the API group (`virtualservices.networking.istio.io`).
    pub fn from_cli(name: &str) -> Option<Kind> {
        let lower = name.to_ascii_lowercase();
        let (resource, group) = match lower.split_once('.') {
            Some((resource, group)) => (resource, Some(group)),
            None => (lower.as_str(), None),
        };
        let kind = match resource {
            "virtualservice" | "virtualservices" | "vs" => Kind::VirtualService,
            "destinationrule" | "destinationrules" | "dr" => Kind::DestinationRule,
            "peerauthentication" | "peerauthentications" | "pa" => Kind::PeerAuthentication,
            "service" | "services" | "svc" => Kind::Service,
            "pod" | "pods" | "po" => Kind::Pod,
            _ => return None,
        };
        match group {
            None => Some(kind),
            Some(group) if group == kind.group() => Some(kind),
            Some(_) => None,
        }
    }

    /// The `kind:` value, e.g. `VirtualService`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::Service => "Service",
            Kind::Pod => "Pod",
        }
    }

    /// The API group (empty for the Kubernetes core group).
    pub fn group(self) -> &'static str {
        match self {
            Kind::VirtualService | Kind::DestinationRule => "networking.istio.io",
            Kind::PeerAuthentication => "security.istio.io",
            Kind::Service | Kind::Pod => "",
        }
    }

    /// The name kubectl prints in output lines: `virtualservice.networking.istio.io`, `service`.
    pub fn api_resource(self) -> String {
        let singular = self.as_str().to_ascii_lowercase();
        match self.group() {
            "" => singular,
            group => format!("{singular}.{group}"),
        }
    }

    /// The accepted `apiVersion` values, oldest first.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::VirtualService | Kind::DestinationRule => NETWORKING_VERSIONS,
            Kind::PeerAuthentication => SECURITY_VERSIONS,
            Kind::Service | Kind::Pod => CORE_VERSIONS,
        }
    }

    /// The `apiVersion` weft writes for new objects (the newest).
    pub fn preferred_api_version(self) -> &'static str {
        self.api_versions().last().copied().unwrap_or("v1")
    }

    /// Parses the `kind:` field exactly as written in YAML.
    fn from_kind_field(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    /// Checks a document's `apiVersion` + `kind` and returns the kind, or why it is refused.
    pub(crate) fn resolve(api_version: &str, kind: &str) -> Result<Kind, crate::error::Problem> {
        use crate::error::Problem;
        match Kind::from_kind_field(kind) {
            Some(k) if k.api_versions().contains(&api_version) => Ok(k),
            Some(k) => Err(Problem::UnsupportedApiVersion {
                kind: kind.to_string(),
                api_version: api_version.to_string(),
                allowed: k.api_versions().join(", "),
            }),
            None if KNOWN_ISTIO_KINDS.contains(&kind) && api_version.contains(".istio.io/") => {
                Err(Problem::KindNotImplemented {
                    api_version: api_version.to_string(),
                    kind: kind.to_string(),
                })
            }
            None => Err(Problem::UnsupportedKind {
                api_version: api_version.to_string(),
                kind: kind.to_string(),
            }),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kubernetes object metadata: the fields weft uses, plus the server-set ones it accepts and drops.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name (required; a DNS-1123 subdomain, a DNS-1035 label for Services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Namespace; [`crate::parse_documents`] fills in the caller's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    // Server-populated fields that `kubectl get -o yaml` output carries: accepted so such output
    // can be applied again, and dropped because weft's store assigns its own versions.
    #[serde(default, skip_serializing)]
    uid: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    resource_version: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    creation_timestamp: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    deletion_timestamp: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    deletion_grace_period_seconds: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    generation: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    generate_name: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    managed_fields: Option<IgnoredAny>,
    /// Owners; a Pod's controller names its workload ([`crate::pod::Pod::workload_name`]). Kept
    /// for every kind (it is data, not a setting to honour).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
    #[serde(default, skip_serializing)]
    finalizers: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    self_link: Option<IgnoredAny>,
}

/// One of `metadata.ownerReferences`: the fields that say which object controls this one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OwnerReference {
    /// The owner's API version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    /// The owner's kind (`ReplicaSet`, `Job`, ...).
    #[serde(default)]
    pub kind: String,
    /// The owner's name.
    #[serde(default)]
    pub name: String,
    /// Whether the owner is the managing controller (at most one is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
    #[serde(default, skip_serializing)]
    uid: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    block_owner_deletion: Option<IgnoredAny>,
}

impl OwnerReference {
    /// A controller reference to `kind` `name`.
    pub fn controller(kind: &str, name: &str) -> Self {
        Self {
            kind: kind.to_string(),
            name: name.to_string(),
            controller: Some(true),
            ..Self::default()
        }
    }
}

impl ObjectMeta {
    /// Metadata with just a name and namespace.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Self::default()
        }
    }
}

/// Identifies one stored object: kind, namespace and name. Orders by kind, then namespace, then name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    /// The kind.
    pub kind: Kind,
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Any one object weft stores. Serializes exactly as the object's YAML/JSON (no extra tag).
// Not boxed: a configuration holds at most thousands of objects, and boxing would make every
// consumer's pattern matching clumsier for a few hundred bytes each.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    /// A VirtualService.
    VirtualService(VirtualService),
    /// A DestinationRule.
    DestinationRule(DestinationRule),
    /// A PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
    /// A Kubernetes Service.
    Service(Service),
    /// A Kubernetes Pod (the platform's record of a workload).
    Pod(Pod),
}

impl Resource {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::VirtualService(_) => Kind::VirtualService,
            Resource::DestinationRule(_) => Kind::DestinationRule,
            Resource::PeerAuthentication(_) => Kind::PeerAuthentication,
            Resource::Service(_) => Kind::Service,
            Resource::Pod(_) => Kind::Pod,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::VirtualService(o) => &o.metadata,
            Resource::DestinationRule(o) => &o.metadata,
            Resource::PeerAuthentication(o) => &o.metadata,
            Resource::Service(o) => &o.metadata,
            Resource::Pod(o) => &o.metadata,
        }
    }

    /// The object's metadata, mutable (for the store to set labels or the namespace).
    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Resource::VirtualService(o) => &mut o.metadata,
            Resource::DestinationRule(o) => &mut o.metadata,
            Resource::PeerAuthentication(o) => &mut o.metadata,
            Resource::Service(o) => &mut o.metadata,
            Resource::Pod(o) => &mut o.metadata,
        }
    }

    /// The object's `apiVersion` as written.
    pub fn api_version(&self) -> &str {
        match self {
            Resource::VirtualService(o) => &o.api_version,
            Resource::DestinationRule(o) => &o.api_version,
            Resource::PeerAuthentication(o) => &o.api_version,
            Resource::Service(o) => &o.api_version,
            Resource::Pod(o) => &o.api_version,
        }
    }

    /// The namespace (`default` if, unusually, none was ever set).
    pub fn namespace(&self) -> &str {
        self.metadata().namespace.as_deref().unwrap_or("default")
    }

    /// The name (empty only for objects that failed validation).
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }

    /// The stable identity used by the store and in messages.
    pub fn key(&self) -> ResourceKey {
        ResourceKey {
            kind: self.kind(),
            namespace: self.namespace().to_string(),
            name: self.name().to_string(),
        }
    }

    /// The object as YAML (for `pilot get -o yaml`).
    pub fn to_yaml(&self) -> Result<String, serde_saphyr::SerializeError> {
        serde_saphyr::to_string(self)
    }

    /// The object as pretty JSON (for `pilot get -o json`).
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }
}

/// Reads an object back from JSON or any self-describing format (the store's encoding).
/// Positions are not tracked here; use [`crate::parse_documents`] for user input.
impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let kind = Kind::resolve(&field("apiVersion"), &field("kind")).map_err(D::Error::custom)?;
        let resource = match kind {
            Kind::VirtualService => serde_json::from_value(value).map(Resource::VirtualService),
            Kind::DestinationRule => serde_json::from_value(value).map(Resource::DestinationRule),
            Kind::PeerAuthentication => {
                serde_json::from_value(value).map(Resource::PeerAuthentication)
            }
            Kind::Service => serde_json::from_value(value).map(Resource::Service),
            Kind::Pod => serde_json::from_value(value).map(Resource::Pod),
        };
        resource.map_err(D::Error::custom)
    }
}

/// The first, lenient read of a document: just enough to choose the concrete type and name the
/// object in errors. Parsing twice keeps line/column in errors (an internally tagged enum loses them).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TypeMeta {
    #[serde(default)]
    pub(crate) api_version: Option<String>,
    #[serde(default)]
    pub(crate) kind: Option<String>,
    #[serde(default)]
    pub(crate) metadata: Option<MetaPeek>,
}

/// Name and namespace read leniently, so errors can name the object even if its metadata is bad.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct MetaPeek {
    #[serde(default)]
    pub(crate) name: Option<LenientString>,
    #[serde(default)]
    pub(crate) namespace: Option<LenientString>,
}

/// Any scalar as a string; anything else as nothing. Never fails.
#[derive(Debug, Default)]
pub(crate) struct LenientString(pub(crate) Option<String>);

impl<'de> Deserialize<'de> for LenientString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer).unwrap_or_default();
        Ok(LenientString(match value {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }))
    }
}

/// Ignored top-level `status`, as written by `kubectl get -o yaml`.
pub(crate) type IgnoredStatus = Option<IgnoredAny>;
