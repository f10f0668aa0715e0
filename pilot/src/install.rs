//! `pilot install`: every manifest a cluster needs for weft, as one multi-document YAML stream
//! (like `istioctl manifest generate`). `deploy/k8s/weft.yaml` is the output with the defaults; a
//! test keeps the two equal.
//!
//! Built from typed values (k8s-openapi) so a misspelt field does not compile; the CRDs are JSON
//! (`crds`), whose schemas a test checks against Istio's samples and the seed's YAML.

mod crds;
mod workloads;

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount, ServicePort};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

pub use crds::crds;

/// The namespace the control plane's identities are issued for: sidecars verify pilot as
/// `spiffe://<td>/ns/weft-system/sa/pilot` and everyone verifies the CA as `.../sa/weft-ca`
/// (`weft_ca::server::CA_NAMESPACE`, `discovery::PILOT_NAMESPACE`).
pub const NAMESPACE: &str = "weft-system";
/// pilot's service account (its SPIFFE identity's `sa`).
pub const PILOT_SERVICE_ACCOUNT: &str = "pilot";
/// The CA's service account.
pub const CA_SERVICE_ACCOUNT: &str = "weft-ca";
/// pilot's Service: discovery, webhooks, monitoring.
pub const PILOT_SERVICE: &str = "weft-pilot";
/// The CA's Service.
pub const CA_SERVICE: &str = "weft-ca";
/// The mesh settings pilot reads (`pilot serve --mesh-config`).
pub const MESH_CONFIGMAP: &str = "weft-mesh";
/// The Secret in Istio's plug-in CA layout, created before install (README "Kubernetes").
pub const CACERTS_SECRET: &str = "cacerts";
/// Names of the webhook configurations pilot patches (`webhook::ca_bundle`).
pub const INJECTOR: &str = "weft-sidecar-injector";
/// The validating webhook configuration.
pub const VALIDATOR: &str = "weft-validator";

/// Ports, one place: the Deployments' flags, container ports, probes and Services use these.
pub mod ports {
    /// The CA's gRPC (Istio: istiod's 15012 serves both; weft splits CA and discovery).
    pub const CA: u16 = 15010;
    /// Discovery.
    pub const DISCOVERY: u16 = 15012;
    /// Monitoring: `/metrics`, `/ready`, `/healthz`.
    pub const MONITORING: u16 = 15014;
    /// The admission webhooks (istiod's 15017); the Service exposes them on 443.
    pub const WEBHOOK: u16 = 15017;
}

/// `pilot install` flags, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The control plane's namespace.
    pub namespace: String,
    /// The image holding `ca`, `pilot` and `sidecar`.
    pub image: String,
    /// Replicas of pilot and of the CA.
    pub replicas: i32,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Leave the CRDs out (a cluster that already has Istio's).
    pub skip_crds: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: NAMESPACE.to_string(),
            image: crate::inject::Options::default().image,
            replicas: 2,
            trust_domain: "cluster.local".to_string(),
            skip_crds: false,
        }
    }
}

/// Why the manifests could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A flag value the manifests cannot honour.
    #[error("{0}")]
    Options(String),
    /// A typed object did not serialise (a bug).
    #[error("cannot serialise {what}: {source}")]
    Serialise {
        /// The object.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The YAML writer failed (a bug).
    #[error("cannot write YAML: {0}")]
    Yaml(String),
}

impl Options {
    fn check(&self) -> Result<(), InstallError> {
        if self.namespace != NAMESPACE {
            return Err(InstallError::Options(format!(
                "--namespace {:?}: sidecars verify pilot as spiffe://<td>/ns/{NAMESPACE}/sa/{PILOT_SERVICE_ACCOUNT} \
                 and the CA as .../ns/{NAMESPACE}/sa/{CA_SERVICE_ACCOUNT}; another namespace is not supported yet",
                self.namespace
            )));
        }
        if self.replicas < 1 {
            return Err(InstallError::Options(format!(
                "--replicas {}: at least 1",
                self.replicas
            )));
        }
        if self.image.trim().is_empty() || self.trust_domain.trim().is_empty() {
            return Err(InstallError::Options(
                "--image and --trust-domain must not be empty".into(),
            ));
        }
        Ok(())
    }

    fn svc(&self, service: &str) -> String {
        format!("{service}.{}.svc", self.namespace)
    }
}

/// Every object, in the order `kubectl apply` needs them (namespace and CRDs first).
pub fn objects(options: &Options) -> Result<Vec<Value>, InstallError> {
    options.check()?;
    let mut out = vec![to_value("Namespace", namespace(options))?];
    if !options.skip_crds {
        out.extend(crds());
    }
    out.push(to_value(
        "ServiceAccount",
        service_account(options, PILOT_SERVICE_ACCOUNT),
    )?);
    out.push(to_value(
        "ServiceAccount",
        service_account(options, CA_SERVICE_ACCOUNT),
    )?);
    for (role, binding) in [pilot_rbac(options), ca_rbac(options)] {
        out.push(to_value("ClusterRole", role)?);
        out.push(to_value("ClusterRoleBinding", binding)?);
    }
    out.push(to_value("ConfigMap", mesh_config(options))?);
    out.push(to_value("Service", ca_service(options))?);
    out.push(to_value("Service", pilot_service(options))?);
    out.push(to_value("Deployment", workloads::ca_deployment(options))?);
    out.push(to_value(
        "Deployment",
        workloads::pilot_deployment(options),
    )?);
    out.push(to_value(
        "PodDisruptionBudget",
        workloads::pdb(options, CA_SERVICE),
    )?);
    out.push(to_value(
        "PodDisruptionBudget",
        workloads::pdb(options, PILOT_SERVICE),
    )?);
    out.push(to_value("MutatingWebhookConfiguration", injector(options))?);
    out.push(to_value(
        "ValidatingWebhookConfiguration",
        validator(options),
    )?);
    Ok(out)
}

/// The manifests as one YAML stream, documents separated by `---`.
pub fn render(options: &Options) -> Result<String, InstallError> {
    let mut out = String::from(
        "# weft's control plane: `pilot install` output (deploy/k8s/weft.yaml holds the defaults).\n\
         # Needs the Secret weft-system/cacerts first (README.md, \"Kubernetes\").\n",
    );
    for (i, object) in objects(options)?.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(
            &serde_saphyr::to_string(object).map_err(|e| InstallError::Yaml(e.to_string()))?,
        );
    }
    Ok(out)
}

fn to_value(what: &str, object: impl serde::Serialize) -> Result<Value, InstallError> {
    serde_json::to_value(object).map_err(|source| InstallError::Serialise {
        what: what.to_string(),
        source,
    })
}

/// `app.kubernetes.io/*` labels every object carries (`kubectl delete -l app.kubernetes.io/part-of=weft`).
fn labels(component: Option<&str>) -> BTreeMap<String, String> {
    let mut labels =
        BTreeMap::from([("app.kubernetes.io/part-of".to_string(), "weft".to_string())]);
    if let Some(component) = component {
        labels.insert("app".to_string(), component.to_string());
    }
    labels
}

fn meta(name: &str, namespace: Option<&str>, component: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(labels(component)),
        ..ObjectMeta::default()
    }
}

fn namespace(options: &Options) -> Namespace {
    Namespace {
        metadata: meta(&options.namespace, None, None),
        ..Namespace::default()
    }
}

fn service_account(options: &Options, name: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(name, Some(&options.namespace), None),
        ..ServiceAccount::default()
    }
}

fn rule(group: &str, resources: &[&str], verbs: &[&str], names: &[&str]) -> PolicyRule {
    let strings = |s: &[&str]| s.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(strings(&[group])),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        resource_names: (!names.is_empty()).then(|| strings(names)),
        ..PolicyRule::default()
    }
}

fn binding(options: &Options, role: &str, service_account: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(role, None, None),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: service_account.into(),
            namespace: Some(options.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

/// pilot: watch what it reads (kube-runtime's watchers only list and watch), keep
/// `istio-ca-root-cert` in every namespace (server-side apply: create/patch; the ConfigMap watcher
/// lists and watches it), and patch the caBundle of its own two webhook configurations.
fn pilot_rbac(options: &Options) -> (ClusterRole, ClusterRoleBinding) {
    let watch = ["list", "watch"];
    let role = ClusterRole {
        metadata: meta("weft-pilot", None, None),
        rules: Some(vec![
            rule("", &["services", "pods", "namespaces"], &watch, &[]),
            rule("discovery.k8s.io", &["endpointslices"], &watch, &[]),
            rule(
                "networking.istio.io",
                &["virtualservices", "destinationrules"],
                &watch,
                &[],
            ),
            rule("security.istio.io", &["peerauthentications"], &watch, &[]),
            rule(
                "",
                &["configmaps"],
                &["get", "list", "watch", "create", "patch"],
                &[],
            ),
            rule(
                "admissionregistration.k8s.io",
                &["mutatingwebhookconfigurations"],
                &["get", "patch"],
                &[INJECTOR],
            ),
            rule(
                "admissionregistration.k8s.io",
                &["validatingwebhookconfigurations"],
                &["get", "patch"],
                &[VALIDATOR],
            ),
        ]),
        ..ClusterRole::default()
    };
    let binding = binding(options, "weft-pilot", PILOT_SERVICE_ACCOUNT);
    (role, binding)
}

/// The CA: TokenReviews only (`ca serve --auth kubernetes`).
fn ca_rbac(options: &Options) -> (ClusterRole, ClusterRoleBinding) {
    let role = ClusterRole {
        metadata: meta("weft-ca", None, None),
        rules: Some(vec![rule(
            "authentication.k8s.io",
            &["tokenreviews"],
            &["create"],
            &[],
        )]),
        ..ClusterRole::default()
    };
    (role, binding(options, "weft-ca", CA_SERVICE_ACCOUNT))
}

/// The mesh settings file pilot reads (`serve::MeshConfig`): Istio's defaults, trace sampling 1%.
pub fn mesh_config_yaml(options: &Options) -> String {
    format!(
        "# weft's mesh settings (pilot serve --mesh-config); edit and restart pilot.\n\
         trustDomain: {}\n\
         # Percent of new traces sampled (Istio's default is 1).\n\
         traceSampling: 1.0\n\
         # Mirrored requests get \"-shadow\" appended to their host (Istio <= 1.27).\n\
         mirrorShadowSuffix: true\n\
         # Where injected sidecars send spans (OTLP/gRPC); deploy/k8s/addons/ runs Jaeger there.\n\
         otlpEndpoint: http://jaeger-collector.{}.svc:4317\n",
        options.trust_domain, options.namespace
    )
}

fn mesh_config(options: &Options) -> ConfigMap {
    ConfigMap {
        metadata: meta(MESH_CONFIGMAP, Some(&options.namespace), None),
        data: Some(BTreeMap::from([(
            "mesh.yaml".to_string(),
            mesh_config_yaml(options),
        )])),
        ..ConfigMap::default()
    }
}

fn port(name: &str, port: u16, target: u16) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: port.into(),
        target_port: Some(IntOrString::Int(target.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

fn service(options: &Options, name: &str, ports: Vec<ServicePort>) -> Service {
    Service {
        metadata: meta(name, Some(&options.namespace), Some(name)),
        spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
            selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Service::default()
    }
}

fn ca_service(options: &Options) -> Service {
    service(
        options,
        CA_SERVICE,
        vec![
            port("grpc-ca", ports::CA, ports::CA),
            port("http-monitoring", ports::MONITORING, ports::MONITORING),
        ],
    )
}

fn pilot_service(options: &Options) -> Service {
    service(
        options,
        PILOT_SERVICE,
        vec![
            port("grpc-xds", ports::DISCOVERY, ports::DISCOVERY),
            port("https-webhook", 443, ports::WEBHOOK),
            port("http-monitoring", ports::MONITORING, ports::MONITORING),
        ],
    )
}

fn client_config(options: &Options, path: &str) -> WebhookClientConfig {
    WebhookClientConfig {
        service: Some(ServiceReference {
            name: PILOT_SERVICE.into(),
            namespace: options.namespace.clone(),
            path: Some(path.into()),
            port: Some(443),
        }),
        // Empty: pilot patches it with its root (`--webhook-patch-ca-bundle`).
        ca_bundle: None,
        url: None,
    }
}

fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_string()).collect()),
    }
}

fn selector(requirements: Vec<LabelSelectorRequirement>) -> LabelSelector {
    LabelSelector {
        match_expressions: Some(requirements),
        match_labels: None,
    }
}

/// Label values of `sidecar.istio.io/inject` the injection table takes as "enabled" (it compares
/// without case; a selector cannot, so the usual spellings are listed).
pub const ENABLED_VALUES: [&str; 11] = [
    "true", "True", "TRUE", "yes", "Yes", "YES", "y", "Y", "on", "On", "ON",
];

/// The namespace selectors leave out the namespaces pilot never injects into.
fn not_system() -> LabelSelectorRequirement {
    requirement(
        "kubernetes.io/metadata.name",
        "NotIn",
        &crate::inject::SYSTEM_NAMESPACES,
    )
}

/// Istio's two entries (pilot/README.md, "Injection policy"): a labelled namespace injects every
/// pod that does not opt out; an unlabelled one only pods that opt in by label. The selectors only
/// decide when the API server calls; `/inject` applies the whole table itself.
fn injector(options: &Options) -> MutatingWebhookConfiguration {
    let webhook = |name: &str, namespace: Vec<LabelSelectorRequirement>, object| MutatingWebhook {
        name: name.into(),
        admission_review_versions: vec!["v1".into()],
        client_config: client_config(options, "/inject"),
        failure_policy: Some("Fail".into()),
        match_policy: Some("Equivalent".into()),
        namespace_selector: Some(selector(namespace)),
        object_selector: Some(selector(object)),
        reinvocation_policy: Some("Never".into()),
        rules: Some(vec![RuleWithOperations {
            api_groups: Some(vec![String::new()]),
            api_versions: Some(vec!["v1".into()]),
            operations: Some(vec!["CREATE".into()]),
            resources: Some(vec!["pods".into()]),
            scope: Some("Namespaced".into()),
        }]),
        side_effects: "None".into(),
        timeout_seconds: Some(10),
        match_conditions: None,
    };
    MutatingWebhookConfiguration {
        metadata: meta(INJECTOR, None, None),
        webhooks: Some(vec![
            webhook(
                "namespace.sidecar-injector.weft.dev",
                vec![
                    requirement("istio-injection", "In", &["enabled"]),
                    not_system(),
                ],
                vec![requirement("sidecar.istio.io/inject", "NotIn", &["false"])],
            ),
            webhook(
                "object.sidecar-injector.weft.dev",
                // Istio has `DoesNotExist`; NotIn also matches a namespace labelled with another
                // value, which the table treats as unlabelled.
                vec![
                    requirement("istio-injection", "NotIn", &["enabled", "disabled"]),
                    not_system(),
                ],
                vec![requirement(
                    "sidecar.istio.io/inject",
                    "In",
                    &ENABLED_VALUES,
                )],
            ),
        ]),
    }
}

/// `/validate` for the Istio kinds weft serves. `Fail` as Istio's validator once istiod is up: a
/// config change is refused while no pilot answers rather than stored unchecked.
fn validator(options: &Options) -> ValidatingWebhookConfiguration {
    let rule = |group: &str, resources: &[&str]| RuleWithOperations {
        api_groups: Some(vec![group.into()]),
        api_versions: Some(vec!["*".into()]),
        operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
        resources: Some(resources.iter().map(|r| (*r).to_string()).collect()),
        scope: Some("Namespaced".into()),
    };
    ValidatingWebhookConfiguration {
        metadata: meta(VALIDATOR, None, None),
        webhooks: Some(vec![ValidatingWebhook {
            name: "validation.weft.dev".into(),
            admission_review_versions: vec!["v1".into()],
            client_config: client_config(options, "/validate"),
            failure_policy: Some("Fail".into()),
            match_policy: Some("Equivalent".into()),
            rules: Some(vec![
                rule(
                    "networking.istio.io",
                    &["virtualservices", "destinationrules"],
                ),
                rule("security.istio.io", &["peerauthentications"]),
            ]),
            side_effects: "None".into(),
            timeout_seconds: Some(10),
            namespace_selector: None,
            object_selector: None,
            match_conditions: None,
        }]),
    }
}

#[cfg(test)]
mod tests;
