//! Soak: the seed's mesh in explicit mode on 127.0.0.1 (real `ca serve`, `pilot serve`, httpbin v1
//! and v2 under gunicorn, sidecars for v1, v2 and sleep) under steady load for a bounded time, with
//! everything that wears a long-running mesh down happening on a schedule: short-lived bootstrap
//! tokens rewritten every second (atomically, as the kubelet does), short certificates renewed by every
//! sidecar, a config change every minute (the VirtualService flips between all-v1 and a 50/50 split),
//! and the CA and pilot restarted in turn on the same addresses, alternately with SIGTERM and SIGKILL.
//!
//! It prints requests sent, failed requests (non-2xx and connection errors; the goal is 0) per load
//! segment with the events that happened in it, certificate renewals each sidecar logged, and VmRSS
//! and open descriptors of ca, pilot and the three sidecars at the start, after the first segment
//! (warm) and at the end (the goal is flat). The CA and pilot are new processes after each restart,
//! so their figures are the latest generation's; the sidecars live through the whole run.
//!
//! Sidecars start with a token of `max(--token-ttl, 10s)` and the files then hold `--token-ttl`
//! tokens. The CA tolerates 60 s of clock skew past a token's `exp` (`weft_ca::token::LEEWAY`), so a
//! sidecar that kept its first token only starts failing renewals about 70 s in.
//!
//! pilot's own certificate lives 24 h (a constant, no flag), so only its restarts read short tokens.
//!
//! Load is `hey` through sleep's sidecar (its outbound port as HTTP proxy), in back-to-back segments so
//! failures can be placed in time. Sidecars run with access logs off and pilot with trace sampling 0:
//! the harness keeps every stdout line in memory, which would grow with the run, not with the mesh.
//!
//! Usage: `bench/soak.sh [MINUTES]` (builds, then runs this), or directly:
//! `soak [--minutes M] [--fast] [--rps N] [--workers N] [--token-ttl D] [--cert-ttl D]
//!  [--config-every D] [--restart-every D] [--log-dir DIR]`.
//! `--fast` is a 3-minute sanity run: config every 20 s, the CA and pilot restarted every 60 s, staggered.
//! SIGINT/SIGTERM stop it early; everything it started is killed on the way out.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_ca::cli::parse_duration;
use weft_tests::Sidecar;
use weft_tests::chaos::{self, Stop, TokenRefresher, Usage};
use weft_tests::seed::{Seed, has_vs_route};

/// The run's knobs.
#[derive(Debug, Clone)]
struct Opts {
    duration: Duration,
    rps: u32,
    workers: u32,
    token_ttl: Duration,
    cert_ttl: Duration,
    config_every: Duration,
    restart_every: Duration,
    log_dir: Option<PathBuf>,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(30 * 60),
            rps: 500,
            workers: 50,
            token_ttl: Duration::from_secs(2),
            cert_ttl: Duration::from_secs(20),
            config_every: Duration::from_secs(60),
            restart_every: Duration::from_secs(180),
            log_dir: None,
        }
    }
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts::default();
    let mut args = std::env::args().skip(1);
    let dur = |v: Option<String>, flag: &str| -> Result<Duration> {
        let v = v.with_context(|| format!("{flag} needs a value"))?;
        parse_duration(&v).map_err(|e| anyhow::anyhow!("{flag} {v}: {e}"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--fast" => {
                o.duration = Duration::from_secs(180);
                o.config_every = Duration::from_secs(20);
                o.restart_every = Duration::from_secs(60);
            }
            "--minutes" => {
                let m: f64 = args
                    .next()
                    .context("--minutes needs a value")?
                    .parse()
                    .context("--minutes")?;
                o.duration = Duration::from_secs_f64(m * 60.0);
            }
            "--rps" => o.rps = args.next().context("--rps")?.parse().context("--rps")?,
            "--workers" => {
                o.workers = args
                    .next()
                    .context("--workers")?
                    .parse()
                    .context("--workers")?
            }
            "--token-ttl" => o.token_ttl = dur(args.next(), "--token-ttl")?,
            "--cert-ttl" => o.cert_ttl = dur(args.next(), "--cert-ttl")?,
            "--config-every" => o.config_every = dur(args.next(), "--config-every")?,
            "--restart-every" => o.restart_every = dur(args.next(), "--restart-every")?,
            "--log-dir" => o.log_dir = Some(args.next().context("--log-dir")?.into()),
            "-h" | "--help" => {
                println!(
                    "soak [--minutes M] [--fast] [--rps N] [--workers N] [--token-ttl D] \
                     [--cert-ttl D] [--config-every D] [--restart-every D] [--log-dir DIR]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (--help)"),
        }
    }
    if o.workers == 0 || o.rps < o.workers {
        bail!("--rps must be at least --workers (hey paces each worker at rps/workers)");
    }
    if o.config_every < Duration::from_secs(5) || o.restart_every < Duration::from_secs(10) {
        bail!("--config-every must be >= 5s and --restart-every >= 10s");
    }
    Ok(o)
}

/// The 50/50 split the config flips to (the DestinationRule's subsets come from all-v1.yaml).
const SPLIT: &str = "apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - httpbin
  http:
  - route:
    - destination:
        host: httpbin
        subset: v1
      weight: 50
    - destination:
        host: httpbin
        subset: v2
      weight: 50
";

/// The shortest lifetime of the token a sidecar starts with.
const FIRST_TOKEN_MIN: Duration = Duration::from_secs(10);

/// Pilot's flags, at first start and at every restart.
const PILOT_ARGS: [&str; 2] = ["--trace-sampling", "0"];

/// One `hey` segment's summary.
#[derive(Debug, Default, Clone)]
struct Segment {
    /// Seconds since the load began.
    start: f64,
    secs: f64,
    /// (status, count).
    statuses: Vec<(u16, u64)>,
    /// (count, message).
    errors: Vec<(u64, String)>,
}

impl Segment {
    fn sent(&self) -> u64 {
        self.statuses.iter().map(|(_, n)| n).sum::<u64>()
            + self.errors.iter().map(|(n, _)| n).sum::<u64>()
    }
    fn failed(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(s))
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.errors.iter().map(|(n, _)| n).sum::<u64>()
    }
}

/// hey's answers: (status, count) and (count, error message).
type Distributions = (Vec<(u16, u64)>, Vec<(u64, String)>);

/// Reads hey's "Status code distribution" (`  [200]\t123 responses`) and "Error distribution"
/// (`  [3]\tGet "...": EOF`) sections.
fn parse_hey(out: &str) -> Distributions {
    let (mut statuses, mut errors) = (Vec::new(), Vec::new());
    let mut section = "";
    for line in out.lines() {
        let t = line.trim();
        if t.ends_with("distribution:") {
            section = t;
            continue;
        }
        let Some((bracket, rest)) = t.strip_prefix('[').and_then(|r| r.split_once(']')) else {
            continue;
        };
        let rest = rest.trim();
        if section.starts_with("Status code") {
            if let (Ok(code), Some(Ok(n))) = (
                bracket.parse(),
                rest.split_whitespace().next().map(str::parse),
            ) {
                statuses.push((code, n));
            }
        } else if section.starts_with("Error")
            && let Ok(n) = bracket.parse()
        {
            errors.push((n, rest.to_owned()));
        }
    }
    (statuses, errors)
}

/// Runs hey segments back to back through sleep's sidecar until `deadline` or `stop`. The running
/// hey's PID is in `running` so the main thread can interrupt it (hey prints its summary on SIGINT).
fn load(
    outbound: String,
    o: Opts,
    t0: Instant,
    deadline: Instant,
    stop: Arc<AtomicBool>,
    running: Arc<AtomicU32>,
) -> Result<Vec<Segment>> {
    let mut segments = Vec::new();
    let per_worker = f64::from(o.rps) / f64::from(o.workers);
    while !stop.load(Ordering::Relaxed) {
        let left = deadline.saturating_duration_since(Instant::now());
        let len = o.config_every.min(left);
        if len < Duration::from_secs(1) {
            break;
        }
        let start = t0.elapsed().as_secs_f64();
        let mut child: Child = Command::new("hey")
            .args(["-z", &format!("{}ms", len.as_millis())])
            .args(["-c", &o.workers.to_string(), "-q", &format!("{per_worker}")])
            .args(["-t", "10", "-x", &format!("http://{outbound}")])
            .arg("http://httpbin:8000/get")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn hey (apt-get install hey)")?;
        running.store(child.id(), Ordering::Relaxed);
        let mut out = String::new();
        child
            .stdout
            .take()
            .context("hey stdout")?
            .read_to_string(&mut out)
            .context("read hey output")?;
        let status = child.wait().context("wait for hey")?;
        running.store(0, Ordering::Relaxed);
        let (statuses, errors) = parse_hey(&out);
        if statuses.is_empty() && errors.is_empty() {
            // Interrupted before its first answer: nothing to count.
            if stop.load(Ordering::Relaxed) {
                break;
            }
            bail!("hey ({status}) printed no distribution:\n{out}");
        }
        segments.push(Segment {
            start,
            secs: t0.elapsed().as_secs_f64() - start,
            statuses,
            errors,
        });
    }
    Ok(segments)
}

/// Stops early on SIGINT or SIGTERM: sets `stop`, so the run ends through the normal path and every
/// process it started is dropped (killed).
fn watch_signals(stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("soak: signal received, stopping");
        stop.store(true, Ordering::Relaxed);
    });
}

/// The processes whose memory and descriptors are tracked, by name.
fn usages(seed: &Seed) -> Vec<(&'static str, Result<Usage>)> {
    vec![
        ("ca", chaos::usage(seed.plane.ca.pid())),
        ("pilot", chaos::usage(seed.plane.pilot.pid())),
        ("sidecar-v1", chaos::usage(seed.sidecars[0].proc.pid())),
        ("sidecar-v2", chaos::usage(seed.sidecars[1].proc.pid())),
        ("sidecar-sleep", chaos::usage(seed.sleep.proc.pid())),
    ]
}

/// The status of a sidecar's `/ready` right now (200, or 503 while it lacks a valid certificate or
/// config).
fn ready(s: &Sidecar) -> String {
    Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-m", "5", "-w", "%{http_code}"])
        .arg(format!("http://{}/ready", s.admin))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("curl: {e}"))
}

fn show(u: &Result<Usage>) -> String {
    match u {
        Ok(u) => format!("{:>7} KiB {:>4} fds", u.rss_kib, u.fds),
        Err(e) => format!("({e:#})"),
    }
}

/// What happens at a moment of the run.
#[derive(Debug, Clone, Copy)]
enum Event {
    Config(u32),
    RestartCa(u32),
    RestartPilot(u32),
    Sample,
}

/// The schedule: config flips every `config_every`; the CA at (k - 1/2) x `restart_every` + 10 s and
/// pilot at k x `restart_every` + 10 s, so they are never down together and pilot's restart does not
/// coincide with a config change; a usage sample every config period.
fn schedule(o: &Opts) -> Vec<(Duration, Event)> {
    let mut ev = Vec::new();
    let mut k = 1u32;
    while o.config_every * k < o.duration {
        ev.push((o.config_every * k, Event::Config(k)));
        ev.push((o.config_every * k, Event::Sample));
        k += 1;
    }
    let offset = Duration::from_secs(10);
    let mut k = 1u32;
    loop {
        let ca = o.restart_every * k - o.restart_every / 2 + offset;
        let pilot = o.restart_every * k + offset;
        if ca + Duration::from_secs(10) < o.duration {
            ev.push((ca, Event::RestartCa(k)));
        }
        if pilot + Duration::from_secs(10) < o.duration {
            ev.push((pilot, Event::RestartPilot(k)));
        }
        if ca >= o.duration {
            break;
        }
        k += 1;
    }
    ev.sort_by_key(|(t, _)| *t);
    ev
}

/// The usage samples of one run: at the start, after the first config period (warm), at the end.
type Usages = Vec<(&'static str, Result<Usage>)>;

/// Flips the VirtualService: odd periods to the 50/50 split, even ones back to all-v1.
fn change_config(seed: &Seed, k: u32) -> String {
    let (name, res) = if k % 2 == 1 {
        ("50/50 split", seed.apply_yaml("split.yaml", SPLIT))
    } else {
        ("all-v1", seed.apply("all-v1.yaml"))
    };
    match res {
        Ok(()) => format!("config -> {name}"),
        Err(e) => format!("config -> {name} FAILED: {e:#}"),
    }
}

/// Restarts the CA or pilot, the k-th time: odd times with SIGTERM, even ones with SIGKILL. Returns the
/// log line and whether a SIGTERM had to be followed by SIGKILL.
fn restart(seed: &mut Seed, ev: Event) -> Result<(String, bool)> {
    let (Event::RestartCa(k) | Event::RestartPilot(k)) = ev else {
        bail!("{ev:?} is not a restart");
    };
    let how = if k % 2 == 1 {
        Stop::Term(Duration::from_secs(10))
    } else {
        Stop::Kill
    };
    let (who, r) = if matches!(ev, Event::RestartCa(_)) {
        ("ca", chaos::restart_ca(&mut seed.plane, how, k))
    } else {
        (
            "pilot",
            chaos::restart_pilot(&mut seed.plane, &PILOT_ARGS, how, k),
        )
    };
    let r = r.with_context(|| format!("{who} restart"))?;
    let forced = if r.clean_exit {
        ""
    } else {
        ", killed after the grace"
    };
    Ok((
        format!(
            "{who} restarted ({how}{forced}), back in {:.2}s",
            r.downtime.as_secs_f64()
        ),
        !r.clean_exit,
    ))
}

/// What the scheduled events did, for the report.
#[derive(Default)]
struct Timeline {
    /// (seconds since the load began, what happened).
    events: Vec<(f64, String)>,
    warm: Option<Usages>,
    restarts_forced: u32,
}

/// Fires the schedule's events at their times until the run ends (deadline, signal, or the load thread
/// giving up). A CA or pilot that cannot come back stops the run: the rest would measure nothing.
fn drive(
    seed: &mut Seed,
    o: &Opts,
    t0: Instant,
    stop: &AtomicBool,
    load_done: impl Fn() -> bool,
) -> Timeline {
    let mut tl = Timeline::default();
    for (at, ev) in schedule(o) {
        while Instant::now() < t0 + at && !stop.load(Ordering::Relaxed) && !load_done() {
            std::thread::sleep(Duration::from_millis(100));
        }
        if stop.load(Ordering::Relaxed) || load_done() {
            break;
        }
        let now = t0.elapsed().as_secs_f64();
        let what = match ev {
            Event::Config(k) => change_config(seed, k),
            Event::RestartCa(_) | Event::RestartPilot(_) => match restart(seed, ev) {
                Ok((line, forced)) => {
                    tl.restarts_forced += u32::from(forced);
                    line
                }
                Err(e) => {
                    println!("{now:7.1}s FAILED: {e:#}");
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
            },
            Event::Sample => {
                let u = usages(seed);
                let line: Vec<String> = u.iter().map(|(n, u)| format!("{n} {}", show(u))).collect();
                tl.warm.get_or_insert(u);
                format!("usage: {}", line.join(" | "))
            }
        };
        println!("{now:7.1}s {what}");
        tl.events.push((now, what));
    }
    tl
}

/// Prints each load segment with the events that happened in it, then the totals.
fn report_load(segments: &[Segment], tl: &Timeline) {
    println!("\n== load segments (failures with the events in them)");
    for s in segments {
        let in_it: Vec<&str> = tl
            .events
            .iter()
            .filter(|(t, w)| *t >= s.start && *t < s.start + s.secs && !w.starts_with("usage"))
            .map(|(_, w)| w.as_str())
            .collect();
        println!(
            "{:7.1}s +{:5.1}s  sent {:6}  failed {:4}  ({:.0} rps)  {}",
            s.start,
            s.secs,
            s.sent(),
            s.failed(),
            s.sent() as f64 / s.secs.max(0.001),
            in_it.join("; ")
        );
        for (code, n) in s.statuses.iter().filter(|(c, _)| !(200..300).contains(c)) {
            println!("            status {code}: {n}");
        }
        for (n, e) in &s.errors {
            println!("            error x{n}: {e}");
        }
    }
    let sent: u64 = segments.iter().map(Segment::sent).sum();
    let failed: u64 = segments.iter().map(Segment::failed).sum();
    let secs: f64 = segments.iter().map(|s| s.secs).sum();
    println!("\n== summary");
    println!(
        "requests sent {sent}, failed {failed} ({:.4}%), {:.0} rps over {secs:.0}s",
        100.0 * failed as f64 / (sent.max(1)) as f64,
        sent as f64 / secs.max(0.001),
    );
}

/// Prints renewals and readiness per sidecar, the token writer's count, and the usage table.
fn report_mesh(seed: &Seed, tokens: &TokenRefresher, tl: &Timeline, start: &Usages, end: &Usages) {
    let sidecars = [
        ("sidecar-v1", &seed.sidecars[0]),
        ("sidecar-v2", &seed.sidecars[1]),
        ("sidecar-sleep", &seed.sleep),
    ];
    for (n, s) in sidecars {
        println!(
            "{n}: {} certificate renewals, {} renewal failures logged, ready: {}",
            s.log_count("certificate rotated"),
            s.log_count("certificate renewal failed"),
            ready(s)
        );
    }
    println!(
        "token files written {}, token write errors {}; restarts that needed SIGKILL after SIGTERM: {}",
        tokens.writes(),
        tokens.errors().len(),
        tl.restarts_forced
    );
    println!("\n== memory and descriptors (ca and pilot: the current generation)");
    println!(
        "{:<14} {:>22} {:>22} {:>22}",
        "process", "start", "warm", "end"
    );
    for (i, (n, first)) in start.iter().enumerate() {
        let warm = tl
            .warm
            .as_ref()
            .map(|w| show(&w[i].1))
            .unwrap_or_else(|| "-".into());
        println!(
            "{n:<14} {:>22} {warm:>22} {:>22}",
            show(first),
            show(&end[i].1)
        );
    }
}

/// Copies the processes' stderr logs (not the apps' access logs: large, and not about the mesh) out of
/// the run's temporary directory.
fn keep_logs(seed: &Seed, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for entry in std::fs::read_dir(seed.dir.path())?.flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "log") && !p.to_string_lossy().contains("access") {
            std::fs::copy(&p, dir.join(entry.file_name()))
                .with_context(|| format!("copy {}", p.display()))?;
        }
    }
    println!("logs copied to {}", dir.display());
    Ok(())
}

fn main() -> Result<()> {
    let o = parse_args()?;
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(stop.clone());
    println!(
        "soak: {:?} at {} rps ({} workers), tokens {:?} rewritten every 1s, certificates {:?}, \
         config every {:?}, CA and pilot restarts every {:?}",
        o.duration, o.rps, o.workers, o.token_ttl, o.cert_ttl, o.config_every, o.restart_every
    );
    let cert_ttl = format!("{}ms", o.cert_ttl.as_millis());
    // Sidecars start with a short token too (as with a projected token), but one that outlives a
    // first certificate request on a loaded machine; every token after that lives --token-ttl.
    let first_token_ttl = format!("{}s", o.token_ttl.max(FIRST_TOKEN_MIN).as_secs());
    let mut seed = Seed::explicit_with_tokens(
        &PILOT_ARGS,
        &["--cert-ttl", &cert_ttl, "--access-log", "off"],
        Some(&first_token_ttl),
    )?;
    seed.apply("all-v1.yaml")?;
    seed.wait_routes("all-v1 is in force", has_vs_route)?;
    let tokens = TokenRefresher::start(
        &seed.plane,
        &[
            ("default", "httpbin"),
            ("default", "sleep"),
            ("weft-system", "pilot"),
        ],
        o.token_ttl,
        Duration::from_secs(1),
    )?;
    let at_start = usages(&seed);
    println!("mesh up in {}", seed.dir.path().display());

    let t0 = Instant::now();
    let deadline = t0 + o.duration;
    let running = Arc::new(AtomicU32::new(0));
    let loader = {
        let (outbound, o, stop, running) = (
            seed.sleep.outbound.clone(),
            o.clone(),
            stop.clone(),
            running.clone(),
        );
        std::thread::spawn(move || load(outbound, o, t0, deadline, stop, running))
    };
    let timeline = drive(&mut seed, &o, t0, &stop, || loader.is_finished());

    // The load thread ends at the deadline; on an early stop, interrupt the running hey.
    if stop.load(Ordering::Relaxed) {
        let pid = running.load(Ordering::Relaxed);
        if pid != 0 {
            let _ = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
    }
    let segments = match loader.join() {
        Ok(r) => r?,
        Err(_) => bail!("the load thread panicked"),
    };
    let at_end = usages(&seed);
    report_load(&segments, &timeline);
    report_mesh(&seed, &tokens, &timeline, &at_start, &at_end);
    if let Some(dir) = &o.log_dir {
        keep_logs(&seed, dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hey_distributions() {
        let out = "Status code distribution:\n  [200]\t120 responses\n  [503]\t3 responses\n\n\
                   Error distribution:\n  [2]\tGet \"http://httpbin:8000/get\": EOF\n";
        let (s, e) = parse_hey(out);
        assert_eq!(s, vec![(200, 120), (503, 3)]);
        assert_eq!(
            e,
            vec![(2, "Get \"http://httpbin:8000/get\": EOF".to_owned())]
        );
        let seg = Segment {
            statuses: s,
            errors: e,
            ..Segment::default()
        };
        assert_eq!((seg.sent(), seg.failed()), (125, 5));
    }

    #[test]
    fn restarts_are_staggered_and_inside_the_run() {
        let o = Opts::default();
        let ev = schedule(&o);
        let ca: Vec<u64> = ev
            .iter()
            .filter(|(_, e)| matches!(e, Event::RestartCa(_)))
            .map(|(t, _)| t.as_secs())
            .collect();
        let pilot: Vec<u64> = ev
            .iter()
            .filter(|(_, e)| matches!(e, Event::RestartPilot(_)))
            .map(|(t, _)| t.as_secs())
            .collect();
        assert_eq!(&ca[..3], &[100, 280, 460]);
        assert_eq!(&pilot[..3], &[190, 370, 550]);
        assert!(ev.iter().all(|(t, _)| *t < o.duration));
        assert_eq!(
            ev.iter()
                .filter(|(_, e)| matches!(e, Event::Config(_)))
                .count(),
            29
        );
    }
}
