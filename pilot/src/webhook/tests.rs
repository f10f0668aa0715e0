//! The handlers on AdmissionReviews: the seed's pods in, `pilot inject`'s pods out (as a JSONPatch);
//! the injection policy's cases; validation as `pilot apply` does it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(test)] // the whole file is the test module; marks it for tools that scan for test code
use super::*;
use base64::Engine;
use serde_json::{Value, json};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/istio-samples");

/// The first document of a YAML file.
fn yaml_file(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let first = text.split("\n---").next().unwrap();
    serde_saphyr::from_str(first).unwrap()
}

/// The pod a Deployment of the seed makes: its template, named as the ReplicaSet names pods.
fn seed_pod(name: &str) -> Value {
    let deployment = yaml_file(&format!("{EXAMPLES}/{name}.yaml"));
    let template = &deployment["spec"]["template"];
    let mut metadata = template["metadata"].clone();
    metadata["generateName"] = json!(format!("{name}-5d8f7c9b4-"));
    metadata["namespace"] = json!("default");
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
}

fn review_of(group: &str, kind: &str, operation: &str, namespace: &str, object: Value) -> Vec<u8> {
    let version = if group.is_empty() {
        "v1".to_string()
    } else {
        object["apiVersion"]
            .as_str()
            .unwrap_or("v1")
            .rsplit('/')
            .next()
            .unwrap()
            .to_string()
    };
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or("")
        .to_string();
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": format!("{}s", kind.to_lowercase())},
            "name": name,
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "admin"},
            "object": if operation == "DELETE" { Value::Null } else { object.clone() },
            "oldObject": if operation == "DELETE" { object } else { Value::Null },
            "dryRun": false,
        }
    }))
    .unwrap()
}

fn pod_review(pod: &Value) -> Vec<u8> {
    let namespace = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    review_of("", "Pod", "CREATE", &namespace, pod.clone())
}

/// The response of an answer, checked for the uid.
fn response(answer: &[u8]) -> Value {
    let review: Value = serde_json::from_slice(answer).unwrap();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let response = review["response"].clone();
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    response
}

/// The JSONPatch of a response, if any.
fn patch_of(response: &Value) -> Option<json_patch::Patch> {
    let patch = response.get("patch")?.as_str()?;
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

fn admission() -> Admission {
    Admission::new(crate::inject::Options::default())
}

/// `pilot inject`'s output for a pod, as JSON.
fn pilot_inject(pod: &Value) -> Value {
    let out = crate::inject::inject(
        &serde_json::to_string(pod).unwrap(),
        &crate::inject::Options::default(),
    )
    .unwrap();
    serde_saphyr::from_str(&out.yaml).unwrap()
}

fn inject(admission: &Admission, pod: &Value) -> Value {
    response(&admission.inject(&pod_review(pod)).unwrap())
}

fn not_patched(response: &Value) {
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("patch").is_none(), "{response}");
}

fn containers(pod: &Value) -> Vec<String> {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_seeds_pods_are_patched_into_what_pilot_inject_writes() {
    for name in ["httpbin-v1", "httpbin-v2", "sleep"] {
        let pod = seed_pod(name);
        let response = inject(&admission(), &pod);
        assert_eq!(response["allowed"], true);
        let patch = patch_of(&response).unwrap_or_else(|| panic!("{name}: no patch: {response}"));
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        assert_eq!(patched, pilot_inject(&pod), "{name}");
        assert_eq!(
            containers(&patched).last().unwrap(),
            crate::inject::PROXY_CONTAINER
        );
        assert!(patched["metadata"]["annotations"][crate::inject::STATUS_ANNOTATION].is_string());
        // Injected once: the patched pod comes back unchanged.
        not_patched(&inject(&admission(), &patched));
    }
}

#[test]
fn a_pod_without_a_namespace_in_its_metadata_is_patched_without_touching_it() {
    let mut pod = seed_pod("sleep");
    pod["metadata"].as_object_mut().unwrap().remove("namespace");
    let response = response(
        &admission()
            .inject(&review_of("", "Pod", "CREATE", "shop", pod.clone()))
            .unwrap(),
    );
    let patch = patch_of(&response).unwrap();
    assert!(
        !serde_json::to_string(&patch)
            .unwrap()
            .contains("/metadata/namespace")
    );
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    assert!(patched["metadata"].get("namespace").is_none());
    assert_eq!(containers(&patched), ["sleep", "weft-proxy"]);
}

#[test]
fn opting_out_by_label_or_annotation_leaves_the_pod_alone() {
    for field in ["labels", "annotations"] {
        for value in ["false", "False", "no"] {
            let mut pod = seed_pod("httpbin-v1");
            pod["metadata"][field][policy::POD_KEY] = json!(value);
            not_patched(&inject(&admission(), &pod));
        }
    }
}

fn with_namespaces(labels: &'static [(&'static str, Option<&'static str>)]) -> Admission {
    let mut admission = admission();
    admission.namespace_labels = Some(Arc::new(move |namespace: &str| {
        let (_, value) = labels.iter().find(|(n, _)| *n == namespace)?;
        let mut map = BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            namespace.to_string(),
        )]);
        if let Some(v) = value {
            map.insert(policy::NAMESPACE_LABEL.to_string(), (*v).to_string());
        }
        Some(map)
    }));
    admission
}

#[test]
fn namespace_labels_are_honoured_when_known() {
    let admission = with_namespaces(&[
        ("on", Some("enabled")),
        ("off", Some("disabled")),
        ("plain", None),
    ]);
    let in_namespace = |namespace: &str, pod_label: Option<&str>| {
        let mut pod = seed_pod("sleep");
        pod["metadata"]["namespace"] = json!(namespace);
        if let Some(v) = pod_label {
            pod["metadata"]["labels"][policy::POD_KEY] = json!(v);
        }
        patch_of(&inject(&admission, &pod)).is_some()
    };
    assert!(in_namespace("on", None));
    assert!(!in_namespace("off", None), "namespace disabled");
    assert!(
        !in_namespace("off", Some("true")),
        "namespace disabled wins over the pod"
    );
    assert!(!in_namespace("plain", None), "no label anywhere");
    assert!(
        in_namespace("plain", Some("true")),
        "pod label true in an unlabelled namespace"
    );
    assert!(!in_namespace("on", Some("false")));
    // A namespace the lookup does not know: the webhook configuration's selectors decided.
    assert!(in_namespace("unknown", None));
}

#[test]
fn a_pod_label_true_wins_over_an_annotation_false_as_in_istio() {
    let mut pod = seed_pod("sleep");
    pod["metadata"]["labels"][policy::POD_KEY] = json!("true");
    pod["metadata"]["annotations"] = json!({policy::POD_KEY: "false"});
    let response = inject(&with_namespaces(&[("default", None)]), &pod);
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch_of(&response).unwrap()).unwrap();
    assert_eq!(containers(&patched), ["sleep", "weft-proxy"]);
    assert_eq!(
        patched["metadata"]["annotations"][policy::POD_KEY],
        "false",
        "kept as the user wrote it"
    );
}

#[test]
fn pods_injected_before_by_weft_or_istio_are_left_alone() {
    let mut by_istio = seed_pod("sleep");
    by_istio["metadata"]["annotations"] = json!({inject::ISTIO_STATUS_ANNOTATION: "{}"});
    not_patched(&inject(&admission(), &by_istio));
    let mut with_proxy = seed_pod("sleep");
    with_proxy["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "istio-proxy", "image": "istio/proxyv2"}));
    not_patched(&inject(&admission(), &with_proxy));
    let mut with_ours = seed_pod("sleep");
    with_ours["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "weft-proxy", "image": "x"}));
    not_patched(&inject(&admission(), &with_ours));
}

#[test]
fn host_network_system_namespaces_other_kinds_and_updates_are_not_patched() {
    let mut host = seed_pod("sleep");
    host["spec"]["hostNetwork"] = json!(true);
    not_patched(&inject(&admission(), &host));
    let mut system = seed_pod("sleep");
    system["metadata"]["namespace"] = json!("kube-system");
    not_patched(&inject(&admission(), &system));
    // The review's namespace left empty: the pod's own is used.
    not_patched(&response(
        &admission()
            .inject(&review_of("", "Pod", "CREATE", "", system.clone()))
            .unwrap(),
    ));
    let pod = seed_pod("sleep");
    not_patched(&response(
        &admission()
            .inject(&review_of("", "Pod", "UPDATE", "default", pod.clone()))
            .unwrap(),
    ));
    let deployment = yaml_file(&format!("{EXAMPLES}/sleep.yaml"));
    not_patched(&response(
        &admission()
            .inject(&review_of(
                "apps",
                "Deployment",
                "CREATE",
                "default",
                deployment,
            ))
            .unwrap(),
    ));
}

#[test]
fn a_pod_pilot_inject_refuses_is_allowed_with_a_warning() {
    let mut pod = seed_pod("sleep");
    pod["spec"]["containers"] = json!([]);
    let response = inject(&admission(), &pod);
    not_patched(&response);
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(
        warning.starts_with("weft: sidecar not injected: "),
        "{warning}"
    );
    assert!(
        warning.contains("spec.containers: has no containers"),
        "{warning}"
    );
}

fn vs(weight: i64) -> Value {
    let mut vs = yaml_file(&format!("{SAMPLES}/virtual-service-reviews-80-20.yaml"));
    vs["metadata"]["namespace"] = json!("bookinfo");
    vs["spec"]["http"][0]["route"][1]["weight"] = json!(weight);
    vs
}

fn validate(operation: &str, object: Value) -> Value {
    let kind = object["kind"].as_str().unwrap().to_string();
    let group = object["apiVersion"]
        .as_str()
        .unwrap()
        .split_once('/')
        .map_or("", |(g, _)| g)
        .to_string();
    response(
        &admission()
            .validate(&review_of(&group, &kind, operation, "bookinfo", object))
            .unwrap(),
    )
}

#[test]
fn a_bad_virtual_service_is_refused_with_pilot_applys_field_path() {
    let response = validate("CREATE", vs(-5));
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 400);
    let message = response["status"]["message"].as_str().unwrap();
    // What `pilot apply` says of the same object, from the same parser, without file and line.
    let yaml = serde_saphyr::to_string(&vs(-5)).unwrap();
    let errors = weft_pilot_config::parse_documents("vs.yaml", &yaml, "default").unwrap_err();
    let line = errors.errors()[0].to_string();
    assert_eq!(
        message,
        "VirtualService bookinfo/reviews: spec.http[0].route[1].weight: must not be negative, got -5"
    );
    assert!(line.ends_with("(VirtualService bookinfo/reviews): spec.http[0].route[1].weight: must not be negative, got -5"), "{line}");
}

#[test]
fn good_objects_deletes_and_kinds_weft_does_not_serve_are_allowed() {
    assert_eq!(validate("CREATE", vs(20))["allowed"], true);
    assert_eq!(validate("UPDATE", vs(20))["allowed"], true);
    assert_eq!(
        validate("DELETE", vs(-5))["allowed"],
        true,
        "a delete is never refused"
    );
    let dr = yaml_file(&format!("{SAMPLES}/destination-rule-all.yaml"));
    assert_eq!(validate("CREATE", dr)["allowed"], true);
    let gateway = json!({"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "gw"}, "spec": {"nonsense": 1}});
    assert_eq!(validate("CREATE", gateway)["allowed"], true);
    let config_map = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}});
    assert_eq!(validate("CREATE", config_map)["allowed"], true);
}

#[test]
fn bodies_that_are_not_admission_reviews_are_refused_with_a_reason() {
    let bad = |body: &[u8]| admission().inject(body).unwrap_err().0;
    assert!(bad(b"{not json").starts_with("not an AdmissionReview: "));
    assert!(bad(b"[]").starts_with("not an AdmissionReview: "));
    let mut v1beta1: Value = serde_json::from_slice(&pod_review(&seed_pod("sleep"))).unwrap();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    assert!(bad(&serde_json::to_vec(&v1beta1).unwrap()).contains("admission.k8s.io/v1"));
    let no_request = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"});
    assert_eq!(
        bad(&serde_json::to_vec(&no_request).unwrap()),
        "the AdmissionReview has no request"
    );
    assert!(admission().validate(b"\xff\xfe").is_err());
}

#[test]
fn the_ca_gives_dns_names_to_pilots_service_account() {
    assert_eq!(
        crate::discovery::PILOT_SERVICE_ACCOUNT,
        weft_ca::dns::CONTROL_PLANE_SERVICE_ACCOUNT
    );
}

#[test]
fn after_a_handler_failure_the_review_is_allowed_with_a_warning() {
    let response = response(
        &admission()
            .allowed_after_failure(&pod_review(&seed_pod("sleep")))
            .unwrap(),
    );
    not_patched(&response);
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap()
            .contains("failed internally")
    );
    assert!(admission().allowed_after_failure(b"nonsense").is_err());
}
