//! `pilot inject`: adds weft's sidecar to Kubernetes workloads, offline, like `istioctl kube-inject`.
//!
//! [`inject`] is pure: a YAML stream and [`Options`] in, the injected stream and warnings out.
//! Workloads (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob,
//! and `List`s of them, any apiVersion) get, in their pod template:
//! - init container `weft-init` (`sidecar init`: the iptables capture; NET_ADMIN + NET_RAW only);
//! - container `weft-proxy` (`sidecar run --mode transparent` as the proxy uid), with the pod's
//!   identity from the downward API, the CA root from the ConfigMap `istio-ca-root-cert`, and a
//!   projected service-account token with audience `istio-ca`;
//! - their volumes, the labels `security.istio.io/tlsMode` and `service.istio.io/canonical-*`, and
//!   the annotation `sidecar.weft.dev/status` listing what was injected (so that injecting again
//!   replaces it: injection is idempotent).
//!
//! Every other document (Service, ConfigMap, Istio CRDs, skipped workloads) is written back as it was
//! read, comments included; injected documents are re-serialised: the comments heading them are
//! kept, comments inside them are lost (serde-saphyr does not carry comments into a generic value).

mod yaml;

use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_saphyr::MessageFormatter;

use yaml::{Map, Yaml};

/// The pod annotation recording what was injected (`sidecar.istio.io/status` in Istio).
pub const STATUS_ANNOTATION: &str = "sidecar.weft.dev/status";
/// The opt-out annotation (or label), Istio's: `"false"` skips the workload.
pub const INJECT_ANNOTATION: &str = "sidecar.istio.io/inject";
/// The injected init container.
pub const INIT_CONTAINER: &str = "weft-init";
/// The injected sidecar container.
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// Volume with the projected service-account token (`istio-token` in Istio).
pub const TOKEN_VOLUME: &str = "weft-token";
/// Volume with the mesh root certificate.
pub const CA_ROOT_VOLUME: &str = "weft-ca-root-cert";
/// The ConfigMap that volume mounts: Istio's name, which `pilot serve --registry kubernetes`
/// writes into every namespace (a name of weft's own would leave injected pods waiting for a
/// ConfigMap nothing creates).
pub const CA_ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// Audience of the projected token: what the CA checks (Istio's CA audience).
pub const TOKEN_AUDIENCE: &str = "istio-ca";
/// Lifetime asked for the projected token; the kubelet refreshes it at 80%.
pub const TOKEN_EXPIRATION_SECONDS: u64 = 43200;
/// Where the token is mounted, and its file.
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// Where the root certificate is mounted; the ConfigMap's key is `root-cert.pem`.
const CA_ROOT_DIR: &str = "/var/run/secrets/weft";
/// The key of the root certificate in the ConfigMap.
const CA_ROOT_KEY: &str = "root-cert.pem";
/// Namespaces that are never injected (Istio's list; the webhook's policy uses it too).
pub const SYSTEM_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];

/// weft's image (`deploy/image/`: ca, pilot and sidecar in one), tagged with the version.
pub const IMAGE_REPOSITORY: &str = "weft/weft";

/// What gets injected: image, addresses, ports, identity settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The sidecar image (it runs both `sidecar init` and `sidecar run`).
    pub image: String,
    /// pilot's discovery address, `host:port`.
    pub pilot_address: String,
    /// The CA's address, `host:port`.
    pub ca_address: String,
    /// uid (and gid) the proxy runs as; `sidecar init` exempts its traffic from capture.
    pub proxy_uid: u32,
    /// Outbound listener (iptables target for the app's outgoing TCP).
    pub outbound_port: u16,
    /// Inbound listener (iptables target for incoming TCP).
    pub inbound_port: u16,
    /// Admin listener (loopback only).
    pub admin_port: u16,
    /// Status listener serving `/healthz/ready` on the pod IP, for the kubelet's readiness probe;
    /// never captured.
    pub status_port: u16,
    /// Prometheus' scrape port on the pod IP (Istio's 15020: the sidecar's metrics merged with the
    /// app's); the pod's `prometheus.io/*` annotations point here; never captured.
    pub prometheus_port: u16,
    /// The mesh trust domain.
    pub trust_domain: String,
    /// Version recorded in the status annotation.
    pub version: String,
    /// Where the proxy sends spans (OTLP/gRPC, `OTEL_EXPORTER_OTLP_ENDPOINT`); none: no export.
    /// The webhook takes it from the mesh settings (`pilot serve --mesh-config`, `otlpEndpoint`).
    pub otlp_endpoint: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION").to_string();
        Self {
            image: format!("{IMAGE_REPOSITORY}:{version}"),
            pilot_address: "weft-pilot.weft-system.svc:15012".to_string(),
            ca_address: "weft-ca.weft-system.svc:15010".to_string(),
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            admin_port: 15000,
            status_port: 15021,
            prometheus_port: 15020,
            trust_domain: "cluster.local".to_string(),
            version,
            otlp_endpoint: None,
        }
    }
}

/// The result of [`inject`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injected {
    /// The output stream: every input document in order, separated by `---` lines.
    pub yaml: String,
    /// Why a workload was left alone (opt-out, host network, system namespace).
    pub warnings: Vec<String>,
}

/// Why an input cannot be injected. Documents are numbered from 1 in the stream, counting
/// documents with content only (as `pilot apply` does); lines are the stream's, from 1.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    /// The YAML does not parse.
    #[error("document {document} (line {line}): {message}")]
    Syntax {
        /// Document number.
        document: usize,
        /// Line of the problem in the stream.
        line: u64,
        /// The parser's message.
        message: String,
    },
    /// A workload lacks what injection needs (or has it in the wrong shape).
    #[error("document {document} ({object}): {field}: {problem}")]
    Invalid {
        /// Document number.
        document: usize,
        /// `Deployment "ns/name"`, or `object` when the document has no kind.
        object: String,
        /// Field path, e.g. `spec.template.spec.containers`.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// The result could not be written as YAML (not expected for parsed input).
    #[error("document {document}: cannot write the injected object: {message}")]
    Render {
        /// Document number.
        document: usize,
        /// The serialiser's message.
        message: String,
    },
}

/// The `sidecar.weft.dev/status` annotation's JSON.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
struct Status {
    init_containers: Vec<String>,
    containers: Vec<String>,
    volumes: Vec<String>,
    version: String,
}

/// Injects the sidecar into every workload of a YAML stream; see the module docs.
pub fn inject(text: &str, options: &Options) -> Result<Injected, InjectError> {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    let mut number = 0;
    for raw in yaml::split_documents(text) {
        if raw.comments_only {
            out.push(verbatim(raw.text));
            continue;
        }
        number += 1;
        let mut value: Yaml = serde_saphyr::from_str(raw.text).map_err(|e| {
            let line = e.location().map_or(0, |l| l.line()) + raw.line_offset;
            InjectError::Syntax {
                document: number,
                line: line.max(raw.line_offset + 1),
                message: serde_saphyr::UserMessageFormatter
                    .format_message(e.without_snippet())
                    .into_owned(),
            }
        })?;
        let doc = Document { number };
        if doc.object(&mut value, options, &mut warnings)? {
            let text = serde_saphyr::to_string(&value).map_err(|e| InjectError::Render {
                document: number,
                message: e.to_string(),
            })?;
            out.push(verbatim(&format!("{}{text}", leading_comments(raw.text))));
        } else {
            out.push(verbatim(raw.text));
        }
    }
    Ok(Injected {
        yaml: out.join("---\n"),
        warnings,
    })
}

/// The comment lines heading a document (before its first node): kept when it is re-serialised.
fn leading_comments(text: &str) -> String {
    text.lines()
        .map(str::trim_start)
        .take_while(|line| line.is_empty() || line.starts_with('#'))
        .filter(|line| !line.is_empty())
        .fold(String::new(), |out, line| out + line + "\n")
}

/// A document's text ending in exactly one newline.
fn verbatim(text: &str) -> String {
    let mut text = text.trim_end().to_string();
    text.push('\n');
    text
}

/// Where in the stream an object came from, for messages.
struct Document {
    number: usize,
}

/// How an object's pod template is reached.
enum PodPath {
    /// A Pod: the object is the template.
    Itself,
    /// `spec.template` and the like.
    At(&'static [&'static str]),
}

impl Document {
    fn invalid(&self, object: &str, field: &str, problem: impl Into<String>) -> InjectError {
        InjectError::Invalid {
            document: self.number,
            object: object.to_string(),
            field: field.to_string(),
            problem: problem.into(),
        }
    }

    /// Injects one object (recursing into `List` items). `Ok(true)` if it changed.
    fn object(
        &self,
        value: &mut Yaml,
        options: &Options,
        warnings: &mut Vec<String>,
    ) -> Result<bool, InjectError> {
        let Some(object) = value.as_map_mut() else {
            return Err(self.invalid(
                "object",
                "(document)",
                format!(
                    "is {}; a Kubernetes object is a mapping with apiVersion and kind",
                    value.type_name()
                ),
            ));
        };
        let kind = match object.get("kind") {
            Some(Yaml::Str(kind)) if !kind.is_empty() => kind.clone(),
            Some(other) => {
                return Err(self.invalid(
                    "object",
                    "kind",
                    format!("is {}, expected a string", other.type_name()),
                ));
            }
            None => return Err(self.invalid("object", "kind", "is missing")),
        };
        if !matches!(object.get("apiVersion"), Some(Yaml::Str(v)) if !v.is_empty()) {
            return Err(self.invalid(&kind, "apiVersion", "is missing or not a string"));
        }
        let path = match kind.as_str() {
            "Pod" => PodPath::Itself,
            "Deployment"
            | "StatefulSet"
            | "DaemonSet"
            | "ReplicaSet"
            | "ReplicationController"
            | "Job" => PodPath::At(&["spec", "template"]),
            "CronJob" => PodPath::At(&["spec", "jobTemplate", "spec", "template"]),
            "List" => return self.list(object, options, warnings),
            _ => return Ok(false),
        };
        let name = object
            .get("metadata")
            .and_then(|m| m.as_map())
            .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
            .and_then(Yaml::as_str)
            .map(|n| n.trim_end_matches('-').to_string())
            .unwrap_or_default();
        let namespace = object
            .at(&["metadata", "namespace"])
            .and_then(Yaml::as_str)
            .unwrap_or("")
            .to_string();
        let label = if namespace.is_empty() {
            format!("{kind} {name:?}")
        } else {
            format!("{kind} \"{namespace}/{name}\"")
        };
        if SYSTEM_NAMESPACES.contains(&namespace.as_str()) {
            warnings.push(format!(
                "skipping injection because {label} is in the system namespace {namespace}"
            ));
            return Ok(false);
        }
        if opted_out(object) {
            warnings.push(format!(
                "skipping injection because {label} has sidecar injection disabled ({INJECT_ANNOTATION}: \"false\")"
            ));
            return Ok(false);
        }
        let (pod, field) = match path {
            PodPath::Itself => (object, String::new()),
            PodPath::At(path) => {
                let mut node = &mut *object;
                let mut walked = Vec::new();
                for key in path {
                    walked.push(*key);
                    node = match node.get_mut(key) {
                        Some(Yaml::Map(m)) => m,
                        Some(other) => {
                            let problem = format!("is {}, expected a mapping", other.type_name());
                            return Err(self.invalid(&label, &walked.join("."), problem));
                        }
                        None => return Err(self.invalid(&label, &walked.join("."), "is missing")),
                    };
                }
                (node, format!("{}.", path.join(".")))
            }
        };
        if opted_out(pod) {
            warnings.push(format!(
                "skipping injection because {label} has sidecar injection disabled ({INJECT_ANNOTATION}: \"false\")"
            ));
            return Ok(false);
        }
        if pod.at(&["spec", "hostNetwork"]) == Some(&Yaml::Bool(true)) {
            warnings.push(format!(
                "skipping injection because {label} has host networking enabled"
            ));
            return Ok(false);
        }
        let workload = match path {
            PodPath::Itself => pod_workload_name(pod, &name),
            PodPath::At(_) => name,
        };
        inject_pod(pod, &workload, options)
            .map_err(|(f, problem)| self.invalid(&label, &format!("{field}{f}"), problem))?;
        Ok(true)
    }

    /// A `v1 List`: each item is injected as an object of its own.
    fn list(
        &self,
        list: &mut Map,
        options: &Options,
        warnings: &mut Vec<String>,
    ) -> Result<bool, InjectError> {
        let Some(items) = list.get_mut("items") else {
            return Ok(false);
        };
        let Some(items) = items.as_seq_mut() else {
            return Err(self.invalid("List", "items", "is not a list"));
        };
        let mut changed = false;
        for item in items {
            changed |= self.object(item, options, warnings)?;
        }
        Ok(changed)
    }
}

/// `sidecar.istio.io/inject: "false"` as a label or annotation of the object or template.
fn opted_out(object: &Map) -> bool {
    ["labels", "annotations"].iter().any(|field| {
        let value = object
            .get("metadata")
            .and_then(|m| m.as_map())
            .and_then(|m| m.get(field))
            .and_then(|m| m.as_map())
            .and_then(|m| m.get(INJECT_ANNOTATION));
        matches!(value, Some(Yaml::Bool(false)))
            || value
                .and_then(Yaml::as_str)
                .is_some_and(|v| v.eq_ignore_ascii_case("false"))
    })
}

/// A problem found in a pod template: the field (relative to the template) and what is wrong.
type PodError = (String, String);

/// The workload a Pod object belongs to (`weft_pilot_config::pod::workload_name`: the Deployment
/// behind its ReplicaSet, ...), as the webhook sees a pod a controller creates.
fn pod_workload_name(pod: &Map, name: &str) -> String {
    let controller = match pod.at(&["metadata", "ownerReferences"]) {
        Some(Yaml::Seq(owners)) => owners.iter().filter_map(Yaml::as_map).find_map(|o| {
            (o.get("controller") == Some(&Yaml::Bool(true))).then(|| {
                (
                    o.get("kind").and_then(Yaml::as_str).unwrap_or_default(),
                    o.get("name").and_then(Yaml::as_str).unwrap_or_default(),
                )
            })
        }),
        _ => None,
    };
    weft_pilot_config::pod::workload_name(
        name,
        pod.at(&["metadata", "labels", "pod-template-hash"])
            .and_then(Yaml::as_str),
        controller,
    )
}

/// Adds the sidecar to a pod (template): `metadata` and `spec`. Replaces a previous injection.
fn inject_pod(pod: &mut Map, workload: &str, options: &Options) -> Result<(), PodError> {
    let wrong = |field: &str, problem: String| (field.to_string(), problem);
    let previous_app = previous_app_metrics(pod);
    let metadata = pod
        .map_entry("metadata", Some(0))
        .ok_or_else(|| wrong("metadata", "is not a mapping".into()))?;
    let previous: Status = metadata
        .get("annotations")
        .and_then(|a| a.as_map())
        .and_then(|a| a.get(STATUS_ANNOTATION))
        .and_then(Yaml::as_str)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();

    let app_metrics = app_prometheus_annotations(metadata, previous_app, options);

    // Labels first: the proxy's POD_LABELS is built from the final set.
    let labels = metadata
        .map_entry("labels", None)
        .ok_or_else(|| wrong("metadata.labels", "is not a mapping".into()))?;
    let first_label = |labels: &Map, keys: &[&str]| {
        keys.iter()
            .find_map(|k| labels.get(k).and_then(Yaml::scalar_text))
    };
    if !labels.contains_key("security.istio.io/tlsMode") {
        labels.insert("security.istio.io/tlsMode", "istio".into());
    }
    let canonical_name = first_label(
        labels,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .unwrap_or_else(|| workload.to_string());
    if !labels.contains_key("service.istio.io/canonical-name") && !canonical_name.is_empty() {
        labels.insert("service.istio.io/canonical-name", canonical_name.into());
    }
    let canonical_revision = first_label(
        labels,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or_else(|| "latest".to_string());
    if !labels.contains_key("service.istio.io/canonical-revision") {
        labels.insert(
            "service.istio.io/canonical-revision",
            canonical_revision.into(),
        );
    }
    let pod_labels = labels
        .iter()
        .filter_map(|(k, v)| Some(format!("{k}={}", v.scalar_text()?)))
        .collect::<Vec<_>>()
        .join(",");

    // The spec: drop what a previous injection added, then add it afresh.
    let spec = match pod.get_mut("spec") {
        Some(Yaml::Map(spec)) => spec,
        Some(other) => {
            return Err(wrong(
                "spec",
                format!("is {}, expected a mapping", other.type_name()),
            ));
        }
        None => return Err(wrong("spec", "is missing".into())),
    };
    let ours = |list: &[String], fixed: &[&str], name: &str| {
        list.iter().any(|n| n == name) || fixed.contains(&name)
    };
    let mut init_containers = take_list(spec, "initContainers")?;
    init_containers.retain(|c| !ours(&previous.init_containers, &[INIT_CONTAINER], &item_name(c)));
    let mut containers = take_list(spec, "containers")?;
    containers.retain(|c| !ours(&previous.containers, &[PROXY_CONTAINER], &item_name(c)));
    let mut volumes = take_list(spec, "volumes")?;
    volumes.retain(|v| {
        !ours(
            &previous.volumes,
            &[TOKEN_VOLUME, CA_ROOT_VOLUME],
            &item_name(v),
        )
    });
    if containers.is_empty() {
        return Err(wrong("spec.containers", "has no containers".into()));
    }
    for (i, container) in containers.iter().enumerate() {
        if item_name(container).is_empty() {
            return Err(wrong(
                &format!("spec.containers[{i}]"),
                format!(
                    "is {}, expected a container with a name",
                    container.type_name()
                ),
            ));
        }
    }
    let app_container = item_name(&containers[0]);

    init_containers.push(init_container(options));
    containers.push(proxy_container(
        options,
        &pod_labels,
        workload,
        app_metrics.as_deref(),
    ));
    volumes.extend(pod_volumes());
    spec.insert_before("initContainers", Yaml::Seq(init_containers), "containers");
    spec.insert("containers", Yaml::Seq(containers));
    spec.insert("volumes", Yaml::Seq(volumes));

    let status = Status {
        init_containers: vec![INIT_CONTAINER.into()],
        containers: vec![PROXY_CONTAINER.into()],
        volumes: vec![TOKEN_VOLUME.into(), CA_ROOT_VOLUME.into()],
        version: options.version.clone(),
    };
    let status =
        serde_json::to_string(&status).map_err(|e| wrong("metadata.annotations", e.to_string()))?;
    let metadata = pod
        .map_entry("metadata", Some(0))
        .ok_or_else(|| wrong("metadata", "is not a mapping".into()))?;
    let annotations = metadata
        .map_entry("annotations", None)
        .ok_or_else(|| wrong("metadata.annotations", "is not a mapping".into()))?;
    for key in [
        "kubectl.kubernetes.io/default-container",
        "kubectl.kubernetes.io/default-logs-container",
    ] {
        if !annotations.contains_key(key) {
            annotations.insert(key, app_container.clone().into());
        }
    }
    annotations.insert(STATUS_ANNOTATION, status.into());
    if app_metrics.is_some() || !scrape_disabled(annotations) {
        // Istio's metrics merging: Prometheus scrapes the sidecar, which adds the app's metrics.
        annotations.insert("prometheus.io/scrape", "true".into());
        annotations.insert(
            "prometheus.io/port",
            options.prometheus_port.to_string().into(),
        );
        annotations.insert("prometheus.io/path", PROMETHEUS_PATH.into());
    }
    Ok(())
}

/// The path of the merged metrics on the Prometheus port (Istio's).
const PROMETHEUS_PATH: &str = "/stats/prometheus";
/// The proxy's env holding the app's original `prometheus.io/*` annotations (Istio:
/// `ISTIO_PROMETHEUS_ANNOTATIONS`).
const APP_PROMETHEUS_ENV: &str = "WEFT_APP_PROMETHEUS_ANNOTATIONS";
const PROMETHEUS_KEYS: [&str; 3] = ["scrape", "port", "path"];

/// `prometheus.io/scrape: "false"`: the owner does not want the pod scraped; left as written.
fn scrape_disabled(annotations: &Map) -> bool {
    annotations
        .get("prometheus.io/scrape")
        .and_then(Yaml::scalar_text)
        .is_some_and(|v| v == "false")
}

/// What a previous injection kept of the app's annotations (its proxy's env), so that injecting
/// again, when the annotations already point at the sidecar, does not lose them.
fn previous_app_metrics(pod: &Map) -> Option<String> {
    let Some(Yaml::Seq(containers)) = pod.at(&["spec", "containers"]) else {
        return None;
    };
    let proxy = containers
        .iter()
        .find(|c| item_name(c) == PROXY_CONTAINER)?;
    let Some(Yaml::Seq(env)) = proxy.at(&["env"]) else {
        return None;
    };
    env.iter()
        .find(|e| e.at(&["name"]).and_then(Yaml::as_str) == Some(APP_PROMETHEUS_ENV))?
        .at(&["value"])
        .and_then(Yaml::as_str)
        .map(str::to_owned)
}

/// The JSON of the app's own `prometheus.io/*` annotations for the proxy's env, if the pod had
/// any (and has not opted out of scraping).
fn app_prometheus_annotations(
    metadata: &Map,
    previous: Option<String>,
    options: &Options,
) -> Option<String> {
    let annotations = metadata.get("annotations").and_then(Yaml::as_map)?;
    if scrape_disabled(annotations) {
        return None;
    }
    let value = |k: &str| {
        annotations
            .get(&format!("prometheus.io/{k}"))
            .and_then(Yaml::scalar_text)
    };
    if value("port") == Some(options.prometheus_port.to_string())
        && value("path").as_deref() == Some(PROMETHEUS_PATH)
    {
        // Already ours: a previous injection moved the app's into the env.
        return previous;
    }
    let original: std::collections::BTreeMap<&str, String> = PROMETHEUS_KEYS
        .iter()
        .filter_map(|k| Some((*k, value(k)?)))
        .collect();
    if original.is_empty() {
        return None;
    }
    serde_json::to_string(&original).ok()
}

/// The list at `key` (empty if missing or null), or an error if it is something else.
fn take_list(spec: &Map, key: &str) -> Result<Vec<Yaml>, PodError> {
    match spec.get(key) {
        None | Some(Yaml::Null) => Ok(Vec::new()),
        Some(Yaml::Seq(items)) => Ok(items.clone()),
        Some(other) => Err((
            format!("spec.{key}"),
            format!("is {}, expected a list", other.type_name()),
        )),
    }
}

/// The `name` of a container or volume ("" if none).
fn item_name(item: &Yaml) -> String {
    item.at(&["name"])
        .and_then(Yaml::as_str)
        .unwrap_or("")
        .to_string()
}

fn init_container(o: &Options) -> Yaml {
    json!({
        "name": INIT_CONTAINER,
        "image": o.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sidecar", "init"],
        "args": [
            "--proxy-uid", o.proxy_uid.to_string(),
            "--outbound-port", o.outbound_port.to_string(),
            "--inbound-port", o.inbound_port.to_string(),
            "--exclude-inbound-ports", format!("{},{}", o.prometheus_port, o.status_port),
        ],
        "resources": {"requests": {"cpu": "10m", "memory": "10Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "privileged": false,
            // iptables takes its lock under /run.
            "readOnlyRootFilesystem": false,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "runAsUser": 0,
        },
    })
    .into()
}

fn proxy_container(
    o: &Options,
    pod_labels: &str,
    workload: &str,
    app_metrics: Option<&str>,
) -> Yaml {
    let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
    let probe = |period: u32, failures: u32| {
        json!({
            "httpGet": {"path": "/healthz/ready", "port": o.status_port},
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": failures,
        })
    };
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": field("metadata.name")}),
        json!({"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")}),
        json!({"name": "SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")}),
        json!({"name": "INSTANCE_IP", "valueFrom": field("status.podIP")}),
        json!({"name": "POD_LABELS", "value": pod_labels}),
        // Istio's ISTIO_META_WORKLOAD_NAME: the sidecar's own `*_workload` metric label.
        json!({"name": "WORKLOAD_NAME", "value": workload}),
        json!({"name": "WEFT_PILOT", "value": o.pilot_address}),
        json!({"name": "WEFT_CA_ADDR", "value": o.ca_address}),
        json!({"name": "WEFT_CA_ROOT", "value": format!("{CA_ROOT_DIR}/{CA_ROOT_KEY}")}),
        json!({"name": "WEFT_TOKEN_FILE", "value": format!("{TOKEN_DIR}/{TOKEN_VOLUME}")}),
    ];
    if let Some(app) = app_metrics {
        env.push(json!({"name": APP_PROMETHEUS_ENV, "value": app}));
    }
    if let Some(endpoint) = &o.otlp_endpoint {
        env.push(json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": endpoint}));
        env.push(json!({"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": "grpc"}));
    }
    json!({
        "name": PROXY_CONTAINER,
        "image": o.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sidecar", "run"],
        "args": [
            "--mode", "transparent",
            "--outbound-port", o.outbound_port.to_string(),
            "--inbound-port", o.inbound_port.to_string(),
            "--admin-port", o.admin_port.to_string(),
            "--status-port", o.status_port.to_string(),
            "--prometheus-port", o.prometheus_port.to_string(),
            "--trust-domain", o.trust_domain,
        ],
        "ports": [
            // Istio's name for it; Prometheus finds it through the pod's annotations.
            {"containerPort": o.prometheus_port, "name": "http-envoy-prom", "protocol": "TCP"},
        ],
        "env": env,
        "readinessProbe": probe(15, 4),
        "startupProbe": probe(1, 600),
        "resources": {"requests": {"cpu": "10m", "memory": "40Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "runAsGroup": o.proxy_uid,
            "runAsNonRoot": true,
            "runAsUser": o.proxy_uid,
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": CA_ROOT_VOLUME, "mountPath": CA_ROOT_DIR, "readOnly": true},
        ],
    })
    .into()
}

fn pod_volumes() -> Vec<Yaml> {
    vec![
        json!({
            "name": TOKEN_VOLUME,
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": TOKEN_AUDIENCE,
                "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                "path": TOKEN_VOLUME,
            }}]},
        })
        .into(),
        json!({"name": CA_ROOT_VOLUME, "configMap": {"name": CA_ROOT_CONFIGMAP}}).into(),
    ]
}

#[cfg(test)]
mod tests;
