//! Debian's `prometheus` package in tests: `promtool check metrics` on a scrape, and a real
//! Prometheus server (bounded, on a loopback port of its own, data in a temp dir, killed by PID
//! with its process group when dropped) queried through its HTTP API.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Proc, run};

/// A binary of Debian's `prometheus` package (`deploy/local/install-deps.sh` installs it).
pub fn tool(name: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run ./deploy/local/install-deps.sh (Debian's prometheus package)",
        path.display()
    );
    path
}

/// `promtool check metrics` on `text` (kept as `dir/<name>.prom`): the lint lines it reports, or an
/// error when the text does not parse (an exit code other than 0, clean, or 3, lints only).
pub fn lints(text: &str, dir: &Path, name: &str) -> Result<Vec<String>> {
    let file = dir.join(format!("{name}.prom"));
    std::fs::write(&file, text)?;
    let out = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file)?)
        .output()
        .context("run promtool")?;
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !matches!(out.status.code(), Some(0 | 3)) {
        bail!(
            "{name}: promtool check metrics ({:?}):\n{report}",
            out.status.code()
        );
    }
    Ok(report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// A running Prometheus server.
#[derive(Debug)]
pub struct Prometheus {
    /// The process (killed on drop).
    pub proc: Proc,
    /// `http://ADDR` of its API.
    pub base: String,
}

impl Prometheus {
    /// Checks `config_file` with `promtool check config`, then starts Prometheus on a free loopback
    /// port with its data under `dir/tsdb`.
    pub fn start(config_file: &Path, dir: &Path) -> Result<Self> {
        let (ok, out, err) = run(Command::new(tool("promtool"))
            .args(["check", "config"])
            .arg(config_file))?;
        if !ok {
            bail!("promtool check config:\n{out}{err}");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("127.0.0.1:{port}");
        // Prometheus prints nothing on stdout: the shell announces the address the way the
        // harness waits for, then becomes Prometheus (same PID, same process group).
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"echo "listening on $0"; exec "$1" --config.file="$2" --storage.tsdb.path="$3" --web.listen-address="$0" --log.level=warn"#])
            .arg(&listen)
            .arg(tool("prometheus"))
            .arg(config_file)
            .arg(dir.join("tsdb"));
        let (proc, _) = Proc::spawn_listening("prometheus", cmd, dir)?;
        Ok(Prometheus {
            proc,
            base: format!("http://{listen}"),
        })
    }

    /// An instant query through `/api/v1/query`: the result vector.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        query(&self.base, promql)
    }
}

/// An instant query of the Prometheus at `base` (`http://ADDR`): the result vector.
pub fn query(base: &str, promql: &str) -> Result<Vec<Value>, String> {
    let (ok, out, err) = run(Command::new("curl")
        .args(["-sS", "-m", "10", "-G", &format!("{base}/api/v1/query")])
        .args(["--data-urlencode", &format!("query={promql}")]))
    .map_err(|e| e.to_string())?;
    if !ok {
        return Err(format!("curl: {err}"));
    }
    let body: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    if body["status"] != "success" {
        return Err(format!("{}: {}", body["errorType"], body["error"]));
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// A sample's value as a number (instant vectors and scalars); NaN if it has none.
pub fn sample_value(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}
