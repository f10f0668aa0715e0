//! The CA and pilot Deployments and their PodDisruptionBudgets.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, ServiceAccountTokenProjection, TCPSocketAction, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    CA_SERVICE, CA_SERVICE_ACCOUNT, CACERTS_SECRET, MESH_CONFIGMAP, Options, PILOT_SERVICE,
    PILOT_SERVICE_ACCOUNT, meta, ports,
};

/// Where the `cacerts` Secret is mounted (the CA: all of it; pilot: only `root-cert.pem`).
pub(super) const CACERTS_DIR: &str = "/etc/cacerts";
/// pilot's projected service-account token (audience `istio-ca`), for its own certificate.
pub(super) const TOKEN_FILE: &str = "/var/run/secrets/tokens/weft-token";
/// The mesh settings file, from ConfigMap `weft-mesh`.
pub(super) const MESH_FILE: &str = "/etc/weft/mesh/mesh.yaml";
/// pilot's data directory (only the config API socket in this mode), inside an emptyDir. Given as
/// `WEFT_PILOT_DATA_DIR`, so `kubectl exec ... -- pilot proxy-status` finds the socket too.
pub(super) const DATA_DIR: &str = "/var/run/weft/pilot";
/// The uid/gid everything runs as (the image's user).
const UID: i64 = 1337;

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_string()).collect()
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn container_port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port.into(),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn requests(cpu: &str, memory: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(memory.into())),
        ])),
        ..ResourceRequirements::default()
    }
}

/// Non-root 1337, read-only root filesystem, no capabilities, no privilege escalation.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(strings(&["ALL"])),
            add: None,
        }),
        privileged: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(UID),
        run_as_group: Some(UID),
        ..SecurityContext::default()
    }
}

fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        // Group-readable mounted secrets and the projected token for uid 1337.
        fs_group: Some(UID),
        run_as_non_root: Some(true),
        run_as_user: Some(UID),
        run_as_group: Some(UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

fn http_probe(path: &str, port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port.into()),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn tcp_probe(port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(port.into()),
            host: None,
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(3),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn deployment(options: &Options, name: &str, service_account: &str, pod: PodSpec) -> Deployment {
    let labels = BTreeMap::from([("app".to_string(), name.to_string())]);
    Deployment {
        metadata: meta(name, Some(&options.namespace), Some(name)),
        spec: Some(DeploymentSpec {
            replicas: Some(options.replicas),
            selector: LabelSelector {
                match_labels: Some(labels),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(super::labels(Some(name))),
                    annotations: Some(BTreeMap::from([(
                        // The control plane is never injected, whatever the namespace says.
                        "sidecar.istio.io/inject".to_string(),
                        "false".to_string(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(service_account.into()),
                    security_context: Some(pod_security()),
                    ..pod
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// `ca serve --cacerts`: the root comes from the `cacerts` Secret, made before install and shared
/// by every replica (nothing is generated at start, so replicas never race to create a root).
pub(super) fn ca_deployment(options: &Options) -> Deployment {
    let listen = format!("0.0.0.0:{}", ports::CA);
    let container = Container {
        name: "ca".into(),
        image: Some(options.image.clone()),
        command: Some(strings(&[
            "ca",
            "serve",
            "--cacerts",
            CACERTS_DIR,
            "--auth",
            "kubernetes",
            "--listen",
            &listen,
            "--trust-domain",
            &options.trust_domain,
            // citadel_server_* for Prometheus, on istiod's monitoring port (the CA's own pod).
            "--monitoring-listen",
            &format!("0.0.0.0:{}", ports::MONITORING),
        ])),
        ports: Some(vec![
            container_port("grpc-ca", ports::CA),
            container_port("http-monitoring", ports::MONITORING),
        ]),
        // `ca serve` loads and checks the Secret before it binds, so an open port means it serves.
        readiness_probe: Some(tcp_probe(ports::CA, 5, 3)),
        liveness_probe: Some(tcp_probe(ports::CA, 15, 4)),
        resources: Some(requests("50m", "64Mi")),
        security_context: Some(container_security()),
        volume_mounts: Some(vec![mount("cacerts", CACERTS_DIR)]),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "cacerts".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(CACERTS_SECRET.into()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    };
    deployment(options, CA_SERVICE, CA_SERVICE_ACCOUNT, pod)
}

/// The flags of pilot's container (also what the tests check against the ports).
pub(super) fn pilot_command(options: &Options) -> Vec<String> {
    let any = |port: u16| format!("0.0.0.0:{port}");
    let ca = format!("{}:{}", options.svc(CA_SERVICE), ports::CA);
    let discovery = format!("{}:{}", options.svc(PILOT_SERVICE), ports::DISCOVERY);
    let root = format!("{CACERTS_DIR}/root-cert.pem");
    let webhook_service = format!("{PILOT_SERVICE}.{}", options.namespace);
    strings(&[
        "pilot",
        "serve",
        "--registry",
        "kubernetes",
        "--listen",
        &any(ports::DISCOVERY),
        "--ca",
        &ca,
        // The root from the cacerts Secret: the istio-ca-root-cert ConfigMap is what pilot writes,
        // so it cannot be what pilot starts from.
        "--ca-root",
        &root,
        "--token-file",
        TOKEN_FILE,
        "--webhook-listen",
        &any(ports::WEBHOOK),
        "--webhook-service",
        &webhook_service,
        "--webhook-patch-ca-bundle",
        "--monitoring-listen",
        &any(ports::MONITORING),
        "--mesh-config",
        MESH_FILE,
        "--inject-image",
        &options.image,
        "--inject-pilot-address",
        &discovery,
        "--inject-ca-address",
        &ca,
    ])
}

/// `pilot serve --registry kubernetes` with discovery, the webhooks and monitoring.
pub(super) fn pilot_deployment(options: &Options) -> Deployment {
    let container = Container {
        name: "pilot".into(),
        image: Some(options.image.clone()),
        command: Some(pilot_command(options)),
        env: Some(vec![EnvVar {
            name: "WEFT_PILOT_DATA_DIR".into(),
            value: Some(DATA_DIR.into()),
            value_from: None,
        }]),
        ports: Some(vec![
            container_port("grpc-xds", ports::DISCOVERY),
            container_port("https-webhook", ports::WEBHOOK),
            container_port("http-monitoring", ports::MONITORING),
        ]),
        // Ready once every watch has listed (discovery serves then); live while it answers.
        readiness_probe: Some(http_probe("/ready", ports::MONITORING, 5, 3)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..http_probe("/healthz", ports::MONITORING, 15, 4)
        }),
        resources: Some(requests("100m", "128Mi")),
        security_context: Some(container_security()),
        volume_mounts: Some(vec![
            mount("weft-token", "/var/run/secrets/tokens"),
            mount("cacerts", CACERTS_DIR),
            mount("mesh", "/etc/weft/mesh"),
            VolumeMount {
                read_only: Some(false),
                ..mount("run", "/var/run/weft")
            },
        ]),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(vec![
            Volume {
                name: "weft-token".into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some("istio-ca".into()),
                            expiration_seconds: Some(43200),
                            path: "weft-token".into(),
                        }),
                        ..VolumeProjection::default()
                    }]),
                    default_mode: None,
                }),
                ..Volume::default()
            },
            Volume {
                // Only the root: pilot has no business with the CA's key.
                name: "cacerts".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(CACERTS_SECRET.into()),
                    items: Some(vec![KeyToPath {
                        key: "root-cert.pem".into(),
                        path: "root-cert.pem".into(),
                        mode: None,
                    }]),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "mesh".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: MESH_CONFIGMAP.into(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "run".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    deployment(options, PILOT_SERVICE, PILOT_SERVICE_ACCOUNT, pod)
}

/// One pod at a time may be evicted (works for any replica count; minAvailable would block
/// every drain of a one-replica install).
pub(super) fn pdb(options: &Options, app: &str) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(app, Some(&options.namespace), Some(app)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("app".to_string(), app.to_string())])),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
