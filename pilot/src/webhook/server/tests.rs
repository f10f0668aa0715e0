//! Requests through the HTTP handler: routes, bounded bodies, 400s with reasons.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(test)] // the whole file is the test module; marks it for tools that scan for test code
use super::*;
use http_body_util::StreamBody;
use hyper::body::Frame;

fn admission() -> Arc<Admission> {
    Arc::new(Admission::new(crate::inject::Options::default()))
}

fn request(method: Method, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(body.into()))
        .unwrap()
}

async fn text_of(response: Response<Full<Bytes>>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn malformed_json_is_a_400_with_the_reason() {
    let response = handle(
        &admission(),
        request(Method::POST, "/inject", "{\"kind\": "),
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let text = text_of(response).await;
    assert!(text.starts_with("not an AdmissionReview: "), "{text}");
    assert!(text.contains("EOF"), "{text}");
    let response = handle(&admission(), request(Method::POST, "/validate", "42")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_review_is_answered_as_json() {
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/corpus/admission_review/pod-httpbin-v1.json"
    ))
    .unwrap();
    let response = handle(&admission(), request(Method::POST, "/inject", body)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let review: serde_json::Value = serde_json::from_str(&text_of(response).await).unwrap();
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");
}

#[tokio::test]
async fn oversize_bodies_are_refused_declared_or_streamed() {
    let big = vec![b' '; MAX_BODY_BYTES + 1];
    let response = handle(&admission(), request(Method::POST, "/inject", big.clone())).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let mut declared = request(Method::POST, "/validate", "{}");
    declared.headers_mut().insert(
        header::CONTENT_LENGTH,
        header::HeaderValue::from(MAX_BODY_BYTES + 1),
    );
    let response = handle(&admission(), declared).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // No length announced: cut off once the limit is passed, in chunks.
    let chunks = big
        .chunks(64 * 1024)
        .map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::copy_from_slice(c))))
        .collect::<Vec<_>>();
    let streamed = Request::builder()
        .method(Method::POST)
        .uri("/inject")
        .body(StreamBody::new(tokio_stream::iter(chunks)))
        .unwrap();
    let response = handle(&admission(), streamed).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let text = text_of(response).await;
    assert!(text.contains(&MAX_BODY_BYTES.to_string()), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_ends_times_out() {
    let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let stalled = Request::builder()
        .method(Method::POST)
        .uri("/inject")
        .body(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    let response = handle(&admission(), stalled).await;
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
}

#[tokio::test]
async fn other_paths_and_methods() {
    let response = handle(&admission(), request(Method::GET, "/inject", "")).await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let response = handle(&admission(), request(Method::POST, "/mutate", "")).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = handle(&admission(), request(Method::GET, "/ready", "")).await;
    assert_eq!(response.status(), StatusCode::OK);
}
