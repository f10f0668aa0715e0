//! The `pilot` command line: `serve`, and the kubectl-like config commands `apply`, `get`,
//! `delete`, `analyze`, which talk to `pilot serve` over its unix socket.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use weft_pilot_config::{Kind, Level};
use weft_proto::config as pb;
use weft_proto::config::config_service_client::ConfigServiceClient;

use crate::serve::{SOCKET_FILE, ServeArgs};

/// Largest response accepted (a `get` of many objects).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// weft's control plane: stores Istio config and serves it to sidecars; also its command line.
#[derive(Debug, Parser)]
#[command(name = "pilot", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `pilot` subcommands.
// Parsed once per process: the size of `serve`'s flags costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane: the config store and the config API on unix:<data-dir>/pilot.sock
    /// (owner-only; the config API is never served over TCP). Prints `listening on unix:PATH`.
    Serve(ServeArgs),
    /// Create or update objects from YAML files (all or nothing), like `kubectl apply`.
    Apply(ApplyArgs),
    /// Show stored objects, like `kubectl get`.
    Get(GetArgs),
    /// Delete objects by kind and name, or those a file defines (all or nothing).
    Delete(DeleteArgs),
    /// Print analyzer warnings (e.g. IST0101) for the stored objects, plus files as if applied.
    Analyze(AnalyzeArgs),
    /// A sidecar's config, like `istioctl proxy-config`, read from its admin `/config_dump`.
    ProxyConfig(ProxyConfigArgs),
    /// Client and server versions, like `istioctl version`.
    Version(VersionArgs),
    /// Print a shell completion script: `source <(pilot completion bash)`.
    Completion(CompletionArgs),
    /// One line per connected sidecar: identity, config version sent and acked, SYNCED/STALE/NACKED,
    /// and the sidecar's own version.
    ProxyStatus(ServerArgs),
    /// Shadow-diff: how each mirrored route's copies compared with the primary's answers
    /// (`weft.io/mirror-compare`), merged over every sidecar, with the most diverging paths.
    MirrorReport(MirrorReportArgs),
    /// Add the sidecar to workloads in YAML (offline, like `istioctl kube-inject`); writes to stdout.
    Inject(InjectArgs),
    /// Print every manifest a cluster needs (like `istioctl manifest generate`), for
    /// `pilot install | kubectl apply -f -`. Needs the Secret <namespace>/cacerts first.
    Install(InstallArgs),
}

/// `pilot install` flags; defaults are [`crate::install::Options::default`] (deploy/k8s/weft.yaml).
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The control plane's namespace (only weft-system for now: the control plane's identities name it).
    #[arg(long, default_value = crate::install::NAMESPACE)]
    pub namespace: String,
    /// The image holding ca, pilot and sidecar. Default: weft/weft:<version> (deploy/image/).
    #[arg(long)]
    pub image: Option<String>,
    /// Replicas of pilot and of the CA.
    #[arg(long, default_value_t = 2)]
    pub replicas: i32,
    /// The mesh trust domain (the CA's, and pilot's through ConfigMap weft-mesh).
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Leave out the CRDs (VirtualService, DestinationRule, PeerAuthentication): for a cluster
    /// where Istio's are installed, which must not be replaced.
    #[arg(long)]
    pub skip_crds: bool,
}

/// `pilot inject` flags; defaults are [`crate::inject::Options::default`].
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// The YAML file to inject, or `-` for stdin.
    #[arg(short = 'f', long = "filename")]
    pub file: String,
    /// The sidecar image (runs `sidecar init` and `sidecar run`). Default: weft/weft:<version> (deploy/image/).
    #[arg(long)]
    pub image: Option<String>,
    /// pilot's discovery address, host:port.
    #[arg(long, default_value = "weft-pilot.weft-system.svc:15012")]
    pub pilot_address: String,
    /// The CA's address, host:port.
    #[arg(long, default_value = "weft-ca.weft-system.svc:15010")]
    pub ca_address: String,
    /// uid and gid the proxy runs as; its own traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The proxy's outbound listener (iptables target for the app's outgoing TCP).
    #[arg(long, default_value_t = 15001)]
    pub outbound_port: u16,
    /// The proxy's inbound listener (iptables target for incoming TCP).
    #[arg(long, default_value_t = 15006)]
    pub inbound_port: u16,
    /// The proxy's admin port (loopback only).
    #[arg(long, default_value_t = 15000)]
    pub admin_port: u16,
    /// The proxy's status port: readiness probe GET /healthz/ready; excluded from capture.
    #[arg(long, default_value_t = 15021)]
    pub status_port: u16,
    /// The proxy's Prometheus port (merged /stats/prometheus; the pod's prometheus.io/*
    /// annotations point at it); excluded from capture.
    #[arg(long, default_value_t = 15020)]
    pub prometheus_port: u16,
    /// The mesh trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
}

/// How the config commands reach `pilot serve`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Config API address: unix:PATH (the only transport; pilot never serves config over TCP).
    /// Defaults to unix:<data-dir>/pilot.sock when --data-dir is given.
    #[arg(long, env = "PILOT_SERVER")]
    pub server: Option<String>,
    /// pilot's data directory, to find its socket when --server is not given.
    #[arg(long, env = "WEFT_PILOT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// `pilot apply` flags.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A YAML file, a directory (its *.yaml and *.yml files, sorted by name) or `-` for stdin.
    /// Repeatable; everything given is applied in one transaction.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<String>,
    /// Namespace for objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Store nothing. `--dry-run=server` (or a bare `--dry-run`, as before): pilot validates,
    /// analyzes and reports each object's outcome. `--dry-run=client`: only parse and validate
    /// here, without reaching pilot (no outcomes, no analysis, no check against stored objects).
    #[arg(
        long,
        value_enum,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "server",
        value_name = "client|server"
    )]
    pub dry_run: Option<DryRun>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `pilot proxy-config` flags.
#[derive(Debug, Args)]
pub struct ProxyConfigArgs {
    /// What to show.
    #[arg(value_enum)]
    pub section: crate::proxy_config::Section,
    /// The pod (shown in errors): its sidecar is reached at --admin.
    pub pod: Option<String>,
    /// The pod's namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// The sidecar's admin address, host:port (loopback 15000 in the pod; from outside through
    /// `kubectl port-forward POD 15000`). Required: pilot cannot reach admin listeners.
    #[arg(long)]
    pub admin: Option<String>,
    /// `json`: the dump's part for the section, instead of a table.
    #[arg(short = 'o', long, value_parser = ["json"])]
    pub output: Option<String>,
}

/// `pilot version` flags.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Print only the client's version number, without asking pilot.
    #[arg(long)]
    pub short: bool,
    /// `json`: `{"clientVersion": {"version"}, "meshVersion": [{"Component": "pilot", "Info": {"version"}}]}`,
    /// istioctl's shape; `meshVersion` is empty when pilot did not answer.
    #[arg(short = 'o', long, value_parser = ["json"])]
    pub output: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `pilot completion` flags.
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// How long `pilot version` waits for pilot: a version is not worth hanging a script for.
const VERSION_TIMEOUT: Duration = Duration::from_secs(2);

/// `pilot apply --dry-run` modes, as kubectl's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DryRun {
    /// Parse and validate locally; pilot is not contacted.
    Client,
    /// pilot does everything but store.
    Server,
}

/// Output formats of `pilot get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The table with more columns (kubectl's `-o wide`).
    Wide,
    /// `resource.group/name` per object, as kubectl.
    Name,
    /// One object (a NAME given), or a kubectl `List` (apiVersion v1, kind List, items), as YAML
    /// with the server-set metadata; `pilot apply` takes it back.
    Yaml,
    /// The same as JSON.
    Json,
}

/// `pilot mirror-report` flags.
#[derive(Debug, Args)]
pub struct MirrorReportArgs {
    /// Only the routes of this VirtualService (default: every VirtualService of the namespace).
    pub virtual_service: Option<String>,
    /// The VirtualServices' namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// VirtualServices of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format (default: a table): `wide` adds columns and every diverging path, `json`
    /// prints the merged report.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<MirrorReportOutput>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Output formats of `pilot mirror-report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MirrorReportOutput {
    /// More columns, and every diverging path with its sample's sidecar.
    Wide,
    /// The merged report (routes, outcome counts, paths, samples) as JSON.
    Json,
}

/// `pilot get` flags.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Kind: virtualservice/vs, destinationrule/dr, peerauthentication/pa, service/svc, pod/po.
    pub kind: String,
    /// One object's name (default: all of the kind).
    pub name: Option<String>,
    /// Namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// List objects in every namespace.
    #[arg(short = 'A', long, conflicts_with = "name")]
    pub all_namespaces: bool,
    /// Only objects whose labels match: `key=value`, `key==value`, `key!=value`, `key`, `!key`,
    /// comma-separated (all must hold), as kubectl's equality-based selectors.
    #[arg(short = 'l', long, conflicts_with = "name")]
    pub selector: Option<String>,
    /// Output format (default: a table).
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Output>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `pilot delete` flags.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Kind of the objects to delete (with NAMEs or --all).
    #[arg(conflicts_with = "files")]
    pub kind: Option<String>,
    /// Names of the objects to delete (all or nothing: if one is missing, none is deleted).
    #[arg(conflicts_with = "all")]
    pub names: Vec<String>,
    /// Delete the objects these files define instead (file, directory or `-`; repeatable).
    #[arg(short = 'f', long = "filename", required_unless_present = "kind")]
    pub files: Vec<String>,
    /// Every object of KIND in the namespace.
    #[arg(long, requires = "kind")]
    pub all: bool,
    /// Skip objects that do not exist (and succeed) instead of failing; the rest is still one
    /// transaction.
    #[arg(long)]
    pub ignore_not_found: bool,
    /// Namespace of the NAMEs, of --all, and of file objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `pilot analyze` flags (istioctl's).
#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// Also analyze these files as if applied (file, directory or `-`; repeatable). Nothing is stored.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<String>,
    /// Namespace for file objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Exit with 79 when a message is at or above this level (log output only, as istioctl).
    #[arg(long, value_enum, ignore_case = true, default_value = "Error")]
    pub failure_threshold: Threshold,
    /// Print only messages at or above this level.
    #[arg(long, value_enum, ignore_case = true, default_value = "Info")]
    pub output_threshold: Threshold,
    /// Output format: `log` lines (`Error [IST0101] (VirtualService default/x) ...`), or a JSON or
    /// YAML list of messages.
    #[arg(short = 'o', long, value_enum, default_value = "log")]
    pub output: AnalyzeOutput,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// istioctl's analyzer levels, as flag values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Threshold {
    /// Info and above: every message.
    #[value(name = "Info")]
    Info,
    /// Warning and Error.
    #[value(name = "Warning")]
    Warning,
    /// Error only.
    #[value(name = "Error")]
    Error,
}

impl Threshold {
    fn level(self) -> Level {
        match self {
            Threshold::Info => Level::Info,
            Threshold::Warning => Level::Warning,
            Threshold::Error => Level::Error,
        }
    }
}

/// Output formats of `pilot analyze`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AnalyzeOutput {
    /// One line per message, istioctl's format.
    Log,
    /// A JSON array of messages (code, level, message, origin, documentationUrl).
    Json,
    /// The same array as YAML.
    Yaml,
}

/// istioctl's exit code when the analyzers found messages at or above `--failure-threshold`.
pub const EXIT_ANALYZER_FOUND_ISSUES: u8 = 79;

/// `pilot analyze` found messages at or above the failure threshold: exit 79, as istioctl.
#[derive(Debug, thiserror::Error)]
#[error(
    "Analyzers found issues when analyzing {0}.\nSee https://istio.io/latest/docs/reference/config/analysis for more information about causes and resolutions."
)]
pub struct AnalyzerFoundIssues(String);

/// Runs the parsed command; prints errors on stderr and returns a non-zero code on any error.
pub fn run(cli: Cli) -> ExitCode {
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<AnalyzerFoundIssues>() => {
            eprintln!("Error: {error}");
            ExitCode::from(EXIT_ANALYZER_FOUND_ISSUES)
        }
        Err(error) => {
            print_error(&error);
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    if let Command::Inject(args) = cli.command {
        return inject(args);
    }
    if let Command::Install(args) = cli.command {
        return install(args);
    }
    if let Command::Completion(args) = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(args.shell, &mut command, "pilot", &mut std::io::stdout());
        return Ok(());
    }
    if let Command::Serve(args) = cli.command {
        weft_ca::cli::init_logging();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let result = runtime.block_on(crate::serve::run(args));
        // Dropping the runtime would wait without bound for blocking work (a cancelled apply
        // finishing its current document, a store commit); a commit is atomic either way.
        runtime.shutdown_timeout(crate::serve::EXIT_AFTER_DRAIN);
        return Ok(result?);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(_)
            | Command::Inject(_)
            | Command::Install(_)
            | Command::Completion(_) => Ok(()),
            Command::Version(args) => version(args).await,
            Command::ProxyConfig(args) => proxy_config(args).await,
            Command::Apply(args) => apply(args).await,
            Command::Get(args) => get(args).await,
            Command::Delete(args) => delete(args).await,
            Command::Analyze(args) => analyze(args).await,
            Command::ProxyStatus(args) => proxy_status(args).await,
            Command::MirrorReport(args) => mirror_report(args).await,
        }
    })
}

/// Server errors print one line per problem, kubectl style; anything else as `error: ...`.
fn print_error(error: &anyhow::Error) {
    let Some(status) = error.downcast_ref::<tonic::Status>() else {
        eprintln!("error: {error:#}");
        return;
    };
    let prefix = match status.code() {
        tonic::Code::InvalidArgument => "error: ".to_string(),
        tonic::Code::NotFound => "Error from server (NotFound): ".to_string(),
        tonic::Code::Unavailable => "error: cannot reach pilot: ".to_string(),
        code => format!("Error from server ({code:?}): "),
    };
    for line in status.message().lines() {
        eprintln!("{prefix}{line}");
    }
}

/// `pilot inject`: pure transformation of one input; warnings on stderr, the result on stdout.
fn inject(args: InjectArgs) -> Result<()> {
    let defaults = crate::inject::Options::default();
    let options = crate::inject::Options {
        image: args.image.unwrap_or(defaults.image),
        pilot_address: args.pilot_address,
        ca_address: args.ca_address,
        proxy_uid: args.proxy_uid,
        outbound_port: args.outbound_port,
        inbound_port: args.inbound_port,
        admin_port: args.admin_port,
        status_port: args.status_port,
        prometheus_port: args.prometheus_port,
        trust_domain: args.trust_domain,
        version: defaults.version,
        otlp_endpoint: defaults.otlp_endpoint,
    };
    let (name, text) = if args.file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read standard input")?;
        ("<stdin>".to_string(), text)
    } else {
        let text = std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file))?;
        (args.file, text)
    };
    let injected = crate::inject::inject(&text, &options).with_context(|| name.clone())?;
    for warning in &injected.warnings {
        eprintln!("Warning: {name}: {warning}");
    }
    std::io::stdout()
        .lock()
        .write_all(injected.yaml.as_bytes())
        .context("cannot write standard output")?;
    Ok(())
}

/// `pilot install`: the manifests on stdout.
fn install(args: InstallArgs) -> Result<()> {
    let defaults = crate::install::Options::default();
    let options = crate::install::Options {
        namespace: args.namespace,
        image: args.image.unwrap_or(defaults.image),
        replicas: args.replicas,
        trust_domain: args.trust_domain,
        skip_crds: args.skip_crds,
    };
    let text = crate::install::render(&options)?;
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .context("cannot write standard output")?;
    Ok(())
}

async fn apply(args: ApplyArgs) -> Result<()> {
    let documents = read_documents(&args.files)?;
    if args.dry_run == Some(DryRun::Client) {
        return validate_locally(&documents, &args.namespace);
    }
    let dry_run = args.dry_run == Some(DryRun::Server);
    let mut client = connect(&args.server).await?;
    let response = client
        .apply(pb::ApplyRequest {
            documents,
            default_namespace: args.namespace,
            dry_run,
        })
        .await?
        .into_inner();
    let suffix = if dry_run { " (server dry run)" } else { "" };
    for result in &response.results {
        let outcome = match result.outcome() {
            pb::Outcome::Created => "created",
            pb::Outcome::Configured => "configured",
            pb::Outcome::Unchanged => "unchanged",
            pb::Outcome::Unspecified => "applied",
        };
        println!("{} {outcome}{suffix}", object_name(result.object.as_ref()));
    }
    print_warnings(&response.warnings);
    Ok(())
}

/// `apply --dry-run=client`: the server's parsing and validation, run here; prints
/// `KIND/NAME validated (client dry run)` per object, or every problem (kubectl style) and fails.
fn validate_locally(documents: &[pb::Document], namespace: &str) -> Result<()> {
    let mut problems = Vec::new();
    let mut lines = Vec::new();
    for document in documents {
        match weft_pilot_config::parse_documents(&document.file, &document.text, namespace) {
            Ok(resources) => lines.extend(resources.iter().map(|r| {
                let key = r.key();
                format!(
                    "{}/{} validated (client dry run)",
                    key.kind.api_resource(),
                    key.name
                )
            })),
            Err(errors) => problems.push(errors.to_string()),
        }
    }
    if !problems.is_empty() {
        // The same lines and prefix as the server's INVALID_ARGUMENT.
        bail!(tonic::Status::invalid_argument(problems.join("\n")));
    }
    if lines.is_empty() {
        bail!("no objects passed to apply");
    }
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

async fn get(args: GetArgs) -> Result<()> {
    let kind = Kind::from_cli(&args.kind).with_context(|| {
        format!(
            "the server doesn't have a resource type {:?} (use virtualservice/vs, destinationrule/dr, peerauthentication/pa, service/svc, pod/po)",
            args.kind
        )
    })?;
    let selector = args.selector.as_deref().map(Selector::parse).transpose()?;
    let mut client = connect(&args.server).await?;
    let named = args.name.is_some();
    let response = client
        .get(pb::GetRequest {
            kind: kind.as_str().to_string(),
            name: args.name.unwrap_or_default(),
            namespace: args.namespace.clone(),
            all_namespaces: args.all_namespaces,
        })
        .await?
        .into_inner();
    let mut objects = Vec::with_capacity(response.objects.len());
    for object in &response.objects {
        let value: serde_json::Value =
            serde_json::from_str(&object.json).context("the server sent an unreadable object")?;
        if selector.as_ref().is_none_or(|s| s.matches(&value)) {
            objects.push((object, value));
        }
    }
    let mut out = std::io::stdout().lock();
    if objects.is_empty() && !matches!(args.output, Some(Output::Yaml | Output::Json)) {
        if args.all_namespaces {
            eprintln!("No resources found");
        } else {
            eprintln!("No resources found in {} namespace.", args.namespace);
        }
        return Ok(());
    }
    match args.output {
        Some(Output::Yaml | Output::Json) => {
            let mut items: Vec<serde_json::Value> = objects
                .into_iter()
                .map(|(object, value)| with_server_fields(object, value))
                .collect();
            // One named object prints as itself; anything listed is a List, even of one or none.
            let value = match items.pop() {
                Some(item) if named => item,
                last => {
                    items.extend(last);
                    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items})
                }
            };
            if args.output == Some(Output::Json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                write!(out, "{}", serde_saphyr::to_string(&value)?)?;
            }
        }
        Some(Output::Name) => {
            for (_, value) in &objects {
                let name = value
                    .pointer("/metadata/name")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("");
                writeln!(out, "{}/{name}", kind.api_resource())?;
            }
        }
        Some(Output::Wide) | None => {
            let wide = args.output == Some(Output::Wide);
            write!(out, "{}", table(kind, &objects, args.all_namespaces, wide))?;
        }
    }
    Ok(())
}

/// A kubectl equality-based label selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

/// One term of a [`Selector`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl Selector {
    /// Parses `app=httpbin,version!=v2,tier,!canary` (`==` is `=`; spaces around terms are ignored).
    pub fn parse(text: &str) -> Result<Self> {
        let mut requirements = Vec::new();
        for term in text.split(',').map(str::trim) {
            let requirement = if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotEquals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, value)) = term.split_once('=') {
                let value = value.strip_prefix('=').unwrap_or(value);
                Requirement::Equals(key.trim().to_string(), value.trim().to_string())
            } else if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_string())
            } else {
                Requirement::Exists(term.to_string())
            };
            let key = match &requirement {
                Requirement::Equals(k, _)
                | Requirement::NotEquals(k, _)
                | Requirement::Exists(k)
                | Requirement::NotExists(k) => k,
            };
            let bad_key =
                key.is_empty() || key.contains(|c: char| c.is_whitespace() || "!=(),".contains(c));
            if bad_key {
                bail!(
                    "unable to parse requirement {term:?} of selector {text:?}: expected key, key=value, key!=value or !key"
                );
            }
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &serde_json::Value) -> bool {
        let label = |key: &str| {
            object
                .pointer("/metadata/labels")
                .and_then(|labels| labels.get(key))
                .and_then(serde_json::Value::as_str)
        };
        self.0.iter().all(|requirement| match requirement {
            Requirement::Equals(key, value) => label(key) == Some(value.as_str()),
            // As kubectl: `!=` also holds for objects without the label.
            Requirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
            Requirement::Exists(key) => label(key).is_some(),
            Requirement::NotExists(key) => label(key).is_none(),
        })
    }
}

async fn delete(args: DeleteArgs) -> Result<()> {
    let mut request = pb::DeleteRequest {
        default_namespace: args.namespace.clone(),
        ignore_not_found: args.ignore_not_found,
        ..pb::DeleteRequest::default()
    };
    if let Some(kind) = &args.kind {
        let kind = Kind::from_cli(kind)
            .with_context(|| format!("the server doesn't have a resource type {kind:?}"))?;
        if args.names.is_empty() && !args.all {
            bail!("resource(s) were provided, but no name was specified: give NAMEs or --all");
        }
        for name in &args.names {
            request.objects.push(pb::ObjectRef {
                kind: kind.as_str().to_string(),
                namespace: args.namespace.clone(),
                name: name.clone(),
            });
        }
        if args.all {
            request.all_of_kind = kind.as_str().to_string();
        }
    }
    request.documents = read_documents(&args.files)?;
    let mut client = connect(&args.server).await?;
    let response = client.delete(request).await?.into_inner();
    for object in &response.deleted {
        println!("{} deleted", object_name(Some(object)));
    }
    if response.deleted.is_empty() && args.all {
        eprintln!("No resources found");
    }
    Ok(())
}

async fn analyze(args: AnalyzeArgs) -> Result<()> {
    let documents = read_documents(&args.files)?;
    let target = analyze_target(&documents);
    let mut client = connect(&args.server).await?;
    let response = client
        .analyze(pb::AnalyzeRequest {
            documents,
            default_namespace: args.namespace,
        })
        .await?
        .into_inner();
    let shown: Vec<&pb::Warning> = response
        .warnings
        .iter()
        .filter(|w| warning_level(w) >= args.output_threshold.level())
        .collect();
    let mut out = std::io::stdout().lock();
    match args.output {
        AnalyzeOutput::Log => {
            for warning in &shown {
                writeln!(out, "{}", analyzer_line(warning))?;
            }
        }
        AnalyzeOutput::Json => {
            let messages: Vec<_> = shown.iter().map(|w| analyzer_json(w)).collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&messages)?)?;
        }
        AnalyzeOutput::Yaml => {
            let messages: Vec<_> = shown.iter().map(|w| analyzer_json(w)).collect();
            write!(out, "{}", serde_saphyr::to_string(&messages)?)?;
        }
    }
    if shown.is_empty() {
        eprintln!("\u{2714} No validation issues found when analyzing {target}.");
    }
    // As istioctl: the exit code reads every message (not only those shown), and only the log
    // format sets it, so a script parsing JSON or YAML gets 0.
    let failed = response
        .warnings
        .iter()
        .any(|w| warning_level(w) >= args.failure_threshold.level());
    if failed && args.output == AnalyzeOutput::Log {
        return Err(AnalyzerFoundIssues(target).into());
    }
    Ok(())
}

/// What istioctl's summary names: the stored config, plus the files given.
fn analyze_target(documents: &[pb::Document]) -> String {
    if documents.is_empty() {
        return "all namespaces".to_string();
    }
    let files: Vec<&str> = documents.iter().map(|d| d.file.as_str()).collect();
    format!("all namespaces with {}", files.join(", "))
}

/// The warning's level; a server that sends none (or an unknown one) is read by the code.
fn warning_level(warning: &pb::Warning) -> Level {
    Level::parse(&warning.level).unwrap_or_else(|| Level::of_code(&warning.code))
}

/// `VirtualService default/httpbin`, istioctl's origin of a message.
fn warning_origin(warning: &pb::Warning) -> String {
    match &warning.object {
        Some(o) => format!("{} {}/{}", o.kind, o.namespace, o.name),
        None => String::new(),
    }
}

/// The message without its object (older servers send only the full sentence).
fn warning_detail(warning: &pb::Warning) -> &str {
    if !warning.detail.is_empty() {
        return &warning.detail;
    }
    let origin = warning_origin(warning);
    warning
        .message
        .strip_prefix(origin.as_str())
        .and_then(|rest| rest.strip_prefix(": "))
        .unwrap_or(&warning.message)
}

/// istioctl's log line: `Error [IST0101] (VirtualService default/httpbin) host ... has no Service`.
fn analyzer_line(warning: &pb::Warning) -> String {
    let origin = warning_origin(warning);
    let level = warning_level(warning);
    let detail = warning_detail(warning);
    if origin.is_empty() {
        format!("{level} [{}] {detail}", warning.code)
    } else {
        format!("{level} [{}] ({origin}) {detail}", warning.code)
    }
}

/// One message of `-o json|yaml`, with istioctl's field names.
fn analyzer_json(warning: &pb::Warning) -> serde_json::Value {
    serde_json::json!({
        "code": warning.code,
        "level": warning_level(warning).as_str(),
        "origin": warning_origin(warning),
        "message": warning_detail(warning),
        // Istio documents its IST codes; weft's own (WFT0001) are in pilot/config/README.md, which
        // has no stable URL, so they get none rather than a dead istio.io link.
        "documentationUrl": if warning.code.starts_with("IST") {
            format!(
                "https://istio.io/latest/docs/reference/config/analysis/{}/",
                warning.code.to_ascii_lowercase()
            )
        } else {
            String::new()
        },
    })
}

async fn proxy_config(args: ProxyConfigArgs) -> Result<()> {
    let Some(admin) = &args.admin else {
        let pod = match &args.pod {
            Some(pod) => format!("{}/{pod}", args.namespace),
            None => "the pod".to_string(),
        };
        bail!(
            "give --admin ADDR: the admin listener of {pod}'s sidecar is loopback-only and pilot cannot read it (run where 127.0.0.1:15000 is the sidecar's, or through `kubectl port-forward`)"
        );
    };
    let dump = crate::proxy_config::fetch(admin).await?;
    let mut out = std::io::stdout().lock();
    if args.output.is_some() {
        let part = crate::proxy_config::json_of(&dump, args.section);
        writeln!(out, "{}", serde_json::to_string_pretty(&part)?)?;
    } else {
        write!(out, "{}", crate::proxy_config::table(&dump, args.section))?;
    }
    Ok(())
}

async fn version(args: VersionArgs) -> Result<()> {
    let client_version = env!("CARGO_PKG_VERSION");
    if args.short {
        println!("{client_version}");
        return Ok(());
    }
    let server = tokio::time::timeout(VERSION_TIMEOUT, async {
        let mut client = connect(&args.server).await?;
        let response = client.version(pb::VersionRequest {}).await?;
        anyhow::Ok(response.into_inner())
    })
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "pilot did not answer within {}s",
            VERSION_TIMEOUT.as_secs()
        ))
    });
    if args.output.is_some() {
        let mesh: Vec<serde_json::Value> = server
            .as_ref()
            .map(|s| {
                serde_json::json!({"Component": "pilot", "Info": {"version": s.version, "revision": s.revision}})
            })
            .into_iter()
            .collect();
        let value = serde_json::json!({
            "clientVersion": {"version": client_version},
            "meshVersion": mesh,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("client version: {client_version}");
        if let Ok(server) = &server {
            println!("control plane version: {}", server.version);
        }
    }
    if let Err(error) = &server {
        // The client's version is still an answer: as istioctl, say why the server's is missing.
        eprintln!("control plane version: unknown: {error:#}");
    }
    Ok(())
}

async fn proxy_status(args: ServerArgs) -> Result<()> {
    let mut client = connect(&args).await?;
    let response = client
        .proxy_status(pb::ProxyStatusRequest {})
        .await?
        .into_inner();
    if !response.discovery_enabled {
        bail!(
            "pilot runs without discovery (start it with --listen, --ca, --ca-root, --token-file)"
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let mut rows = vec![[
        "NAME".to_string(),
        "NAMESPACE".into(),
        "IDENTITY".into(),
        "SENT".into(),
        "ACKED".into(),
        "STATUS".into(),
        "LAST PUSH".into(),
        "VERSION".into(),
    ]];
    for p in &response.proxies {
        let status = if p.error.is_empty() {
            p.state.clone()
        } else {
            format!("{} ({})", p.state, p.error)
        };
        rows.push([
            p.name.clone(),
            p.namespace.clone(),
            p.identity.clone(),
            p.version_sent.clone(),
            p.version_acked.clone(),
            status,
            format!("{}s ago", (now - p.last_push).max(0)),
            p.proxy_version.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
    Ok(())
}

async fn mirror_report(args: MirrorReportArgs) -> Result<()> {
    let mut client = connect(&args.server).await?;
    let namespace = if args.all_namespaces {
        String::new()
    } else {
        args.namespace.clone()
    };
    let response = client
        .mirror_report(pb::MirrorReportRequest {
            virtual_service: args.virtual_service.clone().unwrap_or_default(),
            namespace,
        })
        .await?
        .into_inner();
    let merged = crate::mirror_report::merge(&response.proxies);
    if args.output == Some(MirrorReportOutput::Json) {
        println!("{}", serde_json::to_string_pretty(&merged)?);
        return Ok(());
    }
    if merged.routes.is_empty() {
        // kubectl's "No resources found" goes to stderr, so scripts reading stdout see nothing.
        let scope = match (&args.virtual_service, args.all_namespaces) {
            (Some(vs), true) => format!("VirtualService {vs} in any namespace"),
            (Some(vs), false) => format!("VirtualService {}/{vs}", args.namespace),
            (None, true) => "any namespace".to_string(),
            (None, false) => format!("namespace {}", args.namespace),
        };
        eprintln!(
            "No mirror reports for {scope}: no sidecar has compared a mirrored request yet (is weft.io/mirror-compare set on the VirtualService, and has traffic been mirrored?)."
        );
        return Ok(());
    }
    print!(
        "{}",
        crate::mirror_report::render(&merged, args.output == Some(MirrorReportOutput::Wide))
    );
    Ok(())
}

fn print_warnings(warnings: &[pb::Warning]) {
    for warning in warnings {
        eprintln!("Warning: [{}] {}", warning.code, warning.message);
    }
}

/// `virtualservice.networking.istio.io/httpbin`, `service/httpbin`.
fn object_name(object: Option<&pb::ObjectRef>) -> String {
    let Some(object) = object else {
        return "<unknown>".to_string();
    };
    match Kind::from_cli(&object.kind) {
        Some(kind) => format!("{}/{}", kind.api_resource(), object.name),
        None => format!("{}/{}", object.kind, object.name),
    }
}

// === server connection ===

/// Connects to the config API at `--server`, `PILOT_SERVER`, or `<data-dir>/pilot.sock`.
async fn connect(args: &ServerArgs) -> Result<ConfigServiceClient<Channel>> {
    let path = socket_path(args)?;
    // The URI is required by the API but unused: the connector always dials the socket.
    let endpoint = Endpoint::try_from("http://pilot.sock")?;
    let dial = path.clone();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let dial = dial.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(dial).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|error| {
            // tonic nests the I/O error a few times; its innermost message is the useful one.
            let mut cause: &dyn std::error::Error = &error;
            while let Some(source) = cause.source() {
                cause = source;
            }
            anyhow::anyhow!(
                "cannot reach pilot at unix:{} ({cause}); is `pilot serve` running with that data directory?",
                path.display()
            )
        })?;
    Ok(ConfigServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES))
}

fn socket_path(args: &ServerArgs) -> Result<PathBuf> {
    match (&args.server, &args.data_dir) {
        (Some(server), _) => match server.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
            _ => bail!(
                "--server {server:?}: the config API is only served on a unix socket; use unix:PATH (e.g. unix:/var/lib/weft/pilot/{SOCKET_FILE})"
            ),
        },
        (None, Some(dir)) => Ok(dir.join(SOCKET_FILE)),
        (None, None) => bail!(
            "no pilot to talk to: give --server unix:PATH (or PILOT_SERVER), or --data-dir DIR (or WEFT_PILOT_DATA_DIR) to use unix:DIR/{SOCKET_FILE}"
        ),
    }
}

// === input files ===

/// Reads every `-f` argument: a file, a directory's `*.yaml`/`*.yml` (sorted), or `-` for stdin.
fn read_documents(args: &[String]) -> Result<Vec<pb::Document>> {
    let mut documents = Vec::new();
    for arg in args {
        if arg == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
            documents.push(expand_list(pb::Document {
                file: "<stdin>".to_string(),
                text,
            }));
            continue;
        }
        let path = Path::new(arg);
        if path.is_dir() {
            let files = yaml_files(path)?;
            if files.is_empty() {
                bail!("{arg}: no *.yaml or *.yml files in this directory");
            }
            for file in files {
                documents.push(read_file(&file)?);
            }
        } else {
            documents.push(read_file(path)?);
        }
    }
    Ok(documents)
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        if yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<pb::Document> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(expand_list(pb::Document {
        file: path.display().to_string(),
        text,
    }))
}

/// A file holding one kubectl `List` (what `get -o yaml` prints for several objects) becomes its
/// items as YAML documents, so it applies as kubectl applies it; the server parses single objects.
/// Errors then count the items as documents (item 1 is document 1), and their line numbers are of
/// the re-written items. Anything else is passed through untouched.
fn expand_list(document: pb::Document) -> pb::Document {
    // Cheap test first: most files are no List, and those keep their exact text.
    if !document.text.contains("List") {
        return document;
    }
    let Ok(value) = serde_saphyr::from_str::<serde_json::Value>(&document.text) else {
        return document;
    };
    let is_list = value.get("kind").and_then(serde_json::Value::as_str) == Some("List")
        && value.get("apiVersion").and_then(serde_json::Value::as_str) == Some("v1");
    let Some(items) = value.get("items").and_then(serde_json::Value::as_array) else {
        return document;
    };
    if !is_list {
        return document;
    }
    let mut text = String::new();
    for item in items {
        let Ok(yaml) = serde_saphyr::to_string(item) else {
            return document;
        };
        text.push_str("---\n");
        text.push_str(&yaml);
    }
    pb::Document {
        file: document.file,
        text,
    }
}

// === output ===

/// The object's JSON with the server-set metadata kubectl shows (`resourceVersion`, `generation`,
/// `creationTimestamp`); applying it again ignores them.
fn with_server_fields(
    object: &pb::StoredObject,
    mut value: serde_json::Value,
) -> serde_json::Value {
    if let Some(metadata) = value
        .get_mut("metadata")
        .and_then(serde_json::Value::as_object_mut)
    {
        metadata.insert(
            "resourceVersion".into(),
            object.resource_version.to_string().into(),
        );
        metadata.insert("generation".into(), object.generation.into());
        metadata.insert(
            "creationTimestamp".into(),
            rfc3339(object.creation_timestamp).into(),
        );
    }
    value
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A kubectl-like table with the columns that fit the kind; `wide` adds kubectl's `-o wide` ones
/// (a VirtualService's gateways, a rule's subsets, selectors, a Pod's labels).
fn table(
    kind: Kind,
    objects: &[(&pb::StoredObject, serde_json::Value)],
    all_namespaces: bool,
    wide: bool,
) -> String {
    let mut header = vec!["NAME"];
    header.extend(match (kind, wide) {
        (Kind::VirtualService, false) => vec!["HOSTS"],
        (Kind::VirtualService, true) => vec!["GATEWAYS", "HOSTS"],
        (Kind::DestinationRule, false) => vec!["HOST"],
        (Kind::DestinationRule, true) => vec!["HOST", "SUBSETS"],
        (Kind::PeerAuthentication, false) => vec!["MODE"],
        (Kind::PeerAuthentication, true) => vec!["MODE", "SELECTOR"],
        (Kind::Service, false) => vec!["TYPE", "CLUSTER-IP", "PORT(S)"],
        (Kind::Service, true) => vec!["TYPE", "CLUSTER-IP", "PORT(S)", "SELECTOR"],
        (Kind::Pod, false) => vec!["IP", "NODE", "SERVICE-ACCOUNT"],
        (Kind::Pod, true) => vec!["IP", "NODE", "SERVICE-ACCOUNT", "LABELS"],
    });
    header.push("AGE");
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    let now = SystemTime::now();
    for (object, value) in objects {
        let text = |pointer: &str| {
            value
                .pointer(pointer)
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let or_none = |s: String| {
            if s.is_empty() {
                "<none>".to_string()
            } else {
                s
            }
        };
        let mut row = Vec::new();
        if all_namespaces {
            row.push(text("/metadata/namespace"));
        }
        row.push(text("/metadata/name"));
        match kind {
            Kind::VirtualService => {
                if wide {
                    row.push(match value.pointer("/spec/gateways") {
                        Some(gateways) => gateways.to_string(),
                        None => "<none>".to_string(),
                    });
                }
                row.push(format!(
                    "{}",
                    value.pointer("/spec/hosts").cloned().unwrap_or_default()
                ));
            }
            Kind::DestinationRule => {
                row.push(text("/spec/host"));
                if wide {
                    let subsets: Vec<&str> = value
                        .pointer("/spec/subsets")
                        .and_then(serde_json::Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s.get("name").and_then(serde_json::Value::as_str))
                        .collect();
                    row.push(or_none(subsets.join(",")));
                }
            }
            Kind::PeerAuthentication => {
                let mode = text("/spec/mtls/mode");
                row.push(if mode.is_empty() {
                    "UNSET".to_string()
                } else {
                    mode
                });
                if wide {
                    row.push(or_none(labels(value.pointer("/spec/selector/matchLabels"))));
                }
            }
            Kind::Service => {
                let kind = text("/spec/type");
                row.push(if kind.is_empty() {
                    "ClusterIP".to_string()
                } else {
                    kind
                });
                row.push(text("/spec/clusterIP"));
                row.push(ports(value));
                if wide {
                    row.push(or_none(labels(value.pointer("/spec/selector"))));
                }
            }
            Kind::Pod => {
                row.push(or_none(text("/status/podIP")));
                row.push(or_none(text("/spec/nodeName")));
                let sa = text("/spec/serviceAccountName");
                row.push(if sa.is_empty() {
                    "default".to_string()
                } else {
                    sa
                });
                if wide {
                    row.push(or_none(labels(value.pointer("/metadata/labels"))));
                }
            }
        }
        let created =
            UNIX_EPOCH + Duration::from_secs(u64::try_from(object.creation_timestamp).unwrap_or(0));
        row.push(age(now.duration_since(created).unwrap_or_default()));
        rows.push(row);
    }
    crate::table::columns(&rows)
}

/// `app=httpbin,version=v1` from a string map, as kubectl prints selectors and labels.
fn labels(map: Option<&serde_json::Value>) -> String {
    let Some(map) = map.and_then(serde_json::Value::as_object) else {
        return String::new();
    };
    map.iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(",")
}

/// `8000/TCP,9000/TCP`, as kubectl prints Service ports.
fn ports(service: &serde_json::Value) -> String {
    let Some(ports) = service
        .pointer("/spec/ports")
        .and_then(serde_json::Value::as_array)
    else {
        return "<none>".to_string();
    };
    ports
        .iter()
        .map(|p| {
            let port = p
                .get("port")
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0);
            let protocol = p
                .get("protocol")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("TCP");
            format!("{port}/{protocol}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// kubectl's short ages: `45s`, `3m20s`, `42m`, `5h10m`, `30h`, `3d4h`, `12d`.
fn age(elapsed: Duration) -> String {
    let s = elapsed.as_secs();
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    match s {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 && !s.is_multiple_of(60) => format!("{m}m{}s", s % 60),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 && !m.is_multiple_of(60) => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if d < 8 && !h.is_multiple_of(24) => format!("{d}d{}h", h % 24),
        _ => format!("{d}d"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        for (secs, want) in [
            (5, "5s"),
            (119, "119s"),
            (200, "3m20s"),
            (600, "10m"),
            (2 * 3600 + 60, "121m"),
            (5 * 3600 + 600, "5h10m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 4 * 3600, "3d4h"),
            (12 * 86400, "12d"),
        ] {
            assert_eq!(age(Duration::from_secs(secs)), want, "{secs}s");
        }
    }

    #[test]
    fn server_address() {
        let args = |server: Option<&str>, dir: Option<&str>| ServerArgs {
            server: server.map(String::from),
            data_dir: dir.map(PathBuf::from),
        };
        assert_eq!(
            socket_path(&args(None, Some("/d"))).unwrap(),
            PathBuf::from("/d/pilot.sock")
        );
        assert_eq!(
            socket_path(&args(Some("unix:/s"), Some("/d"))).unwrap(),
            PathBuf::from("/s")
        );
        assert!(socket_path(&args(Some("127.0.0.1:15012"), None)).is_err());
        assert!(socket_path(&args(None, None)).is_err());
    }

    fn ist0101(level: &str, detail: &str) -> pb::Warning {
        pb::Warning {
            code: "IST0101".into(),
            object: Some(pb::ObjectRef {
                kind: "VirtualService".into(),
                namespace: "default".into(),
                name: "httpbin".into(),
            }),
            message: format!("VirtualService default/httpbin: {detail}"),
            level: level.into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn analyzer_lines_read_like_istioctl() {
        let w = ist0101("Error", "host x.default.svc.cluster.local has no Service");
        assert_eq!(
            analyzer_line(&w),
            "Error [IST0101] (VirtualService default/httpbin) host x.default.svc.cluster.local has no Service"
        );
        // A server without level and detail: both come from the code and the full sentence.
        let old = pb::Warning {
            level: String::new(),
            detail: String::new(),
            ..w.clone()
        };
        assert_eq!(analyzer_line(&old), analyzer_line(&w));
        let json = analyzer_json(&w);
        assert_eq!(json["origin"], "VirtualService default/httpbin");
        assert_eq!(json["level"], "Error");
        assert_eq!(
            json["documentationUrl"],
            "https://istio.io/latest/docs/reference/config/analysis/ist0101/"
        );
        let weft = pb::Warning {
            code: "WFT0001".into(),
            level: "Warning".into(),
            ..w.clone()
        };
        assert_eq!(analyzer_json(&weft)["documentationUrl"], "");
        assert!(
            analyzer_line(&weft).starts_with("Warning [WFT0001] (VirtualService default/httpbin)")
        );
    }

    #[test]
    fn analyze_thresholds_parse_any_case_and_order_levels() {
        let parse = |args: &[&str]| {
            let Command::Analyze(a) = Cli::try_parse_from([&["pilot", "analyze"], args].concat())
                .unwrap()
                .command
            else {
                panic!("not analyze")
            };
            a
        };
        let a = parse(&[]);
        assert_eq!(a.failure_threshold, Threshold::Error);
        assert_eq!(a.output_threshold, Threshold::Info);
        assert_eq!(a.output, AnalyzeOutput::Log);
        let a = parse(&[
            "--failure-threshold",
            "warning",
            "--output-threshold=ERROR",
            "-o",
            "json",
        ]);
        assert_eq!(a.failure_threshold, Threshold::Warning);
        assert_eq!(a.output_threshold, Threshold::Error);
        assert_eq!(a.output, AnalyzeOutput::Json);
        assert!(Cli::try_parse_from(["pilot", "analyze", "--failure-threshold", "bad"]).is_err());
        assert!(Level::Info < Level::Warning && Level::Warning < Level::Error);
        assert_eq!(warning_level(&ist0101("Warning", "x")), Level::Warning);
    }

    #[test]
    fn selectors_match_like_kubectl() {
        let object =
            serde_json::json!({"metadata": {"labels": {"app": "httpbin", "version": "v1"}}});
        let bare = serde_json::json!({"metadata": {"name": "x"}});
        for (selector, on_object, on_bare) in [
            ("app=httpbin", true, false),
            ("app==httpbin", true, false),
            ("app = httpbin, version=v1", true, false),
            ("app=httpbin,version=v2", false, false),
            ("version!=v2", true, true),
            ("version!=v1", false, true),
            ("app", true, false),
            ("!app", false, true),
            ("!canary", true, true),
        ] {
            let parsed = Selector::parse(selector).unwrap();
            assert_eq!(parsed.matches(&object), on_object, "{selector}");
            assert_eq!(parsed.matches(&bare), on_bare, "{selector}");
        }
        for bad in ["", "=v", "a,,b", "a b=c", "!"] {
            assert!(Selector::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_list_file_becomes_its_items() {
        let list = pb::Document {
            file: "l.yaml".into(),
            text: "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}}\n- {apiVersion: v1, kind: Service, metadata: {name: b}}\n".into(),
        };
        let expanded = expand_list(list);
        assert_eq!(expanded.file, "l.yaml");
        let docs: Vec<serde_json::Value> = expanded
            .text
            .split("---\n")
            .filter(|d| !d.is_empty())
            .map(|d| serde_saphyr::from_str(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2, "{}", expanded.text);
        assert_eq!(docs[1]["metadata"]["name"], "b");
        // Anything else keeps its exact text, a kind named like a List included.
        for text in [
            "kind: Service # no List here\n",
            "apiVersion: v2\nkind: List\nitems: []\n",
            "a: [unclosed\nkind: List",
        ] {
            let doc = pb::Document {
                file: "f".into(),
                text: text.into(),
            };
            assert_eq!(expand_list(doc.clone()).text, text);
        }
    }

    #[test]
    fn wide_tables_add_kubectl_columns() {
        let stored = pb::StoredObject::default();
        let dr = serde_json::json!({
            "metadata": {"name": "httpbin"},
            "spec": {"host": "httpbin", "subsets": [{"name": "v1"}, {"name": "v2"}]},
        });
        let objects = [(&stored, dr)];
        let narrow = table(Kind::DestinationRule, &objects, false, false);
        let wide = table(Kind::DestinationRule, &objects, true, true);
        assert!(narrow.starts_with("NAME      HOST      AGE\n"), "{narrow}");
        assert!(
            wide.starts_with("NAMESPACE   NAME      HOST      SUBSETS   AGE\n"),
            "{wide}"
        );
        assert!(wide.contains("httpbin   httpbin   v1,v2"), "{wide}");
        let svc = serde_json::json!({
            "metadata": {"name": "s"},
            "spec": {"selector": {"app": "s"}, "ports": [{"port": 80}]},
        });
        let wide = table(Kind::Service, &[(&stored, svc)], false, true);
        let row: Vec<&str> = wide.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row[..4], ["s", "ClusterIP", "80/TCP", "app=s"]);
    }
}
