//! Traffic capture: what Istio's istio-init does, as `sidecar init`, and reading a redirected
//! connection's original destination.
//!
//! Rules live in dedicated chains (`WEFT_INBOUND`, `WEFT_REDIRECT`, `WEFT_IN_REDIRECT`, `WEFT_OUTPUT`)
//! in the nat table of the pod's network namespace, so `--clean` removes exactly what `init` added and
//! a second `init` replaces rather than duplicates (istio-semantics.md §7):
//! - PREROUTING: inbound TCP → `WEFT_INBOUND` → REDIRECT to the inbound port (except excluded ports).
//! - OUTPUT: TCP from the proxy's uid is left alone (its own upstream connections); loopback-to-self is
//!   left alone; everything else → REDIRECT to the outbound port. DNS (UDP and TCP 53) → the DNS port,
//!   except the proxy's own lookups.

use std::io;
use std::net::SocketAddr;
use std::process::Command;

use tokio::net::TcpStream;

/// The destination a connection had before iptables redirected it here.
pub fn original_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = if tcp.local_addr()?.is_ipv6() {
        sock.original_dst_v6()?
    } else {
        sock.original_dst_v4()?
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// Settings of `sidecar init`.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// The proxy's uid, whose own traffic is not captured.
    pub proxy_uid: u32,
    /// Where inbound TCP goes.
    pub inbound_port: u16,
    /// Where outbound TCP goes.
    pub outbound_port: u16,
    /// Where DNS goes.
    pub dns_port: u16,
    /// Inbound ports left alone (e.g. health checks).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<u16>,
}

/// Why capture setup failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// iptables could not be run.
    #[error(
        "cannot run iptables ({0}); is it installed and are we root in the pod's network namespace?"
    )]
    Spawn(io::Error),
    /// A rule was refused.
    #[error("iptables {args}: {stderr}")]
    Rule {
        /// The arguments.
        args: String,
        /// What iptables said.
        stderr: String,
    },
}

const CHAINS: [&str; 4] = [
    "WEFT_INBOUND",
    "WEFT_IN_REDIRECT",
    "WEFT_REDIRECT",
    "WEFT_OUTPUT",
];

/// An iptables command on the nat table, where all of weft's rules live.
fn nat(args: &[&str]) -> Result<(), CaptureError> {
    let mut all = Vec::with_capacity(args.len() + 2);
    all.extend_from_slice(&["-t", "nat"]);
    all.extend_from_slice(args);
    iptables(&all)
}

fn iptables(args: &[&str]) -> Result<(), CaptureError> {
    let out = Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .map_err(CaptureError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CaptureError::Rule {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Removes weft's chains and the jumps to them; absent ones are fine (idempotent).
pub fn clean() -> Result<(), CaptureError> {
    // Jumps first (a chain cannot be deleted while referenced); ignore "does not exist".
    let _ = nat(&["-D", "PREROUTING", "-p", "tcp", "-j", "WEFT_INBOUND"]);
    let _ = nat(&["-D", "OUTPUT", "-p", "tcp", "-j", "WEFT_OUTPUT"]);
    let _ = nat(&[
        "-D",
        "OUTPUT",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        "WEFT_OUTPUT",
    ]);
    for chain in CHAINS {
        let _ = nat(&["-F", chain]);
        let _ = nat(&["-X", chain]);
    }
    Ok(())
}

/// Installs the capture rules (replacing any earlier ones).
pub fn init(cfg: &CaptureConfig) -> Result<(), CaptureError> {
    clean()?;
    let uid = cfg.proxy_uid.to_string();
    let inbound = cfg.inbound_port.to_string();
    let outbound = cfg.outbound_port.to_string();
    let dns = cfg.dns_port.to_string();
    for chain in CHAINS {
        nat(&["-N", chain])?;
    }
    // Inbound.
    nat(&[
        "-A",
        "WEFT_IN_REDIRECT",
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &inbound,
    ])?;
    for port in &cfg.exclude_inbound_ports {
        nat(&[
            "-A",
            "WEFT_INBOUND",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "RETURN",
        ])?;
    }
    nat(&["-A", "WEFT_INBOUND", "-p", "tcp", "-j", "WEFT_IN_REDIRECT"])?;
    nat(&["-A", "PREROUTING", "-p", "tcp", "-j", "WEFT_INBOUND"])?;
    // Outbound.
    nat(&[
        "-A",
        "WEFT_REDIRECT",
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &outbound,
    ])?;
    // DNS first: the proxy's own lookups go to the real resolver, everyone else's to the DNS proxy.
    for proto in ["udp", "tcp"] {
        nat(&[
            "-A",
            "WEFT_OUTPUT",
            "-p",
            proto,
            "--dport",
            "53",
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "-j",
            "RETURN",
        ])?;
        nat(&[
            "-A",
            "WEFT_OUTPUT",
            "-p",
            proto,
            "--dport",
            "53",
            "-j",
            "REDIRECT",
            "--to-ports",
            &dns,
        ])?;
    }
    // The proxy's own connections (upstream, to pilot and the CA) are never captured.
    nat(&[
        "-A",
        "WEFT_OUTPUT",
        "-m",
        "owner",
        "--uid-owner",
        &uid,
        "-j",
        "RETURN",
    ])?;
    // Loopback-to-self (app to app on localhost) stays local.
    nat(&[
        "-A",
        "WEFT_OUTPUT",
        "-o",
        "lo",
        "-d",
        "127.0.0.1/32",
        "-j",
        "RETURN",
    ])?;
    for port in &cfg.exclude_outbound_ports {
        nat(&[
            "-A",
            "WEFT_OUTPUT",
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "RETURN",
        ])?;
    }
    nat(&["-A", "WEFT_OUTPUT", "-p", "tcp", "-j", "WEFT_REDIRECT"])?;
    nat(&["-A", "OUTPUT", "-p", "tcp", "-j", "WEFT_OUTPUT"])?;
    nat(&[
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        "WEFT_OUTPUT",
    ])?;
    Ok(())
}
