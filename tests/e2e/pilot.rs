//! The `pilot` binary as processes: `pilot serve` on its unix socket, and the config commands
//! (`apply`, `get`, `delete`, `analyze`) against it; restart, kill -9 and socket permissions.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use weft_tests::{Proc, bin, run};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
const ISTIO_SAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../pilot/config/testdata/istio-samples"
);

fn example(name: &str) -> String {
    format!("{EXAMPLES}/{name}")
}

/// Starts `pilot serve` on `dir`; returns the process and its socket path.
fn serve(dir: &Path) -> (Proc, PathBuf) {
    let mut cmd = Command::new(bin("pilot"));
    cmd.arg("serve").arg("--data-dir").arg(dir.join("data"));
    Proc::spawn_listening_unix("pilot", cmd, dir).unwrap()
}

/// Runs a `pilot` config command against the daemon of `dir`; returns (success, stdout, stderr).
fn pilot(dir: &Path, args: &[&str]) -> (bool, String, String) {
    run(Command::new(bin("pilot"))
        .args(args)
        .env("WEFT_PILOT_DATA_DIR", dir.join("data"))
        .env_remove("PILOT_SERVER"))
    .unwrap()
}

/// Runs a command that must succeed; returns stdout, and the stderr in the panic message if not.
fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, out, err) = pilot(dir, args);
    assert!(success, "pilot {args:?} failed:\n{out}\n{err}");
    out
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

fn get_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = ok(dir, &[&["get"], args, &["-o", "json"]].concat());
    serde_json::from_str(&out).unwrap()
}

#[test]
fn seed_and_istio_samples_apply_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (_pilot, _) = serve(dir.path());
    let mut files: Vec<String> = ["httpbin-service.yaml", "all-v1.yaml", "mirror-v2.yaml"]
        .iter()
        .map(|f| example(f))
        .collect();
    let mut samples: Vec<String> = std::fs::read_dir(ISTIO_SAMPLES)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    samples.sort();
    assert!(samples.len() >= 8, "{samples:?}");
    files.extend(samples);
    for file in &files {
        let out = ok(dir.path(), &["apply", "-f", file]);
        assert!(!out.is_empty(), "{file}: no output");
        // Applying the same file again changes nothing.
        let again = ok(dir.path(), &["apply", "-f", file]);
        for line in lines(&again) {
            assert!(line.ends_with(" unchanged"), "{file}: {line}");
        }
    }
}

#[test]
fn created_unchanged_configured_and_get_output_applies_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_pilot, _) = serve(d);
    let all_v1 = example("all-v1.yaml");
    let svc = example("httpbin-service.yaml");
    assert_eq!(
        lines(&ok(d, &["apply", "-f", &svc, "-f", &all_v1])),
        [
            "service/httpbin created",
            "virtualservice.networking.istio.io/httpbin created",
            "destinationrule.networking.istio.io/httpbin created",
        ]
    );
    assert_eq!(
        lines(&ok(d, &["apply", "-f", &all_v1])),
        [
            "virtualservice.networking.istio.io/httpbin unchanged",
            "destinationrule.networking.istio.io/httpbin unchanged",
        ]
    );
    let before = get_json(d, &["vs", "httpbin"]);
    assert_eq!(before["metadata"]["generation"], 1);
    assert_eq!(
        lines(&ok(d, &["apply", "-f", &example("mirror-v2.yaml")])),
        ["virtualservice.networking.istio.io/httpbin configured"]
    );
    let after = get_json(d, &["vs", "httpbin"]);
    assert_eq!(after["metadata"]["generation"], 2);
    assert_eq!(after["spec"]["http"][0]["mirror"]["subset"], "v2");
    assert_ne!(
        before["metadata"]["resourceVersion"],
        after["metadata"]["resourceVersion"]
    );

    // The table shows the allocated cluster IP.
    let table = ok(d, &["get", "svc"]);
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table.contains("10.96.0.2") && table.contains("8000/TCP"),
        "{table}"
    );

    // `get -o yaml` output applies as unchanged, from a file and from stdin.
    for kind in ["vs", "dr", "svc"] {
        let yaml = ok(d, &["get", kind, "-o", "yaml"]);
        let file = d.join(format!("{kind}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        let out = ok(d, &["apply", "-f", file.to_str().unwrap()]);
        assert!(
            out.ends_with(" unchanged\n"),
            "{kind}: {out}\nfrom:\n{yaml}"
        );
    }
    let yaml = ok(d, &["get", "vs", "httpbin", "-o", "yaml"]);
    let mut child = Command::new(bin("pilot"))
        .args(["apply", "-f", "-"])
        .env("WEFT_PILOT_DATA_DIR", d.join("data"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "virtualservice.networking.istio.io/httpbin unchanged\n"
    );
}

#[test]
fn errors_in_two_documents_are_all_reported_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_pilot, _) = serve(d);
    ok(d, &["apply", "-f", &example("all-v1.yaml")]);
    let before = ok(d, &["get", "vs", "-o", "yaml"]);
    let bad = d.join("bad.yaml");
    std::fs::write(
        &bad,
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: new-one
spec:
  hosts: [new-one]
  http:
  - route:
    - destination: {host: new-one}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts: [httpbin]
  http:
  - route:
    - destination: {host: httpbin, subset: v1}
      weight: -5
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  subsets:
  - name: Not_A_Label
",
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    let (success, out, err) = pilot(d, &["apply", "-f", bad]);
    assert!(!success, "{out}");
    assert_eq!(out, "");
    let errors: Vec<&str> = err.lines().collect();
    assert_eq!(errors.len(), 2, "{err}");
    assert!(
        errors[0].contains(&format!("{bad}:"))
            && errors[0].contains("document 2 (VirtualService default/httpbin)")
            && errors[0].contains("spec.http[0].route[0].weight"),
        "{err}"
    );
    assert!(
        errors[1].contains("document 3 (DestinationRule default/httpbin)")
            && errors[1].contains("spec.subsets[0].name"),
        "{err}"
    );
    // Nothing of it is stored: the valid first document neither.
    assert_eq!(ok(d, &["get", "vs", "-o", "yaml"]), before);
    let (found, _, err) = pilot(d, &["get", "vs", "new-one"]);
    assert!(!found);
    assert_eq!(
        err.trim(),
        r#"Error from server (NotFound): virtualservices.networking.istio.io "new-one" not found"#
    );
}

#[test]
fn ist0101_warning_when_the_destination_rule_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_pilot, _) = serve(d);
    ok(d, &["apply", "-f", &example("httpbin-service.yaml")]);
    let vs_only = d.join("vs.yaml");
    let all_v1 = std::fs::read_to_string(example("all-v1.yaml")).unwrap();
    let vs_text = all_v1.split("\n---\n").next().unwrap();
    std::fs::write(&vs_only, vs_text).unwrap();
    let vs_only = vs_only.to_str().unwrap();

    // A dry run stores nothing but still warns.
    let (success, out, err) = pilot(d, &["apply", "-f", vs_only, "--dry-run"]);
    assert!(success, "{err}");
    assert_eq!(
        out,
        "virtualservice.networking.istio.io/httpbin created (server dry run)\n"
    );
    assert!(err.contains("Warning: [IST0101]"), "{err}");
    assert!(!pilot(d, &["get", "vs", "httpbin"]).0);

    let (success, out, err) = pilot(d, &["apply", "-f", vs_only]);
    assert!(success, "{err}");
    assert_eq!(out, "virtualservice.networking.istio.io/httpbin created\n");
    assert!(
        err.starts_with("Warning: [IST0101] VirtualService default/httpbin") && err.contains("v1"),
        "{err}"
    );
    let (_, out, _) = pilot(d, &["analyze"]);
    assert!(
        out.contains("Error [IST0101] (VirtualService default/httpbin) "),
        "{out}"
    );
    // Analyzing the DestinationRule as if applied clears it, without storing it.
    let all_v1 = example("all-v1.yaml");
    let (success, out, err) = pilot(d, &["analyze", "-f", &all_v1]);
    assert!(success, "{err}");
    assert_eq!(
        (out.as_str(), err.as_str()),
        (
            "",
            format!(
                "\u{2714} No validation issues found when analyzing all namespaces with {all_v1}.\n"
            )
            .as_str()
        )
    );
    assert!(!pilot(d, &["get", "dr", "httpbin"]).0);
    let (_, _, err) = pilot(d, &["apply", "-f", &example("all-v1.yaml")]);
    assert_eq!(err, "");
}

#[test]
fn delete_by_name_and_by_file_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_pilot, _) = serve(d);
    let all_v1 = example("all-v1.yaml");
    ok(d, &["apply", "-f", &all_v1]);
    assert_eq!(
        ok(d, &["delete", "vs", "httpbin"]),
        "virtualservice.networking.istio.io/httpbin deleted\n"
    );
    assert!(!pilot(d, &["get", "vs", "httpbin"]).0);
    // The file names the deleted VirtualService too: nothing is deleted.
    let (success, _, err) = pilot(d, &["delete", "-f", &all_v1]);
    assert!(!success);
    assert_eq!(
        err.trim(),
        r#"Error from server (NotFound): virtualservices.networking.istio.io "httpbin" not found"#
    );
    ok(d, &["get", "dr", "httpbin"]);
    ok(d, &["apply", "-f", &all_v1]);
    assert_eq!(
        lines(&ok(d, &["delete", "-f", &all_v1])),
        [
            "virtualservice.networking.istio.io/httpbin deleted",
            "destinationrule.networking.istio.io/httpbin deleted",
        ]
    );
    let (success, out, err) = pilot(d, &["get", "dr"]);
    assert!(success);
    assert_eq!(
        (out.as_str(), err.trim()),
        ("", "No resources found in default namespace.")
    );
}

#[test]
fn restart_keeps_objects_and_cluster_ips() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut first, socket) = serve(d);
    let services = d.join("svcs.yaml");
    let svc = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: 80\n"
        )
    };
    std::fs::write(&services, [svc("a"), svc("b"), svc("c")].join("---\n")).unwrap();
    let services = services.to_str().unwrap();
    ok(d, &["apply", "-f", services, "-f", &example("all-v1.yaml")]);
    ok(d, &["delete", "svc", "b"]);
    let before = (
        get_json(d, &["svc"]),
        get_json(d, &["vs"]),
        get_json(d, &["dr"]),
    );
    assert!(
        first.terminate(Duration::from_secs(10)).unwrap(),
        "unclean exit"
    );
    assert!(!socket.exists(), "socket left behind after a clean exit");

    let (_second, _) = serve(d);
    let after = (
        get_json(d, &["svc"]),
        get_json(d, &["vs"]),
        get_json(d, &["dr"]),
    );
    assert_eq!(before, after);
    let ips: Vec<&str> = after.0["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spec"]["clusterIP"].as_str().unwrap())
        .collect();
    assert_eq!(ips, ["10.96.0.2", "10.96.0.4"]);
    for line in lines(&ok(d, &["apply", "-f", services])) {
        assert!(
            line == "service/b created" || line.ends_with(" unchanged"),
            "{line}"
        );
    }
    // b's freed address is allocated again; a and c keep theirs.
    let ip_of = |name: &str| get_json(d, &["svc", name])["spec"]["clusterIP"].clone();
    assert_eq!(
        (ip_of("a"), ip_of("b"), ip_of("c")),
        ("10.96.0.2".into(), "10.96.0.3".into(), "10.96.0.4".into())
    );
}

#[test]
fn socket_is_owner_only_and_a_second_pilot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_pilot, socket) = serve(d);
    assert_eq!(socket, d.join("data").join("pilot.sock"));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let (success, _, err) = run(Command::new(bin("pilot"))
        .args(["serve", "--data-dir"])
        .arg(d.join("data")))
    .unwrap();
    assert!(!success);
    assert!(err.contains("another pilot is already serving"), "{err}");
    // The first pilot still answers.
    ok(d, &["get", "vs"]);
}

#[test]
fn config_commands_need_a_unix_server_address() {
    let (success, _, err) = run(Command::new(bin("pilot"))
        .args(["get", "vs"])
        .env_remove("WEFT_PILOT_DATA_DIR")
        .env_remove("PILOT_SERVER"))
    .unwrap();
    assert!(!success);
    assert!(err.contains("--server unix:PATH"), "{err}");
    let (success, _, err) =
        run(Command::new(bin("pilot")).args(["get", "vs", "--server", "127.0.0.1:15012"])).unwrap();
    assert!(!success);
    assert!(err.contains("only served on a unix socket"), "{err}");
}

/// A cheap pseudo-random number from the clock (no RNG dependency needed for a kill delay).
fn jitter(max_ms: u64) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let mixed = u64::from(nanos).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    Duration::from_millis(mixed % max_ms)
}

/// Every VirtualService's `round` label, or `None` if the store holds none.
fn stored_round(d: &Path) -> Option<u64> {
    let list = get_json(d, &["vs"]);
    let rounds: Vec<u64> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vs| {
            vs["metadata"]["labels"]["round"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let first = *rounds.first()?;
    assert_eq!(rounds.len(), OBJECTS, "a partial apply is visible");
    assert!(
        rounds.iter().all(|r| *r == first),
        "objects from different applies: {rounds:?}"
    );
    Some(first)
}

const OBJECTS: usize = 200;

#[test]
fn kill_9_during_apply_leaves_the_old_or_the_new_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("round.yaml");
    let file_arg = file.to_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut daemon, socket) = serve(d);
    let mut acked: Option<u64> = None;
    let mut round = 0;
    let mut kills = 0;
    while kills < 6 && Instant::now() < deadline {
        let pid = daemon.pid().to_string();
        let delay = Duration::from_millis(100) + jitter(1500);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        });
        // Apply rounds until the daemon is gone; `in_flight` is the round that got no answer.
        let in_flight = loop {
            round += 1;
            let docs: Vec<String> = (0..OBJECTS)
                .map(|i| {
                    format!(
                        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: vs-{i}\n  labels:\n    round: \"{round}\"\nspec:\n  hosts: [svc-{i}]\n  http:\n  - route:\n    - destination:\n        host: svc-{i}\n"
                    )
                })
                .collect();
            std::fs::write(&file, docs.join("---\n")).unwrap();
            let (success, _, _) = pilot(d, &["apply", "-f", &file_arg]);
            if !success {
                break round;
            }
            acked = Some(round);
        };
        killer.join().unwrap();
        daemon.kill().unwrap();
        kills += 1;
        assert!(socket.exists(), "a killed daemon cannot remove its socket");

        // The socket of the killed daemon is stale; the new one replaces it.
        let (restarted, _) = serve(d);
        daemon = restarted;
        let stored = stored_round(d);
        assert!(
            stored == acked || stored == Some(in_flight),
            "after kill {kills}: stored round {stored:?}, last acknowledged {acked:?}, in flight {in_flight}"
        );
        eprintln!("kill {kills}: acked {acked:?} in flight {in_flight} stored {stored:?}");
        acked = stored;
    }
    assert!(kills >= 3, "only {kills} kills before the deadline");
}

/// Starts `pilot serve` on `dir` with extra flags.
fn serve_with(dir: &Path, extra: &[&str]) -> (Proc, PathBuf) {
    let mut cmd = Command::new(bin("pilot"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(extra);
    Proc::spawn_listening_unix("pilot", cmd, dir).unwrap()
}

/// Writes `n` Services without cluster IPs to one file; returns its path.
fn services_file(dir: &Path, n: usize) -> String {
    let path = dir.join(format!("services-{n}.yaml"));
    let docs: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: s{i}\nspec:\n  selector: {{app: s{i}}}\n  ports:\n  - port: 80\n"
            )
        })
        .collect();
    std::fs::write(&path, docs.join("---\n")).unwrap();
    path.display().to_string()
}

/// Starts `pilot apply` against the daemon of `dir` without waiting for it.
fn spawn_apply(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new(bin("pilot"))
        .arg("apply")
        .args(args)
        .env("WEFT_PILOT_DATA_DIR", dir.join("data"))
        .env_remove("PILOT_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A process's CPU time so far (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; the fields after it start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // utime and stime are fields 14 and 15 of the line (12 and 13 after the name), in clock ticks.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let (_, hz, _) = run(Command::new("getconf").arg("CLK_TCK")).unwrap();
    Duration::from_millis(ticks * 1000 / hz.trim().parse::<u64>().unwrap())
}

/// Waits until `pid` has used `busy` more CPU than `since` (it is working on a request).
fn wait_busy(pid: u32, since: Duration, busy: Duration) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while cpu_time(pid) < since + busy {
        assert!(Instant::now() < deadline, "pilot never got busy");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_goes_away_stops_its_apply() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (pilot_proc, _) = serve(d);
    let pid = pilot_proc.pid();
    // Tens of seconds of parsing in a debug build, seconds in a release one.
    let big = services_file(d, 20_000);
    let idle = cpu_time(pid);
    let mut client = spawn_apply(d, &["--dry-run", "-f", &big]);
    wait_busy(pid, idle, Duration::from_millis(300));
    client.kill().unwrap();
    client.wait().unwrap();
    // The work stops before its next document; give the reset time to arrive.
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(1));
    let burnt = cpu_time(pid) - before;
    assert!(
        burnt < Duration::from_millis(250),
        "pilot used {burnt:?} of CPU in the second after its client went away"
    );
    assert!(
        pilot_proc
            .stderr_tail()
            .contains("config call cancelled; nothing was stored"),
        "{}",
        pilot_proc.stderr_tail()
    );
    // Nothing is left holding the store: the next apply goes through.
    ok(d, &["apply", "-f", &services_file(d, 3)]);
}

/// Starts pilot with `flags`, an apply of `n` Services, and SIGTERM once pilot is busy with it;
/// returns how long pilot took to exit (it must exit 0) and the client's output.
fn sigterm_during_apply(d: &Path, flags: &[&str], n: usize) -> (Duration, std::process::Output) {
    let (mut pilot_proc, _) = serve_with(d, flags);
    let pid = pilot_proc.pid();
    let file = services_file(d, n);
    let idle = cpu_time(pid);
    let client = spawn_apply(d, &["-f", &file]);
    wait_busy(pid, idle, Duration::from_millis(100));
    let start = Instant::now();
    assert!(
        pilot_proc.terminate(Duration::from_secs(10)).unwrap(),
        "pilot exited uncleanly; stderr:\n{}",
        pilot_proc.stderr_tail()
    );
    (start.elapsed(), client.wait_with_output().unwrap())
}

#[test]
fn sigterm_during_a_huge_apply_stops_pilot_within_the_drain_bound() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (took, out) = sigterm_during_apply(d, &["--drain-duration", "1s"], 20_000);
    // The documented bound: the drain duration, then at most 1 s for cancelled work.
    assert!(
        took < Duration::from_millis(2500),
        "pilot took {took:?} to stop"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the cut apply reported success");
    assert!(err.contains("shutting down"), "{err}");
    // Nothing of the cut apply was stored.
    let (_again, _) = serve(d);
    let (success, out, err) = pilot(d, &["get", "svc"]);
    assert!(success, "{err}");
    assert_eq!(
        (out.as_str(), err.trim()),
        ("", "No resources found in default namespace.")
    );
}

#[test]
fn sigterm_lets_an_in_flight_apply_finish_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    const N: usize = 2000;
    // A drain long enough for a loaded machine; pilot must not wait for its end.
    let (took, out) = sigterm_during_apply(d, &["--drain-duration", "60s"], N);
    assert!(
        took < Duration::from_secs(30),
        "pilot took {took:?} to stop: it waited for the drain deadline, not for the apply"
    );
    assert!(
        out.status.success(),
        "the in-flight apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_again, _) = serve(d);
    let stored = get_json(d, &["svc"]);
    assert_eq!(stored["items"].as_array().unwrap().len(), N);
}

#[test]
fn an_existing_data_directory_is_made_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let store = data.join("pilot.redb");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let (mut first, _) = serve(d);
    assert!(first.terminate(Duration::from_secs(10)).unwrap());
    // As a hand-made directory or an older pilot left them.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).unwrap();

    let (second, _) = serve(d);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&store), 0o600);
    let log = second.stderr_tail();
    for path in [&data, &store] {
        assert!(
            log.lines().any(
                |l| l.contains("tightened the mode") && l.contains(&path.display().to_string())
            ),
            "no log line for {}:\n{log}",
            path.display()
        );
    }
    ok(d, &["get", "vs"]);
}
