//! `pilot inject` output checked by Kubernetes' own schemas: the PyPI `kubernetes-validate --strict`
//! (installed into the test venv by `deploy/local/install-deps.sh` from
//! `deploy/local/requirements-test.txt`) over the injected apps/v1 copy of the seed's httpbin-v1
//! Deployment and over every workload kind. extensions/v1beta1 (the seed's own apiVersion) is gone
//! from Kubernetes, so the validator cannot check it; the golden tests in `pilot/tests/inject.rs` do.

use std::process::Command;

use weft_tests::{bin, run, venv};

const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../pilot/testdata/inject");

#[test]
fn injected_manifests_pass_kubernetes_validate_strict() {
    let validator = venv().join("bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run ./deploy/local/install-deps.sh (it installs deploy/local/requirements-test.txt \
         into the venv; WEFT_VENV picks another venv)",
        validator.display()
    );
    let dir = tempfile::tempdir().unwrap();
    for name in ["httpbin-v1-apps.yaml", "workloads.yaml"] {
        let (ok, stdout, stderr) =
            run(Command::new(bin("pilot")).args(["inject", "-f", &format!("{TESTDATA}/{name}")]))
                .unwrap();
        assert!(ok, "pilot inject -f {name} failed: {stderr}");
        assert!(
            stdout.contains("name: weft-proxy"),
            "{name}: nothing injected"
        );
        let injected = dir.path().join(name);
        std::fs::write(&injected, &stdout).unwrap();
        let (ok, out, err) = run(Command::new(&validator).arg("--strict").arg(&injected)).unwrap();
        assert!(
            ok,
            "kubernetes-validate --strict rejects the injected {name}:\n{out}{err}"
        );
        assert!(!out.contains("ERROR"), "{out}");
    }
}
