//! HTTP/2 and gRPC through the mesh: a real tonic gRPC server as the app behind its sidecar (the
//! Service port is named `grpc`, so the callee's sidecar speaks HTTP/2 to it), a real tonic client
//! speaking h2c prior knowledge to the caller's sidecar. Unary calls, metadata, and a gRPC error status
//! (which travels in HTTP/2 trailers) must all arrive intact.

use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use weft_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use weft_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use weft_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use weft_tests::{ControlPlane, Sidecar};

/// An echo app: returns the request's `csr` and its `x-echo` metadata; `fail` yields NOT_FOUND.
struct Echo;

#[tonic::async_trait]
impl IstioCertificateService for Echo {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let meta = request
            .metadata()
            .get("x-echo")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let csr = request.into_inner().csr;
        if csr == "fail" {
            return Err(Status::not_found("no such thing, said the app"));
        }
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![csr, meta],
        }))
    }
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\nspec:\n  selector:\n    app: echo\n  ports:\n  - name: grpc\n    port: 9000\n    targetPort: 9000\n";

#[test]
fn grpc_calls_and_error_trailers_cross_the_mesh() {
    weft_tests::init();
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::start(dir.path(), &[]).unwrap();
    plane.apply_yaml("echo.yaml", SERVICE).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let app_port = listener.local_addr().unwrap().port();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(IstioCertificateServiceServer::new(Echo))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let _echo =
        Sidecar::explicit(&plane, "echo-1", "echo", "app=echo", Some(app_port), &[]).unwrap();
    let client_side =
        Sidecar::explicit(&plane, "client", "client", "app=client", None, &[]).unwrap();
    // Wait until the caller's sidecar knows the echo endpoint.
    let mut ready = false;
    for _ in 0..200 {
        let dump = client_side.config_dump().unwrap();
        if dump.contains("\"workload\": \"default/echo-1\"") {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ready,
        "the echo endpoint never reached the client's sidecar"
    );

    rt.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", client_side.outbound))
                .unwrap()
                .origin("http://echo:9000".parse().unwrap())
                .connect()
                .await
                .unwrap();
        let mut client = IstioCertificateServiceClient::new(channel);
        for i in 0..5 {
            let mut req = Request::new(IstioCertificateRequest {
                csr: format!("hello {i}"),
                ..Default::default()
            });
            req.metadata_mut().insert("x-echo", "kept".parse().unwrap());
            let resp = client.create_certificate(req).await.unwrap().into_inner();
            assert_eq!(
                resp.cert_chain,
                vec![format!("hello {i}"), "kept".to_owned()]
            );
        }
        let status = client
            .create_certificate(IstioCertificateRequest {
                csr: "fail".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        assert_eq!(status.message(), "no such thing, said the app");
    });

    // Istio's metrics name the calls gRPC on both sides, each with its grpc-status: the error's
    // answered in the head (trailers-only), the others' read from their trailers.
    let requests = |text: &str, must: &[&str]| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{") && must.iter().all(|w| l.contains(w))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    for (side, reporter) in [(&client_side, "source"), (&_echo, "destination")] {
        let text = side.stats().unwrap();
        let reporter = format!("reporter=\"{reporter}\"");
        let grpc = [reporter.as_str(), "request_protocol=\"grpc\""];
        assert_eq!(requests(&text, &grpc), 6, "{text}");
        assert_eq!(
            requests(&text, &[grpc[0], grpc[1], "grpc_response_status=\"5\""]),
            1,
            "{text}"
        );
        assert_eq!(
            requests(&text, &[grpc[0], grpc[1], "grpc_response_status=\"0\""]),
            5,
            "{text}"
        );
        assert_eq!(
            requests(&text, &[reporter.as_str(), "request_protocol=\"http\""]),
            0,
            "{text}"
        );
        // The echo workload's `app` label is its canonical service; it has no version label.
        let canonical = [
            grpc[0],
            "destination_canonical_service=\"echo\"",
            "destination_canonical_revision=\"latest\"",
            "destination_cluster=\"Kubernetes\"",
        ];
        assert_eq!(requests(&text, &canonical), 6, "{text}");
    }
}
