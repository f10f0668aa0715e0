//! A scriptable stand-in for pilot's discovery service, for tests that need pushes a real pilot would
//! never send (pilot validates config, so it never pushes an invalid one).
//!
//! It serves the real `weft.discovery.v1.DiscoveryService` over the real mTLS stack, on 127.0.0.1, with
//! a certificate for `spiffe://cluster.local/ns/weft-system/sa/pilot` issued by the control plane's own
//! CA, so a real `sidecar run` accepts it as pilot. The test decides what is pushed and when
//! ([`FakePilot::push`]) and sees every request the sidecars send (node, ACK, NACK) in order
//! ([`FakePilot::next_request`]). It runs on a runtime of its own, so plain `#[test]`s can drive it;
//! dropping it (or [`FakePilot::stop`]) closes the listener and every open stream, as a pilot that
//! went away would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_ca::tls::{self, ClientAuth, CredentialStore};
use weft_proto::discovery as pb;
use weft_proto::discovery::discovery_service_server::{DiscoveryService, DiscoveryServiceServer};

use crate::ControlPlane;

/// One request a sidecar sent on its stream.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which stream (connection) it came on, counting from 0 over the fake pilot's life.
    pub stream: usize,
    /// The request.
    pub request: pb::DiscoveryRequest,
}

impl Received {
    /// A NACK (error_detail set).
    pub fn is_nack(&self) -> bool {
        self.request.error_detail.is_some()
    }

    /// The NACK's message, or "".
    pub fn error(&self) -> &str {
        self.request
            .error_detail
            .as_ref()
            .map_or("", |e| e.message.as_str())
    }
}

#[derive(Default)]
struct State {
    /// The last push: sent to each new stream when it opens.
    current: Option<pb::DiscoveryResponse>,
    /// Open streams.
    streams: Vec<mpsc::Sender<Result<pb::DiscoveryResponse, Status>>>,
    next_stream: usize,
    nonce: u64,
}

#[derive(Clone)]
struct Service {
    state: Arc<Mutex<State>>,
    seen: std_mpsc::Sender<Received>,
}

#[tonic::async_trait]
impl DiscoveryService for Service {
    type StreamConfigStream = ReceiverStream<Result<pb::DiscoveryResponse, Status>>;

    async fn stream_config(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stream = {
            let mut st = self
                .state
                .lock()
                .map_err(|_| Status::internal("poisoned"))?;
            let id = st.next_stream;
            st.next_stream += 1;
            if let Some(current) = st.current.clone() {
                let _ = tx.try_send(Ok(current));
            }
            st.streams.push(tx);
            id
        };
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(request)) = requests.message().await {
                if seen.send(Received { stream, request }).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A running fake pilot. Dropping it stops it.
pub struct FakePilot {
    /// Where it listens (give this to `sidecar run --pilot`).
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    seen: std_mpsc::Receiver<Received>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for FakePilot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakePilot")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakePilot {
    /// Starts on a free port of 127.0.0.1, with a pilot certificate from `plane`'s CA. Nothing is
    /// pushed until [`FakePilot::push`].
    pub fn start(plane: &ControlPlane) -> Result<Self> {
        Self::start_at(plane, "127.0.0.1:0".parse()?)
    }

    /// Starts on `addr` (e.g. the address of a fake pilot that was stopped, to play a pilot restart).
    /// Retries the bind for a few seconds in case the old socket is still closing.
    pub fn start_at(plane: &ControlPlane, addr: SocketAddr) -> Result<Self> {
        crate::init();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("fake pilot runtime")?;
        let _entered = runtime.enter();
        let bundle = plane.bundle()?;
        let creds = runtime
            .block_on(plane.credentials("weft-system", "pilot", Duration::from_secs(3600)))
            .context("pilot certificate from the CA")?;
        let config = tls::server_config(
            CredentialStore::new(creds),
            &bundle,
            ClientAuth::Required,
            &[tls::ALPN_H2],
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match runtime.block_on(tokio::net::TcpListener::bind(addr)) {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e).with_context(|| format!("bind fake pilot on {addr}")),
            }
        };
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let (seen_tx, seen) = std_mpsc::channel();
        let service = Service {
            state: state.clone(),
            seen: seen_tx,
        };
        runtime.spawn(async move {
            let incoming = weft_ca::grpc::tls_incoming(listener, Arc::new(config));
            let _ = tonic::transport::Server::builder()
                .add_service(DiscoveryServiceServer::new(service))
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(FakePilot {
            addr,
            state,
            seen,
            runtime: Some(runtime),
        })
    }

    /// Pushes `config` as `version` to every open stream, and to streams that open later. Returns
    /// the nonce.
    pub fn push(&self, version: &str, config: pb::ProxyConfig) -> String {
        let Ok(mut st) = self.state.lock() else {
            return String::new();
        };
        st.nonce += 1;
        let response = pb::DiscoveryResponse {
            version_info: version.to_owned(),
            nonce: format!("fake-{}", st.nonce),
            config: Some(config),
        };
        st.current = Some(response.clone());
        st.streams
            .retain(|tx| tx.try_send(Ok(response.clone())).is_ok());
        response.nonce
    }

    /// Streams opened so far.
    pub fn streams_opened(&self) -> usize {
        self.state.lock().map_or(0, |s| s.next_stream)
    }

    /// The next request any sidecar sent, waiting at most `timeout`.
    pub fn next_request(&self, timeout: Duration) -> Result<Received> {
        self.seen
            .recv_timeout(timeout)
            .context("no discovery request from the sidecar in time")
    }

    /// Waits (bounded) for the answer to the push with `nonce` (an ACK or a NACK).
    pub fn reply_to(&self, nonce: &str, timeout: Duration) -> Result<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no ACK/NACK for push {nonce} within {timeout:?}");
            }
            let r = self.next_request(left)?;
            if r.request.response_nonce == nonce {
                return Ok(r);
            }
        }
    }

    /// Waits (bounded) for a stream's first request (the one carrying the node).
    pub fn wait_node(&self, timeout: Duration) -> Result<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no sidecar connected within {timeout:?}");
            }
            let r = self.next_request(left)?;
            if r.request.node.is_some() {
                return Ok(r);
            }
        }
    }

    /// Stops serving: the listener and every stream close, as if pilot died.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Ok(mut st) = self.state.lock() {
            st.streams.clear();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for FakePilot {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A minimal valid [`pb::ProxyConfig`]: one Service `name.default.svc.cluster.local` (aliases `name`,
/// `name.default`, `name.default.svc`) on `port`, whose single catch-all route sends everything to a
/// cluster holding one endpoint per entry of `endpoints` (`(ip, port, identity)`; an empty identity
/// means plaintext HTTP/1.1 straight to that address).
pub fn simple_config(name: &str, port: u16, endpoints: &[(&str, u16, &str)]) -> pb::ProxyConfig {
    let fqdn = format!("{name}.default.svc.cluster.local");
    let cluster = format!("outbound|{port}||{fqdn}");
    pb::ProxyConfig {
        mesh: Some(pb::MeshSettings {
            trust_domain: "cluster.local".into(),
            mirror_shadow_suffix: false,
        }),
        services: vec![pb::OutboundService {
            hostname: fqdn.clone(),
            aliases: vec![
                name.into(),
                format!("{name}.default"),
                format!("{name}.default.svc"),
                fqdn.clone(),
            ],
            vip: String::new(),
            ports: vec![pb::ServicePort {
                name: "http".into(),
                port: u32::from(port),
                target_port: u32::from(port),
                protocol: "http".into(),
                routes: vec![route("default", &cluster)],
            }],
            namespace: "default".into(),
            name: name.into(),
        }],
        clusters: vec![pb::Cluster {
            name: cluster,
            service_hostname: fqdn,
            port: u32::from(port),
            endpoints: endpoints
                .iter()
                .map(|(ip, p, identity)| pb::Endpoint {
                    address: (*ip).into(),
                    port: u32::from(*p),
                    dial_port: u32::from(*p),
                    identity: (*identity).into(),
                    workload: format!("default/{name}-{p}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        inbound: Some(pb::Inbound::default()),
        tracing: Some(pb::Tracing::default()),
        peers: Vec::new(),
    }
}

/// A catch-all route `name` to `cluster` (weight 100).
pub fn route(name: &str, cluster: &str) -> pb::HttpRoute {
    pb::HttpRoute {
        name: name.into(),
        destinations: vec![pb::WeightedCluster {
            cluster: cluster.into(),
            weight: 100,
            ..Default::default()
        }],
        ..Default::default()
    }
}
