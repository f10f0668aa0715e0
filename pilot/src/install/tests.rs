#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::webhook::policy::{Decision, decide};
use serde_json::json;

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/k8s/weft.yaml");

#[test]
fn deploy_k8s_weft_yaml_is_the_default_output() {
    let want = render(&Options::default()).unwrap();
    let have = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(COMMITTED, &want).unwrap();
        return;
    }
    assert!(
        have == want,
        "deploy/k8s/weft.yaml is not `pilot install`'s output; regenerate it with\n  \
         cargo run -p weft-pilot --bin pilot -- install > deploy/k8s/weft.yaml\n\
         (or UPDATE_GOLDEN=1 cargo test -p weft-pilot install::)"
    );
}

/// Object by kind and name.
fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Cross-object wiring that no schema checks: every Service's target ports are ports of the
/// containers it selects, probes and `--*listen` flags use declared container ports, the webhooks
/// name a Service port, mounts name volumes. Returns every problem.
fn wiring_problems(objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let deployments: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .collect();
    let container_ports = |app: &str| -> Vec<i64> {
        deployments
            .iter()
            .filter(|d| d["spec"]["template"]["metadata"]["labels"]["app"] == app)
            .flat_map(|d| {
                d["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .unwrap()
            })
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["containerPort"].as_i64())
            .collect()
    };
    for service in objects.iter().filter(|o| o["kind"] == "Service") {
        let name = service["metadata"]["name"].as_str().unwrap();
        let app = service["spec"]["selector"]["app"].as_str().unwrap_or("");
        let have = container_ports(app);
        for port in service["spec"]["ports"].as_array().unwrap() {
            let target = port["targetPort"]
                .as_i64()
                .or(port["port"].as_i64())
                .unwrap();
            if !have.contains(&target) {
                problems.push(format!(
                    "Service {name} targets port {target}, which app={app} does not declare"
                ));
            }
        }
    }
    for deployment in &deployments {
        let pod = &deployment["spec"]["template"]["spec"];
        let volumes: Vec<&str> = pod["volumes"]
            .as_array()
            .map(|v| v.iter().filter_map(|v| v["name"].as_str()).collect())
            .unwrap_or_default();
        for container in pod["containers"].as_array().unwrap() {
            let name = container["name"].as_str().unwrap();
            let declared: Vec<i64> = container["ports"]
                .as_array()
                .map(|p| {
                    p.iter()
                        .filter_map(|p| p["containerPort"].as_i64())
                        .collect()
                })
                .unwrap_or_default();
            for probe in ["readinessProbe", "livenessProbe"] {
                let port = container[probe]["httpGet"]["port"]
                    .as_i64()
                    .or(container[probe]["tcpSocket"]["port"].as_i64());
                match port {
                    Some(port) if declared.contains(&port) => {}
                    other => {
                        problems.push(format!("{name}: {probe} port {other:?} is not declared"))
                    }
                }
            }
            let command: Vec<&str> = container["command"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            for pair in command.windows(2) {
                if pair[0].ends_with("listen") {
                    let port: i64 = pair[1].rsplit(':').next().unwrap().parse().unwrap();
                    if !declared.contains(&port) {
                        problems.push(format!(
                            "{name}: {} {} is not a declared port",
                            pair[0], pair[1]
                        ));
                    }
                }
            }
            for mount in container["volumeMounts"].as_array().unwrap() {
                let volume = mount["name"].as_str().unwrap();
                if !volumes.contains(&volume) {
                    problems.push(format!("{name}: mounts {volume}, which is no volume"));
                }
            }
        }
    }
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        for config in objects.iter().filter(|o| o["kind"] == kind) {
            for webhook in config["webhooks"].as_array().unwrap() {
                let svc = &webhook["clientConfig"]["service"];
                let service = objects
                    .iter()
                    .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == svc["name"]);
                let port_ok = service.is_some_and(|s| {
                    s["spec"]["ports"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p["port"] == svc["port"] && p["targetPort"] == ports::WEBHOOK)
                });
                if !port_ok {
                    problems.push(format!(
                        "{kind} {}: no Service port {} to the webhooks",
                        webhook["name"], svc
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn the_objects_are_wired_to_each_other() {
    let objects = objects(&Options::default()).unwrap();
    assert_eq!(wiring_problems(&objects), Vec::<String>::new());
}

#[test]
fn a_wrong_port_is_caught() {
    let mut objects = objects(&Options::default()).unwrap();
    let service = objects
        .iter_mut()
        .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == PILOT_SERVICE)
        .unwrap();
    service["spec"]["ports"][1]["targetPort"] = json!(15018);
    let problems = wiring_problems(&objects);
    assert!(
        problems.iter().any(|p| p.contains("15018"))
            && problems.iter().any(|p| p.contains("webhooks")),
        "{problems:?}"
    );

    let mut objects = super::objects(&Options::default()).unwrap();
    let pilot = objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == PILOT_SERVICE)
        .unwrap();
    pilot["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] =
        json!(15020);
    let command = &mut pilot["spec"]["template"]["spec"]["containers"][0]["command"];
    let listen = command
        .as_array()
        .unwrap()
        .iter()
        .position(|a| a == "--listen")
        .unwrap();
    command[listen + 1] = json!("0.0.0.0:15011");
    let problems = wiring_problems(&objects);
    assert_eq!(problems.len(), 2, "{problems:?}");
}

#[test]
fn pilot_gets_only_what_it_uses() {
    let objects = objects(&Options::default()).unwrap();
    let rules = &find(&objects, "ClusterRole", "weft-pilot")["rules"];
    let verbs = |group: &str, resource: &str| -> Vec<String> {
        rules
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["apiGroups"][0] == group
                    && r["resources"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x == resource)
            })
            .flat_map(|r| {
                r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
            })
            .collect()
    };
    assert_eq!(verbs("", "pods"), ["list", "watch"]);
    assert_eq!(verbs("", "secrets"), Vec::<String>::new());
    assert_eq!(
        verbs("", "configmaps"),
        ["get", "list", "watch", "create", "patch"]
    );
    assert_eq!(
        verbs("networking.istio.io", "virtualservices"),
        ["list", "watch"]
    );
    for rule in rules.as_array().unwrap() {
        assert!(
            !rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v == "*" || v == "delete" || v == "update"),
            "{rule}"
        );
        if rule["apiGroups"][0] == "admissionregistration.k8s.io" {
            assert!(
                rule["resourceNames"] == json!([INJECTOR])
                    || rule["resourceNames"] == json!([VALIDATOR]),
                "{rule}"
            );
        }
    }
    let ca = &find(&objects, "ClusterRole", "weft-ca")["rules"];
    assert_eq!(
        ca,
        &json!([{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}])
    );
    let binding = find(&objects, "ClusterRoleBinding", "weft-pilot");
    assert_eq!(binding["subjects"][0]["name"], PILOT_SERVICE_ACCOUNT);
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
}

#[test]
fn pilot_mounts_only_the_root_of_the_cacerts_secret() {
    let objects = objects(&Options::default()).unwrap();
    let pod = &find(&objects, "Deployment", PILOT_SERVICE)["spec"]["template"]["spec"];
    let cacerts = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "cacerts")
        .unwrap();
    assert_eq!(
        cacerts["secret"]["items"],
        json!([{"key": "root-cert.pem", "path": "root-cert.pem"}])
    );
    let token = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "weft-token")
        .unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "istio-ca"
    );
    assert_eq!(pod["serviceAccountName"], PILOT_SERVICE_ACCOUNT);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["runAsUser"], 1337);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    // The CLI inside the pod finds the socket through this variable (README: proxy-status).
    assert_eq!(container["env"][0]["name"], "WEFT_PILOT_DATA_DIR");
}

#[test]
fn flags_change_the_manifests() {
    let options = Options {
        image: "registry.local/weft:dev".into(),
        replicas: 3,
        trust_domain: "example.org".into(),
        ..Options::default()
    };
    let objects = objects(&options).unwrap();
    let pilot = find(&objects, "Deployment", PILOT_SERVICE);
    assert_eq!(pilot["spec"]["replicas"], 3);
    assert_eq!(
        pilot["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.local/weft:dev"
    );
    let command = pilot["spec"]["template"]["spec"]["containers"][0]["command"].to_string();
    assert!(
        command.contains(r#""--inject-image","registry.local/weft:dev""#),
        "{command}"
    );
    let mesh = find(&objects, "ConfigMap", MESH_CONFIGMAP)["data"]["mesh.yaml"]
        .as_str()
        .unwrap();
    assert!(mesh.contains("trustDomain: example.org"), "{mesh}");
    let ca = find(&objects, "Deployment", CA_SERVICE)["spec"]["template"]["spec"]["containers"][0]
        ["command"]
        .to_string();
    assert!(ca.contains(r#""--trust-domain","example.org""#), "{ca}");

    let without = super::objects(&Options {
        skip_crds: true,
        ..Options::default()
    })
    .unwrap();
    assert!(
        without
            .iter()
            .all(|o| o["kind"] != "CustomResourceDefinition")
    );
    assert_eq!(
        without.len() + 3,
        super::objects(&Options::default()).unwrap().len()
    );

    for bad in [
        Options {
            namespace: "mesh".into(),
            ..Options::default()
        },
        Options {
            replicas: 0,
            ..Options::default()
        },
        Options {
            image: String::new(),
            ..Options::default()
        },
    ] {
        assert!(
            matches!(super::objects(&bad), Err(InstallError::Options(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn crds_store_v1_and_serve_every_version() {
    for crd in crds() {
        let versions = crd["spec"]["versions"].as_array().unwrap();
        let stored: Vec<_> = versions
            .iter()
            .filter(|v| v["storage"] == true)
            .map(|v| &v["name"])
            .collect();
        assert_eq!(stored, ["v1"], "{}", crd["metadata"]["name"]);
        assert!(versions.iter().all(|v| v["served"] == true));
    }
    let names: Vec<_> = crds()
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "virtualservices.networking.istio.io",
            "destinationrules.networking.istio.io",
            "peerauthentications.security.istio.io"
        ]
    );
}

/// A label selector requirement list (`matchExpressions`) against labels, as the API server
/// evaluates it.
fn matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    selector["matchExpressions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| {
            let value = labels.get(r["key"].as_str().unwrap());
            let values: Vec<&str> = r["values"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match r["operator"].as_str().unwrap() {
                "In" => value.is_some_and(|v| values.contains(&v.as_str())),
                "NotIn" => value.is_none_or(|v| !values.contains(&v.as_str())),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("operator {other}"),
            }
        })
}

/// The injector's selectors never keep a pod from `/inject` that the table (pilot/README.md,
/// "Injection policy") injects, and never send one from a namespace the table excludes.
#[test]
fn injector_selectors_agree_with_the_injection_table() {
    let objects = objects(&Options::default()).unwrap();
    let webhooks = find(&objects, "MutatingWebhookConfiguration", INJECTOR)["webhooks"].clone();
    let mut checked = 0;
    for namespace in ["default", "kube-system"] {
        for ns_label in [None, Some("enabled"), Some("disabled"), Some("other")] {
            for pod_label in [
                None,
                Some(""),
                Some("true"),
                Some("Yes"),
                Some("on"),
                Some("false"),
                Some("no"),
            ] {
                let mut ns_labels = BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    namespace.to_string(),
                )]);
                if let Some(v) = ns_label {
                    ns_labels.insert("istio-injection".into(), v.into());
                }
                let mut pod_labels = BTreeMap::new();
                if let Some(v) = pod_label {
                    pod_labels.insert("sidecar.istio.io/inject".to_string(), v.to_string());
                }
                let called = webhooks.as_array().unwrap().iter().any(|w| {
                    matches(&w["namespaceSelector"], &ns_labels)
                        && matches(&w["objectSelector"], &pod_labels)
                });
                let pod = json!({"metadata": {"labels": pod_labels}, "spec": {}});
                let table = decide(&pod, namespace, Some(&ns_labels)) == Decision::Inject;
                let case = format!("ns {namespace} {ns_label:?}, pod {pod_label:?}");
                if table {
                    assert!(
                        called,
                        "the table injects but the API server would not call: {case}"
                    );
                }
                if ns_label == Some("disabled")
                    || namespace == "kube-system"
                    || pod_label == Some("false")
                {
                    assert!(!called, "called for an excluded pod: {case}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 56);
}

#[test]
fn every_document_renders_as_yaml_that_reads_back() {
    let text = render(&Options::default()).unwrap();
    let documents: Vec<&str> = text.split("\n---\n").collect();
    let objects = objects(&Options::default()).unwrap();
    assert_eq!(documents.len(), objects.len());
    for (document, object) in documents.iter().zip(&objects) {
        let read: Value = serde_saphyr::from_str(document).unwrap();
        assert_eq!(&read, object);
    }
}
