//! `pilot serve`: opens the store, serves the config API on the owner-only unix socket, and stops
//! cleanly on SIGTERM/SIGINT.
//!
//! Discovery plugs in through [`ServeContext`]: it carries the store (and so its snapshots) and the
//! shutdown token every long-running task watches.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::api::ConfigApi;
use crate::discovery::{Debounce, DiscoveryOptions, ProxyTable};
use crate::store::{Store, StoreError};
use weft_pilot_config::translate::MeshOptions;

/// The config API socket's file name inside `--data-dir`.
pub const SOCKET_FILE: &str = "pilot.sock";
/// How long in-flight config calls may take to finish after shutdown starts.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// `pilot serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Directory holding the config store (pilot.redb) and the config API socket (pilot.sock).
    /// Created with owner-only permissions if missing.
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
    #[arg(long, default_value = "cluster.local", env = "WEFT_TRUST_DOMAIN")]
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
    /// Mirrored requests get "-shadow" appended to their host (Istio <= 1.27, and the seed task).
    /// `--mirror-shadow-suffix false` sends them with the original host, as Istio 1.28+ does.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub mirror_shadow_suffix: bool,
    /// Percentage of new traces sampled by sidecars (Istio's default is 1; weft's demo wants all).
    #[arg(long, default_value_t = 100.0)]
    pub trace_sampling: f64,
}

impl ServeArgs {
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
                mesh,
            },
        )))
    }
}

/// Why `pilot serve` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {}: {source}", path.display())]
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
}

/// What the daemon's services share: the store and the shutdown signal.
#[derive(Debug, Clone)]
pub struct ServeContext {
    /// The config store; `store.subscribe()` gives every committed snapshot.
    pub store: Arc<Store>,
    /// Cancelled when the daemon shuts down (SIGTERM/SIGINT or a fatal error).
    pub shutdown: CancellationToken,
    /// Sidecars connected to discovery (`None` without `--listen`).
    pub proxies: Option<Arc<ProxyTable>>,
}

/// Runs `pilot serve` until SIGTERM/SIGINT. Prints `listening on unix:<socket>` once the config API
/// socket is bound.
pub async fn run(args: ServeArgs) -> Result<(), ServeError> {
    let dir = &args.data_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| ServeError::DataDir {
            path: dir.clone(),
            source,
        })?;
    let discovery = args.discovery()?;
    let socket = dir.join(SOCKET_FILE);
    clear_stale_socket(&socket)?;
    let store = Arc::new(Store::open(dir)?);
    let discovery_listener = match &discovery {
        Some((addr, _)) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
            if let Ok(a) = l.local_addr() {
                // Printed before the config API line, which scripts and tests wait for.
                println!("discovery listening on {a}");
            }
            Some(l)
        }
        None => None,
    };
    let listener = bind_owner_only(&socket)?;
    // The one line of stdout: scripts and tests read the socket path from it.
    println!("listening on unix:{}", socket.display());
    let _ = std::io::stdout().flush();
    tracing::info!(
        socket = %socket.display(),
        revision = store.snapshot().revision(),
        objects = store.snapshot().len(),
        "config API serving"
    );

    let context = ServeContext {
        store,
        shutdown: CancellationToken::new(),
        proxies: discovery_listener
            .is_some()
            .then(|| Arc::new(ProxyTable::default())),
    };
    let signal = context.shutdown.clone();
    tokio::spawn(async move {
        weft_ca::cli::shutdown_signal().await;
        signal.cancel();
    });
    if let (Some(listener), Some((_, opts)), Some(proxies)) =
        (discovery_listener, discovery, context.proxies.clone())
    {
        let ctx = context.clone();
        tokio::spawn(async move {
            let result =
                crate::discovery::serve(listener, opts, &ctx.store, proxies, ctx.shutdown.clone())
                    .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "discovery failed; shutting down");
                ctx.shutdown.cancel();
            }
        });
    }
    let result = serve_config_api(listener, context.clone()).await;
    context.shutdown.cancel();
    let _ = std::fs::remove_file(&socket);
    result
}

/// Serves the config API on `listener` until `context.shutdown`, then lets in-flight calls finish
/// for at most [`DRAIN_GRACE`].
pub async fn serve_config_api(
    listener: UnixListener,
    context: ServeContext,
) -> Result<(), ServeError> {
    let shutdown = context.shutdown.clone();
    let server = tonic::transport::Server::builder()
        .add_service(ConfigApi::server(context.store, context.proxies))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        );
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return Ok(result?),
        () = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(DRAIN_GRACE, server).await {
        Ok(result) => Ok(result?),
        Err(_) => {
            tracing::info!("drain grace elapsed; closing remaining config API connections");
            Ok(())
        }
    }
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
