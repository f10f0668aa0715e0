//! The `pilot` CLI's istioctl/kubectl-like commands against a real `pilot serve`: analyze's
//! messages and exit codes, get's output formats and selectors, delete of several objects, apply's
//! dry runs, version and completion.

use std::path::{Path, PathBuf};
use std::process::Command;

use weft_tests::{Proc, bin};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");

fn example(name: &str) -> String {
    format!("{EXAMPLES}/{name}")
}

fn serve(dir: &Path) -> (Proc, PathBuf) {
    let mut cmd = Command::new(bin("pilot"));
    cmd.arg("serve").arg("--data-dir").arg(dir.join("data"));
    Proc::spawn_listening_unix("pilot", cmd, dir).unwrap()
}

/// Runs `pilot ARGS` against the daemon of `dir`: (exit code, stdout, stderr).
fn pilot(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("pilot"))
        .args(args)
        .env("WEFT_PILOT_DATA_DIR", dir.join("data"))
        .env_remove("PILOT_SERVER")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (code, out, err) = pilot(dir, args);
    assert_eq!(code, 0, "pilot {args:?}:\n{out}\n{err}");
    out
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A VirtualService routing `host` to subset v1, which no DestinationRule defines (IST0101).
fn vs(name: &str, host: &str, labels: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n  hosts: [{host}]\n  http:\n  - route:\n    - destination: {{host: {host}, subset: v1}}\n"
    )
}

#[test]
fn analyze_prints_istioctl_messages_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_pilot, _) = serve(d);
    ok(d, &["apply", "-f", &example("httpbin-service.yaml")]);

    let (code, out, err) = pilot(d, &["analyze"]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    assert_eq!(
        err,
        "\u{2714} No validation issues found when analyzing all namespaces.\n"
    );

    let file = write(d, "vs.yaml", &vs("httpbin", "httpbin", ""));
    ok(d, &["apply", "-f", &file]);
    let (code, out, err) = pilot(d, &["analyze"]);
    assert_eq!(code, 79, "{out}{err}");
    assert_eq!(
        out,
        "Error [IST0101] (VirtualService default/httpbin) route to subset v1 of host httpbin.default.svc.cluster.local, but no DestinationRule defines it\n"
    );
    assert!(
        err.starts_with("Error: Analyzers found issues when analyzing all namespaces."),
        "{err}"
    );

    // An Error is below no threshold; hidden by none either.
    assert_eq!(
        pilot(d, &["analyze", "--failure-threshold", "Warning"]).0,
        79
    );
    let (code, out, _) = pilot(d, &["analyze", "--output-threshold", "error"]);
    assert_eq!((code, out.lines().count()), (79, 1));

    // JSON and YAML are the same list; like istioctl they leave the exit code at 0.
    let (code, out, err) = pilot(d, &["analyze", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let messages: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(messages[0]["code"], "IST0101");
    assert_eq!(messages[0]["level"], "Error");
    assert_eq!(messages[0]["origin"], "VirtualService default/httpbin");
    let (code, yaml, _) = pilot(d, &["analyze", "-o", "yaml"]);
    assert_eq!(code, 0);
    assert!(
        yaml.contains("code: IST0101") && yaml.contains("level: Error"),
        "{yaml}"
    );

    // The missing rule given as a file clears the message; a bad level is a usage error.
    let (code, _, err) = pilot(d, &["analyze", "-f", &example("all-v1.yaml")]);
    assert_eq!(code, 0, "{err}");
    assert_ne!(pilot(d, &["analyze", "--failure-threshold", "Fatal"]).0, 0);
}

#[test]
fn get_formats_selectors_and_lists() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_pilot, _) = serve(d);
    let text = [
        vs("a", "a", "app: a, tier: web"),
        vs("b", "b", "app: b, tier: web"),
        vs("c", "c", "app: c"),
    ]
    .join("---\n");
    let file = write(d, "three.yaml", &text);
    ok(d, &["apply", "-f", &file]);
    let other = write(
        d,
        "other.yaml",
        &vs("z", "z", "app: z").replace("name: z", "name: z\n  namespace: other"),
    );
    ok(d, &["apply", "-f", &other]);

    assert_eq!(
        ok(d, &["get", "vs", "-o", "name"]),
        "virtualservice.networking.istio.io/a\nvirtualservice.networking.istio.io/b\nvirtualservice.networking.istio.io/c\n"
    );
    assert_eq!(
        ok(d, &["get", "vs", "-l", "tier=web,app!=a", "-o", "name"]),
        "virtualservice.networking.istio.io/b\n"
    );
    assert_eq!(
        ok(d, &["get", "vs", "-l", "!tier", "-o", "name"]),
        "virtualservice.networking.istio.io/c\n"
    );
    let (code, out, err) = pilot(d, &["get", "vs", "-l", "app=nothing"]);
    assert_eq!((code, out.as_str()), (0, ""));
    assert_eq!(err, "No resources found in default namespace.\n");
    let all = ok(d, &["get", "vs", "-A", "-o", "wide"]);
    assert!(
        all.starts_with("NAMESPACE   NAME   GATEWAYS   HOSTS "),
        "{all}"
    );
    assert!(
        all.lines()
            .any(|l| l.starts_with("other       z      <none>     [\"z\"]")),
        "{all}"
    );

    // Several objects are a List, in YAML as in JSON; one named object is itself.
    let list: serde_json::Value =
        serde_json::from_str(&ok(d, &["get", "vs", "-l", "tier", "-o", "json"])).unwrap();
    assert_eq!(
        (list["apiVersion"].as_str(), list["kind"].as_str()),
        (Some("v1"), Some("List"))
    );
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let yaml = ok(d, &["get", "vs", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: List") && yaml.contains("items:"),
        "{yaml}"
    );
    let one = ok(d, &["get", "vs", "a", "-o", "yaml"]);
    assert!(
        one.contains("kind: VirtualService") && !one.contains("List"),
        "{one}"
    );

    // The List applies back unchanged, as kubectl's would.
    let back = write(d, "list.yaml", &yaml);
    assert_eq!(
        ok(d, &["apply", "-f", &back]),
        "virtualservice.networking.istio.io/a unchanged\nvirtualservice.networking.istio.io/b unchanged\nvirtualservice.networking.istio.io/c unchanged\n"
    );
    // A name and a selector together are a usage error.
    assert_ne!(pilot(d, &["get", "vs", "a", "-l", "app=a"]).0, 0);
}

#[test]
fn delete_several_names_all_and_ignore_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_pilot, _) = serve(d);
    let text = ["a", "b", "c", "d"].map(|n| vs(n, n, "")).join("---\n");
    ok(d, &["apply", "-f", &write(d, "four.yaml", &text)]);
    let names = || ok(d, &["get", "vs", "-o", "name"]);

    // One missing name: nothing is deleted, and the error names it.
    let (code, _, err) = pilot(d, &["delete", "vs", "a", "x"]);
    assert_ne!(code, 0);
    assert_eq!(
        err.trim(),
        r#"Error from server (NotFound): virtualservices.networking.istio.io "x" not found"#
    );
    assert_eq!(names().lines().count(), 4);
    assert_eq!(
        ok(d, &["delete", "virtualservice", "a", "b"]),
        "virtualservice.networking.istio.io/a deleted\nvirtualservice.networking.istio.io/b deleted\n"
    );
    assert_eq!(
        ok(d, &["delete", "vs", "b", "c", "--ignore-not-found"]),
        "virtualservice.networking.istio.io/c deleted\n"
    );
    assert_eq!(
        ok(d, &["delete", "vs", "--all"]),
        "virtualservice.networking.istio.io/d deleted\n"
    );
    let (code, out, err) = pilot(d, &["delete", "vs", "--all"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "", "No resources found\n")
    );
    // A kind without names or --all, or names with --all, are usage errors.
    assert_ne!(pilot(d, &["delete", "vs"]).0, 0);
    assert_ne!(pilot(d, &["delete", "vs", "a", "--all"]).0, 0);
}

#[test]
fn apply_dry_run_client_and_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = write(d, "good.yaml", &vs("a", "a", ""));
    let bad = write(
        d,
        "bad.yaml",
        &vs("b", "b", "").replace("subset: v1", "subset: v1, port: {number: 0}"),
    );

    // Client: no pilot running at all.
    assert_eq!(
        ok(d, &["apply", "-f", &good, "--dry-run=client"]),
        "virtualservice.networking.istio.io/a validated (client dry run)\n"
    );
    let (code, _, err) = pilot(d, &["apply", "-f", &bad, "--dry-run=client"]);
    assert_ne!(code, 0);
    assert!(
        err.starts_with(&format!("error: {bad}")) && err.contains("port"),
        "{err}"
    );

    // Server: pilot validates and reports outcomes, and stores nothing; a bare --dry-run is server.
    let (_pilot, _) = serve(d);
    let (code, _, err_server) = pilot(d, &["apply", "-f", &bad, "--dry-run=server"]);
    assert_ne!(code, 0);
    assert_eq!(err_server, err, "client and server validate alike");
    for flag in ["--dry-run=server", "--dry-run"] {
        let (code, out, err) = pilot(d, &["apply", "-f", &good, flag]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out,
            "virtualservice.networking.istio.io/a created (server dry run)\n"
        );
        assert!(err.contains("IST0101"), "{err}");
    }
    let (_, out, _) = pilot(d, &["get", "vs"]);
    assert_eq!(out, "");
    assert_ne!(pilot(d, &["apply", "-f", &good, "--dry-run=later"]).0, 0);
}

#[test]
fn version_asks_pilot_for_at_most_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let client = env!("CARGO_PKG_VERSION");

    // No pilot: the client's version, exit 0, and why the server's is missing.
    let (code, out, err) = pilot(d, &["version"]);
    assert_eq!(
        (code, out.as_str()),
        (0, format!("client version: {client}\n").as_str())
    );
    assert!(
        err.starts_with("control plane version: unknown: cannot reach pilot"),
        "{err}"
    );
    assert_eq!(ok(d, &["version", "--short"]), format!("{client}\n"));

    // A socket that accepts connections but never answers: given up after 2 s.
    let silent = d.join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let started = std::time::Instant::now();
    let (code, out, err) = pilot(
        d,
        &["version", "--server", &format!("unix:{}", silent.display())],
    );
    let took = started.elapsed();
    assert_eq!((code, out.lines().count()), (0, 1), "{err}");
    assert!(err.contains("did not answer within 2s"), "{err}");
    assert!(took < std::time::Duration::from_secs(4), "{took:?}");

    let (_pilot, _) = serve(d);
    assert_eq!(
        ok(d, &["version"]),
        format!("client version: {client}\ncontrol plane version: {client}\n")
    );
    let json: serde_json::Value = serde_json::from_str(&ok(d, &["version", "-o", "json"])).unwrap();
    assert_eq!(json["clientVersion"]["version"], client);
    assert_eq!(json["meshVersion"][0]["Component"], "pilot");
    assert_eq!(json["meshVersion"][0]["Info"]["version"], client);
}

#[test]
fn completion_scripts_for_bash_zsh_fish() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bash = ok(d, &["completion", "bash"]);
    assert!(
        bash.contains("_pilot()") && bash.contains("complete -F _pilot"),
        "{bash}"
    );
    assert!(bash.contains("--failure-threshold") && bash.contains("proxy-status"));
    // The script is valid bash.
    let script = write(d, "pilot.bash", &bash);
    let checked = Command::new("bash").args(["-n", &script]).status().unwrap();
    assert!(checked.success());
    assert!(ok(d, &["completion", "zsh"]).starts_with("#compdef pilot"));
    assert!(ok(d, &["completion", "fish"]).contains("complete -c pilot"));
    assert_ne!(pilot(d, &["completion", "tcsh"]).0, 0);
}

#[test]
fn proxy_config_reads_a_sidecars_config_dump() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = weft_tests::ControlPlane::start(dir.path(), &[]).unwrap();
    plane
        .apply_yaml(
            "httpbin.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: httpbin\nspec:\n  selector:\n    app: httpbin\n  ports:\n  - name: http\n    port: 8000\n    targetPort: 80\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: httpbin}\nspec:\n  host: httpbin\n  subsets:\n  - {name: v1, labels: {version: v1}}\n",
        )
        .unwrap();
    let _httpbin = weft_tests::Sidecar::explicit(
        &plane,
        "httpbin-1",
        "httpbin",
        "app=httpbin,version=v1",
        Some(9),
        &[],
    )
    .unwrap();
    let client =
        weft_tests::Sidecar::explicit(&plane, "sleep", "sleep", "app=sleep", None, &[]).unwrap();
    let mut seen = false;
    for _ in 0..200 {
        if client.config_dump().unwrap().contains("default/httpbin-1") {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(seen, "the endpoint never reached the client");
    let admin = client.admin.as_str();
    let cmd = |args: &[&str]| {
        let (ok, out, err) = plane
            .pilot_cmd(&[&["proxy-config"], args, &["--admin", admin]].concat())
            .unwrap();
        assert!(ok, "{args:?}: {err}");
        out
    };

    let clusters = cmd(&["clusters", "sleep"]);
    assert!(clusters.starts_with("SERVICE FQDN "), "{clusters}");
    let v1 = clusters
        .lines()
        .find(|l| l.contains("   v1   "))
        .unwrap_or_else(|| panic!("{clusters}"));
    assert!(
        v1.starts_with("httpbin.default.svc.cluster.local   8000 ") && v1.contains("outbound"),
        "{v1}"
    );
    let endpoints = cmd(&["endpoints", "sleep"]);
    assert!(
        endpoints
            .lines()
            .any(|l| l.contains("default/httpbin-1") && l.contains("/sa/httpbin")),
        "{endpoints}"
    );
    let routes = cmd(&["routes", "sleep"]);
    assert!(
        routes.contains("httpbin.default.svc.cluster.local   8000"),
        "{routes}"
    );
    let listeners = cmd(&["listeners", "sleep"]);
    assert!(
        listeners.contains("Route: httpbin.default.svc.cluster.local:8000"),
        "{listeners}"
    );
    let secret = cmd(&["secret", "sleep"]);
    assert!(
        secret.contains("spiffe://cluster.local/ns/default/sa/sleep"),
        "{secret}"
    );
    let json: serde_json::Value = serde_json::from_str(&cmd(&["clusters", "-o", "json"])).unwrap();
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "outbound|8000|v1|httpbin.default.svc.cluster.local")
    );

    // Without --admin: refused with the reason; a wrong address: a clear error.
    let (ok, _, err) = plane
        .pilot_cmd(&["proxy-config", "clusters", "sleep"])
        .unwrap();
    assert!(
        !ok && err.contains("give --admin ADDR") && err.contains("default/sleep"),
        "{err}"
    );
    let (ok, _, err) = plane
        .pilot_cmd(&["proxy-config", "clusters", "--admin", "127.0.0.1:1"])
        .unwrap();
    assert!(
        !ok && err.contains("cannot read http://127.0.0.1:1/config_dump"),
        "{err}"
    );
}
