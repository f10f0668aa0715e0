//! Pods as network namespaces: an isolated "node" namespace holding a bridge, and one namespace per
//! host (a pod, or the control plane) wired to it with a veth pair. Nothing touches the machine's own
//! network namespace: every address lives inside namespaces the test made, and everything is removed
//! when the [`Topology`] is dropped (processes in its namespaces are killed first), also on failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::run;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether this process can build network namespaces; prints why not (the caller then skips).
pub fn available(test: &str) -> bool {
    let uid0 = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !uid0 {
        println!("SKIP {test}: needs root for network namespaces and iptables (CI runs as root)");
        return false;
    }
    for tool in ["ip", "iptables", "setpriv", "curl"] {
        let found = run(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .map(|(ok, _, _)| ok)
            .unwrap_or(false);
        if !found {
            println!(
                "SKIP {test}: {tool} is not installed (deploy/local/install-deps.sh installs it)"
            );
            return false;
        }
    }
    true
}

/// One host (network namespace) on the topology's bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name.
    pub ns: String,
    /// Its address on the bridge.
    pub ip: String,
    /// Its veth's name on the node (bridge) side.
    pub link: String,
}

impl Host {
    /// A command run inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// A command run inside this namespace as `uid` (for the uid-1337 sidecar).
    pub fn command_as(&self, uid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", "--"])
            .arg(program);
        cmd
    }
}

/// An isolated little network: a bridge in a node namespace, hosts attached to it.
#[derive(Debug)]
pub struct Topology {
    id: String,
    node: String,
    subnet: u8,
    hosts: Vec<String>,
    /// A world-readable directory for what the uid-1337 sidecar must read (binary, root, token).
    pub shared: PathBuf,
}

fn ip(args: &[&str]) -> Result<()> {
    let (ok, _, err) = run(Command::new("ip").args(args))?;
    if !ok {
        bail!("ip {}: {}", args.join(" "), err.trim());
    }
    Ok(())
}

impl Topology {
    /// Creates the node namespace and its bridge (10.233.S.1/24, S unique per topology).
    pub fn new() -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("wt{}x{n}", pid % 100_000);
        // Spread subnets over tests in parallel processes; each topology is isolated anyway.
        let subnet =
            u8::try_from((pid.wrapping_mul(31).wrapping_add(n * 7)) % 200 + 20).unwrap_or(20);
        let node = format!("{id}-node");
        let shared = std::env::temp_dir().join(format!("{id}-shared"));
        let topo = Topology {
            id,
            node: node.clone(),
            subnet,
            hosts: Vec::new(),
            shared: shared.clone(),
        };
        std::fs::create_dir_all(&shared)?;
        set_mode(&shared, 0o755)?;
        ip(&["netns", "add", &node])?;
        ip(&["-n", &node, "link", "set", "lo", "up"])?;
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("10.233.{subnet}.1/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &node, "link", "set", "br0", "up"])?;
        Ok(topo)
    }

    /// The gateway (bridge) address, which pods use as their DNS server (queries never reach it:
    /// iptables hands them to the sidecar's DNS proxy).
    pub fn gateway(&self) -> String {
        format!("10.233.{}.1", self.subnet)
    }

    /// Adds a host namespace `name` at 10.233.S.<k>, with a Kubernetes-like resolv.conf.
    pub fn host(&mut self, name: &str) -> Result<Host> {
        let k = self.hosts.len() + 2;
        let ns = format!("{}-{name}", self.id);
        let addr = format!("10.233.{}.{k}", self.subnet);
        ip(&["netns", "add", &ns])?;
        self.hosts.push(ns.clone());
        let veth = format!("v{k}");
        ip(&[
            "link", "add", &veth, "netns", &self.node, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        ip(&[
            "-n", &self.node, "link", "set", &veth, "master", "br0", "up",
        ])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", &self.gateway()])?;
        // `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf.
        let etc = PathBuf::from("/etc/netns").join(&ns);
        std::fs::create_dir_all(&etc)?;
        std::fs::write(
            etc.join("resolv.conf"),
            format!(
                "nameserver {}\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:1\n",
                self.gateway()
            ),
        )?;
        Ok(Host {
            ns,
            ip: addr,
            link: veth,
        })
    }

    /// Takes `host`'s link to the bridge down or up. Down, its packets are dropped silently: peers
    /// get no FIN and no RST, as in a network partition or a node that lost power.
    pub fn set_link(&self, host: &Host, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.node, "link", "set", &host.link, state])
    }

    /// Copies `file` into the shared world-readable directory (mode `mode`) and returns the copy.
    pub fn share(&self, file: &Path, mode: u32) -> Result<PathBuf> {
        let name = file.file_name().context("file without a name")?;
        let dest = self.shared.join(name);
        std::fs::copy(file, &dest).with_context(|| format!("copy {}", file.display()))?;
        set_mode(&dest, mode)?;
        Ok(dest)
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.node)) {
            // Anything still running in the namespace (a process a test lost track of) goes first.
            if let Ok((_, pids, _)) = run(Command::new("ip").args(["netns", "pids", ns])) {
                for pid in pids.split_whitespace() {
                    let _ = run(Command::new("kill").args(["-9", pid]));
                }
            }
            let _ = run(Command::new("ip").args(["netns", "del", ns]));
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
        let _ = std::fs::remove_dir_all(&self.shared);
    }
}
