//! What soak and chaos runs do to a running mesh beyond what the other fixtures do: restart the CA and
//! pilot on the addresses they had (so sidecars reconnect to the place they were configured with,
//! as after a pod restart behind a Service), keep bootstrap tokens short-lived by rewriting them
//! atomically (as the kubelet refreshes a projected service-account token), and read a process's
//! resident memory and open descriptors.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{ControlPlane, Proc, bin};

/// How a control-plane process is stopped before it is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, then SIGKILL if it has not exited within the grace period.
    Term(Duration),
    /// SIGKILL: no chance to close streams or say goodbye.
    Kill,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Term(_) => f.write_str("SIGTERM"),
            Stop::Kill => f.write_str("SIGKILL"),
        }
    }
}

/// Stops `proc` as `how` says. A process that ignores SIGTERM past the grace is killed, and that is
/// reported (`Ok(false)`) rather than hidden: a soak run wants to know.
fn stop(proc: &mut Proc, how: Stop) -> Result<bool> {
    match how {
        Stop::Kill => {
            proc.kill()?;
            Ok(true)
        }
        Stop::Term(grace) => match proc.terminate(grace) {
            Ok(clean) => Ok(clean),
            Err(_) => {
                proc.kill()?;
                Ok(false)
            }
        },
    }
}

/// What a restart did.
#[derive(Debug, Clone, Copy)]
pub struct Restart {
    /// Whether the old process exited cleanly (status 0 after SIGTERM, or was SIGKILLed as asked).
    pub clean_exit: bool,
    /// From the stop signal to the new process announcing its listener.
    pub downtime: Duration,
}

/// Stops the plane's CA and starts it again on the same address with the same data directory (same
/// root and keys). `generation` names its stderr log (`ca-<generation>.stderr.log`) so the previous
/// one's log is kept.
pub fn restart_ca(plane: &mut ControlPlane, how: Stop, generation: u32) -> Result<Restart> {
    let started = Instant::now();
    let clean_exit = stop(&mut plane.ca, how)?;
    let mut cmd = Command::new(bin("ca"));
    cmd.args(["serve", "--listen", &plane.ca_addr, "--data-dir"])
        .arg(plane.dir.join("ca"));
    let (proc, addr) = Proc::spawn_listening(&format!("ca-{generation}"), cmd, &plane.dir)?;
    if addr.to_string() != plane.ca_addr {
        bail!(
            "the CA came back on {addr}, not {}: sidecars would not find it",
            plane.ca_addr
        );
    }
    plane.ca = proc;
    Ok(Restart {
        clean_exit,
        downtime: started.elapsed(),
    })
}

/// Stops pilot and starts it again with discovery on the same address and the same data directory
/// (the config store survives), with `pilot_args` added to `pilot serve` and its token read from the
/// file a [`TokenRefresher`] keeps fresh.
pub fn restart_pilot(
    plane: &mut ControlPlane,
    pilot_args: &[&str],
    how: Stop,
    generation: u32,
) -> Result<Restart> {
    let started = Instant::now();
    let clean_exit = stop(&mut plane.pilot, how)?;
    let mut cmd = Command::new(bin("pilot"));
    cmd.args([
        "serve",
        "--listen",
        &plane.discovery_addr,
        "--ca",
        &plane.ca_addr,
    ])
    .args(crate::sampling_all(pilot_args))
    .arg("--data-dir")
    .arg(plane.dir.join("pilot"))
    .arg("--ca-root")
    .arg(&plane.root)
    .arg("--token-file")
    .arg(token_path(&plane.dir, "weft-system", "pilot"))
    .args(pilot_args);
    let (proc, _socket) =
        Proc::spawn_listening_unix(&format!("pilot-{generation}"), cmd, &plane.dir)?;
    let discovery = proc
        .announced("discovery")
        .context("pilot did not announce its discovery address")?;
    if discovery != plane.discovery_addr {
        bail!(
            "pilot came back with discovery on {discovery}, not {}",
            plane.discovery_addr
        );
    }
    plane.pilot = proc;
    Ok(Restart {
        clean_exit,
        downtime: started.elapsed(),
    })
}

/// Where [`ControlPlane::token`] writes the token of `ns`/`sa` (and where the processes started by
/// the harness read it).
pub fn token_path(dir: &Path, ns: &str, sa: &str) -> PathBuf {
    dir.join(format!("{ns}.{sa}.token"))
}

/// A thread that mints a token of lifetime `ttl` for each identity every `period` and swaps it into
/// its file atomically (a temporary file in the same directory, then a rename), so a reader sees the
/// old token or the new one, never a partial one. Stops and joins on drop.
#[derive(Debug)]
pub struct TokenRefresher {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl TokenRefresher {
    /// Starts refreshing the token files of `identities` (namespace, service account) in `plane`'s
    /// directory, signed with the plane's CA key. The first round is written before this returns.
    pub fn start(
        plane: &ControlPlane,
        identities: &[(&str, &str)],
        ttl: Duration,
        period: Duration,
    ) -> Result<Self> {
        // load_or_create would make a new root in an empty directory: only ever sign with the
        // plane's own key.
        if !plane.root.exists() {
            bail!(
                "{} is missing: is the plane's CA running?",
                plane.root.display()
            );
        }
        let authority = weft_ca::authority::Authority::load_or_create(
            &plane.dir.join("ca"),
            weft_ca::authority::AuthorityOptions::default(),
        )
        .context("load the CA's token key")?;
        let files: Vec<(String, String, PathBuf)> = identities
            .iter()
            .map(|(ns, sa)| {
                (
                    (*ns).to_owned(),
                    (*sa).to_owned(),
                    token_path(&plane.dir, ns, sa),
                )
            })
            .collect();
        let write_all = move || -> Result<usize> {
            for (ns, sa, path) in &files {
                let token = authority.issue_token(ns, sa, ttl)?;
                let tmp = path.with_extension("token.tmp");
                std::fs::write(&tmp, &token).with_context(|| format!("write {}", tmp.display()))?;
                std::fs::rename(&tmp, path)
                    .with_context(|| format!("rename to {}", path.display()))?;
            }
            Ok(files.len())
        };
        let first = write_all()?;
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(first as u64));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let thread = {
            let (stop, writes, errors) = (stop.clone(), writes.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut next = Instant::now() + period;
                while !stop.load(Ordering::Relaxed) {
                    // Short sleeps so drop does not wait a whole period.
                    if Instant::now() < next {
                        std::thread::sleep(Duration::from_millis(20).min(period));
                        continue;
                    }
                    next += period;
                    match write_all() {
                        Ok(n) => {
                            writes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if let Ok(mut errs) = errors.lock() {
                                errs.push(format!("{e:#}"));
                            }
                        }
                    }
                }
            })
        };
        Ok(Self {
            stop,
            writes,
            errors,
            thread: Some(thread),
        })
    }

    /// Token files written so far.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Failed rounds so far (each with its cause).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Drop for TokenRefresher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Resident memory (KiB, `VmRSS`) and open file descriptors of a live process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// `VmRSS` from `/proc/PID/status`, in KiB.
    pub rss_kib: u64,
    /// Entries of `/proc/PID/fd`.
    pub fds: usize,
}

/// Reads [`Usage`] of `pid` from /proc.
pub fn usage(pid: u32) -> Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("list /proc/{pid}/fd"))?
        .count();
    Ok(Usage { rss_kib, fds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_this_process_is_plausible() {
        let u = usage(std::process::id()).unwrap();
        assert!(u.rss_kib > 100, "{u:?}");
        // stdin, stdout, stderr at least, plus the directory handle being listed.
        assert!(u.fds >= 3, "{u:?}");
    }
}
