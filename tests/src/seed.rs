//! The seed task's pods as a fixture: httpbin v1 and v2 (gunicorn with the access log, each behind a
//! sidecar) and sleep (a sidecar; curl is its app), with the seed's Service applied. In explicit mode
//! on loopback, or in transparent mode in network namespaces.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::netns::{Host, Topology};
use crate::{ControlPlane, Httpbin, OtlpSink, Sidecar};

/// The seed's YAML, verbatim.
pub const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
/// The Service's default cluster (all endpoints).
pub const DEFAULT_CLUSTER: &str = "outbound|8000||httpbin.default.svc.cluster.local";

/// The running pods. Fields drop in order: processes first, then the namespaces, then files.
pub struct Seed {
    /// ca + pilot.
    pub plane: ControlPlane,
    /// httpbin v1.
    pub v1: Httpbin,
    /// httpbin v2.
    pub v2: Httpbin,
    /// sleep's sidecar (the client).
    pub sleep: Sidecar,
    /// The httpbin sidecars (v1, v2).
    pub sidecars: Vec<Sidecar>,
    /// Where every sidecar exports its spans.
    pub otlp: OtlpSink,
    /// The httpbin pods' namespaces (transparent mode).
    pub hosts: Vec<Host>,
    /// The network (transparent mode).
    pub topo: Option<Topology>,
    /// Working directory.
    pub dir: tempfile::TempDir,
}

impl Seed {
    /// The pods in explicit mode on 127.0.0.1.
    pub fn explicit(pilot_args: &[&str]) -> Result<Self> {
        Self::explicit_with(pilot_args, &[])
    }

    /// Like [`Seed::explicit`], with `sidecar_args` added to every `sidecar run` (e.g.
    /// `--cert-ttl 4s`).
    pub fn explicit_with(pilot_args: &[&str], sidecar_args: &[&str]) -> Result<Self> {
        Self::explicit_with_tokens(pilot_args, sidecar_args, None)
    }

    /// Like [`Seed::explicit_with`], with the sidecars' bootstrap tokens valid for `token_ttl` (e.g.
    /// `10s`; the CA's default when `None`), as short-lived projected tokens are.
    pub fn explicit_with_tokens(
        pilot_args: &[&str],
        sidecar_args: &[&str],
        token_ttl: Option<&str>,
    ) -> Result<Self> {
        crate::init();
        let dir = tempfile::tempdir()?;
        let mut plane = ControlPlane::start(dir.path(), pilot_args)?;
        plane.token_ttl = token_ttl.map(str::to_owned);
        let otlp = OtlpSink::start(dir.path(), None)?;
        plane.otlp = Some(otlp.grpc.clone());
        plane.apply(&format!("{EXAMPLES}/httpbin-service.yaml"))?;
        let v1 = Httpbin::start(dir.path(), "httpbin-v1")?;
        let v2 = Httpbin::start(dir.path(), "httpbin-v2")?;
        let s1 = Sidecar::explicit(
            &plane,
            "httpbin-v1",
            "httpbin",
            "app=httpbin,version=v1",
            Some(v1.port),
            sidecar_args,
        )?;
        let s2 = Sidecar::explicit(
            &plane,
            "httpbin-v2",
            "httpbin",
            "app=httpbin,version=v2",
            Some(v2.port),
            sidecar_args,
        )?;
        let sleep = Sidecar::explicit(
            &plane,
            "sleep",
            "sleep",
            "app=sleep,version=v1",
            None,
            sidecar_args,
        )?;
        let seed = Seed {
            plane,
            v1,
            v2,
            sleep,
            sidecars: vec![s1, s2],
            otlp,
            hosts: Vec::new(),
            topo: None,
            dir,
        };
        seed.wait_endpoints(DEFAULT_CLUSTER, 2)?;
        Ok(seed)
    }

    /// The pods in network namespaces with iptables capture (root only).
    pub fn transparent(pilot_args: &[&str]) -> Result<Self> {
        crate::init();
        let dir = tempfile::tempdir()?;
        let mut topo = Topology::new()?;
        let cp = topo.host("cp")?;
        let mut plane = ControlPlane::start_on(dir.path(), Some(&cp), pilot_args)?;
        let otlp = OtlpSink::start(dir.path(), Some(&cp))?;
        plane.otlp = Some(otlp.grpc.clone());
        plane.apply(&format!("{EXAMPLES}/httpbin-service.yaml"))?;
        let h1 = topo.host("httpbin-v1")?;
        let h2 = topo.host("httpbin-v2")?;
        let hs = topo.host("sleep")?;
        let s1 = Sidecar::transparent(
            &topo,
            &plane,
            &h1,
            "httpbin-v1",
            "httpbin",
            "app=httpbin,version=v1",
        )?;
        let s2 = Sidecar::transparent(
            &topo,
            &plane,
            &h2,
            "httpbin-v2",
            "httpbin",
            "app=httpbin,version=v2",
        )?;
        let v1 = Httpbin::start_in(dir.path(), "httpbin-v1", &h1)?;
        let v2 = Httpbin::start_in(dir.path(), "httpbin-v2", &h2)?;
        let sleep = Sidecar::transparent(&topo, &plane, &hs, "sleep", "sleep", "app=sleep")?;
        let seed = Seed {
            plane,
            v1,
            v2,
            sleep,
            sidecars: vec![s1, s2],
            otlp,
            hosts: vec![h1, h2],
            topo: Some(topo),
            dir,
        };
        seed.wait_endpoints(DEFAULT_CLUSTER, 2)?;
        Ok(seed)
    }

    /// `pilot apply -f` of a seed file (`all-v1.yaml`) or any path.
    pub fn apply(&self, file: &str) -> Result<()> {
        let path = if file.contains('/') {
            file.to_owned()
        } else {
            format!("{EXAMPLES}/{file}")
        };
        self.plane.apply(&path)
    }

    /// `pilot apply -f` of YAML text.
    pub fn apply_yaml(&self, name: &str, yaml: &str) -> Result<()> {
        self.plane.apply_yaml(name, yaml)
    }

    /// Waits (bounded) until sleep's sidecar has a config where `pred` holds.
    pub fn wait_config(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> Result<()> {
        for _ in 0..200 {
            let dump: serde_json::Value = serde_json::from_str(&self.sleep.config_dump()?)?;
            if pred(&dump) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("sleep's sidecar never got a config where {what}")
    }

    /// Waits until `cluster` has `n` endpoints in sleep's config.
    pub fn wait_endpoints(&self, cluster: &str, n: usize) -> Result<()> {
        self.wait_config(&format!("{cluster} has {n} endpoints"), |d| {
            endpoints(d, cluster) == n
        })
    }

    /// Waits until the names of httpbin's routes in sleep's config satisfy `pred`.
    pub fn wait_routes(&self, what: &str, pred: impl Fn(&[String]) -> bool) -> Result<()> {
        self.wait_config(what, |d| {
            pred(&routes(d, "httpbin.default.svc.cluster.local"))
        })
    }

    /// Waits until httpbin's routes in sleep's config mirror (or, with `want` false, do not mirror).
    pub fn wait_mirroring(&self, want: bool) -> Result<()> {
        self.wait_config("mirroring is as wanted", |d| {
            mirrors(d, "httpbin.default.svc.cluster.local").is_empty() != want
        })
    }

    /// The seed's cleanup: deletes the VirtualService and returns how the next 20 requests split over
    /// v1 and v2 once sleep's sidecar has dropped the rule (both should be > 0: default balancing).
    pub fn cleanup_and_send(&self) -> Result<(usize, usize)> {
        let (ok, _, err) = self
            .plane
            .pilot_cmd(&["delete", "virtualservice", "httpbin"])?;
        if !ok {
            bail!("delete virtualservice httpbin: {err}");
        }
        self.wait_routes("the VirtualService is gone", |r| !has_vs_route(r))?;
        self.send(20, &[])
    }

    /// A counter from sleep's `/stats/prometheus` (the full sample name with labels).
    pub fn sleep_stat(&self, sample: &str) -> Result<u64> {
        let text = self.sleep.stats()?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0))
    }

    /// Sends `n` requests for `/headers` from sleep (each must answer 200); returns how many lines
    /// the v1 and v2 access logs grew by.
    pub fn send(&self, n: usize, extra: &[&str]) -> Result<(usize, usize)> {
        let (a1, a2) = (self.v1.log_lines().len(), self.v2.log_lines().len());
        for _ in 0..n {
            let (code, body) = self.sleep.curl("http://httpbin:8000/headers", extra)?;
            if code != 200 {
                bail!("request answered {code}: {body}");
            }
        }
        // gunicorn logs after answering, and mirror copies land in a log too: wait (bounded) until
        // at least `n` lines arrived and the counts have stopped moving for a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut last = (usize::MAX, usize::MAX);
        let mut stable_since = std::time::Instant::now();
        loop {
            let now = (
                self.v1.log_lines().len() - a1,
                self.v2.log_lines().len() - a2,
            );
            if now != last {
                last = now;
                stable_since = std::time::Instant::now();
            }
            let settled = stable_since.elapsed() >= Duration::from_millis(150);
            if (now.0 + now.1 >= n && settled) || std::time::Instant::now() > deadline {
                return Ok(now);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Number of endpoints of `cluster` in a `/config_dump`.
pub fn endpoints(dump: &serde_json::Value, cluster: &str) -> usize {
    dump["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == cluster)
        .and_then(|c| c["endpoints"].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// Route names of a Service's first port in a `/config_dump`.
pub fn routes(dump: &serde_json::Value, hostname: &str) -> Vec<String> {
    dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["hostname"] == hostname)
        .flat_map(|s| {
            s["ports"][0]["routes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect()
}

/// Mirror clusters of a Service's first-port routes in a `/config_dump`.
pub fn mirrors(dump: &serde_json::Value, hostname: &str) -> Vec<String> {
    dump["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["hostname"] == hostname)
        .flat_map(|s| {
            s["ports"][0]["routes"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|r| r["mirrors"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m["cluster"].as_str().map(str::to_owned))
        .collect()
}

/// Whether a VirtualService route (named `<ns>/<vs>...`) is in force, not just the default route.
pub fn has_vs_route(routes: &[String]) -> bool {
    routes.iter().any(|r| r.starts_with("default/httpbin"))
}

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seed")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}
