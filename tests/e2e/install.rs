//! `pilot install`'s manifests checked by Kubernetes' own schemas (`kubernetes-validate --strict`,
//! Kubernetes 1.33, the version k8s-openapi is built for) and its CRDs' schemas checked with
//! Python `jsonschema` (`tests/python/crd_schemas.py`) against every Istio sample of those kinds in
//! ../shared/istio-samples and the seed's YAML (deploy/examples). Both checks are shown to refuse
//! a broken input. The cross-object wiring (ports, names) is checked in `pilot/src/install/tests.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use weft_tests::{bin, run, venv};

const K8S: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/k8s");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/istio-samples");
const CHECKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/crd_schemas.py");
const KUBERNETES_VERSION: &str = "1.33.0";

fn tool(name: &str) -> PathBuf {
    let path = venv().join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run ./deploy/local/install-deps.sh (it installs deploy/local/requirements-test.txt \
         into the venv; WEFT_VENV picks another venv)",
        path.display()
    );
    path
}

/// `kubernetes-validate --strict` on one file: (passed, output).
fn validate(file: &Path) -> (bool, String) {
    let (ok, out, err) = run(Command::new(tool("kubernetes-validate"))
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .arg(file))
    .unwrap();
    (ok && !out.contains("ERROR"), format!("{out}{err}"))
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

fn install(args: &[&str]) -> String {
    let (ok, out, err) = run(Command::new(bin("pilot")).arg("install").args(args)).unwrap();
    assert!(ok, "pilot install {args:?}: {err}");
    out
}

#[test]
fn every_yaml_under_deploy_k8s_passes_kubernetes_validate_strict() {
    let mut files = Vec::new();
    yaml_files(Path::new(K8S), &mut files);
    assert!(files.iter().any(|f| f.ends_with("weft.yaml")), "{files:?}");
    for file in &files {
        let (ok, out) = validate(file);
        assert!(
            ok,
            "kubernetes-validate --strict rejects {}:\n{out}",
            file.display()
        );
    }
    // Non-default flags too.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.yaml");
    std::fs::write(
        &other,
        install(&[
            "--image",
            "registry.local/weft:dev",
            "--replicas",
            "3",
            "--trust-domain",
            "example.org",
            "--skip-crds",
        ]),
    )
    .unwrap();
    let (ok, out) = validate(&other);
    assert!(ok, "{out}");
    // Every object was checked: one "passed" line per document.
    let documents = install(&[]).matches("\n---\n").count() + 1;
    let (_, out) = validate(&Path::new(K8S).join("weft.yaml"));
    assert_eq!(
        out.matches("passed for resource").count(),
        documents,
        "{out}"
    );
}

#[test]
fn kubernetes_validate_refuses_an_unknown_field_and_a_wrong_type() {
    let text = install(&[]);
    let dir = tempfile::tempdir().unwrap();
    for (what, from, to) in [
        (
            "unknown field",
            "  replicas: 2\n",
            "  replicas: 2\n  replica: 2\n",
        ),
        (
            "wrong type",
            "containerPort: 15012",
            "containerPort: discovery-port-number",
        ),
    ] {
        assert!(text.contains(from), "{from}");
        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        let (ok, out) = validate(&broken);
        assert!(!ok, "a manifest with a {what} passed:\n{out}");
    }
}

fn check_schemas(manifest: &Path, files: &[PathBuf]) -> (bool, String) {
    let (ok, out, err) = run(Command::new(tool("python3"))
        .arg(CHECKER)
        .arg(manifest)
        .args(files))
    .unwrap();
    (ok, format!("{out}{err}"))
}

const PEER_AUTHENTICATIONS: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: default}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    \"8000\": {mode: DISABLE}
";

#[test]
fn crd_schemas_accept_istios_samples_and_the_seed_unchanged() {
    let manifest = Path::new(K8S).join("weft.yaml");
    let mut files = Vec::new();
    yaml_files(Path::new(SAMPLES), &mut files);
    yaml_files(Path::new(EXAMPLES), &mut files);
    let dir = tempfile::tempdir().unwrap();
    let pa = dir.path().join("peer-authentication.yaml");
    std::fs::write(&pa, PEER_AUTHENTICATIONS).unwrap();
    files.push(pa);
    let (ok, out) = check_schemas(&manifest, &files);
    assert!(ok, "{out}");
    for kind in ["VirtualService", "DestinationRule", "PeerAuthentication"] {
        assert!(
            out.contains(&format!(" {kind} ")),
            "no {kind} checked:\n{out}"
        );
    }
    for version in [
        "networking.istio.io/v1 ",
        "networking.istio.io/v1alpha3 ",
        "security.istio.io/v1beta1 ",
    ] {
        assert!(out.contains(version), "no {version} checked:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
}

#[test]
fn crd_schemas_refuse_a_wrong_type_an_unknown_field_and_an_unserved_version() {
    let manifest = Path::new(K8S).join("weft.yaml");
    let seed = std::fs::read_to_string(Path::new(EXAMPLES).join("all-v1.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (what, from, to) in [
        ("wrong type", "weight: 100", "weight: \"all\""),
        (
            "unknown field",
            "subset: v1",
            "subset: v1\n        subsets: v1",
        ),
        (
            "unserved version",
            "networking.istio.io/v1alpha3",
            "networking.istio.io/v2",
        ),
    ] {
        let text = if seed.contains(from) {
            seed.replacen(from, to, 1)
        } else {
            // all-v1.yaml has no weight: the mirror rule does.
            let mirror =
                std::fs::read_to_string(Path::new(EXAMPLES).join("mirror-v2.yaml")).unwrap();
            assert!(mirror.contains(from), "{from}");
            mirror.replacen(from, to, 1)
        };
        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, text).unwrap();
        let (ok, out) = check_schemas(&manifest, &[broken]);
        assert!(
            !ok && out.contains("FAIL"),
            "a VirtualService with a {what} passed:\n{out}"
        );
    }
}

/// The README's root: `deploy/k8s/make-cacerts.sh` writes Istio's `cacerts` layout, which a real
/// `ca serve --cacerts` (the CA Deployment's command, with weft tokens instead of TokenReviews)
/// loads and signs from: the workload certificate verifies against root-cert.pem (openssl).
#[test]
fn make_cacerts_makes_a_root_ca_serve_signs_with() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let script = Path::new(K8S).join("make-cacerts.sh");
    let (ok, _, err) = run(Command::new(&script).arg(&certs)).unwrap();
    assert!(ok, "{err}");
    let mut serve = Command::new(bin("ca"));
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--cacerts"])
        .arg(&certs)
        .arg("--data-dir")
        .arg(dir.path().join("ca"));
    let (_ca, addr) = weft_tests::Proc::spawn_listening("ca", serve, dir.path()).unwrap();
    let token = weft_tests::token_file(dir.path(), "default", "sleep", None).unwrap();
    let cert = dir.path().join("cert.pem");
    let (ok, _, err) = run(Command::new(bin("ca"))
        .args(["request", "--ca", &addr.to_string(), "--ca-root"])
        .arg(certs.join("root-cert.pem"))
        .arg("--token-file")
        .arg(&token)
        .args([
            "--namespace",
            "default",
            "--service-account",
            "sleep",
            "--cert-out",
        ])
        .arg(&cert)
        .arg("--key-out")
        .arg(dir.path().join("key.pem")))
    .unwrap();
    assert!(ok, "ca request: {err}");
    let (ok, out, err) = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(certs.join("root-cert.pem"))
        .arg(&cert))
    .unwrap();
    assert!(ok, "openssl verify: {out}{err}");
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(certs.join("ca-key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o077, 0, "ca-key.pem is readable by others");
}
