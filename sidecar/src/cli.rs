//! The `sidecar` command line: `run` (the proxy) and `init` (traffic capture, as root).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::capture::{self, CaptureConfig};
use crate::outbound::Mode;
use crate::run::RunConfig;

/// weft's per-pod proxy.
#[derive(Debug, Parser)]
#[command(name = "sidecar", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `sidecar` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy. Prints `listening on ADMIN_ADDR` once its listeners are bound.
    Run(Box<RunArgs>),
    /// Install (or with --clean remove) the iptables capture rules in this network namespace; root only.
    Init(InitArgs),
}

/// Capture mode flag.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// iptables captures the pod's traffic (after `sidecar init`); runs as the proxy uid.
    Transparent,
    /// No capture: the app uses the outbound port as its HTTP proxy (http_proxy=http://127.0.0.1:15001).
    Explicit,
}

/// Access-log flag.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AccessLogArg {
    /// Envoy's default text format.
    Text,
    /// One JSON object per line.
    Json,
    /// No access log.
    Off,
}

/// `sidecar run` flags (each also read from an environment variable, for the Kubernetes downward API).
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// pilot's discovery address (host:port).
    #[arg(long, env = "WEFT_PILOT")]
    pub pilot: String,
    /// The CA's address (host:port).
    #[arg(long, env = "WEFT_CA_ADDR")]
    pub ca: String,
    /// The mesh root certificate (PEM; what `ca root` prints).
    #[arg(long, env = "WEFT_CA_ROOT")]
    pub ca_root: PathBuf,
    /// File holding the bootstrap token (from `ca token`, or a projected service-account token).
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Pod namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Pod service account.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    pub service_account: String,
    /// Pod name.
    #[arg(long, env = "POD_NAME")]
    pub name: String,
    /// The workload the pod belongs to (a Deployment's name), for the metrics' `*_workload`
    /// labels, as Istio's ISTIO_META_WORKLOAD_NAME; `pilot inject` sets it. Default: the pod name.
    #[arg(long, env = "WORKLOAD_NAME")]
    pub workload_name: Option<String>,
    /// Pod labels, k=v[,k=v].
    #[arg(long, env = "POD_LABELS", default_value = "", value_parser = parse_labels)]
    pub labels: BTreeMap<String, String>,
    /// Pod IP (default: 127.0.0.1 in explicit mode; required in transparent mode).
    #[arg(long, env = "INSTANCE_IP")]
    pub ip: Option<IpAddr>,
    /// transparent (iptables capture) or explicit (HTTP proxy).
    #[arg(long, value_enum, default_value = "transparent", env = "WEFT_MODE")]
    pub mode: ModeArg,
    /// Address the outbound (transparent) and inbound listeners bind (admin is always loopback).
    #[arg(long, default_value = "0.0.0.0", env = "WEFT_BIND")]
    pub bind: IpAddr,
    /// Outbound listener port.
    #[arg(long, default_value_t = 15001, env = "WEFT_OUTBOUND_PORT")]
    pub outbound_port: u16,
    /// Inbound listener port.
    #[arg(long, default_value_t = 15006, env = "WEFT_INBOUND_PORT")]
    pub inbound_port: u16,
    /// Admin listener port (loopback): /ready, /config_dump, /stats/prometheus.
    #[arg(long, default_value_t = 15000, env = "WEFT_ADMIN_PORT")]
    pub admin_port: u16,
    /// DNS proxy port (UDP and TCP); iptables sends the pod's DNS here in transparent mode.
    #[arg(long, default_value_t = 15053, env = "WEFT_DNS_PORT")]
    pub dns_port: u16,
    /// Resolver for names outside the mesh (default: the first nameserver in /etc/resolv.conf).
    #[arg(long, env = "WEFT_DNS_UPSTREAM")]
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// Where inbound requests go in explicit mode (127.0.0.1:PORT).
    #[arg(long, env = "WEFT_APP_PORT")]
    pub app_port: Option<u16>,
    /// Trust domain.
    #[arg(long, default_value = "cluster.local", env = "WEFT_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Largest request body copied to mirrors (bytes); larger bodies are not mirrored (counted).
    #[arg(long, default_value_t = crate::outbound::mirror::DEFAULT_MAX_BODY, env = "WEFT_MIRROR_MAX_BODY")]
    pub mirror_max_body: usize,
    /// Access log on stdout, one line per request: text (Envoy's default format), json, or off.
    #[arg(long, value_enum, default_value = "text", env = "WEFT_ACCESS_LOG")]
    pub access_log: AccessLogArg,
    /// Kubelet readiness port serving /healthz/ready on --bind (Istio's 15021); 0 turns it off.
    #[arg(long, default_value_t = 15021, env = "WEFT_STATUS_PORT")]
    pub status_port: u16,
    /// Prometheus scrape port on --bind (Istio's 15020): `/stats/prometheus` with the sidecar's
    /// metrics merged with the app's; 0 turns it off.
    #[arg(long, default_value_t = 15020, env = "WEFT_PROMETHEUS_PORT")]
    pub prometheus_port: u16,
    /// The app's original `prometheus.io/*` annotations as JSON (`{"scrape":"true","port":"8080",
    /// "path":"/metrics"}`, keys without the prefix; `pilot inject` sets it): the app's metrics on
    /// 127.0.0.1 are merged into the Prometheus port's.
    #[arg(long, env = "WEFT_APP_PROMETHEUS_ANNOTATIONS")]
    pub app_prometheus_annotations: Option<String>,
    /// Requested certificate lifetime (rotated at about half of it).
    #[arg(long, default_value = "24h", value_parser = weft_ca::cli::parse_duration, env = "WEFT_CERT_TTL")]
    pub cert_ttl: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests and connections get to finish (Istio's
    /// `terminationDrainDuration`); the process exits sooner once they have.
    #[arg(long, default_value = "5s", value_parser = weft_ca::cli::parse_duration, env = "WEFT_DRAIN_DURATION")]
    pub drain_duration: Duration,
    /// Connections each listener serves at once; more are refused (and counted).
    #[arg(long, default_value_t = crate::listener::Limits::default().max_connections, env = "WEFT_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// How long a request head may take to arrive once begun (a new connection's first line
    /// too); then 408 and the connection closes.
    #[arg(long, default_value = "10s", value_parser = weft_ca::cli::parse_duration, env = "WEFT_HEAD_TIMEOUT")]
    pub head_timeout: Duration,
    /// How long a connection may stay without a request (HTTP) or without bytes either way
    /// (opaque TCP) before it is closed (Envoy's and Istio's default: 1h).
    #[arg(long, default_value = "1h", value_parser = weft_ca::cli::parse_duration, env = "WEFT_IDLE_TIMEOUT")]
    pub idle_timeout: Duration,
    /// HTTP/2 keepalive ping interval on the channels to pilot and the CA (Istio's xDS: 30s).
    #[arg(long, default_value = "30s", value_parser = weft_ca::cli::parse_duration, env = "WEFT_KEEPALIVE_INTERVAL")]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is dropped and redialled
    /// (Istio's xDS: 10s). A silent pilot or CA is noticed within interval + timeout.
    #[arg(long, default_value = "10s", value_parser = weft_ca::cli::parse_duration, env = "WEFT_KEEPALIVE_TIMEOUT")]
    pub keepalive_timeout: Duration,
    /// Worker threads (Istio's proxy `concurrency`); 1 runs everything on one thread with no
    /// work-stealing at all. Default: one per core.
    #[arg(long, env = "WEFT_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: Option<u16>,
}

/// `sidecar init` flags.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// uid the proxy runs as; its own traffic is not captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Inbound listener port.
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// Outbound listener port.
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// DNS proxy port.
    #[arg(long, default_value_t = 15053)]
    pub dns_port: u16,
    /// Inbound ports not captured, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "15020,15021")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports not captured, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Remove weft's rules instead.
    #[arg(long)]
    pub clean: bool,
}

/// Parses `k=v[,k=v]`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not k=v"))?;
        if k.is_empty() {
            return Err(format!("label {pair:?} has an empty key"));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(args) => {
            let cfg = CaptureConfig {
                proxy_uid: args.proxy_uid,
                inbound_port: args.inbound_port,
                outbound_port: args.outbound_port,
                dns_port: args.dns_port,
                exclude_inbound_ports: args.exclude_inbound_ports,
                exclude_outbound_ports: args.exclude_outbound_ports,
            };
            if args.clean {
                capture::clean().context("cannot remove the capture rules")?;
                println!("capture rules removed");
            } else {
                capture::init(&cfg).context("cannot install the capture rules")?;
                println!("capture rules installed (proxy uid {})", cfg.proxy_uid);
            }
            Ok(())
        }
        Command::Run(args) => {
            weft_ca::cli::init_logging();
            let mode = match args.mode {
                ModeArg::Transparent => Mode::Transparent,
                ModeArg::Explicit => Mode::Explicit,
            };
            let ip = match (args.ip, mode) {
                (Some(ip), _) => ip,
                (None, Mode::Explicit) => IpAddr::from([127, 0, 0, 1]),
                (None, Mode::Transparent) => {
                    bail!("--ip (INSTANCE_IP) is required in transparent mode")
                }
            };
            let cfg = RunConfig {
                pilot: args.pilot,
                ca: args.ca,
                ca_root: args.ca_root,
                token_file: args.token_file,
                trust_domain: args.trust_domain,
                namespace: args.namespace,
                service_account: args.service_account,
                workload_name: args
                    .workload_name
                    .filter(|w| !w.is_empty())
                    .unwrap_or_else(|| args.name.clone()),
                name: args.name,
                labels: args.labels,
                ip,
                mode,
                bind: args.bind,
                outbound_port: args.outbound_port,
                inbound_port: args.inbound_port,
                admin_port: args.admin_port,
                dns_port: args.dns_port,
                mirror_max_body: args.mirror_max_body,
                status_port: args.status_port,
                prometheus_port: args.prometheus_port,
                app_metrics: crate::telemetry::appmetrics::parse_annotations(
                    args.app_prometheus_annotations.as_deref().unwrap_or(""),
                )
                .context("--app-prometheus-annotations (WEFT_APP_PROMETHEUS_ANNOTATIONS)")?,
                access_log: match args.access_log {
                    AccessLogArg::Text => crate::telemetry::AccessLog::Text,
                    AccessLogArg::Json => crate::telemetry::AccessLog::Json,
                    AccessLogArg::Off => crate::telemetry::AccessLog::Off,
                },
                dns_upstream: args.dns_upstream,
                app_port: args.app_port,
                cert_ttl: args.cert_ttl,
                drain_duration: args.drain_duration,
                limits: crate::listener::Limits {
                    max_connections: args.max_connections,
                    head_timeout: args.head_timeout,
                    idle_timeout: args.idle_timeout,
                },
                keepalive: weft_ca::grpc::Keepalive {
                    interval: args.keepalive_interval,
                    timeout: args.keepalive_timeout,
                },
            };
            let runtime = match args.concurrency {
                // One thread: the single-threaded scheduler does the same work without the
                // multi-threaded one's cross-thread queues and wake-ups.
                Some(1) => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build(),
                Some(n) => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(usize::from(n))
                    .enable_all()
                    .build(),
                None => tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build(),
            }
            .context("cannot start the async runtime")?;
            runtime.block_on(async move {
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    weft_ca::cli::shutdown_signal().await;
                    signal.cancel();
                });
                crate::run::run(cfg, shutdown)
                    .await
                    .context("sidecar failed")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let l = parse_labels("app=httpbin,version=v1").unwrap();
        assert_eq!(l["app"], "httpbin");
        assert_eq!(l["version"], "v1");
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("app").is_err());
        assert!(parse_labels("=x").is_err());
    }
}
