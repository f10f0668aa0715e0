//! Unit tests of the pure injection: skip rules, idempotence, options, errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(test)] // the whole file is the test module; marks it for tools that scan for test code
use super::*;

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web, version: v2}
    spec:
      containers:
      - name: web
        image: example/web
";

fn run(text: &str) -> Injected {
    inject(text, &Options::default()).unwrap()
}

fn parse(text: &str) -> Yaml {
    serde_saphyr::from_str(text).unwrap()
}

/// Names of the items of the list at `path`.
fn names(doc: &Yaml, path: &[&str]) -> Vec<String> {
    match doc.at(path) {
        Some(Yaml::Seq(items)) => items.iter().map(item_name).collect(),
        _ => Vec::new(),
    }
}

fn env(container: &Yaml, name: &str) -> Option<String> {
    let Some(Yaml::Seq(vars)) = container.at(&["env"]) else {
        return None;
    };
    vars.iter()
        .find(|v| item_name(v) == name)
        .and_then(|v| v.at(&["value"]))
        .and_then(Yaml::scalar_text)
}

fn proxy(doc: &Yaml, template: &[&str]) -> Yaml {
    let path: Vec<&str> = template
        .iter()
        .copied()
        .chain(["spec", "containers"])
        .collect();
    let Some(Yaml::Seq(containers)) = doc.at(&path) else {
        panic!("no containers at {path:?}");
    };
    containers
        .iter()
        .find(|c| item_name(c) == PROXY_CONTAINER)
        .cloned()
        .expect("no weft-proxy")
}

#[test]
fn injects_a_deployment() {
    let out = run(DEPLOYMENT);
    assert!(out.warnings.is_empty());
    let doc = parse(&out.yaml);
    let t = ["spec", "template"];
    assert_eq!(
        names(&doc, &["spec", "template", "spec", "initContainers"]),
        [INIT_CONTAINER]
    );
    assert_eq!(
        names(&doc, &["spec", "template", "spec", "containers"]),
        ["web", PROXY_CONTAINER]
    );
    assert_eq!(
        names(&doc, &["spec", "template", "spec", "volumes"]),
        [TOKEN_VOLUME, CA_ROOT_VOLUME]
    );
    let labels = doc.at(&["spec", "template", "metadata", "labels"]).unwrap();
    assert_eq!(
        labels.at(&["security.istio.io/tlsMode"]),
        Some(&"istio".into())
    );
    assert_eq!(
        labels.at(&["service.istio.io/canonical-name"]),
        Some(&"web".into())
    );
    assert_eq!(
        labels.at(&["service.istio.io/canonical-revision"]),
        Some(&"v2".into())
    );
    let proxy = proxy(&doc, &t);
    assert_eq!(
        env(&proxy, "POD_LABELS").as_deref(),
        Some(
            "app=web,version=v2,security.istio.io/tlsMode=istio,service.istio.io/canonical-name=web,service.istio.io/canonical-revision=v2"
        )
    );
    assert_eq!(
        env(&proxy, "WEFT_PILOT").as_deref(),
        Some("weft-pilot.weft-system.svc:15012")
    );
    assert_eq!(
        proxy.at(&["securityContext", "runAsUser"]),
        Some(&Yaml::Int(1337))
    );
    let status = doc
        .at(&[
            "spec",
            "template",
            "metadata",
            "annotations",
            STATUS_ANNOTATION,
        ])
        .and_then(Yaml::as_str)
        .unwrap();
    let status: Status = serde_json::from_str(status).unwrap();
    assert_eq!(status.containers, [PROXY_CONTAINER]);
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    // The rest of the object is untouched and in its order.
    assert!(out.yaml.starts_with(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: shop\nspec:\n"
    ));
}

#[test]
fn init_container_has_only_the_capabilities_it_needs() {
    let doc = parse(&run(DEPLOYMENT).yaml);
    let Some(Yaml::Seq(inits)) = doc.at(&["spec", "template", "spec", "initContainers"]) else {
        panic!("no init containers");
    };
    let sc = inits[0].at(&["securityContext"]).unwrap();
    let strings = |path: &[&str]| match sc.at(path) {
        Some(Yaml::Seq(items)) => items.iter().filter_map(Yaml::scalar_text).collect(),
        _ => Vec::<String>::new(),
    };
    assert_eq!(strings(&["capabilities", "add"]), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(strings(&["capabilities", "drop"]), ["ALL"]);
    assert_eq!(sc.at(&["runAsUser"]), Some(&Yaml::Int(0)));
    assert_eq!(sc.at(&["runAsNonRoot"]), Some(&Yaml::Bool(false)));
    assert_eq!(sc.at(&["privileged"]), Some(&Yaml::Bool(false)));
}

#[test]
fn injecting_twice_equals_once() {
    for input in [
        DEPLOYMENT,
        include_str!("../../../deploy/examples/httpbin-v1.yaml"),
        include_str!("../../../deploy/examples/sleep.yaml"),
        include_str!("../../testdata/inject/workloads.yaml"),
        include_str!("../../testdata/inject/passthrough.yaml"),
    ] {
        let once = run(input).yaml;
        let twice = run(&once).yaml;
        assert_eq!(once, twice);
    }
}

#[test]
fn a_stale_injection_is_replaced_not_duplicated() {
    let old = Options {
        image: "weft/sidecar:0.0.1".into(),
        version: "0.0.1".into(),
        ..Options::default()
    };
    let first = inject(DEPLOYMENT, &old).unwrap().yaml;
    let again = run(&first).yaml;
    assert_eq!(again, run(DEPLOYMENT).yaml);
    assert!(!again.contains("0.0.1"));
}

#[test]
fn options_reach_the_containers() {
    let options = Options {
        image: "registry.local/weft:dev".into(),
        pilot_address: "pilot:1".into(),
        ca_address: "ca:2".into(),
        proxy_uid: 2000,
        outbound_port: 16001,
        inbound_port: 16006,
        admin_port: 16000,
        status_port: 16021,
        prometheus_port: 16020,
        trust_domain: "example.org".into(),
        version: "9".into(),
        otlp_endpoint: Some("http://jaeger:4317".into()),
    };
    let doc = parse(&inject(DEPLOYMENT, &options).unwrap().yaml);
    let proxy = proxy(&doc, &["spec", "template"]);
    assert_eq!(env(&proxy, "WEFT_CA_ADDR").as_deref(), Some("ca:2"));
    assert_eq!(
        env(&proxy, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
        Some("http://jaeger:4317")
    );
    assert_eq!(
        env(&proxy, "OTEL_EXPORTER_OTLP_PROTOCOL").as_deref(),
        Some("grpc")
    );
    let default = parse(&inject(DEPLOYMENT, &Options::default()).unwrap().yaml);
    let default_proxy = super::tests::proxy(&default, &["spec", "template"]);
    assert_eq!(env(&default_proxy, "OTEL_EXPORTER_OTLP_ENDPOINT"), None);
    assert_eq!(env(&proxy, "WEFT_PILOT").as_deref(), Some("pilot:1"));
    assert_eq!(
        proxy.at(&["securityContext", "runAsGroup"]),
        Some(&Yaml::Int(2000))
    );
    assert_eq!(
        proxy.at(&["readinessProbe", "httpGet", "port"]),
        Some(&Yaml::Int(16021))
    );
    let args = |c: &Yaml| match c.at(&["args"]) {
        Some(Yaml::Seq(a)) => a.iter().filter_map(Yaml::scalar_text).collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    let proxy_args = args(&proxy).join(" ");
    assert!(
        proxy_args.contains("--outbound-port 16001 --inbound-port 16006 --admin-port 16000 --status-port 16021 --prometheus-port 16020 --trust-domain example.org"),
        "{proxy_args}"
    );
    let Some(Yaml::Seq(inits)) = doc.at(&["spec", "template", "spec", "initContainers"]) else {
        panic!("no init containers");
    };
    assert_eq!(
        args(&inits[0]).join(" "),
        "--proxy-uid 2000 --outbound-port 16001 --inbound-port 16006 --exclude-inbound-ports 16020,16021"
    );
    assert_eq!(
        doc.at(&[
            "spec",
            "template",
            "metadata",
            "annotations",
            "prometheus.io/port"
        ]),
        Some(&"16020".into())
    );
    assert_eq!(
        proxy.at(&["ports"]),
        Some(&Yaml::from(serde_json::json!([
            {"containerPort": 16020, "name": "http-envoy-prom", "protocol": "TCP"}
        ])))
    );
    assert_eq!(
        inits[0].at(&["image"]),
        Some(&"registry.local/weft:dev".into())
    );
}

#[test]
fn opt_out_leaves_the_document_as_written() {
    let cases = [
        DEPLOYMENT.replace("labels: {app: web, version: v2}", "labels: {app: web}\n      annotations: {sidecar.istio.io/inject: \"false\"}"),
        DEPLOYMENT.replace("labels: {app: web, version: v2}", "labels: {app: web, sidecar.istio.io/inject: \"false\"}"),
        DEPLOYMENT.replace("  namespace: shop\n", "  namespace: shop\n  annotations:\n    sidecar.istio.io/inject: \"false\"  # not this one\n"),
        DEPLOYMENT.replace("namespace: shop", "namespace: kube-system"),
    ];
    for input in cases {
        let out = run(&input);
        assert_eq!(out.yaml, input, "{input}");
        assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
        assert!(out.warnings[0].contains("Deployment"), "{:?}", out.warnings);
    }
    let forced = DEPLOYMENT.replace(
        "labels: {app: web, version: v2}",
        "labels: {app: web}\n      annotations: {sidecar.istio.io/inject: \"true\"}",
    );
    assert!(run(&forced).yaml.contains(PROXY_CONTAINER));
}

#[test]
fn host_network_pods_are_skipped() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: ns\nspec:\n  hostNetwork: true\n  containers:\n  - name: c\n    image: i\n";
    let out = run(input);
    assert_eq!(out.yaml, input);
    assert_eq!(
        out.warnings,
        ["skipping injection because Pod \"ns/p\" has host networking enabled"]
    );
}

#[test]
fn other_kinds_pass_through_byte_for_byte() {
    let input = include_str!("../../testdata/inject/passthrough.yaml");
    let out = run(input);
    assert_eq!(out.yaml, input);
    assert!(out.warnings.is_empty());
    // Comment-only documents survive, and documents keep their order.
    let stream = format!("# header\n---\n{DEPLOYMENT}---\n# tail only\n");
    let out = run(&stream).yaml;
    assert!(
        out.starts_with("# header\n---\napiVersion: apps/v1\n"),
        "{out}"
    );
    assert!(out.ends_with("---\n# tail only\n"), "{out}");
}

#[test]
fn cron_job_template_is_under_the_job_template() {
    let input = "\
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: '0 3 * * *'
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: example/report}]
";
    let doc = parse(&run(input).yaml);
    let t = ["spec", "jobTemplate", "spec", "template"];
    let _ = proxy(&doc, &t);
    assert_eq!(
        doc.at(&[
            "spec",
            "jobTemplate",
            "spec",
            "template",
            "metadata",
            "labels",
            "service.istio.io/canonical-name"
        ]),
        Some(&"nightly".into())
    );
    assert!(doc.at(&["spec", "containers"]).is_none());
}

#[test]
fn pods_and_lists_are_injected() {
    let input = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a}
  spec:
    containers: [{name: a, image: a}]
- apiVersion: v1
  kind: Service
  metadata: {name: s}
";
    let doc = parse(&run(input).yaml);
    let Some(Yaml::Seq(items)) = doc.at(&["items"]) else {
        panic!("no items");
    };
    assert_eq!(
        names(&items[0], &["spec", "containers"]),
        ["a", PROXY_CONTAINER]
    );
    assert_eq!(
        items[0].at(&["metadata", "labels", "service.istio.io/canonical-name"]),
        Some(&"a".into())
    );
    assert_eq!(
        items[1],
        parse("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n")
    );
}

#[test]
fn malformed_input_names_the_document_and_the_problem() {
    let stream =
        |doc: &str| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n---\n{doc}");
    let error = |doc: &str| {
        inject(&stream(doc), &Options::default())
            .unwrap_err()
            .to_string()
    };

    let syntax = error("kind: Pod\nspec: [unclosed\n");
    assert!(syntax.starts_with("document 2 (line "), "{syntax}");

    assert_eq!(
        error("- a list\n"),
        "document 2 (object): (document): is a list; a Kubernetes object is a mapping with apiVersion and kind"
    );
    assert_eq!(
        error("apiVersion: v1\nmetadata: {name: x}\n"),
        "document 2 (object): kind: is missing"
    );
    assert_eq!(
        error("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 1}\n"),
        "document 2 (Deployment \"d\"): spec.template: is missing"
    );
    assert_eq!(
        error(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: ns}\nspec:\n  template:\n    spec: {containers: {name: x}}\n"
        ),
        "document 2 (Deployment \"ns/d\"): spec.template.spec.containers: is a mapping, expected a list"
    );
    assert_eq!(
        error("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n"),
        "document 2 (Pod \"p\"): spec.containers: has no containers"
    );
    assert_eq!(
        error(
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec: {jobTemplate: {spec: {template: 3}}}\n"
        ),
        "document 2 (CronJob \"c\"): spec.jobTemplate.spec.template: is a number, expected a mapping"
    );
}

const SCRAPED: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: app, namespace: default}
spec:
  selector: {matchLabels: {app: app}}
  template:
    metadata:
      labels: {app: app}
      annotations:
        prometheus.io/scrape: \"true\"
        prometheus.io/port: \"8080\"
        prometheus.io/path: /metrics
    spec:
      containers: [{name: app, image: app}]
";

/// The template's annotation `key`, as text.
fn annotation(doc: &Yaml, key: &str) -> Option<String> {
    doc.at(&["spec", "template", "metadata", "annotations", key])
        .and_then(Yaml::scalar_text)
}

#[test]
fn prometheus_annotations_move_to_the_proxy_the_istio_way() {
    const APP_ENV: &str = "WEFT_APP_PROMETHEUS_ANNOTATIONS";
    let template = ["spec", "template"];
    let doc = parse(&run(SCRAPED).yaml);
    assert_eq!(
        annotation(&doc, "prometheus.io/scrape").as_deref(),
        Some("true")
    );
    assert_eq!(
        annotation(&doc, "prometheus.io/port").as_deref(),
        Some("15020")
    );
    assert_eq!(
        annotation(&doc, "prometheus.io/path").as_deref(),
        Some("/stats/prometheus")
    );
    let kept = env(&proxy(&doc, &template), APP_ENV).expect("app annotations kept");
    let kept: serde_json::Value = serde_json::from_str(&kept).unwrap();
    assert_eq!(
        kept,
        serde_json::json!({"scrape": "true", "port": "8080", "path": "/metrics"})
    );

    // Injecting the injected output again keeps the app's, not the sidecar's, annotations.
    let twice = parse(&run(&run(SCRAPED).yaml).yaml);
    assert_eq!(twice, doc);

    // A pod without annotations is scraped through the sidecar alone.
    let plain = parse(&run(DEPLOYMENT).yaml);
    assert_eq!(env(&proxy(&plain, &template), APP_ENV), None);
    assert_eq!(
        annotation(&plain, "prometheus.io/port").as_deref(),
        Some("15020")
    );

    // `scrape: "false"` is the owner's choice: left as written, nothing merged.
    let off = SCRAPED.replace(
        "prometheus.io/scrape: \"true\"",
        "prometheus.io/scrape: \"false\"",
    );
    let off = parse(&run(&off).yaml);
    assert_eq!(
        annotation(&off, "prometheus.io/port").as_deref(),
        Some("8080")
    );
    assert_eq!(env(&proxy(&off, &template), APP_ENV), None);
}
