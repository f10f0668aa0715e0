//! An in-process Kubernetes API server for tests: list, watch (with resourceVersions, bookmarks,
//! 410 Gone and dropped connections), get and server-side apply, over plain HTTP on
//! 127.0.0.1:0. Objects are JSON built from k8s-openapi types (or any JSON, for Istio kinds).
//!
//! It answers as the real API server does where the clients' behaviour depends on it:
//! - a list returns every object of the collection with the collection's resourceVersion;
//! - a watch from resourceVersion R first replays the events after R (so a client resuming after
//!   a dropped connection misses nothing), then streams new ones;
//! - a watch from a version older than the last [`FakeApiServer::expire`] gets one `ERROR` event
//!   with a 410 `Expired` Status, as a compacted etcd gives, and the client must list again;
//! - a collection marked [`FakeApiServer::unserve`] answers 404 (a CRD version the cluster does
//!   not serve).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

type Body = BoxBody<Bytes, Infallible>;

/// The fake API server; stops when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct State {
    /// The cluster's resourceVersion counter (one for every collection, like etcd's revision).
    rv: u64,
    /// Collection path (`api/v1/pods`, `apis/networking.istio.io/v1/virtualservices`) -> objects.
    collections: BTreeMap<String, Collection>,
    /// Collections (or API group versions, as path prefixes) answering 404.
    not_served: BTreeSet<String>,
    /// Watches from a resourceVersion below this get 410 Gone.
    expired_below: u64,
    watches: Vec<Watch>,
    /// Every request, as `METHOD path?query` (for assertions on what clients did).
    requests: Vec<String>,
}

#[derive(Debug, Default)]
struct Collection {
    /// (namespace or "", name) -> object.
    objects: BTreeMap<(String, String), Value>,
    /// (resourceVersion, event type, object) of every change, for watches resuming.
    log: Vec<(u64, &'static str, Value)>,
}

#[derive(Debug)]
struct Watch {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    fn matches(&self, collection: &str, object: &Value) -> bool {
        self.collection == collection
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| meta(object, "namespace") == ns)
            && self
                .name
                .as_deref()
                .is_none_or(|name| meta(object, "name") == name)
    }
}

fn meta<'a>(object: &'a Value, field: &str) -> &'a str {
    object
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// A request path taken apart: `/api/v1/namespaces/ns/pods/name`.
#[derive(Debug)]
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (format!("api/{version}"), rest),
        ["apis", group, version, rest @ ..] => (format!("apis/{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural, name @ ..] => (Some(ns.to_string()), *plural, name.first()),
        [plural, name @ ..] => (None, *plural, name.first()),
        [] => return None,
    };
    Some(Target {
        collection: format!("{prefix}/{plural}"),
        namespace,
        name: name.map(|n| n.to_string()),
    })
}

/// The collection path of a k8s-openapi type.
pub fn collection_of<K: k8s_openapi::Resource>() -> String {
    collection(K::API_VERSION, K::URL_PATH_SEGMENT)
}

/// The collection path of `apiVersion` and resource `plural`.
pub fn collection(api_version: &str, plural: &str) -> String {
    if api_version.contains('/') {
        format!("apis/{api_version}/{plural}")
    } else {
        format!("api/{api_version}/{plural}")
    }
}

impl FakeApiServer {
    /// Starts serving on 127.0.0.1:0.
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the fake API server")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            ..State::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server (for processes: `KUBECONFIG=<path>`).
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user:\n    token: fake\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(&path, text).context("write the kubeconfig")?;
        Ok(path)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates or replaces a typed object (ADDED or MODIFIED); returns its new resourceVersion.
    pub fn apply<K: k8s_openapi::Resource + serde::Serialize>(&self, object: &K) -> u64 {
        let value = serde_json::to_value(object).unwrap_or(Value::Null);
        self.apply_json(&collection_of::<K>(), value)
    }

    /// Creates or replaces an object of `collection` given as JSON (it must carry apiVersion,
    /// kind and metadata.name).
    pub fn apply_json(&self, collection: &str, object: Value) -> u64 {
        self.lock().store(collection, object, true)
    }

    /// Changes an object without any watch event, as if the events were lost to compaction; only
    /// a list shows it (use with [`FakeApiServer::expire`]).
    pub fn apply_silently<K: k8s_openapi::Resource + serde::Serialize>(&self, object: &K) -> u64 {
        let value = serde_json::to_value(object).unwrap_or(Value::Null);
        self.lock().store(&collection_of::<K>(), value, false)
    }

    /// Deletes an object without any watch event, as if the event was lost to compaction (use
    /// with [`FakeApiServer::expire`]); returns whether it existed.
    pub fn delete_silently(&self, collection: &str, namespace: &str, name: &str) -> bool {
        let mut state = self.lock();
        state.rv += 1;
        state.collections.get_mut(collection).is_some_and(|c| {
            c.objects
                .remove(&(namespace.to_string(), name.to_string()))
                .is_some()
        })
    }

    /// Deletes an object (DELETED); returns whether it existed.
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) -> bool {
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        let Some(coll) = state.collections.get_mut(collection) else {
            return false;
        };
        let Some(mut object) = coll
            .objects
            .remove(&(namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        coll.log.push((rv, "DELETED", object.clone()));
        state.broadcast(collection, "DELETED", &object);
        true
    }

    /// One object, as stored.
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .collections
            .get(collection)?
            .objects
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that asked for bookmarks;
    /// returns how many got one.
    pub fn bookmark(&self) -> usize {
        let mut state = self.lock();
        let rv = state.rv.to_string();
        let mut sent = 0;
        state.watches.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let event = json!({
                "type": "BOOKMARK",
                "object": {"metadata": {"resourceVersion": rv}},
            });
            let ok = w.tx.send(line(&event)).is_ok();
            sent += usize::from(ok);
            ok
        });
        sent
    }

    /// Compacts history: every open watch gets a 410 Gone ERROR event and ends, and watches from
    /// an older resourceVersion are refused the same way, so clients must list again.
    pub fn expire(&self) {
        let mut state = self.lock();
        state.expired_below = state.rv;
        for coll in state.collections.values_mut() {
            coll.log.clear();
        }
        for w in state.watches.drain(..) {
            let _ = w.tx.send(line(&gone()));
        }
    }

    /// Ends every open watch connection (the client resumes from its last resourceVersion).
    pub fn drop_watches(&self) {
        self.lock().watches.clear();
    }

    /// Makes a collection, or every collection under a path prefix (`apis/networking.istio.io/v1alpha3`),
    /// answer 404.
    pub fn unserve(&self, prefix: &str) {
        self.lock().not_served.insert(prefix.to_string());
    }

    /// Watches open on `collection` now.
    pub fn open_watches(&self, collection: &str) -> usize {
        self.lock()
            .watches
            .iter()
            .filter(|w| w.collection == collection && !w.tx.is_closed())
            .count()
    }

    /// Requests received so far whose `METHOD path?query` contains `needle`.
    pub fn requests(&self, needle: &str) -> Vec<String> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.contains(needle))
            .cloned()
            .collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
        self.lock().watches.clear();
    }
}

impl State {
    fn store(&mut self, collection: &str, mut object: Value, notify: bool) -> u64 {
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"].get("uid").is_none() {
            object["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        let key = (
            meta(&object, "namespace").to_string(),
            meta(&object, "name").to_string(),
        );
        let coll = self.collections.entry(collection.to_string()).or_default();
        let kind = if coll.objects.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        if notify {
            coll.log.push((rv, kind, object.clone()));
            self.broadcast(collection, kind, &object);
        }
        rv
    }

    fn broadcast(&mut self, collection: &str, kind: &str, object: &Value) {
        let event = line(&json!({"type": kind, "object": object}));
        self.watches
            .retain(|w| !w.matches(collection, object) || w.tx.send(event.clone()).is_ok());
    }

    fn served(&self, collection: &str) -> bool {
        !self
            .not_served
            .iter()
            .any(|prefix| collection == prefix || collection.starts_with(&format!("{prefix}/")))
    }
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn gone() -> Value {
    json!({
        "type": "ERROR",
        "object": status(410, "Expired", "too old resource version"),
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn full(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `metadata.name=x` (the only field selector the clients under test use).
fn field_name(query: &BTreeMap<String, String>) -> Option<String> {
    query
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name="))
        .map(str::to_string)
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let path = req.uri().path().to_string();
    let query = query(&req);
    lock().requests.push(format!(
        "{} {}?{}",
        req.method(),
        path,
        req.uri().query().unwrap_or("")
    ));
    let Some(target) = parse_path(&path) else {
        return full(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "no such path"),
        );
    };
    if !lock().served(&target.collection) {
        return full(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    match *req.method() {
        Method::GET if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(state, &target, &query)
        }
        Method::GET => match &target.name {
            Some(name) => {
                let object = lock().collections.get(&target.collection).and_then(|c| {
                    c.objects
                        .get(&(target.namespace.clone().unwrap_or_default(), name.clone()))
                        .cloned()
                });
                match object {
                    Some(object) => full(StatusCode::OK, &object),
                    None => full(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found")),
                }
            }
            None => list(&lock(), &target, &query),
        },
        Method::PATCH => {
            let apply = req
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/apply-patch"));
            let Some(name) = target.name.clone() else {
                return full(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &status(405, "MethodNotAllowed", "patch needs a name"),
                );
            };
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return full(StatusCode::BAD_REQUEST, &status(400, "BadRequest", "body")),
            };
            let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                return full(
                    StatusCode::BAD_REQUEST,
                    &status(400, "BadRequest", "not JSON"),
                );
            };
            if !apply || !query.contains_key("fieldManager") {
                return full(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    &status(
                        415,
                        "UnsupportedMediaType",
                        "only server-side apply with a fieldManager",
                    ),
                );
            }
            let namespace = target.namespace.clone().unwrap_or_default();
            let mut state = lock();
            let current = state
                .collections
                .get(&target.collection)
                .and_then(|c| c.objects.get(&(namespace.clone(), name.clone())).cloned());
            // Server-side apply of the fields given: maps merge key by key, the rest is replaced.
            let mut object = current
                .unwrap_or_else(|| json!({"metadata": {"name": name, "namespace": namespace}}));
            merge(&mut object, &patch);
            state.store(&target.collection, object.clone(), true);
            let stored = state
                .collections
                .get(&target.collection)
                .and_then(|c| c.objects.get(&(namespace, name)).cloned())
                .unwrap_or(object);
            full(StatusCode::OK, &stored)
        }
        _ => full(
            StatusCode::METHOD_NOT_ALLOWED,
            &status(405, "MethodNotAllowed", "not implemented by the fake"),
        ),
    }
}

fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(into), Value::Object(patch)) => {
            for (k, v) in patch {
                match into.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        into.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (into, patch) => *into = patch.clone(),
    }
}

fn list(state: &State, target: &Target, query: &BTreeMap<String, String>) -> Response<Body> {
    let name = field_name(query);
    let items: Vec<Value> = state
        .collections
        .get(&target.collection)
        .map(|c| {
            c.objects
                .iter()
                .filter(|((ns, _), _)| target.namespace.as_ref().is_none_or(|t| t == ns))
                .filter(|((_, n), _)| name.as_ref().is_none_or(|want| want == n))
                .map(|(_, o)| o.clone())
                .collect()
        })
        .unwrap_or_default();
    full(
        StatusCode::OK,
        &json!({
            "apiVersion": "v1",
            "kind": "List",
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items,
        }),
    )
}

fn watch(
    state: &Arc<Mutex<State>>,
    target: &Target,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel();
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        if from < state.expired_below {
            let _ = tx.send(line(&gone()));
        } else {
            let w = Watch {
                collection: target.collection.clone(),
                namespace: target.namespace.clone(),
                name: field_name(query),
                bookmarks: query
                    .get("allowWatchBookmarks")
                    .is_some_and(|v| v == "true"),
                tx,
            };
            if let Some(coll) = state.collections.get(&target.collection) {
                for (rv, kind, object) in &coll.log {
                    if *rv > from && w.matches(&target.collection, object) {
                        let _ = w.tx.send(line(&json!({"type": kind, "object": object})));
                    }
                }
            }
            state.watches.push(w);
        }
    }
    let body = StreamBody::new(
        UnboundedReceiverStream::new(rx).map(|bytes| Ok::<_, Infallible>(Frame::data(bytes))),
    );
    let mut response = Response::new(BodyExt::boxed(body));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_collections() {
        let t = parse_path("/api/v1/namespaces/ns1/configmaps/istio-ca-root-cert").unwrap();
        assert_eq!(t.collection, "api/v1/configmaps");
        assert_eq!(t.namespace.as_deref(), Some("ns1"));
        assert_eq!(t.name.as_deref(), Some("istio-ca-root-cert"));
        let t = parse_path("/apis/networking.istio.io/v1/virtualservices").unwrap();
        assert_eq!(t.collection, "apis/networking.istio.io/v1/virtualservices");
        assert!(t.namespace.is_none() && t.name.is_none());
        let t = parse_path("/api/v1/namespaces").unwrap();
        assert_eq!(t.collection, "api/v1/namespaces");
        assert_eq!(percent_decode("metadata.name%3Dx"), "metadata.name=x");
    }
}
