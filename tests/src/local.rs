//! `deploy/local/weft-local` driven as a user drives it: a state directory, a namespace prefix and a
//! subnet of its own per instance (so tests run in parallel with each other and with the other
//! namespace tests), `weft-local down` when dropped (also when the test fails), and a check for
//! anything an instance left behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::{bin, run, venv};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A script of `deploy/local/` (`weft-local`, `demo`).
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/local")
        .join(name)
}

/// A weft-local instance: a state directory (not created yet: weft-local makes it world-traversable
/// for the uid-1337 sidecars), a namespace prefix and a subnet of its own. Dropping it runs `down`.
#[derive(Debug)]
pub struct Local {
    /// The state directory (`WEFT_LOCAL_DIR`).
    pub dir: PathBuf,
    /// The namespace prefix (`WEFT_LOCAL_PREFIX`).
    pub prefix: String,
    /// The `--subnet` [`Local::up`] passes: distinct for every instance of this process (the
    /// addresses live only in the instance's namespaces, so other processes' cannot clash anyway).
    pub subnet: u8,
}

impl Local {
    /// A new instance (nothing is created until `up`).
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // 7 is prime to 200: the first 200 instances of a process get distinct subnets.
        let subnet =
            u8::try_from((pid.wrapping_mul(31).wrapping_add(n * 7)) % 200 + 40).unwrap_or(40);
        Local {
            dir: std::env::temp_dir().join(format!("weft-rt-{pid}-{n}")),
            prefix: format!("wr{}x{n}", pid % 100_000),
            subnet,
        }
    }

    /// Sets this instance's environment on `cmd`.
    pub fn env(&self, cmd: &mut Command) {
        let bins = bin("ca").parent().map(Path::to_owned).unwrap_or_default();
        cmd.env("WEFT_LOCAL_DIR", &self.dir)
            .env("WEFT_LOCAL_PREFIX", &self.prefix)
            .env("WEFT_BIN_DIR", bins)
            .env("WEFT_VENV", venv())
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("WEFT_WORKLOAD_GRACE");
    }

    /// `weft-local ARGS`: (success, stdout, stderr).
    pub fn try_wl(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let mut cmd = Command::new(script("weft-local"));
        cmd.args(args);
        self.env(&mut cmd);
        run(&mut cmd).with_context(|| format!("weft-local {args:?}"))
    }

    /// `weft-local ARGS`; its stdout, or an error with its output.
    pub fn wl(&self, args: &[&str]) -> Result<String> {
        let (ok, out, err) = self.try_wl(args)?;
        if !ok {
            bail!("weft-local {args:?} failed:\n{out}\n{err}");
        }
        Ok(out)
    }

    /// `weft-local up --subnet <this instance's> ARGS`.
    pub fn up(&self, args: &[&str]) -> Result<String> {
        let subnet = self.subnet.to_string();
        let mut all = vec!["up", "--subnet", &subnet];
        all.extend_from_slice(args);
        self.wl(&all)
    }

    /// `pilot inject -f` of the seed's `app.yaml` (`deploy/examples/`), written to
    /// `dir/app.injected.yaml`; returns that path, for `run-manifest`.
    pub fn inject(app: &str, dir: &Path) -> Result<PathBuf> {
        let (ok, out, err) = run(Command::new(bin("pilot"))
            .args(["inject", "-f"])
            .arg(format!("{}/{app}.yaml", crate::seed::EXAMPLES)))?;
        if !ok {
            bail!("pilot inject {app}: {err}");
        }
        let path = dir.join(format!("{app}.injected.yaml"));
        std::fs::write(&path, out).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// A file of the pod `pod`'s state, trimmed.
    pub fn pod_file(&self, pod: &str, file: &str) -> Result<String> {
        let path = self.dir.join("pods").join(pod).join(file);
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("read {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// The spans the built-in OTLP receiver got (`STATE/cp/spans.jsonl`), as JSON.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("cp/spans.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The `/config_dump` of `pod`'s sidecar.
    pub fn config_dump(&self, pod: &str) -> Result<serde_json::Value> {
        let out = self.wl(&[
            "exec",
            pod,
            "--",
            "curl",
            "-sf",
            "-m",
            "5",
            "http://127.0.0.1:15000/config_dump",
        ])?;
        serde_json::from_str(&out).context("config_dump is not JSON")
    }

    /// `curl -m max_secs URL` from `pod` (through its sidecar, as the app's requests go): the status
    /// (0 when curl got no answer, e.g. its timeout), the body, and how long curl took in seconds.
    pub fn curl(&self, pod: &str, url: &str, max_secs: u32) -> Result<(u16, String, f64)> {
        let max = max_secs.to_string();
        let (_, out, err) = self.try_wl(&[
            "exec",
            pod,
            "--",
            "curl",
            "-s",
            "-m",
            &max,
            "-w",
            "\n%{http_code} %{time_total}",
            url,
        ])?;
        let (body, tail) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
        let (code, secs) = tail
            .trim()
            .split_once(' ')
            .with_context(|| format!("curl's output: {out:?} {err}"))?;
        Ok((
            code.parse().context("curl's status")?,
            body.to_owned(),
            secs.parse().context("curl's time")?,
        ))
    }

    /// What this instance left behind: namespaces, /etc/netns entries, processes started for it
    /// (weft-local marks each with WEFT_LOCAL_DIR in its environment), the state directory.
    pub fn leftovers(&self) -> Result<Vec<String>> {
        let mut left = Vec::new();
        let ns = format!("{}-", self.prefix);
        let (_, list, _) = run(Command::new("ip").args(["netns", "list"]))?;
        left.extend(
            list.lines()
                .filter(|l| l.starts_with(&ns))
                .map(|l| format!("namespace {l}")),
        );
        for e in std::fs::read_dir("/etc/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&ns) {
                left.push(format!("{}", e.path().display()));
            }
        }
        let marker = format!("WEFT_LOCAL_DIR={}", self.dir.display());
        for e in std::fs::read_dir("/proc")?.flatten() {
            let Ok(environ) = std::fs::read(e.path().join("environ")) else {
                continue;
            };
            if environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                left.push(format!(
                    "process {}: {}",
                    e.file_name().to_string_lossy(),
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
            }
        }
        if self.dir.exists() {
            left.push(format!("{}", self.dir.display()));
        }
        Ok(left)
    }
}

impl Default for Local {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.try_wl(&["down"]);
    }
}
