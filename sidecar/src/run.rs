//! `sidecar run`: start-up in order, then serve until told to stop.
//!
//! Order: key + CSR → certificate from the CA (retried with backoff until the CA answers) → listeners
//! bound (a bind failure fails start-up) → discovery stream to pilot (the node it sends carries the
//! bound inbound port) → ready once the first config is accepted. Certificates rotate at half life in
//! the background (the token file read again for each; see `weft_ca::files`), the root bundle is
//! reloaded when its file changes, and readiness turns false while the certificate is expired; if
//! pilot goes away the last config keeps serving.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_ca::SpiffeId;
use weft_ca::client::CaClient;
use weft_ca::files::RootFile;
use weft_ca::tls::{self, ClientAuth, CredentialStore};
use weft_proto::discovery as pb;

use crate::admin::{Admin, Port};
use crate::control::{ControlConfig, ControlStats};
use crate::inbound::{AppTarget, Inbound};
use crate::outbound::{Mode, Outbound};

use crate::upstream::Upstreams;

/// Namespace and service account of pilot's identity.
pub const PILOT_NAMESPACE: &str = "weft-system";
/// Service account of pilot's identity.
pub const PILOT_SERVICE_ACCOUNT: &str = "pilot";

/// Everything `sidecar run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// pilot's discovery address.
    pub pilot: String,
    /// The CA's address.
    pub ca: String,
    /// The mesh root PEM file.
    pub ca_root: PathBuf,
    /// The bootstrap token file.
    pub token_file: PathBuf,
    /// Trust domain.
    pub trust_domain: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod service account.
    pub service_account: String,
    /// Pod name.
    pub name: String,
    /// The workload it belongs to (the metrics' `*_workload`).
    pub workload_name: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Pod IP.
    pub ip: IpAddr,
    /// Capture mode.
    pub mode: Mode,
    /// Address to bind listeners on (0.0.0.0 in a pod; 127.0.0.1 in explicit mode on a shared host).
    pub bind: IpAddr,
    /// Outbound listener port.
    pub outbound_port: u16,
    /// Inbound listener port.
    pub inbound_port: u16,
    /// Admin listener port (always on loopback).
    pub admin_port: u16,
    /// DNS proxy port.
    pub dns_port: u16,
    /// Where non-mesh DNS queries go (default: the first nameserver of /etc/resolv.conf).
    pub dns_upstream: Option<SocketAddr>,
    /// The app's port, in explicit mode.
    pub app_port: Option<u16>,
    /// Largest request body mirrored.
    pub mirror_max_body: usize,
    /// Access-log format (stdout).
    pub access_log: crate::telemetry::AccessLog,
    /// Kubelet-facing readiness port (`/healthz/ready` on `bind`), like Istio's 15021; 0 = off.
    pub status_port: u16,
    /// Prometheus' scrape port (merged `/stats/prometheus` on `bind`), like Istio's 15020; 0 = off.
    pub prometheus_port: u16,
    /// The app's metrics to merge there (from its original `prometheus.io/*` annotations).
    pub app_metrics: Option<crate::telemetry::appmetrics::AppTarget>,
    /// Requested certificate lifetime.
    pub cert_ttl: Duration,
    /// How long a drain may take before the process exits anyway.
    pub drain_duration: Duration,
    /// Limits at every listener.
    pub limits: crate::listener::Limits,
    /// HTTP/2 keepalive of the channels to pilot and the CA.
    pub keepalive: weft_ca::grpc::Keepalive,
}

/// Why start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Identity or TLS material unusable.
    #[error("{0}")]
    Identity(String),
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the sidecar until `shutdown`. Prints `listening on <admin address>` once everything is bound.
pub async fn run(cfg: RunConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|source| RunError::Read {
            path: path.clone(),
            source,
        })
    };
    let identity = SpiffeId::new(&cfg.trust_domain, &cfg.namespace, &cfg.service_account)
        .map_err(|e| RunError::Identity(format!("invalid identity: {e}")))?;
    // Both files are read again later (the token at every certificate request, the roots then and
    // every few seconds: Kubernetes rotates both in place); here they only have to be usable.
    let roots =
        RootFile::load(&cfg.ca_root).map_err(|e| RunError::Identity(format!("--ca-root: {e}")))?;
    let bundle = roots.bundle().clone();
    read(&cfg.token_file)?;
    let ca_id = weft_ca::server::ca_identity(&cfg.trust_domain)
        .map_err(|e| RunError::Identity(e.to_string()))?;
    let ca = CaClient::with_files(&cfg.ca, &roots, ca_id, &cfg.token_file, &cfg.keepalive)
        .map_err(|e| RunError::Identity(e.to_string()))?;

    let stop = shutdown.clone();
    let Some(creds) =
        weft_ca::client::fetch_with_retry(&ca, &identity, cfg.cert_ttl, stop.cancelled_owned())
            .await
    else {
        return Ok(());
    };
    tracing::info!(%identity, "certificate obtained");
    let creds = CredentialStore::new(creds);
    let rotation = tokio::spawn(weft_ca::client::keep_rotated(
        ca,
        identity.clone(),
        cfg.cert_ttl,
        creds.clone(),
    ));
    let root_watch = tokio::spawn(roots.watch(weft_ca::files::ROOT_POLL_INTERVAL));

    // What keeps serving through the drain (discovery, DNS, admin, readiness, span export) stops
    // after it.
    let stopped = CancellationToken::new();
    let (tables_tx, tables) = watch::channel(Arc::new(crate::snapshot::Snapshot::empty()));
    let bind = |what: &'static str, ip: IpAddr, port: u16| async move {
        let addr = SocketAddr::new(ip, port);
        TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Bind { what, addr, source })
    };
    let outbound_ip = match cfg.mode {
        Mode::Transparent => cfg.bind,
        // An explicit proxy is for the local app only.
        Mode::Explicit => IpAddr::from([127, 0, 0, 1]),
    };
    let outbound_l = bind("outbound", outbound_ip, cfg.outbound_port).await?;
    let inbound_l = bind("inbound", cfg.bind, cfg.inbound_port).await?;
    let admin_l = bind("admin", IpAddr::from([127, 0, 0, 1]), cfg.admin_port).await?;
    let status_l = if cfg.status_port == 0 {
        None
    } else {
        Some(bind("status", cfg.bind, cfg.status_port).await?)
    };
    let prometheus_l = if cfg.prometheus_port == 0 {
        None
    } else {
        Some(bind("prometheus", cfg.bind, cfg.prometheus_port).await?)
    };
    // Loopback only: iptables REDIRECTs the pod's DNS to 127.0.0.1, and a wildcard-bound UDP socket
    // would answer from the pod IP, which conntrack cannot map back (the resolver drops the reply).
    let dns_ip = IpAddr::from([127, 0, 0, 1]);
    let dns_addr = SocketAddr::new(dns_ip, cfg.dns_port);
    let dns_tcp = bind("dns", dns_ip, cfg.dns_port).await?;
    // Same port for UDP as TCP got (matters when the flag is 0).
    let dns_addr = dns_tcp.local_addr().unwrap_or(dns_addr);
    let dns_udp = tokio::net::UdpSocket::bind(dns_addr)
        .await
        .map_err(|source| RunError::Bind {
            what: "dns (udp)",
            addr: dns_addr,
            source,
        })?;
    let dns_upstream = cfg.dns_upstream.or_else(|| {
        std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .and_then(|t| crate::dns::upstream_from_resolv_conf(&t))
    });
    let local = |l: &TcpListener| l.local_addr().map(|a| a.port()).unwrap_or(0);
    let own_ports = vec![local(&outbound_l), local(&inbound_l), local(&admin_l)];

    // HTTP/2 for HTTP between sidecars, `istio` for opaque TCP (Istio's ALPN for it).
    let alpn: &[&[u8]] = &[tls::ALPN_H2, crate::upstream::ALPN_TCP];
    let strict = tls::server_config(creds.clone(), &bundle, ClientAuth::Required, alpn)
        .map_err(|e| RunError::Identity(e.to_string()))?;
    let permissive = tls::server_config(creds.clone(), &bundle, ClientAuth::Optional, alpn)
        .map_err(|e| RunError::Identity(e.to_string()))?;
    let target = match cfg.mode {
        Mode::Transparent => AppTarget::OriginalPort,
        Mode::Explicit => cfg.app_port.map_or(AppTarget::None, AppTarget::Port),
    };
    let label = |k: &str| cfg.labels.get(k).map(String::as_str).unwrap_or_default();
    let get = |k: &str| cfg.labels.get(k).map(String::as_str);
    let me = crate::telemetry::Workload {
        name: &cfg.workload_name,
        namespace: &cfg.namespace,
        principal: identity.as_str(),
        app: label("app"),
        version: label("version"),
        canonical_service: crate::telemetry::canonical_service(get),
        canonical_revision: crate::telemetry::canonical_revision(get),
    };
    // Istio's names for this workload on its spans (pilot's pushed `service.name` is the same
    // `<canonical service>.<namespace>`, from the Pod's labels; this one serves until it arrives).
    let canonical_service = match me.canonical_service {
        "" => cfg.workload_name.as_str(),
        c => c,
    };
    let canonical_revision = match me.canonical_revision {
        "" => "latest",
        r => r,
    };
    let service_name: Arc<str> = Arc::from(crate::telemetry::span_tags::service_name(
        canonical_service,
        &cfg.namespace,
    ));
    let span_tags = crate::telemetry::span_tags::Static::new(&crate::telemetry::span_tags::Node {
        ip: cfg.ip,
        pod: &cfg.name,
        namespace: &cfg.namespace,
        canonical_service,
        canonical_revision,
        mesh_id: &cfg.trust_domain,
    });
    // The OpenTelemetry environment contract (`OTEL_EXPORTER_OTLP_*`, `OTEL_*`): telemetry/export.
    // Istio's per-proxy span tags are the same on every span: they travel once per export, as
    // resource attributes (Jaeger shows them as the process's tags, and its tag search finds them).
    let mut resource = vec![
        ("k8s.pod.name", cfg.name.clone()),
        ("k8s.namespace.name", cfg.namespace.clone()),
        ("weft.identity", identity.to_string()),
    ];
    resource.extend(span_tags.tags().iter().cloned());
    let tracer = crate::telemetry::trace::Tracer::from_env(
        |k| std::env::var(k).ok(),
        resource,
        stopped.clone(),
    );
    let metrics = Arc::new(crate::telemetry::Metrics::new(
        crate::telemetry::workload_labels("source", &me),
        crate::telemetry::workload_labels("destination", &me),
    ));
    let sinks = crate::telemetry::record::Sinks {
        tracer: tracer.clone(),
        service_name,
        metrics: metrics.clone(),
        access_log: cfg.access_log,
        unknown: crate::telemetry::record::Unknown::default(),
    };
    let inbound = Arc::new(Inbound::new(
        tables.clone(),
        crate::inbound::InboundTls {
            strict: Arc::new(strict),
            permissive: Arc::new(permissive),
        },
        target,
        identity.clone(),
        own_ports.clone(),
        sinks.clone(),
    ));
    let upstreams = Arc::new(Upstreams::new(creds.clone(), bundle.clone()));
    let shadow = Arc::new(crate::shadow_diff::ShadowDiff::new(&cfg.workload_name));
    let mirrors = Arc::new(crate::outbound::mirror::Mirrors::new(
        upstreams.clone(),
        cfg.ip.to_string(),
        cfg.mirror_max_body,
        crate::outbound::mirror::DEFAULT_MAX_IN_FLIGHT,
        shadow.clone(),
    ));
    let outbound = Arc::new(Outbound {
        snapshots: tables.clone(),
        upstreams,
        mode: cfg.mode,
        own_ports: own_ports.clone(),
        mirrors: mirrors.clone(),
        sinks,
    });
    let stats = Arc::new(ControlStats::default());
    let drain = crate::listener::Drain::new();
    let listeners = Arc::new(crate::listener::Stats::default());
    let edge = |name: &'static str| crate::listener::Edge {
        limits: cfg.limits,
        drain: drain.clone(),
        stats: listeners.listener(name),
    };
    let admin = Arc::new(Admin {
        drain: drain.clone(),
        listeners: listeners.clone(),
        tables: tables.clone(),
        creds: creds.clone(),
        bundle: bundle.clone(),
        control: stats.clone(),
        mirror: mirrors.stats.clone(),
        shadow: shadow.clone(),
        trace: tracer.stats.clone(),
        metrics: metrics.clone(),
        app_metrics: cfg
            .app_metrics
            .clone()
            .map(crate::telemetry::appmetrics::AppMetrics::new),
    });

    let node = pb::Node {
        name: cfg.name.clone(),
        namespace: cfg.namespace.clone(),
        service_account: cfg.service_account.clone(),
        labels: cfg.labels.clone().into_iter().collect(),
        ip: cfg.ip.to_string(),
        ports: cfg.app_port.map(u32::from).into_iter().collect(),
        inbound_port: u32::from(local(&inbound_l)),
        captured: cfg.mode == Mode::Transparent,
        proxy_version: env!("CARGO_PKG_VERSION").into(),
    };
    let pilot_identity = SpiffeId::new(&cfg.trust_domain, PILOT_NAMESPACE, PILOT_SERVICE_ACCOUNT)
        .map_err(|e| RunError::Identity(e.to_string()))?;
    let control = ControlConfig {
        pilot: cfg.pilot.clone(),
        pilot_identity,
        bundle: bundle.clone(),
        node,
        keepalive: cfg.keepalive,
    };

    let admin_addr = admin_l.local_addr().ok();
    let out_addr = outbound_l.local_addr().ok();
    let in_addr = inbound_l.local_addr().ok();
    tracing::info!(
        outbound = ?outbound_l.local_addr().ok(),
        inbound = ?inbound_l.local_addr().ok(),
        admin = ?admin_addr,
        mode = ?cfg.mode,
        "sidecar listening"
    );
    let mut tasks = vec![
        tokio::spawn(crate::control::run(
            control,
            creds.clone(),
            tables_tx,
            stats,
            shadow,
            stopped.clone(),
        )),
        tokio::spawn(crate::outbound::serve(
            outbound_l,
            outbound,
            edge("outbound"),
        )),
        tokio::spawn(crate::inbound::serve(inbound_l, inbound, edge("inbound"))),
        tokio::spawn(crate::admin::serve(
            admin_l,
            admin.clone(),
            Port::Admin,
            stopped.clone(),
        )),
        tokio::spawn(crate::dns::serve(
            dns_udp,
            dns_tcp,
            tables.clone(),
            dns_upstream,
            stopped.clone(),
        )),
    ];
    let prometheus_addr = prometheus_l.as_ref().and_then(|l| l.local_addr().ok());
    for (l, port) in [(status_l, Port::Status), (prometheus_l, Port::Prometheus)] {
        if let Some(l) = l {
            tasks.push(tokio::spawn(crate::admin::serve(
                l,
                admin.clone(),
                port,
                stopped.clone(),
            )));
        }
    }
    {
        use std::io::Write;
        // stdout is for scripts and tests: each listener's address, the admin one last.
        for (what, l) in [
            ("outbound", out_addr),
            ("inbound", in_addr),
            ("dns", Some(dns_addr)),
            ("prometheus", prometheus_addr),
        ] {
            if let Some(a) = l {
                println!("{what} listening on {a}");
            }
        }
        if let Some(addr) = admin_addr {
            println!("listening on {addr}");
        }
        let _ = std::io::stdout().flush();
    }
    shutdown.cancelled().await;
    // The drain: not ready from now on, no new connections, and those open finish what they have.
    drain.start();
    tracing::info!(
        connections = drain.open(),
        within = ?cfg.drain_duration,
        "draining"
    );
    if drain.finished(cfg.drain_duration).await {
        tracing::info!("drained");
    } else {
        tracing::warn!(
            connections = drain.open(),
            "drain duration passed; closing what is left"
        );
    }
    stopped.cancel();
    rotation.abort();
    root_watch.abort();
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
