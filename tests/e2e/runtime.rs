//! The local runtime (`deploy/local/weft-local`) and the demo, run as a user runs them: the demo script
//! end to end, and a seed Deployment through `pilot inject` started by `weft-local run-manifest`, checked
//! against what the manifest says (inject and runtime agree). Each test has its own state directory and
//! namespace prefix, so they run in parallel with each other and with the other namespace tests. Needs
//! root; without it each test prints why it skips.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use weft_tests::local::{Local, script};
use weft_tests::{netns, run, seed::EXAMPLES, venv};

/// The demo script, the README's first command, exits 0 and shows every observable of the seed, and
/// leaves nothing behind.
#[test]
fn demo_runs_end_to_end_and_leaves_nothing() {
    if !netns::available("demo_runs_end_to_end_and_leaves_nothing") {
        return;
    }
    let local = Local::new();
    let logs = tempfile::tempdir().unwrap();
    let out_path = logs.path().join("demo.out");
    let mut cmd = Command::new(script("demo"));
    local.env(&mut cmd);
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(logs.path().join("demo.err")).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            // Ctrl-C, as a user would: the demo's trap tears down; then make sure.
            let _ = run(Command::new("kill").args(["-INT", &child.id().to_string()]));
            std::thread::sleep(Duration::from_secs(10));
            let _ = run(Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]));
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(logs.path().join("demo.err")).unwrap_or_default();
    let shown = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(
        status.is_some_and(|s| s.success()),
        "demo exited {status:?}\n{shown}"
    );

    // B3 headers as httpbin echoed them, both requests.
    for h in [
        "\"X-B3-Traceid\"",
        "\"X-B3-Spanid\"",
        "\"X-B3-Parentspanid\"",
    ] {
        assert_eq!(out.matches(h).count(), 2, "{h}\n{shown}");
    }
    assert!(out.contains("\"X-B3-Sampled\": \"1\""), "{shown}");
    // v2's log empty after all-to-v1, then the mirrored request with the shadow host.
    assert!(out.contains("(no requests)"), "{shown}");
    let shadow: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.contains("\"GET /headers HTTP/1.1\" 200") && l.contains("host=httpbin-shadow:8000")
        })
        .collect();
    assert_eq!(shadow.len(), 1, "{shown}");
    // The trace of the mirrored request: the id httpbin echoed, four spans, the mirror among them.
    let trace_id = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"X-B3-Traceid\": \""))
        .next_back()
        .and_then(|l| l.split('"').next())
        .unwrap_or_else(|| panic!("no trace id\n{shown}"));
    assert!(
        out.contains(&format!("trace {trace_id} (4 spans)")),
        "{shown}"
    );
    assert!(out.contains("weft.mirror=true"), "{shown}");
    assert!(out.contains("in pod httpbin-v2"), "{shown}");
    assert!(out.contains("SYNCED"), "{shown}");
    // Shadow-diff: v2's new revision differs on /json only, and the report names that path alone
    // (the demo fails otherwise; the line is checked here too).
    assert!(
        out.contains("GET /json straight to each app: v1 200, v2 500"),
        "{shown}"
    );
    assert!(
        out.contains("GET /xml straight to each app: v1 200, v2 200"),
        "{shown}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("GET /json") && l.contains("200->500")),
        "{shown}"
    );
    assert!(out.contains("demo finished"), "{shown}");

    let left = local.leftovers().unwrap();
    assert!(left.is_empty(), "the demo left {left:#?}");
}

/// A manifest field, read with the venv's PyYAML (the test's own reading, not weft-local's).
fn manifest(file: &Path, expr: &str) -> String {
    let py = format!(
        "import json,sys,yaml\nd=[x for x in yaml.safe_load_all(open(sys.argv[1])) if x][0]\nt=d['spec']['template']\nprint(json.dumps({expr}))"
    );
    let (ok, out, err) = run(Command::new(venv().join("bin/python"))
        .args(["-c", &py])
        .arg(file))
    .unwrap();
    assert!(ok, "reading {}: {err}", file.display());
    out.trim().to_owned()
}

/// A seed Deployment through `pilot inject`, then `weft-local run-manifest`: the running pod has the
/// name, labels, service account and command the injected manifest says, and it serves in the mesh.
#[test]
fn inject_and_runtime_agree() {
    if !netns::available("inject_and_runtime_agree") {
        return;
    }
    let local = Local::new();
    let work = tempfile::tempdir().unwrap();
    local.up(&[]).unwrap();
    local
        .wl(&["apply", "-f", &format!("{EXAMPLES}/httpbin-service.yaml")])
        .unwrap();
    let mut injected = Vec::new();
    for app in ["httpbin-v1", "sleep"] {
        let path = Local::inject(app, work.path()).unwrap();
        let started = local
            .wl(&["run-manifest", &path.to_string_lossy()])
            .unwrap();
        assert!(started.contains(&format!("pod {app} running")), "{started}");
        injected.push(path);
    }

    for path in &injected {
        let name: String = serde_json::from_str(&manifest(path, "d['metadata']['name']")).unwrap();
        let labels: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&manifest(path, "t['metadata']['labels']")).unwrap();
        let sa: String = serde_json::from_str(&manifest(
            path,
            "t['spec'].get('serviceAccountName', 'default')",
        ))
        .unwrap();
        let command: Vec<String> =
            serde_json::from_str(&manifest(path, "t['spec']['containers'][0]['command']")).unwrap();
        assert!(
            labels.contains_key("security.istio.io/tlsMode"),
            "{labels:?}"
        );
        let labels: std::collections::BTreeSet<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
            .collect();
        let identity = format!("spiffe://cluster.local/ns/default/sa/{sa}");

        // pilot knows the pod by the manifest's name and service account.
        let status = local.wl(&["pilot", "proxy-status"]).unwrap();
        assert!(
            status.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 5
                    && f[0] == name
                    && f[1] == "default"
                    && f[2] == identity
                    && f[5] == "SYNCED"
            }),
            "{name} as {identity} not in:\n{status}"
        );
        // The sidecar holds that identity and got the manifest's labels.
        let dump: serde_json::Value = local.config_dump(&name).unwrap();
        assert_eq!(dump["identity"], identity.as_str());
        let proxy_pid = local.pod_file(&name, "proxy.pid").unwrap();
        let environ = std::fs::read(format!("/proc/{proxy_pid}/environ")).unwrap();
        let env: Vec<String> = environ
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        let pod_labels: std::collections::BTreeSet<String> = env
            .iter()
            .find_map(|v| v.strip_prefix("POD_LABELS="))
            .unwrap_or_default()
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(pod_labels, labels, "{name}'s sidecar labels; env {env:?}");
        assert!(env.contains(&format!("POD_NAME={name}")), "{env:?}");
        assert!(env.contains(&format!("SERVICE_ACCOUNT={sa}")), "{env:?}");
        // The app runs the manifest's command (gunicorn from the venv; /bin/sleep as is).
        let app_pid = local.pod_file(&name, "app.pid").unwrap();
        let cmdline = std::fs::read(format!("/proc/{app_pid}/cmdline")).unwrap();
        let mut argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // A script (gunicorn) shows its interpreter first.
        if argv[0].contains("/python") {
            argv.remove(0);
        }
        assert_eq!(argv[1..], command[1..], "{name}'s app runs {argv:?}");
        assert!(
            argv[0] == command[0] || argv[0].ends_with(&format!("/bin/{}", command[0])),
            "{argv:?} vs {command:?}"
        );
    }

    // The labels work in the mesh: the DestinationRule's subset v1 selects the pod by them.
    local
        .wl(&["apply", "-f", &format!("{EXAMPLES}/all-v1.yaml")])
        .unwrap();
    let v1_cluster = "outbound|8000|v1|httpbin.default.svc.cluster.local";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dump: serde_json::Value = local.config_dump("sleep").unwrap();
        let eps: Vec<String> = dump["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == v1_cluster)
            .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
            .map(|e| e["workload"].as_str().unwrap_or_default().to_owned())
            .collect();
        if eps.len() == 1 && eps[0].contains("httpbin-v1") {
            break;
        }
        assert!(Instant::now() < deadline, "{v1_cluster} endpoints: {eps:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the app answers through the mesh, sleep's identity proven by mTLS.
    let out = local
        .wl(&[
            "exec",
            "sleep",
            "--",
            "curl",
            "-s",
            "-m",
            "20",
            "-w",
            "\n%{http_code}",
            "http://httpbin:8000/headers",
        ])
        .unwrap();
    let (body, code) = out.trim().rsplit_once('\n').unwrap();
    assert_eq!(code, "200", "{out}");
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/default/sa/default"),
        "{body}"
    );
    let log = local.wl(&["logs", "httpbin-v1"]).unwrap();
    assert!(log.contains("\"GET /headers HTTP/1.1\" 200"), "{log}");

    local.wl(&["down"]).unwrap();
    let left = local.leftovers().unwrap();
    assert!(left.is_empty(), "down left {left:#?}");
}
