//! The config API server (`weft.config.v1.ConfigService`): parses and validates the user's documents
//! with `weft-pilot-config`, stores them, and answers reads from the store's snapshot.
//!
//! Generated types stay in this module (aliased `pb::`); errors become a `tonic::Status` in exactly
//! one place, `impl From<ApiError> for Status`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use weft_pilot_config::{Kind, Resource, ResourceKey, Warning};
use weft_proto::config as pb;
use weft_proto::config::config_service_server::{ConfigService, ConfigServiceServer};

use crate::store::{Outcome, Snapshot, Store, StoreError};

/// Largest request accepted: applies carry whole YAML files.
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Namespace used when a request names none.
const DEFAULT_NAMESPACE: &str = "default";

/// Why a config API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The documents did not parse or validate; one line per problem. Nothing was stored.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    /// The kind named in a request is not one weft knows.
    #[error(
        "the server doesn't have a resource type {0:?} (use virtualservice/vs, destinationrule/dr, peerauthentication/pa, service/svc)"
    )]
    UnknownKind(String),
    /// A request combined options that do not go together.
    #[error("{0}")]
    BadRequest(&'static str),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored object could not be encoded for the response.
    #[error("cannot encode {key}: {source}")]
    Encode {
        /// The object.
        key: ResourceKey,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The blocking store task did not complete.
    #[error("store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The call was abandoned before it stored anything: pilot is shutting down and the drain
    /// deadline passed (a client that went away never sees this).
    #[error("pilot is shutting down; nothing was stored, try again")]
    Cancelled,
    /// An apply or delete while the config comes from the cluster.
    #[error(
        "pilot serves the config of the Kubernetes cluster (--registry kubernetes): change it with \
         kubectl apply/delete; pilot get, analyze and proxy-status show what pilot serves"
    )]
    ReadOnly,
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let message = error.to_string();
        match error {
            ApiError::Invalid(_) | ApiError::UnknownKind(_) | ApiError::BadRequest(_) => {
                Status::invalid_argument(message)
            }
            ApiError::Store(StoreError::NotFound(keys)) => Status::not_found(
                keys.iter()
                    .map(not_found_line)
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            ApiError::Store(
                StoreError::ClusterIpOutOfRange { .. }
                | StoreError::ClusterIpTaken { .. }
                | StoreError::ClusterIpImmutable { .. }
                | StoreError::ClusterIpsExhausted(_),
            ) => Status::invalid_argument(message),
            ApiError::ReadOnly => Status::failed_precondition(message),
            ApiError::Cancelled | ApiError::Store(StoreError::Cancelled) => {
                Status::unavailable(ApiError::Cancelled.to_string())
            }
            ApiError::Store(
                StoreError::Open { .. } | StoreError::Storage(_) | StoreError::Corrupt { .. },
            )
            | ApiError::Encode { .. }
            | ApiError::Task(_) => Status::internal(message),
        }
    }
}

/// kubectl's wording: `virtualservices.networking.istio.io "x" not found`.
fn not_found_line(key: &ResourceKey) -> String {
    // Every supported kind's plural is its lowercase name plus `s`.
    let plural = format!("{}s", key.kind.as_str().to_ascii_lowercase());
    let resource = match key.kind.group() {
        "" => plural,
        group => format!("{plural}.{group}"),
    };
    format!("{resource} {:?} not found", key.name)
}

/// Where the config API reads objects from, and writes them to.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The local store: apply and delete write to it.
    Store(Arc<Store>),
    /// The Kubernetes cluster (`--registry kubernetes`): read-only here; get shows the objects
    /// pilot serves, analyze also lists the objects it refuses.
    Cluster(crate::kube::KubeRegistry),
}

impl Backend {
    /// The objects served now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self {
            Backend::Store(store) => store.snapshot(),
            Backend::Cluster(cluster) => cluster.snapshot(),
        }
    }

    fn store(&self) -> Result<&Store, ApiError> {
        match self {
            Backend::Store(store) => Ok(store),
            Backend::Cluster(_) => Err(ApiError::ReadOnly),
        }
    }

    /// Objects of the cluster refused as invalid, as analyzer findings (Istio's IST0106,
    /// SchemaValidationError).
    fn refused(&self) -> Vec<Warning> {
        let Backend::Cluster(cluster) = self else {
            return Vec::new();
        };
        cluster
            .invalid()
            .iter()
            .map(|object| Warning {
                code: SCHEMA_VALIDATION_ERROR,
                object: object.key.clone(),
                detail: format!(
                    "resourceVersion {} is invalid and not served{}: {}",
                    object.resource_version,
                    if object.previous_in_force {
                        "; its last valid version stays in force"
                    } else {
                        ""
                    },
                    object.problems.join("; ")
                ),
            })
            .collect()
    }
}

/// Istio's analyzer code for an object that fails schema validation.
pub use weft_pilot_config::analyze::SCHEMA_VALIDATION_ERROR;

/// What the config API counts: applies refused (`pilot serve --monitoring-listen`).
///
/// `weft_pilot_config_rejected_total{reason}`: `pilot apply` calls refused, dry runs included (an
/// apply is all or nothing, so a call, not a document, is what is refused): `invalid` (a document
/// did not parse or validate; every problem is in the answer), `conflict` (the store refused it: a
/// Service's cluster IP taken, out of range, immutable or exhausted), `empty` (no objects),
/// `read_only` (the config comes from the cluster). Istio has no counter of this: its nearest is the
/// validation webhook's `galley_validation_failed`, which counts objects kubectl sends; objects of
/// the cluster pilot refuses are `weft_pilot_invalid_objects{kind}`.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    rejected: std::sync::Mutex<BTreeMap<&'static str, u64>>,
}

impl ApiMetrics {
    /// The reasons, each rendered even at zero (so a rate over them is defined from the start).
    const REASONS: [&'static str; 4] = ["conflict", "empty", "invalid", "read_only"];

    /// Counts a refused apply (errors that are pilot's, not the request's, are not counted).
    fn apply_refused(&self, error: &ApiError) {
        let reason = match error {
            ApiError::Invalid(_) => "invalid",
            ApiError::BadRequest(_) => "empty",
            ApiError::ReadOnly => "read_only",
            ApiError::Store(
                StoreError::ClusterIpOutOfRange { .. }
                | StoreError::ClusterIpTaken { .. }
                | StoreError::ClusterIpImmutable { .. }
                | StoreError::ClusterIpsExhausted(_),
            ) => "conflict",
            _ => return,
        };
        let mut rejected = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        *rejected.entry(reason).or_default() += 1;
    }

    /// Applies refused for `reason` so far.
    pub fn rejected(&self, reason: &str) -> u64 {
        let rejected = self.rejected.lock().unwrap_or_else(|p| p.into_inner());
        rejected.get(reason).copied().unwrap_or(0)
    }

    /// Writes the family.
    pub fn render(&self, out: &mut weft_ca::monitoring::Exposition) {
        let name = "weft_pilot_config_rejected_total";
        out.family(
            name,
            weft_ca::monitoring::Kind::Counter,
            "pilot apply calls refused (nothing of them stored), by reason.",
        );
        for reason in Self::REASONS {
            out.sample(name, &[("reason", reason)], self.rejected(reason) as f64);
        }
    }
}

/// The ConfigService implementation over a [`Backend`].
///
/// Every call that parses, validates, analyzes or encodes objects runs on the blocking pool, so a
/// large apply never holds an async worker (discovery keeps being served), and it checks a
/// cancellation token between documents and objects: the token is cancelled when tonic drops the
/// call (the client went away) or when `abort` is (pilot's drain deadline passed).
#[derive(Debug, Clone)]
pub struct ConfigApi {
    backend: Backend,
    /// Connected sidecars; `None` when pilot runs without discovery.
    proxies: Option<Arc<crate::discovery::ProxyTable>>,
    /// Cancelled when in-flight calls must stop (the drain deadline of a shutdown).
    abort: CancellationToken,
    metrics: Arc<ApiMetrics>,
}

impl ConfigApi {
    /// A server for `backend`, with message limits set for whole YAML files. Calls still running when
    /// `abort` is cancelled stop, storing nothing. Refused applies are counted in `metrics`.
    pub fn server(
        backend: Backend,
        proxies: Option<Arc<crate::discovery::ProxyTable>>,
        abort: CancellationToken,
        metrics: Arc<ApiMetrics>,
    ) -> ConfigServiceServer<ConfigApi> {
        ConfigServiceServer::new(ConfigApi {
            backend,
            proxies,
            abort,
            metrics,
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Runs `work` on the blocking pool with a token that is cancelled if this future is dropped
    /// before it completes (tonic drops a call whose client reset the stream or closed the
    /// connection) or when `abort` is cancelled.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce(&Backend, &CancellationToken) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let backend = self.backend.clone();
        let cancel = self.abort.child_token();
        let on_drop = cancel.clone().drop_guard();
        let token = cancel.clone();
        let result = tokio::task::spawn_blocking(move || {
            let result = work(&backend, &token);
            if matches!(
                result,
                Err(ApiError::Cancelled | ApiError::Store(StoreError::Cancelled))
            ) {
                tracing::info!(call = what, "config call cancelled; nothing was stored");
            }
            result
        })
        .await;
        let _ = on_drop.disarm();
        result?
    }

    async fn apply(&self, request: pb::ApplyRequest) -> Result<pb::ApplyResponse, ApiError> {
        let result = self
            .blocking("apply", |backend, cancel| {
                apply_blocking(backend.store()?, request, cancel)
            })
            .await;
        if let Err(e) = &result {
            self.metrics.apply_refused(e);
        }
        result
    }

    async fn get(&self, request: pb::GetRequest) -> Result<pb::GetResponse, ApiError> {
        self.blocking("get", |backend, cancel| {
            get_blocking(&backend.snapshot(), request, cancel)
        })
        .await
    }

    async fn delete(&self, request: pb::DeleteRequest) -> Result<pb::DeleteResponse, ApiError> {
        self.blocking("delete", |backend, cancel| {
            delete_blocking(backend.store()?, request, cancel)
        })
        .await
    }

    async fn analyze(&self, request: pb::AnalyzeRequest) -> Result<pb::AnalyzeResponse, ApiError> {
        self.blocking("analyze", move |backend, cancel| {
            let extra = parse_all(&request.documents, &request.default_namespace, cancel)?;
            let all = overlay(&backend.snapshot(), extra);
            check(cancel)?;
            let mut warnings = backend.refused();
            warnings.extend(weft_pilot_config::analyze(&all));
            warnings.sort();
            Ok(pb::AnalyzeResponse {
                warnings: warnings.into_iter().map(to_pb_warning).collect(),
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        Ok(Response::new(
            ConfigApi::apply(self, request.into_inner()).await?,
        ))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        Ok(Response::new(
            ConfigApi::get(self, request.into_inner()).await?,
        ))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        Ok(Response::new(
            ConfigApi::delete(self, request.into_inner()).await?,
        ))
    }

    async fn analyze(
        &self,
        request: Request<pb::AnalyzeRequest>,
    ) -> Result<Response<pb::AnalyzeResponse>, Status> {
        Ok(Response::new(
            ConfigApi::analyze(self, request.into_inner()).await?,
        ))
    }

    async fn version(
        &self,
        _request: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        let revision = match &self.backend {
            Backend::Store(store) => store.snapshot().revision(),
            Backend::Cluster(_) => 0,
        };
        Ok(Response::new(pb::VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            revision,
        }))
    }

    async fn proxy_status(
        &self,
        _request: Request<pb::ProxyStatusRequest>,
    ) -> Result<Response<pb::ProxyStatusResponse>, Status> {
        let proxies = self
            .proxies
            .as_ref()
            .map(|t| t.list())
            .unwrap_or_default()
            .into_iter()
            .map(|p| pb::ProxyStatus {
                state: p.state().to_owned(),
                name: p.name,
                namespace: p.namespace,
                identity: p.identity,
                version_sent: p.version_sent,
                version_acked: p.version_acked,
                error: p.refused.or(p.nack).unwrap_or_default(),
                last_push: p
                    .last_push
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                    .unwrap_or(0),
                proxy_version: p.proxy_version,
            })
            .collect();
        Ok(Response::new(pb::ProxyStatusResponse {
            proxies,
            discovery_enabled: self.proxies.is_some(),
        }))
    }

    async fn mirror_report(
        &self,
        request: Request<pb::MirrorReportRequest>,
    ) -> Result<Response<pb::MirrorReportResponse>, Status> {
        let request = request.into_inner();
        let proxies = self
            .proxies
            .as_ref()
            .map(|t| t.mirror_reports())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|stored| {
                let mut report = stored.report;
                report.routes.retain(|r| {
                    route_selected(&r.route, &request.namespace, &request.virtual_service)
                });
                (!report.routes.is_empty()).then_some(pb::ProxyMirrorReport {
                    name: stored.name,
                    namespace: stored.namespace,
                    workload: stored.workload,
                    report: Some(report),
                })
            })
            .collect();
        Ok(Response::new(pb::MirrorReportResponse { proxies }))
    }
}

/// Whether the route named `route` ("<namespace>/<virtualservice>/<rule>", as translation names
/// routes) belongs to VirtualService `virtual_service` of `namespace`; an empty filter matches
/// all. Routes not named that way (none should be) match only when both filters are empty.
fn route_selected(route: &str, namespace: &str, virtual_service: &str) -> bool {
    if namespace.is_empty() && virtual_service.is_empty() {
        return true;
    }
    let mut parts = route.splitn(3, '/');
    let (Some(ns), Some(vs), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    (namespace.is_empty() || ns == namespace)
        && (virtual_service.is_empty() || vs == virtual_service)
}

fn get_blocking(
    snapshot: &Snapshot,
    request: pb::GetRequest,
    cancel: &CancellationToken,
) -> Result<pb::GetResponse, ApiError> {
    let kind = parse_kind(&request.kind)?;
    if request.all_namespaces && !request.name.is_empty() {
        return Err(ApiError::BadRequest(
            "a resource cannot be retrieved by name across all namespaces",
        ));
    }
    let namespace = namespace_or_default(&request.namespace);
    let objects = snapshot
        .of_kind(kind)
        .filter(|o| request.all_namespaces || o.resource.namespace() == namespace)
        .filter(|o| request.name.is_empty() || o.resource.name() == request.name)
        .map(|o| {
            check(cancel)?;
            let key = o.resource.key();
            let json = serde_json::to_string(&o.resource).map_err(|source| ApiError::Encode {
                key: key.clone(),
                source,
            })?;
            Ok(pb::StoredObject {
                json,
                resource_version: o.resource_version,
                generation: o.generation,
                creation_timestamp: o
                    .created
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                    .unwrap_or(0),
                object: Some(to_pb_ref(&key)),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    if objects.is_empty() && !request.name.is_empty() {
        return Err(StoreError::NotFound(vec![ResourceKey {
            kind,
            namespace: namespace.to_string(),
            name: request.name,
        }])
        .into());
    }
    Ok(pb::GetResponse {
        objects,
        revision: snapshot.revision(),
    })
}

fn delete_blocking(
    store: &Store,
    request: pb::DeleteRequest,
    cancel: &CancellationToken,
) -> Result<pb::DeleteResponse, ApiError> {
    let namespace = namespace_or_default(&request.default_namespace);
    let mut keys = Vec::new();
    for object in &request.objects {
        keys.push(ResourceKey {
            kind: parse_kind(&object.kind)?,
            namespace: match object.namespace.as_str() {
                "" => namespace.to_string(),
                given => given.to_string(),
            },
            name: object.name.clone(),
        });
    }
    let parsed = parse_all(&request.documents, namespace, cancel)?;
    keys.extend(parsed.iter().map(Resource::key));
    let mut listed = Vec::new();
    if !request.all_of_kind.is_empty() {
        // Listed from a snapshot, deleted if still there: one deleted meanwhile is no error, since
        // `--all` asks for none to be left.
        let kind = parse_kind(&request.all_of_kind)?;
        listed = store
            .snapshot()
            .of_kind(kind)
            .filter(|o| o.resource.namespace() == namespace)
            .map(|o| o.resource.key())
            .collect();
    }
    check(cancel)?;
    let (revision, deleted) = store.delete_existing(&keys, &listed, request.ignore_not_found)?;
    Ok(pb::DeleteResponse {
        deleted: deleted.iter().map(to_pb_ref).collect(),
        revision,
    })
}

/// The whole apply, on a blocking thread: parse and validate, store (or dry run), analyze.
fn apply_blocking(
    store: &Store,
    request: pb::ApplyRequest,
    cancel: &CancellationToken,
) -> Result<pb::ApplyResponse, ApiError> {
    let resources = parse_all(&request.documents, &request.default_namespace, cancel)?;
    if resources.is_empty() {
        return Err(ApiError::BadRequest("no objects passed to apply"));
    }
    let outcomes = store.apply_unless(resources.clone(), request.dry_run, &|| {
        cancel.is_cancelled()
    })?;
    check(cancel)?;
    // After a real apply the snapshot already holds the objects; after a dry run the overlay
    // shows the analyzer the world as it would be.
    let snapshot = store.snapshot();
    let applied: BTreeSet<ResourceKey> = resources.iter().map(Resource::key).collect();
    let warnings = weft_pilot_config::analyze(&overlay(&snapshot, resources))
        .into_iter()
        .filter(|w| applied.contains(&w.object))
        .map(to_pb_warning)
        .collect();
    Ok(pb::ApplyResponse {
        results: outcomes
            .into_iter()
            .map(|(key, outcome)| pb::ObjectOutcome {
                object: Some(to_pb_ref(&key)),
                outcome: to_pb_outcome(outcome).into(),
            })
            .collect(),
        warnings,
        revision: snapshot.revision(),
    })
}

fn check(cancel: &CancellationToken) -> Result<(), ApiError> {
    if cancel.is_cancelled() {
        Err(ApiError::Cancelled)
    } else {
        Ok(())
    }
}

/// Parses every document; on any error, returns every error line of every document.
fn parse_all(
    documents: &[pb::Document],
    namespace: &str,
    cancel: &CancellationToken,
) -> Result<Vec<Resource>, ApiError> {
    let namespace = namespace_or_default(namespace);
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    for document in documents {
        let parsed = weft_pilot_config::parse_documents_until(
            &document.file,
            &document.text,
            namespace,
            || check(cancel),
        )?;
        match parsed {
            Ok(parsed) => resources.extend(parsed),
            Err(e) => errors.extend(e.errors().iter().map(ToString::to_string)),
        }
    }
    if errors.is_empty() {
        Ok(resources)
    } else {
        Err(ApiError::Invalid(errors))
    }
}

/// The stored objects with `extra` replacing those of the same key.
fn overlay(snapshot: &Snapshot, extra: Vec<Resource>) -> Vec<Resource> {
    let mut all: BTreeMap<ResourceKey, Resource> = snapshot
        .iter()
        .map(|o| (o.resource.key(), o.resource.clone()))
        .collect();
    all.extend(extra.into_iter().map(|r| (r.key(), r)));
    all.into_values().collect()
}

fn parse_kind(name: &str) -> Result<Kind, ApiError> {
    Kind::from_cli(name).ok_or_else(|| ApiError::UnknownKind(name.to_string()))
}

fn namespace_or_default(namespace: &str) -> &str {
    if namespace.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        namespace
    }
}

fn to_pb_ref(key: &ResourceKey) -> pb::ObjectRef {
    pb::ObjectRef {
        kind: key.kind.as_str().to_string(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
    }
}

fn to_pb_outcome(outcome: Outcome) -> pb::Outcome {
    match outcome {
        Outcome::Created => pb::Outcome::Created,
        Outcome::Configured => pb::Outcome::Configured,
        Outcome::Unchanged => pb::Outcome::Unchanged,
    }
}

fn to_pb_warning(warning: Warning) -> pb::Warning {
    pb::Warning {
        code: warning.code.to_string(),
        object: Some(to_pb_ref(&warning.object)),
        message: warning.message(),
        level: warning.level().as_str().to_string(),
        detail: warning.detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> (tempfile::TempDir, ConfigApi) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        (
            dir,
            ConfigApi {
                backend: Backend::Store(store),
                proxies: None,
                abort: CancellationToken::new(),
                metrics: Arc::default(),
            },
        )
    }

    fn apply_request(text: &str, dry_run: bool) -> pb::ApplyRequest {
        pb::ApplyRequest {
            documents: vec![pb::Document {
                file: "in.yaml".into(),
                text: text.into(),
            }],
            default_namespace: String::new(),
            dry_run,
        }
    }

    #[test]
    fn mirror_report_routes_are_selected_by_virtual_service_and_namespace() {
        let route = "shop/httpbin/v1-with-mirror";
        assert!(route_selected(route, "", ""));
        assert!(route_selected(route, "shop", ""));
        assert!(route_selected(route, "shop", "httpbin"));
        assert!(route_selected(route, "", "httpbin"));
        assert!(!route_selected(route, "default", "httpbin"));
        assert!(!route_selected(route, "shop", "reviews"));
        // A rule name may hold '/': only the first two parts are namespace and VirtualService.
        assert!(route_selected("shop/httpbin/a/b", "shop", "httpbin"));
        assert!(!route_selected("default", "", "httpbin"));
        assert!(route_selected("default", "", ""));
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  clusterIP: 10.96.0.7\n  ports: [{port: 80}]\n";
    const VS_TO_SUBSET: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec:\n  hosts: [a]\n  http:\n  - route:\n    - destination: {host: a, subset: v1}\n";

    #[tokio::test]
    async fn errors_map_to_statuses_with_every_line() {
        let (_dir, api) = api();
        let bad = "kind: Nope\n---\napiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: []}\n";
        let status = Status::from(api.apply(apply_request(bad, false)).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message().lines().count(), 2, "{}", status.message());
        assert!(status.message().lines().all(|l| l.starts_with("in.yaml")));

        api.apply(apply_request(SERVICE, false)).await.unwrap();
        let taken = SERVICE.replace("name: a", "name: b");
        let status = Status::from(api.apply(apply_request(&taken, false)).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("already allocated"), "{status:?}");
        assert_eq!(
            (
                api.metrics.rejected("invalid"),
                api.metrics.rejected("conflict")
            ),
            (1, 1)
        );
        let status = Status::from(api.apply(apply_request("", false)).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let mut out = weft_ca::monitoring::Exposition::default();
        api.metrics.render(&mut out);
        let text = out.finish();
        for line in [
            "# TYPE weft_pilot_config_rejected_total counter\n",
            "weft_pilot_config_rejected_total{reason=\"invalid\"} 1\n",
            "weft_pilot_config_rejected_total{reason=\"conflict\"} 1\n",
            "weft_pilot_config_rejected_total{reason=\"empty\"} 1\n",
            "weft_pilot_config_rejected_total{reason=\"read_only\"} 0\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }

        let get = pb::GetRequest {
            kind: "vs".into(),
            name: "missing".into(),
            ..Default::default()
        };
        let status = Status::from(api.get(get).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(
            status.message(),
            r#"virtualservices.networking.istio.io "missing" not found"#
        );
    }

    #[tokio::test]
    async fn apply_warns_about_applied_objects_and_dry_run_stores_nothing() {
        let (_dir, api) = api();
        let response = api.apply(apply_request(VS_TO_SUBSET, true)).await.unwrap();
        assert_eq!(response.results[0].outcome(), pb::Outcome::Created);
        assert!(response.warnings.iter().any(|w| w.code == "IST0101"));
        assert!(api.backend.snapshot().is_empty());

        let response = api.apply(apply_request(VS_TO_SUBSET, false)).await.unwrap();
        assert_eq!(response.revision, 1);
        // A later apply of something else does not repeat the stored VirtualService's warning.
        let response = api.apply(apply_request(SERVICE, false)).await.unwrap();
        assert!(response.warnings.is_empty(), "{:?}", response.warnings);
        let all = api.analyze(pb::AnalyzeRequest::default()).await.unwrap();
        assert!(all.warnings.iter().any(|w| w.code == "IST0101"));
    }

    #[tokio::test]
    async fn delete_of_several_all_or_nothing_ignore_missing_and_all_of_a_kind() {
        let (_dir, api) = api();
        let three = ["a", "b", "c"]
            .map(|n| VS_TO_SUBSET.replace("name: a", &format!("name: {n}")))
            .join("---\n");
        api.apply(apply_request(&three, false)).await.unwrap();
        api.apply(apply_request(SERVICE, false)).await.unwrap();
        let refs = |names: &[&str]| -> Vec<pb::ObjectRef> {
            names
                .iter()
                .map(|n| pb::ObjectRef {
                    kind: "vs".into(),
                    namespace: String::new(),
                    name: (*n).into(),
                })
                .collect()
        };
        let names = |response: pb::DeleteResponse| -> Vec<String> {
            response.deleted.into_iter().map(|r| r.name).collect()
        };
        // One missing name: nothing is deleted.
        let request = pb::DeleteRequest {
            objects: refs(&["a", "x"]),
            ..Default::default()
        };
        let status = Status::from(api.delete(request.clone()).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(api.backend.snapshot().len(), 4);
        // Skipping the missing one deletes the rest; a name given twice is deleted once.
        let skip = pb::DeleteRequest {
            objects: refs(&["a", "x", "a"]),
            ignore_not_found: true,
            ..request
        };
        assert_eq!(names(api.delete(skip.clone()).await.unwrap()), ["a"]);
        // Nothing left to delete: success, and the revision does not move.
        let before = api.backend.snapshot().revision();
        let response = api.delete(skip).await.unwrap();
        assert!(response.deleted.is_empty());
        assert_eq!(response.revision, before);
        // --all takes every VirtualService of the namespace, not the Service.
        let all = pb::DeleteRequest {
            all_of_kind: "virtualservice".into(),
            ..Default::default()
        };
        assert_eq!(names(api.delete(all).await.unwrap()), ["b", "c"]);
        assert_eq!(api.backend.snapshot().len(), 1);
    }

    /// Many Services, so the whole apply takes long enough to be cut in the middle.
    fn many_services(n: usize) -> String {
        (0..n)
            .map(|i| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec:\n  ports: [{{port: 80}}]\n"))
            .collect::<Vec<_>>()
            .join("---\n")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_call_cancels_its_blocking_work() {
        let (_dir, api) = api();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
        let call = tokio::spawn(async move {
            api.blocking("test", move |_, cancel| {
                let _ = started_tx.send(());
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while !cancel.is_cancelled() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let _ = stopped_tx.send(cancel.is_cancelled());
                check(cancel)
            })
            .await
        });
        started_rx.await.unwrap();
        // What tonic does when the client resets the stream or closes the connection.
        call.abort();
        let saw_cancel = tokio::task::spawn_blocking(move || {
            stopped_rx.recv_timeout(std::time::Duration::from_secs(5))
        })
        .await
        .unwrap();
        assert_eq!(
            saw_cancel,
            Ok(true),
            "the blocking work must see the cancellation"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abort_mid_apply_stores_nothing_and_answers_unavailable() {
        let (_dir, api) = api();
        let abort = api.abort.clone();
        let text = many_services(3000);
        let handle = {
            let api = api.clone();
            tokio::spawn(async move { api.apply(apply_request(&text, false)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let cut = std::time::Instant::now();
        abort.cancel();
        let result = handle.await.unwrap();
        assert!(
            cut.elapsed() < std::time::Duration::from_secs(2),
            "stopped {:?} after the abort",
            cut.elapsed()
        );
        let status = Status::from(result.unwrap_err());
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(api.backend.snapshot().is_empty());
        assert_eq!(api.backend.snapshot().revision(), 0);
    }

    /// On a single-threaded runtime, work done inline by a call would stop every other task (the
    /// discovery streams) until it ends; a ticker task shows how long the runtime was held.
    #[tokio::test(flavor = "current_thread")]
    async fn a_large_apply_leaves_the_runtime_free() {
        let (_dir, api) = api();
        let text = many_services(2000);
        let stop = CancellationToken::new();
        let ticker = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut longest = std::time::Duration::ZERO;
                let mut last = std::time::Instant::now();
                while !stop.is_cancelled() {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    longest = longest.max(last.elapsed());
                    last = std::time::Instant::now();
                }
                longest
            }
        });
        let started = std::time::Instant::now();
        api.apply(apply_request(&text, true)).await.unwrap();
        let took = started.elapsed();
        stop.cancel();
        let longest = ticker.await.unwrap();
        assert!(
            longest < std::time::Duration::from_millis(300),
            "the runtime was held for {longest:?} during an apply of {took:?}"
        );
    }

    /// With `--registry kubernetes` the config comes from the cluster: writes are refused with a
    /// pointer to kubectl, get shows what is served, analyze also lists the refused objects.
    #[tokio::test]
    async fn cluster_mode_refuses_writes_and_analyze_lists_refused_objects() {
        use serde_json::json;
        let fake = weft_tests::kube_fake::FakeApiServer::start().await.unwrap();
        let vs = |name: &str, weight: i64| {
            json!({
                "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}, "weight": weight}]}]},
            })
        };
        let vss = "apis/networking.istio.io/v1/virtualservices";
        fake.apply_json(vss, vs("good", 100));
        fake.apply_json(vss, vs("bad", -1));
        let client =
            ::kube::Client::try_from(::kube::Config::new(fake.url().parse().unwrap())).unwrap();
        let shutdown = CancellationToken::new();
        let cluster = crate::kube::KubeRegistry::start(
            client,
            crate::kube::KubeOptions::default(),
            &shutdown,
        );
        cluster.wait_synced().await;
        let api = ConfigApi {
            backend: Backend::Cluster(cluster),
            proxies: None,
            abort: CancellationToken::new(),
            metrics: Arc::default(),
        };

        let status = Status::from(api.apply(apply_request(SERVICE, false)).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(api.metrics.rejected("read_only"), 1);
        assert!(
            status.message().contains("kubectl apply"),
            "{}",
            status.message()
        );
        let delete = pb::DeleteRequest {
            objects: vec![pb::ObjectRef {
                kind: "vs".into(),
                namespace: "default".into(),
                name: "good".into(),
            }],
            ..Default::default()
        };
        let status = Status::from(api.delete(delete).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);

        let got = api
            .get(pb::GetRequest {
                kind: "vs".into(),
                all_namespaces: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let names: Vec<_> = got
            .objects
            .iter()
            .map(|o| o.object.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(names, ["good"]);

        let analyzed = api
            .analyze(pb::AnalyzeRequest::default())
            .await
            .unwrap()
            .warnings;
        let refused: Vec<_> = analyzed
            .iter()
            .filter(|w| w.code == SCHEMA_VALIDATION_ERROR)
            .collect();
        assert_eq!(refused.len(), 1, "{analyzed:?}");
        assert_eq!(refused[0].object.as_ref().unwrap().name, "bad");
        assert!(
            refused[0].detail.contains("spec.http[0].route[0].weight:"),
            "{}",
            refused[0].detail
        );
        shutdown.cancel();
    }
}
