//! weft's end-to-end harness: finds the built binaries, runs them as real processes, and makes sure
//! every process a test starts is killed (by PID) when the test ends, pass or fail.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub mod chaos;
pub mod discovery_client;
pub mod fake_pilot;
pub mod kube_fake;
pub mod local;
pub mod netns;
pub mod otlp;
pub mod prometheus;
pub mod raw_http;
pub mod seed;

/// Path of a workspace binary (`ca`, `pilot`, `sidecar`). `WEFT_BIN_DIR` overrides the default, which
/// is the target directory this test binary was built into (`target/debug`).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("WEFT_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            // A test runs from target/<profile>/deps, a benchmark from target/<profile>: take the
            // first of the executable's directory and its parent that holds the binary.
            let exe = std::env::current_exe().ok()?;
            let here = exe.parent()?;
            [Some(here), here.parent()]
                .into_iter()
                .flatten()
                .find(|d| d.join(name).exists())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins) or set WEFT_BIN_DIR",
        path.display()
    );
    path
}

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    stderr_log: PathBuf,
    /// Other `<what> listening on ADDR` lines the process printed, by `<what>`.
    announced: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    /// Every other stdout line.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd` and waits until it prints `listening on ADDR` on stdout; returns ADDR.
    /// Its stderr goes to a log file whose tail is shown if it fails to come up.
    pub fn spawn_listening(
        name: &str,
        cmd: Command,
        log_dir: &std::path::Path,
    ) -> Result<(Self, SocketAddr)> {
        let (proc, addr) = Self::spawn_announcing(name, cmd, log_dir)?;
        let addr = addr
            .parse()
            .with_context(|| format!("{name} printed a bad address {addr:?}"))?;
        Ok((proc, addr))
    }

    /// Like [`Proc::spawn_listening`] for a process that listens on a unix socket and prints
    /// `listening on unix:PATH`; returns PATH.
    pub fn spawn_listening_unix(
        name: &str,
        cmd: Command,
        log_dir: &std::path::Path,
    ) -> Result<(Self, PathBuf)> {
        let (proc, addr) = Self::spawn_announcing(name, cmd, log_dir)?;
        let path = addr
            .strip_prefix("unix:")
            .with_context(|| format!("{name} printed {addr:?}, not unix:PATH"))?;
        Ok((proc, PathBuf::from(path)))
    }

    /// Spawns `cmd` and waits until it prints `listening on ADDR` on stdout; returns ADDR as printed.
    fn spawn_announcing(
        name: &str,
        mut cmd: Command,
        log_dir: &std::path::Path,
    ) -> Result<(Self, String)> {
        let stderr_log = log_dir.join(format!("{name}.stderr.log"));
        let stderr = std::fs::File::create(&stderr_log)
            .with_context(|| format!("create {}", stderr_log.display()))?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let announced =
            std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut proc = Proc {
            name: name.to_owned(),
            child,
            stderr_log,
            announced: announced.clone(),
            lines: lines.clone(),
        };
        let (tx, rx) = mpsc::channel();
        // Keep draining stdout for the process's whole life so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                } else if let Some((what, addr)) = line.split_once(" listening on ")
                    && let Ok(mut map) = announced.lock()
                {
                    map.insert(what.to_owned(), addr.trim().to_owned());
                } else if let Ok(mut all) = lines.lock() {
                    all.push(line);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Ok((proc, addr)),
            Err(_) => {
                let status = proc.child.try_wait().ok().flatten();
                bail!(
                    "{name} did not start listening (exit: {status:?}); stderr:\n{}",
                    proc.stderr_tail()
                )
            }
        }
    }

    /// The address of a `<what> listening on ADDR` line printed before the main `listening on` line
    /// (e.g. pilot's `discovery listening on`).
    pub fn announced(&self, what: &str) -> Option<String> {
        self.announced.lock().ok()?.get(what).cloned()
    }

    /// Stdout lines other than the `listening on` announcements, so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        let _ = self.child.kill();
        self.child.wait().context("wait for killed process")?;
        Ok(())
    }

    /// How many lines of the process's stderr so far contain `what` (e.g. `certificate rotated`).
    pub fn log_count(&self, what: &str) -> usize {
        std::fs::read_to_string(&self.stderr_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(what))
            .count()
    }

    /// The last lines of the process's stderr, for failure messages.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Sends SIGTERM and waits up to `grace` for a clean exit; returns whether it exited with status 0.
    pub fn terminate(&mut self, grace: Duration) -> Result<bool> {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .context("kill -TERM")?;
        let deadline = std::time::Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "{} (pid {pid}) did not exit within {grace:?} of SIGTERM",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Kills a child started in its own process group, with everything it forked (gunicorn's workers
/// would otherwise outlive a killed master), and reaps it.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs a command to completion; returns (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> Result<(bool, String, String)> {
    let out = cmd.stdin(Stdio::null()).output().context("run command")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Installs the rustls crypto provider for in-test clients.
pub fn init() {
    weft_ca::tls::install_default_provider();
}

/// A running control plane: `ca serve` and `pilot serve` (with discovery) as processes, on loopback,
/// in a directory of their own. Dropping it kills both.
#[derive(Debug)]
pub struct ControlPlane {
    /// Working directory (tokens, data dirs, logs).
    pub dir: PathBuf,
    /// The CA process.
    pub ca: Proc,
    /// The CA's address.
    pub ca_addr: String,
    /// The trust bundle file pilot and sidecars take as `--ca-root`: a copy of the CA's root made at
    /// start, so a test can rotate roots in it independently of the CA's data directory.
    pub root: PathBuf,
    /// The pilot process.
    pub pilot: Proc,
    /// pilot's discovery address.
    pub discovery_addr: String,
    /// Where sidecars started for this plane export spans (an [`OtlpSink`]'s address).
    pub otlp: Option<String>,
    /// `grpc` (default) or `http/protobuf`.
    pub otlp_protocol: &'static str,
    /// More `OTEL_*` variables for the sidecars started for this plane (TLS files, headers, ...).
    pub otlp_env: Vec<(String, String)>,
    /// Lifetime of the bootstrap tokens [`ControlPlane::token`] mints (`ca token --ttl`); the CA's
    /// default when `None`.
    pub token_ttl: Option<String>,
}

impl ControlPlane {
    /// Starts the CA, then pilot with discovery on 127.0.0.1; `pilot_args` are added to `pilot serve`.
    pub fn start(dir: &std::path::Path, pilot_args: &[&str]) -> Result<Self> {
        Self::start_on(dir, None, pilot_args)
    }

    /// Like [`ControlPlane::start`], inside network namespace `host` (listening on its address) when
    /// given.
    pub fn start_on(
        dir: &std::path::Path,
        host: Option<&netns::Host>,
        pilot_args: &[&str],
    ) -> Result<Self> {
        Self::start_with(dir, host, pilot_args, None)
    }

    /// Like [`ControlPlane::start_on`], with bootstrap tokens (pilot's included) valid for
    /// `token_ttl` (e.g. `2s`) when given.
    pub fn start_with(
        dir: &std::path::Path,
        host: Option<&netns::Host>,
        pilot_args: &[&str],
        token_ttl: Option<&str>,
    ) -> Result<Self> {
        Self::start_full(dir, host, &[], pilot_args, token_ttl, &[])
    }

    /// Like [`ControlPlane::start`], with `ca_args` added to `ca serve` (e.g. `--monitoring-listen`).
    pub fn start_with_ca_args(
        dir: &std::path::Path,
        ca_args: &[&str],
        pilot_args: &[&str],
    ) -> Result<Self> {
        Self::start_full(dir, None, ca_args, pilot_args, None, &[])
    }

    /// Like [`ControlPlane::start`], with environment variables for pilot (e.g. `KUBECONFIG`).
    pub fn start_with_env(
        dir: &std::path::Path,
        pilot_args: &[&str],
        pilot_env: &[(&str, &std::path::Path)],
    ) -> Result<Self> {
        Self::start_full(dir, None, &[], pilot_args, None, pilot_env)
    }

    fn start_full(
        dir: &std::path::Path,
        host: Option<&netns::Host>,
        ca_args: &[&str],
        pilot_args: &[&str],
        token_ttl: Option<&str>,
        pilot_env: &[(&str, &std::path::Path)],
    ) -> Result<Self> {
        let listen = format!("{}:0", host.map_or("127.0.0.1", |h| h.ip.as_str()));
        let command = |program: PathBuf| match host {
            Some(h) => h.command(program),
            None => Command::new(program),
        };
        let mut cmd = command(bin("ca"));
        cmd.args(["serve", "--listen", &listen, "--data-dir"])
            .arg(dir.join("ca"))
            .args(ca_args);
        let (ca, ca_addr) = Proc::spawn_listening("ca", cmd, dir)?;
        let root = dir.join("mesh-root.pem");
        std::fs::copy(dir.join("ca").join("root-cert.pem"), &root).context("copy the CA root")?;
        let token = token_file(dir, "weft-system", "pilot", token_ttl)?;
        let ca_addr = ca_addr.to_string();
        let mut cmd = command(bin("pilot"));
        cmd.args(["serve", "--listen", &listen, "--ca", &ca_addr])
            .args(sampling_all(pilot_args))
            .arg("--data-dir")
            .arg(dir.join("pilot"))
            .arg("--ca-root")
            .arg(&root)
            .arg("--token-file")
            .arg(&token)
            .args(pilot_args)
            .envs(pilot_env.iter().copied());
        let (pilot, _socket) = Proc::spawn_listening_unix("pilot", cmd, dir)?;
        let discovery_addr = pilot
            .announced("discovery")
            .context("pilot did not announce its discovery address")?;
        Ok(ControlPlane {
            dir: dir.to_owned(),
            ca,
            ca_addr,
            root,
            pilot,
            discovery_addr,
            otlp: None,
            otlp_protocol: "grpc",
            otlp_env: Vec::new(),
            token_ttl: token_ttl.map(str::to_owned),
        })
    }

    /// Starts the CA again (after [`Proc::kill`] of `self.ca`) on the same address and data
    /// directory, with `extra` flags (e.g. `--root-cert`/`--root-key` to plug in a new root).
    pub fn restart_ca(&mut self, extra: &[&str]) -> Result<()> {
        let mut cmd = Command::new(bin("ca"));
        cmd.args(["serve", "--listen", &self.ca_addr, "--data-dir"])
            .arg(self.dir.join("ca"))
            .args(extra);
        let (ca, addr) = Proc::spawn_listening("ca-restarted", cmd, &self.dir)?;
        if addr.to_string() != self.ca_addr {
            bail!("the CA came back on {addr}, not {}", self.ca_addr);
        }
        self.ca = ca;
        Ok(())
    }

    /// The plane's trust bundle (the root sidecars take as `--ca-root`).
    pub fn bundle(&self) -> Result<weft_ca::tls::TrustBundle> {
        Ok(weft_ca::tls::TrustBundle::from_pem(
            &std::fs::read_to_string(&self.root)?,
        )?)
    }

    /// A client of the plane's CA presenting `token` (inside a Tokio runtime: its channel spawns
    /// onto the current one).
    pub fn ca_client(&self, token: &str) -> Result<weft_ca::client::CaClient> {
        Ok(weft_ca::client::CaClient::new(
            &self.ca_addr,
            &self.bundle()?,
            weft_ca::server::ca_identity("cluster.local")?,
            token,
        )?)
    }

    /// Credentials for `ns`/`sa` from the plane's CA, asked for with a bootstrap token of theirs,
    /// valid for `validity`.
    pub async fn credentials(
        &self,
        ns: &str,
        sa: &str,
        validity: Duration,
    ) -> Result<weft_ca::tls::Credentials> {
        let token = std::fs::read_to_string(self.token(ns, sa)?)?;
        let me = weft_ca::SpiffeId::new("cluster.local", ns, sa)?;
        Ok(self
            .ca_client(&token)?
            .fetch_credentials(&me, validity)
            .await?)
    }

    /// Asks the CA for a certificate for `default/sleep` with a token it cannot verify: whether it
    /// refused, as it must (counted as an authentication failure).
    pub async fn forged_token_refused(&self) -> Result<bool> {
        let me = weft_ca::SpiffeId::new("cluster.local", "default", "sleep")?;
        Ok(self
            .ca_client("not-a-token")?
            .fetch_credentials(&me, Duration::from_secs(600))
            .await
            .is_err())
    }

    /// Writes a bootstrap token for `ns`/`sa` to a file and returns its path.
    pub fn token(&self, ns: &str, sa: &str) -> Result<PathBuf> {
        token_file(&self.dir, ns, sa, self.token_ttl.as_deref())
    }

    /// `pilot apply -f PATH`; a failure carries pilot's output.
    pub fn apply(&self, path: &str) -> Result<()> {
        let (ok, out, err) = self.pilot_cmd(&["apply", "-f", path])?;
        if !ok {
            bail!("apply {path}: {out}{err}");
        }
        Ok(())
    }

    /// `pilot apply -f` of YAML text, written to `<dir>/<name>` first.
    pub fn apply_yaml(&self, name: &str, yaml: &str) -> Result<()> {
        let path = self.dir.join(name);
        std::fs::write(&path, yaml)?;
        self.apply(&path.to_string_lossy())
    }

    /// Registers pod `default/name` (service account `sa`, labels `k=v,...`, address `ip`) with
    /// pilot, as the local runtime does before it starts a pod (the kubelet's part): pilot admits a
    /// sidecar only as a Pod the platform registered.
    pub fn register_pod(&self, name: &str, sa: &str, labels: &str, ip: &str) -> Result<()> {
        self.apply_yaml(
            &format!("pod-{name}.yaml"),
            &pod_yaml("default", name, sa, labels, ip),
        )
    }

    /// Runs a `pilot` CLI command against this pilot; returns (success, stdout, stderr).
    pub fn pilot_cmd(&self, args: &[&str]) -> Result<(bool, String, String)> {
        run(Command::new(bin("pilot"))
            .args(args)
            .env("WEFT_PILOT_DATA_DIR", self.dir.join("pilot"))
            .env_remove("PILOT_SERVER"))
    }
}

/// The Pod record of pod `namespace/name` (see [`ControlPlane::register_pod`]); `labels` is
/// `k=v,...`.
pub fn pod_yaml(namespace: &str, name: &str, sa: &str, labels: &str, ip: &str) -> String {
    let labels: String = labels
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| format!("    {k}: {v:?}\n"))
        .collect();
    let labels = if labels.is_empty() {
        "  labels: {}\n".to_string()
    } else {
        format!("  labels:\n{labels}")
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{labels}\
         spec:\n  serviceAccountName: {sa}\nstatus:\n  podIP: {ip}\n"
    )
}

/// Mints a bootstrap token (valid for `ttl`, or the CA's default) with the CA in `dir/ca` and
/// writes it to `dir/<ns>.<sa>.token`, atomically (a rename), as the kubelet replaces a projected
/// token: a reader never sees half a token.
pub fn token_file(dir: &std::path::Path, ns: &str, sa: &str, ttl: Option<&str>) -> Result<PathBuf> {
    let mut cmd = Command::new(bin("ca"));
    cmd.args([
        "token",
        "--namespace",
        ns,
        "--service-account",
        sa,
        "--data-dir",
    ])
    .arg(dir.join("ca"));
    if let Some(ttl) = ttl {
        cmd.args(["--ttl", ttl]);
    }
    let (ok, out, err) = run(&mut cmd)?;
    if !ok {
        bail!("ca token failed: {err}");
    }
    let path = dir.join(format!("{ns}.{sa}.token"));
    write_atomic(&path, out.trim().as_bytes())?;
    Ok(path)
}

/// Writes `data` to `path` through a temporary file (unique to this call, so concurrent writers do
/// not collide) and a rename.
pub fn write_atomic(path: &std::path::Path, data: &[u8]) -> Result<()> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("{n}.tmp"));
    std::fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

/// The Python venv with httpbin and gunicorn that `deploy/local/install-deps.sh` makes.
pub fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("WEFT_VENV") {
        return PathBuf::from(v);
    }
    let root = PathBuf::from("/opt/weft-venv");
    if root.join("bin/gunicorn").exists() {
        return root;
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/weft/venv")
}

/// The real httpbin under gunicorn with its access log on (as in the seed), on 127.0.0.1.
#[derive(Debug)]
pub struct Httpbin {
    /// The gunicorn process.
    pub proc: Child,
    /// Its port.
    pub port: u16,
    /// gunicorn's access log (stdout), one line per request.
    pub access_log: PathBuf,
}

impl Httpbin {
    /// Starts gunicorn on 127.0.0.1 (a free port) and waits until it answers.
    pub fn start(dir: &std::path::Path, name: &str) -> Result<Self> {
        Self::spawn(dir, name, None, None)
    }

    /// Starts another WSGI app of `tests/python` (`module:app`, with `env`) under gunicorn the same
    /// way, with 16 threads (an app that sleeps must not hold the others up). It must answer
    /// `GET /get` with a 2xx.
    pub fn start_app(
        dir: &std::path::Path,
        name: &str,
        module: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::spawn(dir, name, None, Some((module, env)))
    }

    /// Starts gunicorn in pod `host` exactly as the seed's Deployment does (`-b 0.0.0.0:80`).
    pub fn start_in(dir: &std::path::Path, name: &str, host: &netns::Host) -> Result<Self> {
        Self::spawn(dir, name, Some(host), None)
    }

    fn spawn(
        dir: &std::path::Path,
        name: &str,
        host: Option<&netns::Host>,
        app: Option<(&str, &[(&str, &str)])>,
    ) -> Result<Self> {
        let gunicorn = venv().join("bin/gunicorn");
        if !gunicorn.exists() {
            bail!(
                "{} not found: run deploy/local/install-deps.sh (or set WEFT_VENV)",
                gunicorn.display()
            );
        }
        let access_log = dir.join(format!("{name}.access.log"));
        let error_log = dir.join(format!("{name}.gunicorn.log"));
        let (mut cmd, bind) = match host {
            Some(h) => (h.command(&gunicorn), "0.0.0.0:80"),
            None => (Command::new(&gunicorn), "127.0.0.1:0"),
        };
        if let Some((_, env)) = app {
            let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
            cmd.arg("--chdir").arg(python).args(["--threads", "16"]);
            cmd.envs(env.iter().copied());
        }
        let module = app.map_or("httpbin:app", |(m, _)| m);
        let mut proc = cmd
            // --no-control-socket: gunicorn 27 otherwise shares ~/.gunicorn/gunicorn.ctl between
            // every instance, which breaks parallel tests.
            .args([
                "--access-logfile",
                "-",
                "--no-control-socket",
                "-b",
                bind,
                module,
            ])
            // gunicorn's default format plus the Host header, so tests can see the mirror's
            // `-shadow` host in v2's log.
            .args(["--access-logformat", ACCESS_LOG_FORMAT])
            .stdout(std::fs::File::create(&access_log)?)
            .stderr(std::fs::File::create(&error_log)?)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .context("spawn gunicorn")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let port = loop {
            let log = std::fs::read_to_string(&error_log).unwrap_or_default();
            if let Some(port) = log
                .split("Listening at: http://")
                .nth(1)
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, rest)| rest)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|p| p.parse().ok())
            {
                break port;
            }
            if std::time::Instant::now() > deadline || proc.try_wait()?.is_some() {
                let _ = proc.kill();
                let _ = proc.wait();
                bail!("gunicorn did not start:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let app = Httpbin {
            proc,
            port,
            access_log,
        };
        // Listening is not serving: wait until a worker answers (this request is logged; callers
        // count log lines from after start).
        let url = format!("http://127.0.0.1:{port}/get");
        let curl = || match host {
            Some(h) => h.command("curl"),
            None => Command::new("curl"),
        };
        while !run(curl().args(["-sf", "-o", "/dev/null", &url]))?.0 {
            if std::time::Instant::now() > deadline {
                bail!("httpbin on port {port} never answered");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(app)
    }

    /// Access-log lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Httpbin {
    fn drop(&mut self) {
        kill_group(&mut self.proc);
    }
}

/// A sidecar process and its listeners.
#[derive(Debug)]
pub struct Sidecar {
    /// The process.
    pub proc: Proc,
    /// Outbound listener.
    pub outbound: String,
    /// Inbound listener.
    pub inbound: String,
    /// Admin listener.
    pub admin: String,
    /// The pod namespace it runs in (transparent mode); its admin port is only reachable there.
    pub host: Option<netns::Host>,
}

impl Sidecar {
    /// Starts an explicit-mode sidecar on 127.0.0.1 for pod `name` of service account `sa`, in front
    /// of `app_port` if given, and waits until it is ready (certificate and first config).
    pub fn explicit(
        plane: &ControlPlane,
        name: &str,
        sa: &str,
        labels: &str,
        app_port: Option<u16>,
        extra: &[&str],
    ) -> Result<Self> {
        Self::explicit_with_pilot(
            plane,
            &plane.discovery_addr,
            name,
            sa,
            labels,
            app_port,
            extra,
        )
    }

    /// Like [`Sidecar::explicit`], taking its config from the discovery server at `pilot` (e.g. a
    /// [`fake_pilot::FakePilot`]) instead of the plane's pilot; the plane's CA still issues its
    /// certificate. Waits until ready, so `pilot` must push a first config.
    #[allow(clippy::too_many_arguments)]
    pub fn explicit_with_pilot(
        plane: &ControlPlane,
        pilot: &str,
        name: &str,
        sa: &str,
        labels: &str,
        app_port: Option<u16>,
        extra: &[&str],
    ) -> Result<Self> {
        plane.register_pod(name, sa, labels, "127.0.0.1")?;
        let cmd = explicit_command(plane, pilot, (name, sa, labels), app_port, extra)?;
        Self::spawn(name, cmd, plane, None)
    }

    /// Like [`Sidecar::explicit`] for a pod the platform already has (with `--registry
    /// kubernetes`, a Pod of the API server), so nothing is registered with pilot.
    pub fn explicit_of_platform_pod(
        plane: &ControlPlane,
        name: &str,
        sa: &str,
        labels: &str,
    ) -> Result<Self> {
        let cmd = explicit_command(plane, &plane.discovery_addr, (name, sa, labels), None, &[])?;
        Self::spawn(name, cmd, plane, None)
    }

    /// Starts an explicit-mode sidecar claiming pod `default/name` with `labels`, without
    /// registering the pod and without waiting for it to be ready (tests of the registry rule).
    pub fn spawn_unregistered(
        plane: &ControlPlane,
        name: &str,
        sa: &str,
        labels: &str,
    ) -> Result<Self> {
        let cmd = explicit_command(plane, &plane.discovery_addr, (name, sa, labels), None, &[])?;
        Self::start(name, cmd, None, plane)
    }

    /// Starts a transparent sidecar in pod `host`: `sidecar init` as root (iptables in the pod's
    /// namespace), then `sidecar run` as uid 1337 from the topology's world-readable directory, and
    /// waits until it is ready.
    pub fn transparent(
        topo: &netns::Topology,
        plane: &ControlPlane,
        host: &netns::Host,
        name: &str,
        sa: &str,
        labels: &str,
    ) -> Result<Self> {
        Self::transparent_with(topo, plane, host, (name, sa, labels), &[])
    }

    /// Like [`Sidecar::transparent`] for pod (name, service account, labels), with `extra` flags
    /// added to `sidecar run`.
    pub fn transparent_with(
        topo: &netns::Topology,
        plane: &ControlPlane,
        host: &netns::Host,
        (name, sa, labels): (&str, &str, &str),
        extra: &[&str],
    ) -> Result<Self> {
        let sidecar_bin = topo.shared.join("sidecar");
        if !sidecar_bin.exists() {
            topo.share(&bin("sidecar"), 0o755)?;
        }
        let root = topo.share(&plane.root, 0o644)?;
        let token = topo.share(&plane.token("default", sa)?, 0o644)?;
        plane.register_pod(name, sa, labels, &host.ip)?;
        let (ok, out, err) = run(host.command(&sidecar_bin).arg("init"))?;
        if !ok {
            bail!("sidecar init in {}: {out}{err}", host.ns);
        }
        let mut cmd = host.command_as(1337, &sidecar_bin);
        run_flags(
            &mut cmd,
            plane,
            "transparent",
            &plane.discovery_addr,
            (&root, &token),
            (sa, name, labels),
            &host.ip,
        );
        cmd.args(extra);
        Self::spawn(name, cmd, plane, Some(host.clone()))
    }

    /// Starts the process and waits until the sidecar is ready.
    fn spawn(
        name: &str,
        cmd: Command,
        plane: &ControlPlane,
        host: Option<netns::Host>,
    ) -> Result<Self> {
        let sidecar = Self::start(name, cmd, host, plane)?;
        sidecar.wait_ready()?;
        Ok(sidecar)
    }

    /// Starts the process and waits until it listens.
    fn start(
        name: &str,
        cmd: Command,
        host: Option<netns::Host>,
        plane: &ControlPlane,
    ) -> Result<Self> {
        let (proc, admin) = Proc::spawn_listening(name, cmd, &plane.dir)?;
        Ok(Sidecar {
            outbound: proc.announced("outbound").context("no outbound address")?,
            inbound: proc.announced("inbound").context("no inbound address")?,
            admin: admin.to_string(),
            proc,
            host,
        })
    }

    /// curl, run where the admin port is reachable.
    fn admin_curl(&self) -> Command {
        match &self.host {
            Some(h) => h.command("curl"),
            None => Command::new("curl"),
        }
    }

    /// Waits (bounded) until `/ready` answers 200.
    pub fn wait_ready(&self) -> Result<()> {
        let url = format!("http://{}/ready", self.admin);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !run(self.admin_curl().args(["-sf", "-o", "/dev/null", &url]))?.0 {
            if std::time::Instant::now() > deadline {
                bail!(
                    "sidecar never became ready; stderr:\n{}",
                    self.proc.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `/stats/prometheus` text.
    pub fn stats(&self) -> Result<String> {
        let (ok, out, err) = run(self
            .admin_curl()
            .args(["-sf", &format!("http://{}/stats/prometheus", self.admin)]))?;
        if !ok {
            bail!("stats failed: {err}");
        }
        Ok(out)
    }

    /// `/config_dump` as JSON text.
    pub fn config_dump(&self) -> Result<String> {
        let (ok, out, err) = run(self
            .admin_curl()
            .args(["-sf", &format!("http://{}/config_dump", self.admin)]))?;
        if !ok {
            bail!("config_dump failed: {err}");
        }
        Ok(out)
    }

    /// One unlabelled metric from `/stats/prometheus` (e.g. `weft_config_nacks_total`).
    pub fn stat(&self, metric: &str) -> Result<f64> {
        let text = self.stats()?;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .find(|(name, _)| *name == metric)
            .and_then(|(_, v)| v.trim().parse().ok())
            .with_context(|| format!("no metric {metric} in:\n{text}"))
    }

    /// How many times the sidecar has logged `what` on stderr so far (e.g. `certificate rotated`).
    pub fn log_count(&self, what: &str) -> usize {
        self.proc.log_count(what)
    }

    /// Opens a fresh TLS connection to the inbound listener (explicit mode), verifying it presents a
    /// valid certificate from `root` for `expected`; returns the leaf certificate (DER). Each call
    /// is a new handshake, so it shows which certificate the sidecar serves right now.
    pub fn inbound_certificate(
        &self,
        root: &std::path::Path,
        expected: &weft_ca::SpiffeId,
    ) -> Result<Vec<u8>> {
        served_certificate(&self.inbound, root, expected)
    }

    /// The status of `/ready` now (200, or 503 with the reason in the body).
    pub fn ready_status(&self) -> Result<u16> {
        let url = format!("http://{}/ready", self.admin);
        let (_, out, _) = run(self.admin_curl().args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "5",
            &url,
        ]))?;
        Ok(out.trim().parse().unwrap_or(0))
    }

    /// Runs curl as this sidecar's app would: inside the pod (captured by iptables) in transparent
    /// mode, through the sidecar as HTTP proxy in explicit mode. Returns (status code, body).
    pub fn curl(&self, url: &str, extra: &[&str]) -> Result<(u16, String)> {
        let mut cmd = match &self.host {
            Some(h) => h.command("curl"),
            None => {
                let mut c = Command::new("curl");
                c.args(["-x", &format!("http://{}", self.outbound)]);
                c
            }
        };
        let (ok, out, err) = run(cmd
            .args(["-s", "-m", "20"])
            .args(["-w", "\n%{http_code}"])
            .args(extra)
            .arg(url))?;
        if !ok {
            bail!("curl {url} failed: {err}");
        }
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
        Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
    }
}

/// Opens a fresh TLS connection to `addr` (a sidecar's inbound listener, pilot's discovery port),
/// verifying that it presents a valid certificate (chain, validity, SVID rules) from the roots in
/// `root` for `expected`; returns the leaf (DER). No client certificate is sent: in TLS 1.3 the
/// client has judged the server's certificate before the server asks for one.
pub fn served_certificate(
    addr: &str,
    root: &std::path::Path,
    expected: &weft_ca::SpiffeId,
) -> Result<Vec<u8>> {
    let bundle = weft_ca::tls::TrustBundle::from_pem(&std::fs::read_to_string(root)?)?;
    let cfg = weft_ca::tls::client_config(
        None,
        &bundle,
        vec![expected.clone()],
        &[weft_ca::tls::ALPN_H2],
    )?;
    let name = rustls::pki_types::ServerName::try_from("inbound.weft")?.to_owned();
    let stream = tls_handshake(cfg, name, addr)?;
    let leaf = stream
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no peer certificate")?;
    Ok(leaf.as_ref().to_vec())
}

/// gunicorn's default access-log format with the request id, `x-envoy-internal`, `x-forwarded-for`,
/// `x-forwarded-client-cert` (what identity the app was told) and,
/// last, the Host appended (what the seed's tcpdump shows of a mirrored request).
const ACCESS_LOG_FORMAT: &str = r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" rid=%({x-request-id}i)s internal=%({x-envoy-internal}i)s xff="%({x-forwarded-for}i)s" xfcc="%({x-forwarded-client-cert}i)s" host=%({host}i)s"#;

/// The command line of an explicit-mode sidecar on 127.0.0.1 for pod (name, service account,
/// labels), taking its config from `pilot`.
fn explicit_command(
    plane: &ControlPlane,
    pilot: &str,
    (name, sa, labels): (&str, &str, &str),
    app_port: Option<u16>,
    extra: &[&str],
) -> Result<Command> {
    let token = plane.token("default", sa)?;
    let mut cmd = Command::new(bin("sidecar"));
    run_flags(
        &mut cmd,
        plane,
        "explicit",
        pilot,
        (&plane.root, &token),
        (sa, name, labels),
        "127.0.0.1",
    );
    cmd.args(["--bind", "127.0.0.1"])
        .args([
            "--outbound-port",
            "0",
            "--inbound-port",
            "0",
            "--admin-port",
            "0",
        ])
        .args(["--dns-port", "0", "--status-port", "0"])
        .args(extra);
    // Off unless the test asks for it (a fixed port would collide between sidecars on one host).
    if !extra.contains(&"--prometheus-port") {
        cmd.args(["--prometheus-port", "0"]);
    }
    if let Some(p) = app_port {
        cmd.args(["--app-port", &p.to_string()]);
    }
    Ok(cmd)
}

/// The `sidecar run` flags every test sidecar has: mode, pilot, CA, (root, token) files, (service
/// account, pod name, labels) and pod IP; logs at info and spans to the plane's sink.
fn run_flags(
    cmd: &mut Command,
    plane: &ControlPlane,
    mode: &str,
    pilot: &str,
    (root, token): (&std::path::Path, &std::path::Path),
    (sa, name, labels): (&str, &str, &str),
    ip: &str,
) {
    cmd.args([
        "run",
        "--mode",
        mode,
        "--pilot",
        pilot,
        "--ca",
        &plane.ca_addr,
    ])
    .arg("--ca-root")
    .arg(root)
    .arg("--token-file")
    .arg(token)
    .args([
        "--namespace",
        "default",
        "--service-account",
        sa,
        "--name",
        name,
    ])
    .args(["--labels", labels, "--ip", ip])
    .env("RUST_LOG", "info");
    otlp_env(cmd, plane);
}

fn otlp_env(cmd: &mut Command, plane: &ControlPlane) {
    if let Some(addr) = &plane.otlp {
        // A bare address is a plaintext collector; a URL (`https://...`) is used as given.
        let url = if addr.contains("://") {
            addr.clone()
        } else {
            format!("http://{addr}")
        };
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", url)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", plane.otlp_protocol)
            .envs(plane.otlp_env.iter().map(|(k, v)| (k, v)));
    }
}

/// The `otlp-sink` receiver (Jaeger's stand-in), collecting the spans sidecars export.
#[derive(Debug)]
pub struct OtlpSink {
    proc: Proc,
    /// Its OTLP/gRPC address.
    pub grpc: String,
    /// Its OTLP/HTTP address (`POST /v1/traces`).
    pub http: String,
}

impl OtlpSink {
    /// Starts it on 127.0.0.1, or inside `host` on its address.
    pub fn start(dir: &std::path::Path, host: Option<&netns::Host>) -> Result<Self> {
        let ip = host.map_or("127.0.0.1", |h| h.ip.as_str());
        let mut cmd = match host {
            Some(h) => h.command(bin("otlp-sink")),
            None => Command::new(bin("otlp-sink")),
        };
        cmd.args(["--grpc", &format!("{ip}:0"), "--http", &format!("{ip}:0")]);
        let (proc, addr) = Proc::spawn_listening("otlp-sink", cmd, dir)?;
        let http = proc
            .announced("http")
            .context("otlp-sink did not announce its HTTP address")?;
        Ok(Self {
            proc,
            grpc: addr.to_string(),
            http,
        })
    }

    /// The spans received so far, as JSON.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        self.proc
            .stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (bounded; sidecars batch for up to a second) until the spans satisfy `pred`.
    pub fn wait(
        &self,
        what: &str,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Result<Vec<serde_json::Value>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans();
            if pred(&spans) {
                return Ok(spans);
            }
            if std::time::Instant::now() > deadline {
                bail!("the OTLP sink never saw {what}; spans: {spans:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An HTTPS response read by [`https_post`].
#[derive(Debug)]
pub struct HttpsResponse {
    /// Status code.
    pub status: u16,
    /// The body (Content-Length framed).
    pub body: Vec<u8>,
    /// The ALPN protocol the server chose, if any.
    pub alpn: Option<Vec<u8>>,
}

/// A TLS connection to `addr` (handshake done), verifying the server's certificate against the
/// roots in `root` for DNS name `server_name` (webpki through rustls; what the Kubernetes API server
/// does with a webhook's caBundle), offering `alpn`.
pub fn tls_connect(
    addr: &str,
    root: &std::path::Path,
    server_name: &str,
    alpn: &[&[u8]],
) -> Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(root)? {
        roots.add(cert?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(weft_ca::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())?;
    tls_handshake(cfg, name, addr).with_context(|| format!("as {server_name}"))
}

/// Connects to `addr` and completes the TLS handshake with `cfg` for `name` (reads and writes
/// bounded by 10 s).
fn tls_handshake(
    cfg: rustls::ClientConfig,
    name: rustls::pki_types::ServerName<'static>,
    addr: &str,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name)?;
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .with_context(|| format!("TLS handshake with {addr}"))?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// POSTs `body` to `path` over HTTP/1.1 on a [`tls_connect`] connection.
pub fn https_post(
    addr: &str,
    root: &std::path::Path,
    server_name: &str,
    alpn: &[&[u8]],
    path: &str,
    body: &[u8],
) -> Result<HttpsResponse> {
    use std::io::{Read, Write};
    let mut tls = tls_connect(addr, root, server_name, alpn)?;
    let alpn = tls.conn.alpn_protocol().map(<[u8]>::to_vec);
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {server_name}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes())?;
    tls.write_all(body)?;
    tls.flush()?;
    let mut raw = Vec::new();
    // The server closes after the response (connection: close); a missing close_notify is fine.
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e).context("read the response"),
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response head")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok(HttpsResponse {
        status,
        body: raw[split + 4..].to_vec(),
        alpn,
    })
}

/// `--trace-sampling 100` unless `pilot_args` set the sampling (or a mesh config, which does): the
/// tests follow every trace, where pilot's default is Istio's 1%.
pub fn sampling_all(pilot_args: &[&str]) -> &'static [&'static str] {
    if pilot_args
        .iter()
        .any(|a| *a == "--trace-sampling" || *a == "--mesh-config")
    {
        &[]
    } else {
        &["--trace-sampling", "100"]
    }
}
