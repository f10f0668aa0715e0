//! A sidecar's side of the discovery stream, driven by a test: the real proto over real mTLS with a
//! certificate from the plane's real CA. For tests of what pilot does with what a sidecar sends
//! (ACKs, NACKs, shadow-diff reports) without running a sidecar.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_ca::SpiffeId;
use weft_ca::tls::{self, CredentialStore};
use weft_proto::discovery as pb;
use weft_proto::discovery::discovery_service_client::DiscoveryServiceClient;

use crate::ControlPlane;

/// One open discovery stream.
#[derive(Debug)]
pub struct DiscoveryStream {
    tx: mpsc::Sender<pb::DiscoveryRequest>,
    rx: tonic::Streaming<pb::DiscoveryResponse>,
}

/// The node of pod `default/name`, with service account `sa`, `labels` and address `ip`.
pub fn node(name: &str, sa: &str, labels: &[(&str, &str)], ip: &str) -> pb::Node {
    pb::Node {
        name: name.into(),
        namespace: "default".into(),
        service_account: sa.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ip: ip.into(),
        ports: vec![80],
        inbound_port: 15006,
        captured: true,
        proxy_version: "0.0.0-test".into(),
    }
}

/// Registers the Pod `node` names, with the labels and IP it claims (the platform's part).
pub fn register(plane: &ControlPlane, node: &pb::Node) -> Result<()> {
    let labels: Vec<String> = node
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    plane.register_pod(
        &node.name,
        &node.service_account,
        &labels.join(","),
        &node.ip,
    )
}

impl DiscoveryStream {
    /// Registers `node`'s Pod with the plane, then opens a stream with a certificate for
    /// `default/<node.service_account>` claiming `node`.
    pub async fn open_registered(plane: &ControlPlane, node: pb::Node) -> Result<Self> {
        register(plane, &node)?;
        let sa = node.service_account.clone();
        Self::open(plane, &sa, node)
            .await?
            .map_err(|status| anyhow::anyhow!("pilot refused the stream: {status}"))
    }

    /// Opens a stream with a certificate for `default/<cert_sa>` claiming `node` (registered or
    /// not). The outer error is the test's set-up failing; the inner one is pilot's answer when it
    /// refuses the stream.
    pub async fn open(
        plane: &ControlPlane,
        cert_sa: &str,
        node: pb::Node,
    ) -> Result<std::result::Result<Self, tonic::Status>> {
        let creds = plane
            .credentials("default", cert_sa, Duration::from_secs(600))
            .await?;
        let bundle = plane.bundle()?;
        let pilot_id = SpiffeId::new("cluster.local", "weft-system", "pilot")?;
        let cfg = tls::client_config(
            Some(CredentialStore::new(creds)),
            &bundle,
            vec![pilot_id],
            &[tls::ALPN_H2],
        )?;
        let channel =
            weft_ca::grpc::tls_channel(&plane.discovery_addr, Arc::new(cfg), &Default::default())?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(pb::DiscoveryRequest {
            node: Some(node),
            ..Default::default()
        })
        .await?;
        Ok(DiscoveryServiceClient::new(channel)
            .stream_config(ReceiverStream::new(rx))
            .await
            .map(|r| Self {
                tx,
                rx: r.into_inner(),
            }))
    }

    /// Keeps the stream open without the test reading it: pushes are read and dropped in a task,
    /// and the stream lives as long as the returned sender.
    pub fn keep_open(self) -> mpsc::Sender<pb::DiscoveryRequest> {
        let Self { tx, mut rx } = self;
        tokio::spawn(async move { while let Ok(Some(_)) = rx.message().await {} });
        tx
    }

    /// The next push, within 20 s.
    pub async fn next(&mut self) -> Result<pb::DiscoveryResponse> {
        tokio::time::timeout(Duration::from_secs(20), self.rx.message())
            .await
            .context("no push within 20 s")??
            .context("the stream ended")
    }

    /// The next push that satisfies `pred`; earlier ones are ACKed (a push may reflect a state
    /// from before the last change, within the debounce window).
    pub async fn next_until(
        &mut self,
        pred: impl Fn(&pb::DiscoveryResponse) -> bool,
    ) -> Result<pb::DiscoveryResponse> {
        for _ in 0..20 {
            let r = self.next().await?;
            if pred(&r) {
                return Ok(r);
            }
            self.ack(&r).await?;
        }
        bail!("no matching push in 20 pushes")
    }

    /// ACKs push `r`.
    pub async fn ack(&self, r: &pb::DiscoveryResponse) -> Result<()> {
        self.send(pb::DiscoveryRequest {
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
    }

    /// NACKs push `r`, naming `last_good` as the version still in use.
    pub async fn nack(&self, r: &pb::DiscoveryResponse, last_good: &str, msg: &str) -> Result<()> {
        self.send(pb::DiscoveryRequest {
            version_info: last_good.into(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(pb::ErrorDetail {
                message: msg.into(),
            }),
            ..Default::default()
        })
        .await
    }

    /// Sends a shadow-diff report, as the sidecar does: no nonce, neither ACK nor NACK.
    pub async fn report(&self, report: pb::MirrorReport) -> Result<()> {
        self.send(pb::DiscoveryRequest {
            mirror_report: Some(report),
            ..Default::default()
        })
        .await
    }

    /// Sends `request` as it is.
    pub async fn send(&self, request: pb::DiscoveryRequest) -> Result<()> {
        self.tx
            .send(request)
            .await
            .map_err(|_| anyhow::anyhow!("the discovery stream is closed"))
    }
}
