//! The `ca` command line: `serve`, `token`, `root`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::auth::Authenticator;
use crate::auth::jwks::{Expected, JwksAuthenticator, JwksFile};
use crate::auth::token_review::TokenReviewer;
use crate::authority::{Authority, AuthorityOptions, ImportOutcome};

/// weft's certificate authority: issues SPIFFE workload certificates to token-authenticated callers.
#[derive(Debug, Parser)]
#[command(name = "ca", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve CreateCertificate over gRPC/TLS. Prints `listening on ADDR` once bound.
    Serve(ServeArgs),
    /// Print a bootstrap token for a namespace/service account.
    Token(TokenArgs),
    /// Print the root certificate (PEM), what clients take as --ca-root.
    Root(RootArgs),
    /// Obtain a workload certificate from a running CA, as a sidecar does (for scripts and debugging).
    Request(RequestArgs),
}

/// `ca serve` flags.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Directory holding the CA key, certificate chain and token key (created on first start).
    /// With --cacerts it holds only the weft token key (needed for --auth weft).
    #[arg(long, env = "WEFT_CA_DATA_DIR", required_unless_present = "cacerts")]
    pub data_dir: Option<PathBuf>,
    /// Istio's plug-in CA layout, e.g. the `cacerts` Secret mounted as files: ca-cert.pem,
    /// ca-key.pem, cert-chain.pem, root-cert.pem. Read at start, never written; replicas given the
    /// same files share one root.
    #[arg(long, env = "WEFT_CA_CACERTS", conflicts_with_all = ["root_cert", "root_key"])]
    pub cacerts: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:15010 (port 0 picks a free port).
    #[arg(long, env = "WEFT_CA_LISTEN")]
    pub listen: String,
    /// Serve `/metrics` (Prometheus text: Istio's `citadel_server_*` families), `/ready` and
    /// `/healthz` over plain HTTP on this address, e.g. 0.0.0.0:15014. Prints `monitoring listening
    /// on ADDR` once bound. Off by default.
    #[arg(long, env = "WEFT_CA_MONITORING_LISTEN")]
    pub monitoring_listen: Option<String>,
    /// Trust domain of issued SPIFFE IDs.
    #[arg(long, default_value = "cluster.local", env = "WEFT_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Validity of a workload certificate when the request names none (e.g. 24h, 90m, 30s).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,
    /// Longest validity issued; longer requests are capped to it.
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    pub max_cert_ttl: Duration,
    /// Plug in an operator's CA: its certificate (a root or an intermediate) followed by the rest of
    /// its chain up to and including the self-signed root. Installed into --data-dir. Needs --root-key.
    #[arg(long, requires = "root_key")]
    pub root_cert: Option<PathBuf>,
    /// The private key of --root-cert's first certificate (PKCS#8 PEM).
    #[arg(long, requires = "root_cert")]
    pub root_key: Option<PathBuf>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish after the listener stops
    /// accepting (Istio's terminationDrainDuration); the CA then exits 0.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_duration: Duration,
    /// How callers prove who they are: `weft` (tokens from `ca token`), `kubernetes` (projected
    /// service-account tokens, checked with a TokenReview), `jwks` (the same tokens, checked offline
    /// against --jwks).
    #[arg(long, value_enum, default_value_t = AuthMode::Weft, env = "WEFT_CA_AUTH")]
    pub auth: AuthMode,
    /// The audience service-account tokens must carry (`kubernetes` and `jwks`; weft tokens are
    /// always for istio-ca).
    #[arg(long, default_value = crate::token::AUDIENCE, env = "WEFT_CA_TOKEN_AUDIENCE")]
    pub token_audience: String,
    /// `kubernetes`: how long a TokenReview may take before the caller is told to retry.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub token_review_timeout: Duration,
    /// `jwks`: the service-account issuer's keys (what the API server serves at /openid/v1/jwks),
    /// read again when the file changes.
    #[arg(long, required_if_eq("auth", "jwks"), env = "WEFT_CA_JWKS")]
    pub jwks: Option<PathBuf>,
    /// `jwks`: the issuer tokens must name (the API server's --service-account-issuer, e.g.
    /// https://kubernetes.default.svc.cluster.local).
    #[arg(long, required_if_eq("auth", "jwks"), env = "WEFT_CA_TOKEN_ISSUER")]
    pub token_issuer: Option<String>,
    /// `jwks`: how often the --jwks file is checked for changes.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub jwks_poll_interval: Duration,
}

/// `ca serve --auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Tokens signed by the CA's own token key (`ca token`).
    Weft,
    /// Kubernetes service-account tokens, checked by the API server (TokenReview).
    Kubernetes,
    /// Kubernetes service-account tokens, checked offline against the issuer's JWKS.
    Jwks,
}

/// `ca token` flags.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The CA's data directory (the token is signed with its token key).
    #[arg(long, env = "WEFT_CA_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Namespace of the identity.
    #[arg(long)]
    pub namespace: String,
    /// Service account of the identity.
    #[arg(long)]
    pub service_account: String,
    /// How long the token is valid.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Trust domain (must match the CA's, to refuse identities it could not issue).
    #[arg(long, default_value = "cluster.local", env = "WEFT_TRUST_DOMAIN")]
    pub trust_domain: String,
}

/// `ca root` flags.
#[derive(Debug, clap::Args)]
pub struct RootArgs {
    /// The CA's data directory.
    #[arg(long, env = "WEFT_CA_DATA_DIR")]
    pub data_dir: PathBuf,
}

/// `ca request` flags.
#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// The CA's address (host:port).
    #[arg(long, env = "WEFT_CA_ADDR")]
    pub ca: String,
    /// Root certificate the CA must chain to (what `ca root` prints).
    #[arg(long, env = "WEFT_CA_ROOT")]
    pub ca_root: PathBuf,
    /// File holding the bootstrap token (what `ca token` prints).
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Namespace of the identity to request (must match the token).
    #[arg(long)]
    pub namespace: String,
    /// Service account of the identity to request (must match the token).
    #[arg(long)]
    pub service_account: String,
    /// Trust domain of the mesh.
    #[arg(long, default_value = "cluster.local", env = "WEFT_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Requested validity (0s = the CA's default).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Write the certificate chain (PEM, leaf first) here.
    #[arg(long)]
    pub cert_out: Option<PathBuf>,
    /// Write the private key (PEM, mode 0600) here.
    #[arg(long)]
    pub key_out: Option<PathBuf>,
}

/// Parses `24h`, `90d`, `1h30m`, `45s`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?}: use e.g. 30s, 90m, 24h, 90d, 1h30m");
    if s.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            _ => return Err(err()),
        };
        total = unit
            .checked_mul(u32::try_from(n).map_err(|_| err())?)
            .and_then(|d| total.checked_add(d))
            .ok_or_else(err)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Token(args) => {
            let authority = load(&args.data_dir, &args.trust_domain)?;
            let token = authority
                .issue_token(&args.namespace, &args.service_account, args.ttl)
                .context("cannot issue token")?;
            println!("{token}");
            Ok(())
        }
        Command::Request(args) => request(args),
        Command::Root(args) => {
            let path = args.data_dir.join(crate::authority::ROOT_FILE);
            let pem = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "cannot read {} (has `ca serve --data-dir {}` run?)",
                    path.display(),
                    args.data_dir.display()
                )
            })?;
            print!("{pem}");
            Ok(())
        }
    }
}

fn request(args: RequestArgs) -> Result<()> {
    let root = std::fs::read_to_string(&args.ca_root)
        .with_context(|| format!("cannot read --ca-root {}", args.ca_root.display()))?;
    let bundle = crate::tls::TrustBundle::from_pem(&root)
        .with_context(|| format!("--ca-root {}", args.ca_root.display()))?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("cannot read --token-file {}", args.token_file.display()))?;
    let identity = crate::SpiffeId::new(&args.trust_domain, &args.namespace, &args.service_account)
        .context("invalid identity")?;
    let ca_id = crate::server::ca_identity(&args.trust_domain).context("invalid trust domain")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (chain, key_pem) = runtime.block_on(async {
        let client = crate::client::CaClient::new(&args.ca, &bundle, ca_id, &token)?;
        let kc = crate::csr::generate(&identity)?;
        let chain = client.create_certificate(&kc.csr_pem, args.ttl).await?;
        Ok::<_, crate::client::ClientError>((chain, kc.key_pem))
    })?;
    let creds = crate::tls::Credentials::from_pem(&chain, &key_pem)
        .context("the CA returned an unusable certificate")?;
    let left = creds
        .not_after()
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    println!(
        "issued {} (chain of {} certificates, expires in {}s)",
        creds.identity(),
        chain.len(),
        left.as_secs()
    );
    if let Some(path) = &args.cert_out {
        crate::authority::write_atomic(path, chain.concat().as_bytes(), 0o644)?;
    }
    if let Some(path) = &args.key_out {
        crate::authority::write_atomic(path, key_pem.as_bytes(), 0o600)?;
    }
    Ok(())
}

fn load(dir: &std::path::Path, trust_domain: &str) -> Result<Authority> {
    Authority::load_or_create(
        dir,
        AuthorityOptions {
            trust_domain: trust_domain.to_owned(),
            ..AuthorityOptions::default()
        },
    )
    .with_context(|| format!("cannot load the CA from {}", dir.display()))
}

fn serve(args: ServeArgs) -> Result<()> {
    init_logging();
    if args.workload_cert_ttl > args.max_cert_ttl {
        anyhow::bail!(
            "--workload-cert-ttl ({:?}) exceeds --max-cert-ttl ({:?})",
            args.workload_cert_ttl,
            args.max_cert_ttl
        );
    }
    if args.auth == AuthMode::Weft && args.cacerts.is_some() && args.data_dir.is_none() {
        anyhow::bail!(
            "--auth weft with --cacerts needs --data-dir: the weft token key is kept there so tokens outlive a restart"
        );
    }
    if args.auth == AuthMode::Weft && args.token_audience != crate::token::AUDIENCE {
        anyhow::bail!(
            "--token-audience applies to --auth kubernetes and jwks; weft tokens are for {}",
            crate::token::AUDIENCE
        );
    }
    let authority = load_for_serve(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let authenticator = Arc::new(authenticator(&args, &authority).await?);
        let service = crate::server::CaService::with_authenticator(Arc::new(authority), authenticator.clone());
        let shutdown = shutdown_signal();
        // Bound before the CA's own `listening on` line: scripts reading that line may scrape at once.
        let monitoring = match &args.monitoring_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (--monitoring-listen)"))?;
                let bound = listener.local_addr().context("no local address")?;
                println!("monitoring listening on {bound}");
                Some(listener)
            }
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr().context("no local address")?;
        // The one line of stdout: scripts and tests read the bound address from it.
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
        tracing::info!(%addr, trust_domain = %args.trust_domain, auth = authenticator.mode(), "CA serving");
        let stop_monitoring = tokio_util::sync::CancellationToken::new();
        if let Some(listener) = monitoring {
            let metrics = service.metrics();
            tokio::spawn(crate::monitoring::serve(
                listener,
                Arc::new(move || metrics.render(std::time::SystemTime::now())),
                // Ready once serving: the authority is loaded before anything is bound.
                Arc::new(|| true),
                stop_monitoring.clone(),
            ));
        }
        let _stop_monitoring = stop_monitoring.drop_guard();
        crate::server::serve_with(
            listener,
            service,
            shutdown,
            args.drain_duration,
        )
        .await
        .context("CA server failed")
    })
}

/// The authority `ca serve` signs with: the operator's `--cacerts` as they are, else the data
/// directory (after installing `--root-cert`/`--root-key` there, if given).
fn load_for_serve(args: &ServeArgs) -> Result<Authority> {
    let options = AuthorityOptions {
        trust_domain: args.trust_domain.clone(),
        default_ttl: args.workload_cert_ttl,
        max_ttl: args.max_cert_ttl,
    };
    if let Some(cacerts) = &args.cacerts {
        return Authority::load_cacerts(cacerts, args.data_dir.as_deref(), options)
            .with_context(|| format!("cannot load the CA from --cacerts {}", cacerts.display()));
    }
    let Some(data_dir) = &args.data_dir else {
        anyhow::bail!("--data-dir or --cacerts is needed");
    };
    if let (Some(cert), Some(key)) = (&args.root_cert, &args.root_key) {
        let outcome =
            Authority::import(data_dir, cert, key).context("cannot plug in the operator's CA")?;
        match outcome {
            ImportOutcome::Installed => tracing::info!("installed the operator's CA"),
            ImportOutcome::Replaced => tracing::warn!(
                "replaced the CA in the data directory with the operator's; workloads need the new root"
            ),
            ImportOutcome::Unchanged => {}
        }
    }
    Authority::load_or_create(data_dir, options)
        .with_context(|| format!("cannot load the CA from {}", data_dir.display()))
}

/// The `--auth` mode's authenticator; `jwks` also starts polling its file (inside the runtime).
async fn authenticator(args: &ServeArgs, authority: &Authority) -> Result<Authenticator> {
    Ok(match args.auth {
        AuthMode::Weft => crate::server::weft_tokens(authority),
        AuthMode::Kubernetes => Authenticator::Kubernetes(
            TokenReviewer::from_environment(args.token_audience.clone(), args.token_review_timeout)
                .await
                .context("--auth kubernetes")?,
        ),
        AuthMode::Jwks => {
            let (Some(path), Some(issuer)) = (&args.jwks, &args.token_issuer) else {
                anyhow::bail!("--auth jwks needs --jwks and --token-issuer");
            };
            let file = JwksFile::load(path).context("--jwks")?;
            tokio::spawn(file.clone().watch(args.jwks_poll_interval));
            Authenticator::Jwks(JwksAuthenticator::new(
                file,
                Expected {
                    issuer: issuer.clone(),
                    audience: args.token_audience.clone(),
                },
            ))
        }
    })
}

/// An error and its causes on one line for operators, skipping a cause whose text the message before
/// it already contains (library errors often render their source inline).
pub fn report(err: &anyhow::Error) -> String {
    report_chain(err.as_ref())
}

/// [`report`] for any error: it and its sources, `: `-joined, repeated texts once.
pub fn report_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(err);
    while let Some(cause) = next {
        next = cause.source();
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: a signal that arrives between the `listening on` line and the first
/// poll would otherwise kill the process with the default action instead of draining it. Call it
/// inside the runtime, before announcing the listener.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            (Err(_), Err(_)) => std::future::pending().await,
        }
        tracing::info!("shutting down");
    }
}

/// Logs to stderr, filtered by RUST_LOG (default info); shared by the weft binaries.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_skip_repeated_causes() {
        let io = std::io::Error::other("Address already in use");
        let err = anyhow::Error::new(io)
            .context("cannot bind dns: Address already in use")
            .context("sidecar failed");
        assert_eq!(
            report(&err),
            "sidecar failed: cannot bind dns: Address already in use"
        );
    }

    #[test]
    fn serve_flags_by_auth_mode() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["ca", "serve", "--listen", "127.0.0.1:0"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Serve(args) => args,
                _ => unreachable!(),
            })
        };
        let weft = parse(&["--data-dir", "/d"]).unwrap();
        assert_eq!(weft.auth, AuthMode::Weft);
        assert_eq!(weft.token_audience, "istio-ca");
        assert!(parse(&[]).is_err(), "no --data-dir and no --cacerts");

        assert!(parse(&["--data-dir", "/d", "--auth", "jwks"]).is_err());
        assert!(parse(&["--data-dir", "/d", "--auth", "jwks", "--jwks", "/k"]).is_err());
        let jwks = parse(&[
            "--cacerts",
            "/c",
            "--auth",
            "jwks",
            "--jwks",
            "/k",
            "--token-issuer",
            "https://i",
            "--token-audience",
            "weft-ca",
        ])
        .unwrap();
        assert_eq!(
            (jwks.auth, jwks.data_dir, jwks.token_audience.as_str()),
            (AuthMode::Jwks, None, "weft-ca")
        );

        let k8s = parse(&["--cacerts", "/c", "--auth", "kubernetes"]).unwrap();
        assert_eq!(k8s.token_review_timeout, Duration::from_secs(5));
        assert!(parse(&["--cacerts", "/c", "--root-cert", "/r", "--root-key", "/k"]).is_err());
        assert!(parse(&["--data-dir", "/d", "--auth", "oidc"]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "h", "10", "10x", "-5s", "1.5h", "99999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
