//! `pilot serve`: opens the store, serves the config API on the owner-only unix socket, and stops
//! cleanly on SIGTERM/SIGINT.
//!
//! Discovery plugs in through [`ServeContext`]: it carries the config backend (the store, or the
//! Kubernetes registry with `--registry kubernetes`; either gives snapshots) and the shutdown token
//! every long-running task watches.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiMetrics, Backend, ConfigApi};
use crate::discovery::{Debounce, DiscoveryOptions, ProxyTable};
use crate::kube::{KubeOptions, KubeRegistry};
use crate::store::{Store, StoreError};
use weft_pilot_config::translate::MeshOptions;

/// The config API socket's file name inside `--data-dir`.
pub const SOCKET_FILE: &str = "pilot.sock";
/// How long the process may take past the drain deadline: calls still running then stop between
/// two documents or objects, and the runtime gives blocking work this long before it exits anyway.
pub const EXIT_AFTER_DRAIN: Duration = Duration::from_secs(1);

/// `pilot serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Directory holding the config store (pilot.redb) and the config API socket (pilot.sock).
    /// Created with owner-only permissions if missing; an existing one is set to 0700 and its files
    /// to 0600 at start.
    #[arg(long, env = "WEFT_PILOT_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Discovery (mTLS gRPC to sidecars) listen address, e.g. 0.0.0.0:15012. The config API is never
    /// served over TCP: it is only on unix:<data-dir>/pilot.sock.
    #[arg(long)]
    pub listen: Option<String>,
    /// Address of `ca serve`, where pilot gets its own certificate.
    #[arg(long)]
    pub ca: Option<String>,
    /// The CA's root certificate (PEM, what `ca root` prints), to verify the CA and sidecars.
    #[arg(long)]
    pub ca_root: Option<PathBuf>,
    /// File holding the bootstrap token for pilot's identity (from `ca token`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Trust domain of SPIFFE identities.
    #[arg(
        long,
        default_value = "cluster.local",
        env = "WEFT_TRUST_DOMAIN",
        conflicts_with = "mesh_config"
    )]
    pub trust_domain: String,
    /// Lifetime pilot asks for its own certificate (renewed at about half of it).
    #[arg(long, default_value = "24h", value_parser = weft_ca::cli::parse_duration, env = "WEFT_CERT_TTL")]
    pub cert_ttl: Duration,
    /// Quiet period before a config change is pushed to sidecars (e.g. 100ms, 1s).
    #[arg(long, default_value = "100ms", value_parser = weft_ca::cli::parse_duration)]
    pub debounce: Duration,
    /// Longest a change waits for quiet before it is pushed anyway.
    #[arg(long, default_value = "10s", value_parser = weft_ca::cli::parse_duration)]
    pub debounce_max: Duration,
    /// How long a workload whose sidecar disconnected stays an endpoint (a reconnect within it does
    /// not flap endpoints; Istio's WorkloadEntry grace).
    #[arg(long, default_value = "10s", value_parser = weft_ca::cli::parse_duration)]
    pub workload_grace: Duration,
    /// After a (re)start, how long sidecars that connect wait for their first config, so that it
    /// holds the workloads whose sidecars are reconnecting too (the registry of live workloads starts
    /// empty; a config sent at once would have no endpoints). Capped by --workload-grace; 0 = none.
    #[arg(long, default_value = "2s", value_parser = weft_ca::cli::parse_duration)]
    pub warm_up: Duration,
    /// Mirrored requests get "-shadow" appended to their host (Istio <= 1.27, and the seed task).
    /// `--mirror-shadow-suffix false` sends them with the original host, as Istio 1.28+ does.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, conflicts_with = "mesh_config")]
    pub mirror_shadow_suffix: bool,
    /// Percentage of new traces sampled by sidecars: Istio's default, 1 (the local runtime and
    /// its demo run with 100).
    #[arg(long, default_value_t = 1.0, conflicts_with = "mesh_config")]
    pub trace_sampling: f64,
    /// INSECURE, for setups without a platform (explicit mode on a laptop): admit a sidecar as
    /// the pod it names with the labels and address it declares, checking only that its namespace
    /// and service account are its certificate's. By default a sidecar is admitted only as a Pod
    /// the platform registered (the API server's, or one `pilot apply`'d by the local runtime), with
    /// that Pod's labels and address, and refused otherwise (shown in `pilot proxy-status`).
    #[arg(long)]
    pub trust_workload_claims: bool,
    /// On SIGTERM/SIGINT, how long in-flight calls (an apply, a discovery push) may take to finish
    /// after listeners stop accepting (Istio's terminationDrainDuration). Work still running then
    /// is cancelled (an apply stores nothing) and pilot exits 0 within 1 s more.
    #[arg(long, default_value = "5s", value_parser = weft_ca::cli::parse_duration)]
    pub drain_duration: Duration,
    /// HTTP/2 PING interval on every discovery connection (and pilot's channel to the CA). A
    /// sidecar that vanished without a FIN (a lost node, a partition) is dropped when a PING goes
    /// unanswered for --keepalive-timeout, so its stream ends and --workload-grace starts (Istio's
    /// xDS keepalive: 30 s and 10 s).
    #[arg(long, default_value = "30s", value_parser = weft_ca::cli::parse_duration)]
    pub keepalive_interval: Duration,
    /// How long a keepalive PING may go unanswered.
    #[arg(long, default_value = "10s", value_parser = weft_ca::cli::parse_duration)]
    pub keepalive_timeout: Duration,

    // --- Admission webhooks (issue 16, part "webhook"; pilot/src/webhook/, pilot/README.md) ---
    /// Serve the admission webhooks (POST /inject, POST /validate; AdmissionReview v1) over TLS on
    /// this address, e.g. 0.0.0.0:15017. Off by default. Needs --ca, --ca-root and --token-file:
    /// the certificate comes from the CA with the webhook Service's DNS names.
    #[arg(long)]
    pub webhook_listen: Option<String>,
    /// The webhook Service as NAME.NAMESPACE. The certificate names NAME, NAME.NAMESPACE,
    /// NAME.NAMESPACE.svc and NAME.NAMESPACE.svc.cluster.local; NAMESPACE is pilot's own (the CA
    /// gives DNS names only for Services of the caller's namespace).
    #[arg(long, default_value = "weft-pilot.weft-system")]
    pub webhook_service: String,
    /// Keep caBundle of the MutatingWebhookConfiguration weft-sidecar-injector and the
    /// ValidatingWebhookConfiguration weft-validator equal to --ca-root, through the Kubernetes API
    /// (in-cluster config or KUBECONFIG). Explicit, never inferred: a kubeconfig on a laptop must
    /// not make a local pilot patch a cluster.
    #[arg(long, requires = "webhook_listen")]
    pub webhook_patch_ca_bundle: bool,
    /// Sidecar image /inject adds (as `pilot inject --image`). Default: weft/weft:<version>.
    #[arg(long)]
    pub inject_image: Option<String>,
    /// pilot's discovery address injected sidecars use (as `pilot inject --pilot-address`).
    #[arg(long, default_value = "weft-pilot.weft-system.svc:15012")]
    pub inject_pilot_address: String,
    /// The CA's address injected sidecars use (as `pilot inject --ca-address`).
    #[arg(long, default_value = "weft-ca.weft-system.svc:15010")]
    pub inject_ca_address: String,

    // --- Kubernetes registry (issue 16, `pilot serve --registry kubernetes`) ---
    /// Where config objects and workloads come from: `local` (the store, written by `pilot apply`,
    /// and workloads registered by their sidecars) or `kubernetes` (the cluster's API server, from
    /// the in-cluster service account or KUBECONFIG; apply/delete are then refused: use kubectl).
    /// With `kubernetes`, the `--ca-root` file is also written into every namespace as ConfigMap
    /// istio-ca-root-cert.
    #[arg(long, value_enum, default_value_t = RegistryMode::Local, env = "WEFT_PILOT_REGISTRY")]
    pub registry: RegistryMode,
    /// Serve `/metrics` (Prometheus text) on this address, e.g. 0.0.0.0:15014 (istiod's
    /// monitoring port). Off by default.
    #[arg(long)]
    pub monitoring_listen: Option<String>,
    /// Mesh settings file (YAML: trustDomain, traceSampling, mirrorShadowSuffix, otlpEndpoint;
    /// `pilot install` mounts ConfigMap weft-mesh). Each key replaces its flag's default; giving
    /// the flag too is an error. Read at start.
    #[arg(long, env = "WEFT_MESH_CONFIG")]
    pub mesh_config: Option<PathBuf>,
    /// From --mesh-config's `otlpEndpoint`: the OTLP endpoint /inject gives sidecars.
    #[arg(skip)]
    pub otlp_endpoint: Option<String>,
}

/// `--registry`: where config objects and workloads come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RegistryMode {
    /// The local store and self-registered sidecars.
    Local,
    /// The Kubernetes API server.
    Kubernetes,
}

impl ServeArgs {
    /// Applies `--mesh-config` (its keys replace the defaults of their flags, which clap refuses
    /// alongside it).
    pub fn with_mesh_config(mut self) -> Result<Self, ServeError> {
        let Some(path) = &self.mesh_config else {
            return Ok(self);
        };
        let config = crate::mesh_config::MeshConfig::load(path)
            .map_err(|e| ServeError::Flags(e.to_string()))?;
        if let Some(trust_domain) = config.trust_domain {
            self.trust_domain = trust_domain;
        }
        if let Some(sampling) = config.trace_sampling {
            self.trace_sampling = sampling;
        }
        if let Some(suffix) = config.mirror_shadow_suffix {
            self.mirror_shadow_suffix = suffix;
        }
        self.otlp_endpoint = config.otlp_endpoint;
        Ok(self)
    }

    /// The discovery settings, if `--listen` asks for discovery; all three identity flags must then be
    /// given (checked before anything binds).
    fn discovery(&self) -> Result<Option<(String, DiscoveryOptions)>, ServeError> {
        let Some(listen) = &self.listen else {
            return Ok(None);
        };
        let missing = |flag: &'static str| ServeError::Flags(format!("--listen needs {flag}"));
        let ca = self.ca.clone().ok_or_else(|| missing("--ca"))?;
        let ca_root = self.ca_root.as_ref().ok_or_else(|| missing("--ca-root"))?;
        let token_file = self
            .token_file
            .as_ref()
            .ok_or_else(|| missing("--token-file"))?;
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p)
                .map_err(|e| ServeError::Flags(format!("cannot read {}: {e}", p.display())))
        };
        // Read again later (the token for every certificate request, the roots when they change);
        // unreadable files still fail start-up before anything binds.
        read(ca_root)?;
        read(token_file)?;
        if !(0.0..=100.0).contains(&self.trace_sampling) {
            return Err(ServeError::Flags("--trace-sampling must be 0..100".into()));
        }
        let mesh = MeshOptions {
            trust_domain: self.trust_domain.clone(),
            mirror_shadow_suffix: self.mirror_shadow_suffix,
            sampling_percent: self.trace_sampling,
            ..MeshOptions::default()
        };
        Ok(Some((
            listen.clone(),
            DiscoveryOptions {
                ca,
                root_file: ca_root.clone(),
                token_file: token_file.clone(),
                cert_ttl: self.cert_ttl,
                debounce: Debounce {
                    quiet: self.debounce,
                    max: self.debounce_max,
                },
                workload_grace: self.workload_grace,
                // With --registry kubernetes the workloads are listed from the cluster before
                // discovery accepts a sidecar: nothing to wait for.
                warm_up: match self.registry {
                    RegistryMode::Local => self.warm_up.min(self.workload_grace),
                    RegistryMode::Kubernetes => Duration::ZERO,
                },
                mesh,
                trust_workload_claims: self.trust_workload_claims,
                drain: self.drain_duration,
                keepalive: weft_ca::grpc::Keepalive {
                    interval: self.keepalive_interval,
                    timeout: self.keepalive_timeout,
                },
            },
        )))
    }
}

impl ServeArgs {
    /// The webhook settings, if `--webhook-listen` asks for them (checked before anything binds).
    /// The Kubernetes client is not built here: that happens at start, with the runtime.
    fn webhook(&self) -> Result<Option<(String, crate::webhook::WebhookOptions)>, ServeError> {
        let Some(listen) = &self.webhook_listen else {
            return Ok(None);
        };
        let missing =
            |flag: &'static str| ServeError::Flags(format!("--webhook-listen needs {flag}"));
        let ca = self.ca.clone().ok_or_else(|| missing("--ca"))?;
        let root_file = self.ca_root.clone().ok_or_else(|| missing("--ca-root"))?;
        let token_file = self
            .token_file
            .clone()
            .ok_or_else(|| missing("--token-file"))?;
        let (service, namespace) = self
            .webhook_service
            .split_once('.')
            .filter(|(s, n)| !s.is_empty() && !n.is_empty() && !n.contains('.'))
            .ok_or_else(|| {
                ServeError::Flags(format!(
                    "--webhook-service {:?}: expected NAME.NAMESPACE",
                    self.webhook_service
                ))
            })?;
        let defaults = crate::inject::Options::default();
        let inject = crate::inject::Options {
            image: self.inject_image.clone().unwrap_or(defaults.image),
            pilot_address: self.inject_pilot_address.clone(),
            ca_address: self.inject_ca_address.clone(),
            trust_domain: self.trust_domain.clone(),
            otlp_endpoint: self.otlp_endpoint.clone(),
            ..defaults
        };
        Ok(Some((
            listen.clone(),
            crate::webhook::WebhookOptions {
                ca,
                root_file,
                token_file,
                trust_domain: self.trust_domain.clone(),
                cert_ttl: self.cert_ttl,
                service: service.to_string(),
                namespace: namespace.to_string(),
                admission: crate::webhook::Admission::new(inject),
                kube: None,
                drain: self.drain_duration,
            },
        )))
    }
}

/// Why `pilot serve` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be created or restricted to its owner.
    #[error("cannot create or secure the data directory {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another pilot answers on the socket.
    #[error("another pilot is already serving on unix:{}; stop it first", .0.display())]
    AlreadyServing(PathBuf),
    /// Something that is not a socket sits where the socket goes; it is not removed.
    #[error("{} exists and is not a socket; remove it or choose another --data-dir", .0.display())]
    NotASocket(PathBuf),
    /// The socket could not be created or secured.
    #[error("cannot listen on unix:{}: {source}", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Flags that do not fit together, or files they name that cannot be read.
    #[error("{0}")]
    Flags(String),
    /// The discovery listener could not be bound.
    #[error("cannot listen on {addr} for discovery: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config API server failed.
    #[error("config API server failed: {0}")]
    Server(#[from] tonic::transport::Error),
    /// No Kubernetes client could be made (`--registry kubernetes`, `--webhook-patch-ca-bundle`).
    #[error(transparent)]
    Kube(#[from] crate::kube::client::ClientError),
}

/// What the daemon's services share: where the config comes from and the shutdown signal.
#[derive(Debug, Clone)]
pub struct ServeContext {
    /// The config store, or the Kubernetes registry.
    pub backend: Backend,
    /// Cancelled when the daemon shuts down (SIGTERM/SIGINT or a fatal error): listeners stop
    /// accepting and the drain starts.
    pub shutdown: CancellationToken,
    /// Cancelled when the drain is over: work still running stops.
    pub abort: CancellationToken,
    /// How long the drain lasts.
    pub drain: Duration,
    /// Sidecars connected to discovery (`None` without `--listen`).
    pub proxies: Option<Arc<ProxyTable>>,
    /// What the config API counts.
    pub api_metrics: Arc<ApiMetrics>,
}

/// Runs `pilot serve` until SIGTERM/SIGINT. Prints `listening on unix:<socket>` once the config API
/// socket is bound.
pub async fn run(args: ServeArgs) -> Result<(), ServeError> {
    // Before anything is announced: a SIGTERM right after `listening on` must drain, not kill.
    let signals = weft_ca::cli::shutdown_signal();
    let args = args.with_mesh_config()?;
    let dir = &args.data_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ServeError::DataDir {
            path: dir.clone(),
            source,
        })?;
    restrict_mode(dir, 0o700)?;
    let discovery = args.discovery()?;
    let mut webhook = args.webhook()?;
    if args.webhook_patch_ca_bundle
        && let Some((_, opts)) = &mut webhook
    {
        opts.kube = Some(crate::kube::client::infer().await?);
    }
    let socket = dir.join(SOCKET_FILE);
    clear_stale_socket(&socket)?;
    let shutdown = CancellationToken::new();
    let backend = match args.registry {
        RegistryMode::Local => {
            let store = Arc::new(Store::open(dir)?);
            // After the open, so a store file redb just created (with the umask's mode) is covered too.
            restrict_files(dir)?;
            Backend::Store(store)
        }
        RegistryMode::Kubernetes => {
            let client = crate::kube::client::infer().await?;
            if args.ca_root.is_none() {
                tracing::warn!("no --ca-root: the istio-ca-root-cert ConfigMaps are not written");
            }
            let options = KubeOptions {
                root_file: args.ca_root.clone(),
                root_poll: None,
            };
            Backend::Cluster(KubeRegistry::start(client, options, &shutdown))
        }
    };
    // With the cluster's namespaces at hand, /inject applies the istio-injection label itself too
    // (the webhook configuration's namespaceSelector already filters in a cluster).
    if let (Backend::Cluster(registry), Some((_, opts))) = (&backend, &mut webhook) {
        let registry = registry.clone();
        opts.admission.namespace_labels =
            Some(Arc::new(move |ns: &str| registry.namespace_labels(ns)));
    }
    let monitoring = bind_tcp(args.monitoring_listen.as_deref(), "monitoring").await?;
    let discovery_listener =
        bind_tcp(discovery.as_ref().map(|(a, _)| a.as_str()), "discovery").await?;
    let webhook_listener = bind_tcp(webhook.as_ref().map(|(a, _)| a.as_str()), "webhook").await?;
    let listener = bind_owner_only(&socket)?;
    // The one line of stdout: scripts and tests read the socket path from it.
    println!("listening on unix:{}", socket.display());
    let _ = std::io::stdout().flush();
    tracing::info!(
        socket = %socket.display(),
        registry = ?args.registry,
        revision = backend.snapshot().revision(),
        objects = backend.snapshot().len(),
        "config API serving"
    );
    let proxies = discovery_listener
        .is_some()
        .then(|| Arc::new(ProxyTable::default()));
    let api_metrics = Arc::new(ApiMetrics::default());
    if let Some(listener) = monitoring {
        let kube = match &backend {
            Backend::Cluster(cluster) => Some(cluster.metrics()),
            Backend::Store(_) => None,
        };
        let (proxies, api_metrics) = (proxies.clone(), api_metrics.clone());
        let started = std::time::Instant::now();
        // Each component renders what it owns; this only puts them together.
        let render = move || {
            let mut out = weft_ca::monitoring::Exposition::default();
            out.family(
                "pilot_info",
                weft_ca::monitoring::Kind::Gauge,
                "Pilot version and build information.",
            )
            .sample("pilot_info", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
            out.family(
                "istiod_uptime_seconds",
                weft_ca::monitoring::Kind::Gauge,
                "Current pilot server uptime in seconds.",
            )
            .sample(
                "istiod_uptime_seconds",
                &[],
                started.elapsed().as_secs_f64().floor(),
            );
            if let Some(proxies) = &proxies {
                proxies.render_metrics(&mut out);
            }
            api_metrics.render(&mut out);
            if let Some(kube) = &kube {
                out.append(&kube.render());
            }
            out.finish()
        };
        // Ready when discovery can serve: at once with the local store (everything is bound
        // by now), once every watch has listed with the cluster's.
        let ready: weft_ca::monitoring::Ready = match &backend {
            Backend::Cluster(cluster) => {
                let cluster = cluster.clone();
                Arc::new(move || cluster.is_synced())
            }
            Backend::Store(_) => Arc::new(|| true),
        };
        tokio::spawn(weft_ca::monitoring::serve(
            listener,
            Arc::new(render),
            ready,
            shutdown.clone(),
        ));
    }

    let context = ServeContext {
        backend,
        shutdown,
        abort: CancellationToken::new(),
        drain: args.drain_duration,
        proxies,
        api_metrics,
    };
    let signal = context.shutdown.clone();
    tokio::spawn(async move {
        signals.await;
        signal.cancel();
    });
    let discovery_task = if let (Some(listener), Some((_, opts)), Some(proxies)) =
        (discovery_listener, discovery, context.proxies.clone())
    {
        let ctx = context.clone();
        Some(tokio::spawn(async move {
            let source = match &ctx.backend {
                Backend::Store(store) => crate::discovery::Source::Local(store.subscribe()),
                Backend::Cluster(cluster) => {
                    // Sidecars wait in the accept queue until every kind is listed, rather than
                    // get a view of half the cluster.
                    tokio::select! {
                        () = ctx.shutdown.cancelled() => return,
                        () = cluster.wait_synced() => {}
                    }
                    crate::discovery::Source::Platform {
                        snapshots: cluster.subscribe(),
                        workloads: Arc::new(cluster.clone()),
                    }
                }
            };
            let result =
                crate::discovery::serve(listener, opts, source, proxies, ctx.shutdown.clone())
                    .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "discovery failed; shutting down");
                ctx.shutdown.cancel();
            }
        }))
    } else {
        None
    };
    let webhook_task = webhook_listener.zip(webhook).map(|(listener, (_, opts))| {
        let ctx = context.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::webhook::run(listener, opts, ctx.shutdown.clone()).await {
                tracing::error!(error = %e, "webhooks failed; shutting down");
                ctx.shutdown.cancel();
            }
        })
    });
    let result = serve_config_api(listener, context.clone()).await;
    context.shutdown.cancel();
    let _ = std::fs::remove_file(&socket);
    // Discovery and the webhooks drain for the same duration, from the same moment, side by side;
    // each has its own deadline.
    let tasks = discovery_task.into_iter().chain(webhook_task);
    let _ = tokio::time::timeout(
        context.drain + EXIT_AFTER_DRAIN,
        futures_util::future::join_all(tasks),
    )
    .await;
    context.abort.cancel();
    tracing::info!("stopped");
    result
}

/// Serves the config API on `listener` until `context.shutdown`, then drains: no new connections,
/// HTTP/2 GOAWAY on open ones (tonic's graceful shutdown), and in-flight calls get
/// `context.drain` to finish. Calls still running then are cancelled through `context.abort`.
pub async fn serve_config_api(
    listener: UnixListener,
    context: ServeContext,
) -> Result<(), ServeError> {
    let shutdown = context.shutdown.clone();
    let server = tonic::transport::Server::builder()
        .add_service(ConfigApi::server(
            context.backend,
            context.proxies,
            context.abort.clone(),
            context.api_metrics.clone(),
        ))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        );
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return Ok(result?),
        () = shutdown.cancelled() => {}
    }
    tracing::info!(drain = ?context.drain, "draining the config API");
    let result = match tokio::time::timeout(context.drain, &mut server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::info!("drain duration elapsed; cancelling config calls still running");
            context.abort.cancel();
            // Cancelled calls answer within one document; then the connections close.
            match tokio::time::timeout(EXIT_AFTER_DRAIN, server).await {
                Ok(result) => result,
                Err(_) => Ok(()),
            }
        }
    };
    Ok(result?)
}

/// Binds `addr` (when given) and prints `<what> listening on ADDR`, before the config API's line,
/// which scripts and tests wait for.
async fn bind_tcp(
    addr: Option<&str>,
    what: &str,
) -> Result<Option<tokio::net::TcpListener>, ServeError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    if let Ok(a) = l.local_addr() {
        println!("{what} listening on {a}");
    }
    Ok(Some(l))
}

/// Sets `path`'s permission bits to `mode` if they differ, and says so: a data directory made by
/// hand or by an older pilot (0755, files 0644) exposed the store to every local user.
fn restrict_mode(path: &Path, mode: u32) -> Result<(), ServeError> {
    let error = |source| ServeError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    let current = std::fs::symlink_metadata(path)
        .map_err(error)?
        .permissions()
        .mode()
        & 0o7777;
    if current != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(error)?;
        tracing::warn!(
            path = %path.display(),
            from = format_args!("{current:04o}"),
            to = format_args!("{mode:04o}"),
            "tightened the mode of pilot's data"
        );
    }
    Ok(())
}

/// Makes every regular file directly in the data directory owner-only (0600). Symlinks and
/// sockets are left alone: the socket is secured when bound, and a symlink's target is not ours.
fn restrict_files(dir: &Path) -> Result<(), ServeError> {
    let error = |source| ServeError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(error)? {
        let entry = entry.map_err(error)?;
        if entry.file_type().map_err(error)?.is_file() {
            restrict_mode(&entry.path(), 0o600)?;
        }
    }
    Ok(())
}

/// Removes a socket file no process answers on (left by a killed pilot); refuses if one answers.
fn clear_stale_socket(path: &Path) -> Result<(), ServeError> {
    let socket_error = |source| ServeError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(socket_error(e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.to_path_buf()));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServeError::AlreadyServing(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(socket_error)
}

/// Binds the socket and restricts it to the owner: the file mode is the config API's only
/// authentication. The data directory is already 0700 when pilot created it, which closes the
/// window between bind and chmod.
fn bind_owner_only(path: &Path) -> Result<UnixListener, ServeError> {
    let socket_error = |source| ServeError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_error)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn an_open_data_directory_and_its_files_become_owner_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join(crate::store::STORE_FILE);
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let outside = root.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();

        restrict_mode(&dir, 0o700).unwrap();
        restrict_files(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(
            mode(&outside),
            0o644,
            "a symlink's target is not pilot's to change"
        );
    }

    fn serve_args(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        use clap::Parser;
        let argv = ["pilot", "serve", "--data-dir", "/nonexistent"]
            .iter()
            .chain(extra);
        match crate::cli::Cli::try_parse_from(argv)?.command {
            crate::cli::Command::Serve(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn webhook_flags_are_checked_before_anything_binds() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let file = file.to_str().unwrap();
        let identity = [
            "--ca",
            "127.0.0.1:1",
            "--ca-root",
            file,
            "--token-file",
            file,
        ];

        assert!(
            serve_args(&[]).unwrap().webhook().unwrap().is_none(),
            "off by default"
        );
        let err = serve_args(&["--webhook-listen", "127.0.0.1:0"])
            .unwrap()
            .webhook()
            .unwrap_err();
        assert_eq!(err.to_string(), "--webhook-listen needs --ca");

        let mut args = vec![
            "--webhook-listen",
            "127.0.0.1:0",
            "--trust-domain",
            "example.org",
        ];
        args.extend(identity);
        let (listen, opts) = serve_args(&args).unwrap().webhook().unwrap().unwrap();
        assert_eq!(listen, "127.0.0.1:0");
        assert_eq!(
            (opts.service.as_str(), opts.namespace.as_str()),
            ("weft-pilot", "weft-system")
        );
        assert_eq!(opts.admission.inject.trust_domain, "example.org");
        assert_eq!(
            opts.admission.inject,
            crate::inject::Options {
                trust_domain: "example.org".into(),
                ..crate::inject::Options::default()
            },
            "the same defaults as `pilot inject`"
        );
        assert!(opts.kube.is_none());

        let base = args.clone();
        args.extend([
            "--webhook-service",
            "istiod.mesh",
            "--inject-image",
            "reg/sidecar:1",
        ]);
        let (_, opts) = serve_args(&args).unwrap().webhook().unwrap().unwrap();
        assert_eq!(
            (opts.service.as_str(), opts.namespace.as_str()),
            ("istiod", "mesh")
        );
        assert_eq!(opts.admission.inject.image, "reg/sidecar:1");
        for bad in ["weft-pilot", "weft-pilot.", ".ns", "a.b.c"] {
            let mut args = base.clone();
            args.extend(["--webhook-service", bad]);
            let err = serve_args(&args).unwrap().webhook().unwrap_err();
            assert!(err.to_string().contains("NAME.NAMESPACE"), "{bad}: {err}");
        }
        // caBundle patching only with the webhooks.
        assert!(serve_args(&["--webhook-patch-ca-bundle"]).is_err());
    }

    #[test]
    fn mesh_config_sets_the_mesh_and_conflicts_with_its_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.yaml");
        std::fs::write(
            &file,
            "trustDomain: example.org\ntraceSampling: 1\nmirrorShadowSuffix: false\n\
             otlpEndpoint: http://jaeger:4317\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let args = serve_args(&["--mesh-config", path])
            .unwrap()
            .with_mesh_config()
            .unwrap();
        assert_eq!(args.trust_domain, "example.org");
        assert!((args.trace_sampling - 1.0).abs() < f64::EPSILON);
        assert!(!args.mirror_shadow_suffix);
        assert_eq!(args.otlp_endpoint.as_deref(), Some("http://jaeger:4317"));
        // What /inject gives sidecars follows the file.
        let webhook = serve_args(&[
            "--mesh-config",
            path,
            "--webhook-listen",
            "127.0.0.1:0",
            "--ca",
            "ca:1",
            "--ca-root",
            "/r",
            "--token-file",
            "/t",
        ])
        .unwrap()
        .with_mesh_config()
        .unwrap()
        .webhook()
        .unwrap()
        .unwrap()
        .1;
        assert_eq!(webhook.trust_domain, "example.org");
        // Without the file, the flags' defaults.
        let plain = serve_args(&[]).unwrap().with_mesh_config().unwrap();
        assert!((plain.trace_sampling - 1.0).abs() < f64::EPSILON);
        assert_eq!(plain.otlp_endpoint, None);
        for flag in [
            ["--trace-sampling", "5"],
            ["--mirror-shadow-suffix", "true"],
            ["--trust-domain", "x.org"],
        ] {
            let mut argv = vec!["--mesh-config", path];
            argv.extend(flag);
            assert!(serve_args(&argv).is_err(), "{flag:?} with --mesh-config");
        }
        std::fs::write(&file, "traceSampling: 200\n").unwrap();
        let error = serve_args(&["--mesh-config", path])
            .unwrap()
            .with_mesh_config()
            .unwrap_err();
        assert!(error.to_string().contains("0..100"), "{error}");
    }
}
