//! `pilot inject`: golden files (the seed's Deployments and `pilot/testdata/inject/*.yaml` in,
//! `pilot/testdata/inject/<name>.injected` out; `UPDATE_GOLDEN=1 cargo test` rewrites them, review the
//! diff), idempotence of the golden outputs, and the command line (stdin, warnings, errors, exit code).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use weft_pilot::inject::{Options, inject};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/inject")
}

/// Defaults with the version pinned, so a workspace version bump does not rewrite the goldens.
fn options() -> Options {
    Options {
        image: "weft/sidecar:0.1.0".into(),
        version: "0.1.0".into(),
        ..Options::default()
    }
}

fn check_golden(input: &Path) {
    let text = std::fs::read_to_string(input).unwrap();
    let out = inject(&text, &options()).unwrap();
    let name = input.file_name().unwrap().to_str().unwrap();
    let golden = testdata().join(format!("{name}.injected"));
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::write(&golden, &out.yaml).unwrap();
    }
    let want = std::fs::read_to_string(&golden)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", golden.display()));
    if out.yaml != want {
        let line = out
            .yaml
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .map_or(out.yaml.lines().count().min(want.lines().count()), |i| i)
            + 1;
        panic!(
            "{}: differs from {} first at line {line} (UPDATE_GOLDEN=1 rewrites it; review the diff)",
            input.display(),
            golden.display()
        );
    }
    // Injecting the injected output changes nothing.
    assert_eq!(inject(&want, &options()).unwrap().yaml, want, "{name}");
}

#[test]
fn seed_deployments() {
    for name in ["httpbin-v1.yaml", "httpbin-v2.yaml", "sleep.yaml"] {
        check_golden(&root().join("deploy/examples").join(name));
    }
}

#[test]
fn workload_kinds_and_skips() {
    check_golden(&testdata().join("workloads.yaml"));
    check_golden(&testdata().join("httpbin-v1-apps.yaml"));
}

#[test]
fn non_workloads_are_unchanged() {
    let path = testdata().join("passthrough.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(inject(&text, &options()).unwrap().yaml, text);
}

// === the command line ===

fn pilot_inject(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pilot"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn cli_reads_stdin_and_prints_warnings_on_stderr() {
    let input = std::fs::read_to_string(testdata().join("workloads.yaml")).unwrap();
    let out = pilot_inject(&["-f", "-", "--image", "weft/sidecar:0.1.0"], &input);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let want = std::fs::read_to_string(testdata().join("workloads.yaml.injected")).unwrap();
    // Same as the library's output, except the status version (the crate's own).
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        stdout,
        want.replace(
            r#"\"version\":\"0.1.0\""#,
            &format!(r#"\"version\":\"{version}\""#)
        )
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "Warning: <stdin>: skipping injection because Pod \"node-exporter\" has host networking enabled",
            "Warning: <stdin>: skipping injection because Deployment \"legacy\" has sidecar injection disabled (sidecar.istio.io/inject: \"false\")",
            "Warning: <stdin>: skipping injection because ReplicaSet \"batch\" has sidecar injection disabled (sidecar.istio.io/inject: \"false\")",
        ]
    );
}

#[test]
fn cli_flags_reach_the_output() {
    let path = root().join("deploy/examples/sleep.yaml");
    let out = pilot_inject(
        &[
            "-f",
            path.to_str().unwrap(),
            "--image",
            "registry.local/weft:dev",
            "--pilot-address",
            "pilot.mesh:15012",
            "--ca-address",
            "ca.mesh:15010",
            "--proxy-uid",
            "2000",
            "--trust-domain",
            "example.org",
        ],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    for want in [
        "image: registry.local/weft:dev",
        "value: pilot.mesh:15012",
        "value: ca.mesh:15010",
        "runAsUser: 2000",
        "- example.org",
    ] {
        assert!(stdout.contains(want), "{want} missing:\n{stdout}");
    }
}

#[test]
fn cli_malformed_input_fails_naming_the_document() {
    let input = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 1}\n";
    let out = pilot_inject(&["-f", "-"], input);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing is written on error");
    assert_eq!(
        String::from_utf8(out.stderr).unwrap().trim(),
        "error: <stdin>: document 2 (Deployment \"d\"): spec.template: is missing"
    );

    let out = pilot_inject(&["-f", "/nonexistent/x.yaml"], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .starts_with("error: cannot read /nonexistent/x.yaml")
    );
}
