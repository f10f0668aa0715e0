//! The patcher against an in-process API server (hyper on 127.0.0.1:0, kube's client through
//! `Config::new`): what it sends, and that it follows the root file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(test)] // the whole file is the test module; marks it for tools that scan for test code
use super::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, ValidatingWebhook, WebhookClientConfig,
};
use kube::api::ObjectMeta;

const MUTATING_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/weft-sidecar-injector";
const VALIDATING_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/weft-validator";

/// One PATCH the API server received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    content_type: String,
    body: Value,
}

/// The fake API server's state: objects by path, PATCHes received, requests to fail first.
#[derive(Default)]
struct State {
    objects: HashMap<String, Value>,
    patches: Vec<Received>,
    fail_next: usize,
}

fn client_config(service: &str) -> WebhookClientConfig {
    WebhookClientConfig {
        service: Some(
            k8s_openapi::api::admissionregistration::v1::ServiceReference {
                name: "weft-pilot".into(),
                namespace: "weft-system".into(),
                path: Some(service.into()),
                port: Some(443),
            },
        ),
        ..WebhookClientConfig::default()
    }
}

fn configurations() -> HashMap<String, Value> {
    let meta = |name: &str| ObjectMeta {
        name: Some(name.into()),
        resource_version: Some("1".into()),
        ..ObjectMeta::default()
    };
    let mutating = MutatingWebhookConfiguration {
        metadata: meta(MUTATING_CONFIGURATION),
        webhooks: Some(
            [
                "namespace.sidecar-injector.weft.dev",
                "object.sidecar-injector.weft.dev",
            ]
            .map(|name| MutatingWebhook {
                name: name.into(),
                client_config: client_config("/inject"),
                admission_review_versions: vec!["v1".into()],
                side_effects: "None".into(),
                ..MutatingWebhook::default()
            })
            .to_vec(),
        ),
    };
    let validating = ValidatingWebhookConfiguration {
        metadata: meta(VALIDATING_CONFIGURATION),
        webhooks: Some(vec![ValidatingWebhook {
            name: "validation.weft.dev".into(),
            client_config: client_config("/validate"),
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            ..ValidatingWebhook::default()
        }]),
    };
    HashMap::from([
        (
            MUTATING_PATH.to_string(),
            serde_json::to_value(mutating).unwrap(),
        ),
        (
            VALIDATING_PATH.to_string(),
            serde_json::to_value(validating).unwrap(),
        ),
    ])
}

fn status(code: u16, reason: &str) -> http::Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code});
    http::Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn answer(
    state: Arc<Mutex<State>>,
    request: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let content_type = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let mut state = state.lock().unwrap();
    if state.fail_next > 0 {
        state.fail_next -= 1;
        return status(503, "ServiceUnavailable");
    }
    let Some(object) = state.objects.get(&path).cloned() else {
        return status(404, "NotFound");
    };
    let object = if method == http::Method::PATCH {
        let patch: Value = serde_json::from_slice(&body).unwrap();
        state.patches.push(Received {
            path: path.clone(),
            content_type,
            body: patch.clone(),
        });
        let mut patched = object;
        let ops: json_patch::Patch = serde_json::from_value(patch).unwrap();
        if json_patch::patch(&mut patched, &ops).is_err() {
            return status(422, "Invalid");
        }
        let version: u64 = patched["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        patched["metadata"]["resourceVersion"] = json!((version + 1).to_string());
        state.objects.insert(path, patched.clone());
        patched
    } else {
        object
    };
    http::Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(object.to_string())))
        .unwrap()
}

/// Starts the fake API server; returns a kube client for it.
async fn api_server(state: Arc<Mutex<State>>) -> kube::Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(state, r).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    let config = kube::Config::new(url.parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn root_pem() -> String {
    let dir = tempfile::tempdir().unwrap();
    let authority =
        weft_ca::authority::Authority::load_or_create(dir.path(), Default::default()).unwrap();
    authority.root_pem().to_string()
}

fn bundles(state: &Mutex<State>, path: &str) -> Vec<String> {
    let state = state.lock().unwrap();
    state.objects[path]["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let b64 = w["clientConfig"]["caBundle"].as_str().unwrap_or("");
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            )
            .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn every_webhook_gets_the_root_in_one_guarded_json_patch() {
    let state = Arc::new(Mutex::new(State {
        objects: configurations(),
        ..State::default()
    }));
    let client = api_server(state.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root-cert.pem");
    let pem = root_pem();
    std::fs::write(&root_file, &pem).unwrap();
    let patcher = Patcher::new(client, root_file);

    assert_eq!(patcher.patch_all(&pem).await.unwrap(), 3);
    let patches = state.lock().unwrap().patches.clone();
    assert_eq!(patches.len(), 2);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&pem);
    assert_eq!(patches[0].path, MUTATING_PATH);
    assert_eq!(patches[0].content_type, "application/json-patch+json");
    assert_eq!(
        patches[0].body,
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
            {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": b64},
            {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": b64},
        ])
    );
    assert_eq!(patches[1].path, VALIDATING_PATH);
    assert_eq!(patches[1].body.as_array().unwrap().len(), 2);
    assert_eq!(bundles(&state, MUTATING_PATH), [pem.clone(), pem.clone()]);
    assert_eq!(bundles(&state, VALIDATING_PATH), std::slice::from_ref(&pem));

    // Already equal: read, nothing sent.
    assert_eq!(patcher.patch_all(&pem).await.unwrap(), 0);
    assert_eq!(state.lock().unwrap().patches.len(), 2);

    // A configuration that does not exist (not installed yet) is not an error.
    state.lock().unwrap().objects.remove(VALIDATING_PATH);
    let other = root_pem();
    assert_eq!(patcher.patch_all(&other).await.unwrap(), 2);
}

#[tokio::test]
async fn the_bundle_follows_the_root_file_and_survives_an_api_server_outage() {
    let state = Arc::new(Mutex::new(State {
        objects: configurations(),
        // The first rounds meet an API server that is down: retried with backoff.
        fail_next: 2,
        ..State::default()
    }));
    let client = api_server(state.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root-cert.pem");
    let first = root_pem();
    std::fs::write(&root_file, &first).unwrap();
    let patcher = Patcher {
        poll: Duration::from_millis(50),
        ..Patcher::new(client, root_file.clone())
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(patcher.keep_patched(shutdown.clone()));

    let wait_for = |want: String| {
        let state = state.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while bundles(&state, MUTATING_PATH) != [want.clone(), want.clone()]
                || bundles(&state, VALIDATING_PATH) != [want.clone()]
            {
                assert!(Instant::now() < deadline, "caBundle never became the root");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(first.clone()).await;
    assert_eq!(state.lock().unwrap().patches.len(), 2);

    // A rotation: the file holds the old and the new root, then the new one alone.
    let second = root_pem();
    let both = format!("{first}{second}");
    weft_ca::authority::write_atomic(&root_file, both.as_bytes(), 0o644).unwrap();
    wait_for(both).await;
    // A half-written file (no certificate) is never published.
    std::fs::write(&root_file, "-----BEGIN CERT").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(bundles(&state, MUTATING_PATH)[0].contains(&second));
    weft_ca::authority::write_atomic(&root_file, second.as_bytes(), 0o644).unwrap();
    wait_for(second).await;
    assert_eq!(state.lock().unwrap().patches.len(), 6);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
