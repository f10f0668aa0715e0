//! TokenReview against an in-process HTTP server on loopback that plays the API server: it records
//! each request (the real bytes kube's client sent) and answers with JSON built from k8s-openapi's
//! types.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::UserInfo;

use super::*;

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    authorization: Option<String>,
    body: serde_json::Value,
}

/// What the fake API server answers.
#[derive(Clone)]
enum Answer {
    Review(TokenReviewStatus),
    Error(StatusCode, &'static str),
    Hang,
}

struct FakeApiServer {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_api_server(answer: Answer) -> FakeApiServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (log, answer) = (log.clone(), answer.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (log, answer) = (log.clone(), answer.clone());
                    async move { Ok::<_, Infallible>(respond(req, &log, answer).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    FakeApiServer { url, seen, task }
}

async fn respond(
    req: Request<Incoming>,
    log: &Mutex<Vec<Seen>>,
    answer: Answer,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    log.lock().unwrap().push(Seen {
        method,
        path,
        authorization,
        body: body.clone(),
    });
    let json = |code: StatusCode, v: serde_json::Value| {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())))
            .unwrap()
    };
    match answer {
        Answer::Review(status) => {
            // The API server echoes the spec and fills the status.
            let mut review: TokenReview = serde_json::from_value(body).unwrap();
            review.status = Some(status);
            json(StatusCode::CREATED, serde_json::to_value(&review).unwrap())
        }
        Answer::Error(code, message) => json(
            code,
            serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": message, "reason": code.canonical_reason(), "code": code.as_u16()
            }),
        ),
        Answer::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            json(StatusCode::OK, serde_json::Value::Null)
        }
    }
}

fn reviewer(url: &str, timeout: Duration) -> TokenReviewer {
    crate::tls::install_default_provider();
    let mut config = kube::Config::new(url.parse().unwrap());
    // The CA's own service-account token: what the API server authenticates the review with.
    config.auth_info.token = Some("the-ca-own-token".to_owned().into());
    TokenReviewer::from_config(config, "istio-ca", timeout).unwrap()
}

/// What a review of a token answered with `answer` fails with (the fake server stops on return).
async fn refusal(answer: Answer, timeout: Duration) -> ReviewError {
    let api = fake_api_server(answer).await;
    reviewer(&api.url, timeout).review("t").await.unwrap_err()
}

fn authenticated(username: &str, audiences: &[&str]) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(true),
        audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
        user: Some(UserInfo {
            username: Some(username.to_owned()),
            groups: Some(vec!["system:serviceaccounts".into()]),
            ..UserInfo::default()
        }),
        error: None,
    }
}

#[tokio::test]
async fn an_authenticated_service_account_is_the_identity() {
    let api = fake_api_server(Answer::Review(authenticated(
        "system:serviceaccount:default:sleep",
        &["istio-ca"],
    )))
    .await;
    let r = reviewer(&api.url, DEFAULT_TIMEOUT);
    assert_eq!(
        r.review("workload-token").await.unwrap(),
        ("default".to_owned(), "sleep".to_owned())
    );
    let seen = api.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "one review per call, no cache");
    let req = &seen[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/apis/authentication.k8s.io/v1/tokenreviews");
    assert_eq!(
        req.authorization.as_deref(),
        Some("Bearer the-ca-own-token")
    );
    assert_eq!(req.body["kind"], "TokenReview");
    assert_eq!(req.body["spec"]["token"], "workload-token");
    assert_eq!(
        req.body["spec"]["audiences"],
        serde_json::json!(["istio-ca"])
    );
}

#[tokio::test]
async fn a_token_whose_bound_pod_is_gone_is_refused_with_the_api_server_reason() {
    let gone = "[invalid bearer token, pod \"sleep-7d9c8b6f5-x2x4z\" not found]";
    let not_authenticated = TokenReviewStatus {
        authenticated: Some(false),
        error: Some(gone.into()),
        ..TokenReviewStatus::default()
    };
    let err = refusal(Answer::Review(not_authenticated), DEFAULT_TIMEOUT).await;
    assert!(
        matches!(&err, ReviewError::NotAuthenticated(e) if e == gone),
        "{err}"
    );
    assert!(!err.is_unavailable());
    assert!(err.to_string().contains("not found"), "{err}");

    // No error text at all still says why.
    let err = refusal(
        Answer::Review(TokenReviewStatus::default()),
        DEFAULT_TIMEOUT,
    )
    .await;
    assert!(err.to_string().contains("not valid"), "{err}");
}

#[tokio::test]
async fn audience_and_username_are_checked_in_the_answer() {
    // The API server validated the token for another audience only.
    let other_audience = authenticated(
        "system:serviceaccount:default:sleep",
        &["https://kubernetes.default.svc"],
    );
    let err = refusal(Answer::Review(other_audience), DEFAULT_TIMEOUT).await;
    assert!(
        matches!(&err, ReviewError::Audience { got, want } if got == &["https://kubernetes.default.svc"] && want == "istio-ca"),
        "{err}"
    );
    let node = authenticated("system:node:worker-1", &["istio-ca"]);
    let err = refusal(Answer::Review(node), DEFAULT_TIMEOUT).await;
    assert!(
        matches!(&err, ReviewError::NotServiceAccount(u) if u == "system:node:worker-1"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_or_failing_api_server_is_unavailable_not_a_refusal() {
    // Connection refused: a port that was just free.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let err = reviewer(&closed, DEFAULT_TIMEOUT)
        .review("t")
        .await
        .unwrap_err();
    assert!(matches!(err, ReviewError::Unavailable(_)), "{err}");
    assert!(err.is_unavailable());

    for code in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let err = refusal(Answer::Error(code, "etcd is down"), DEFAULT_TIMEOUT).await;
        assert!(
            matches!(&err, ReviewError::Unavailable(m) if m.contains("etcd is down")),
            "{code}: {err}"
        );
    }

    let started = std::time::Instant::now();
    let err = refusal(Answer::Hang, Duration::from_millis(200)).await;
    assert!(matches!(err, ReviewError::Timeout(_)), "{err}");
    assert!(err.is_unavailable());
    assert!(started.elapsed() < Duration::from_secs(5));

    // The CA's own request refused (no RBAC): neither the caller's fault nor worth a blind retry.
    let forbidden = Answer::Error(
        StatusCode::FORBIDDEN,
        "tokenreviews.authentication.k8s.io is forbidden",
    );
    let err = refusal(forbidden, DEFAULT_TIMEOUT).await;
    assert!(
        matches!(err, ReviewError::Refused { code: 403, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("RBAC"), "{err}");
}

#[tokio::test]
async fn oversized_tokens_are_not_sent() {
    let api = fake_api_server(Answer::Review(TokenReviewStatus::default())).await;
    let err = reviewer(&api.url, DEFAULT_TIMEOUT)
        .review(&"a".repeat(MAX_TOKEN_LEN + 1))
        .await
        .unwrap_err();
    assert!(matches!(err, ReviewError::TooLarge(_)));
    assert!(api.seen.lock().unwrap().is_empty());
}
