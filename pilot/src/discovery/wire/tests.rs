//! Responses assembled from pieces decode, with the generated prost types a sidecar uses, into
//! exactly the `ProxyConfig` that `translate` returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(test)] // the whole file is the test module; marks it for tools that scan for test code
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message as _;
use serde_json::Value;
use weft_pilot_config::translate::{
    MeshOptions, Workload, translate, translate_local, translate_outbound,
};
use weft_pilot_config::{Resource, parse_documents};

use super::*;

/// One golden case of `weft-pilot-config`: its objects, workloads, node and mesh options.
struct Case {
    name: String,
    resources: Vec<Resource>,
    workloads: Vec<Workload>,
    node: Workload,
    mesh: MeshOptions,
}

fn golden_cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/testdata/golden");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 10,
        "golden cases not found in {}",
        root.display()
    );
    dirs.iter().map(|dir| load(dir)).collect()
}

fn load(dir: &Path) -> Case {
    let yaml = std::fs::read_to_string(dir.join("input.yaml")).unwrap();
    let resources = match parse_documents("input.yaml", &yaml, "default") {
        Ok(resources) => resources,
        Err(errors) => panic!("{}: {errors}", dir.display()),
    };
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("workloads.json")).unwrap())
            .unwrap();
    let text = |w: &Value, key: &str, default: &str| {
        w.get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let workloads: Vec<Workload> = file["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| Workload {
            name: text(w, "name", ""),
            namespace: text(w, "namespace", "default"),
            service_account: text(w, "service_account", "default"),
            labels: w
                .get("labels")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            ip: text(w, "ip", ""),
            ports: w
                .get("ports")
                .and_then(Value::as_array)
                .map(|p| p.iter().map(|n| n.as_u64().unwrap() as u32).collect())
                .unwrap_or_default(),
            inbound_port: w
                .get("inbound_port")
                .and_then(Value::as_u64)
                .map_or(15006, |p| p as u32),
            captured: w.get("captured").and_then(Value::as_bool).unwrap_or(true),
            workload_name: String::new(),
            no_sidecar: false,
        })
        .collect();
    let node_name = file["node"].as_str().unwrap();
    let node = workloads
        .iter()
        .find(|w| w.name == node_name)
        .unwrap()
        .clone();
    let mut mesh = MeshOptions::default();
    if let Some(suffix) = file
        .pointer("/mesh/mirror_shadow_suffix")
        .and_then(Value::as_bool)
    {
        mesh.mirror_shadow_suffix = suffix;
    }
    if let Some(percent) = file
        .pointer("/mesh/sampling_percent")
        .and_then(Value::as_f64)
    {
        mesh.sampling_percent = percent;
    }
    Case {
        name: dir.file_name().unwrap().to_string_lossy().into_owned(),
        resources,
        workloads,
        node,
        mesh,
    }
}

/// The message as the bytes that go on the wire.
/// The mesh's peers as pilot sends them with every response.
fn peers_of(workloads: &[Workload], mesh: &MeshOptions) -> Bytes {
    encode_peers(&weft_pilot_config::translate::peers::build(
        workloads,
        &mesh.trust_domain,
    ))
}

fn concat(message: &Message) -> Vec<u8> {
    message
        .pieces
        .iter()
        .flat_map(|p| p.iter().copied())
        .collect()
}

/// The gRPC frame's payload, after checking its 5-byte prefix.
fn payload(wire: &[u8]) -> &[u8] {
    assert_eq!(wire[0], 0, "not compressed");
    let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
    assert_eq!(len, wire.len() - 5, "length prefix");
    &wire[5..]
}

#[test]
fn assembled_responses_decode_into_what_translate_returns() {
    for case in golden_cases() {
        let expected = translate(&case.resources, &case.workloads, &case.node, &case.mesh);
        let outbound = translate_outbound(&case.resources, &case.workloads, &case.node, &case.mesh);
        let local = translate_local(&case.resources, &case.node, &case.mesh);
        let shared = encode_outbound(&outbound);
        let message = Message::response(
            "42",
            "7-3",
            &local,
            &shared,
            &peers_of(&case.workloads, &case.mesh),
        )
        .unwrap();
        let wire = concat(&message);
        assert_eq!(message.len(), wire.len());
        let decoded = pb::DiscoveryResponse::decode(payload(&wire)).unwrap();
        assert_eq!(
            decoded,
            pb::DiscoveryResponse {
                version_info: "42".into(),
                nonce: "7-3".into(),
                config: Some(expected.clone()),
            },
            "{}",
            case.name
        );
        // Field for field the bytes prost writes for the whole response: the same length always,
        // the same bytes whenever the config has no maps (whose order prost does not fix).
        let whole = pb::DiscoveryResponse {
            version_info: "42".into(),
            nonce: "7-3".into(),
            config: Some(expected),
        };
        assert_eq!(whole.encoded_len(), wire.len() - 5, "{}", case.name);
    }
}

#[test]
fn assembled_bytes_equal_prosts_encoding() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec:
  ports: [{name: http, port: 8000, targetPort: 80}, {name: tcp-db, port: 5432}]
  selector: {app: httpbin}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin}
spec:
  host: httpbin
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin}
spec:
  hosts: [httpbin]
  http:
  - route:
    - {destination: {host: httpbin, subset: v1}, weight: 90}
    - {destination: {host: httpbin, subset: v2}, weight: 10}
    mirror: {host: httpbin, subset: v2}
    timeout: 3s
";
    let resources = parse_documents("t.yaml", yaml, "default").unwrap();
    let node = Workload {
        name: "sleep".into(),
        namespace: "default".into(),
        service_account: "sleep".into(),
        ip: "10.0.0.1".into(),
        inbound_port: 15006,
        captured: true,
        workload_name: String::new(),
        no_sidecar: false,
        ..Workload::default()
    };
    let workloads = vec![node.clone()];
    let mesh = MeshOptions::default();
    let expected = pb::DiscoveryResponse {
        version_info: "3".into(),
        nonce: "1-1".into(),
        config: Some(translate(&resources, &workloads, &node, &mesh)),
    };
    let shared = encode_outbound(&translate_outbound(&resources, &workloads, &node, &mesh));
    let local = translate_local(&resources, &node, &mesh);
    let message =
        Message::response("3", "1-1", &local, &shared, &peers_of(&workloads, &mesh)).unwrap();
    assert_eq!(payload(&concat(&message)), expected.encode_to_vec());
}

#[test]
fn every_response_refers_to_the_same_shared_bytes() {
    let case = golden_cases().remove(0);
    let outbound = translate_outbound(&case.resources, &case.workloads, &case.node, &case.mesh);
    let shared = encode_outbound(&outbound);
    let local = translate_local(&case.resources, &case.node, &case.mesh);
    let a = Message::response("1", "1-1", &local, &shared, &Bytes::new()).unwrap();
    let b = Message::response("1", "2-1", &local, &shared, &Bytes::new()).unwrap();
    assert_eq!(a.pieces[1].as_ptr(), shared.as_ptr());
    assert_eq!(b.pieces[1].as_ptr(), shared.as_ptr());
}

async fn next_frame(body: &mut ResponseBody) -> Option<Frame<Bytes>> {
    use http_body::Body as _;
    std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
        .await
        .map(|r| r.unwrap())
}

/// Polls frames until the body has one ready (or ends), without waiting for more to be posted.
fn ready_frames(body: &mut ResponseBody) -> Vec<Frame<Bytes>> {
    use http_body::Body as _;
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut frames = Vec::new();
    while let Poll::Ready(Some(frame)) = Pin::new(&mut *body).poll_frame(&mut cx) {
        frames.push(frame.unwrap());
    }
    frames
}

fn data_of(frames: Vec<Frame<Bytes>>) -> Vec<u8> {
    frames
        .into_iter()
        .flat_map(|f| f.into_data().unwrap().to_vec())
        .collect()
}

fn two_messages() -> (Message, Message) {
    let case = golden_cases().remove(0);
    let shared = encode_outbound(&translate_outbound(
        &case.resources,
        &case.workloads,
        &case.node,
        &case.mesh,
    ));
    let local = translate_local(&case.resources, &case.node, &case.mesh);
    (
        Message::response("1", "1-1", &local, &shared, &Bytes::new()).unwrap(),
        Message::response("2", "1-2", &local, &shared, &Bytes::new()).unwrap(),
    )
}

#[tokio::test]
async fn the_body_carries_each_message_then_ok_trailers() {
    let (first, second) = two_messages();
    let (outbox, mut body) = outbox();
    assert!(ready_frames(&mut body).is_empty(), "nothing posted yet");
    outbox.post(first.clone()).unwrap();
    assert_eq!(data_of(ready_frames(&mut body)), concat(&first));
    outbox.post(second.clone()).unwrap();
    drop(outbox);
    let mut data = Vec::new();
    let trailers = loop {
        let frame = next_frame(&mut body)
            .await
            .expect("trailers before the end");
        match frame.into_data() {
            Ok(bytes) => data.extend_from_slice(&bytes),
            Err(frame) => break frame.into_trailers().unwrap(),
        }
    };
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert!(next_frame(&mut body).await.is_none());
    assert_eq!(data, concat(&second));
}

#[tokio::test]
async fn a_newer_message_replaces_one_still_waiting_but_not_one_being_written() {
    let (first, second) = two_messages();
    let (outbox, mut body) = outbox();
    // Both posted before the body ran: only the newer view goes out.
    outbox.post(first.clone()).unwrap();
    outbox.post(second.clone()).unwrap();
    assert_eq!(data_of(ready_frames(&mut body)), concat(&second));

    // A message the body has started is written whole; the next one follows it.
    let (outbox, mut body) = super::outbox();
    outbox.post(first.clone()).unwrap();
    let started = next_frame(&mut body).await.unwrap().into_data().unwrap();
    outbox.post(second.clone()).unwrap();
    let mut data = started.to_vec();
    data.extend(data_of(ready_frames(&mut body)));
    let mut expected = concat(&first);
    expected.extend(concat(&second));
    assert_eq!(data, expected);
}

#[tokio::test]
async fn a_body_that_is_gone_refuses_posts_and_wakes_on_posts() {
    let (first, second) = two_messages();
    let (outbox, mut body) = outbox();
    // A waiting body is woken by a post.
    let poll = tokio::spawn(async move {
        let frame = next_frame(&mut body).await;
        (frame.is_some(), body)
    });
    tokio::task::yield_now().await;
    outbox.post(first).unwrap();
    let (got, body) = poll.await.unwrap();
    assert!(got);
    drop(body);
    assert!(outbox.post(second).is_err(), "the call has ended");
}

#[tokio::test]
async fn calls_without_a_client_certificate_or_to_other_methods_are_refused() {
    use tower::ServiceExt as _;
    let ctx = Arc::new(crate::discovery::PushContext::new(
        1,
        1,
        Arc::new(crate::discovery::Objects::new(Vec::new())),
        Arc::new(Vec::new()),
    ));
    let (_contexts_tx, contexts) = tokio::sync::watch::channel(ctx);
    let (_pods_tx, pods) = tokio::sync::watch::channel(Arc::default());
    let discovery = crate::discovery::Discovery::new(
        contexts,
        Some(crate::registry::Registry::new(
            std::time::Duration::from_secs(1),
            false,
        )),
        pods,
        false,
        crate::discovery::Translator::new(MeshOptions::default(), 1).unwrap(),
        Arc::default(),
        tokio_util::sync::CancellationToken::new(),
        std::time::Duration::ZERO,
    );
    let call = |path: &'static str| {
        let discovery = discovery.clone();
        async move {
            let request = http::Request::builder()
                .method("POST")
                .uri(path)
                .header("content-type", "application/grpc")
                .body(tonic::body::Body::empty())
                .unwrap();
            let response = discovery.oneshot(request).await.unwrap();
            let status = response.headers().get("grpc-status").cloned();
            (response.status(), status)
        }
    };
    let (http_status, grpc) = call(STREAM_CONFIG_PATH).await;
    assert_eq!(http_status, http::StatusCode::OK);
    assert_eq!(
        grpc.unwrap(),
        (tonic::Code::Unauthenticated as i32).to_string().as_str()
    );
    let (_, grpc) = call("/weft.discovery.v1.DiscoveryService/Other").await;
    assert_eq!(
        grpc.unwrap(),
        (tonic::Code::Unimplemented as i32).to_string().as_str()
    );
}
