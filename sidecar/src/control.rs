//! The discovery client: keeps a stream to pilot open, turns each push into a [`RouteTable`], and
//! publishes it; ACKs what converts, NACKs what does not (keeping the last good table), and reconnects
//! with jittered, capped exponential backoff when the stream ends. While pilot is away the sidecar keeps
//! serving with what it has.
//!
//! Every [`REPORT_EVERY`], when a comparison concluded since the last one, the sidecar's shadow-diff
//! report ([`crate::shadow_diff`]) goes to pilot on the same stream: a request carrying
//! `mirror_report` and no `response_nonce` (neither an ACK nor a NACK; pilot matches answers by
//! nonce). Only after this stream has delivered a config, so that pilot never sees it before the
//! stream's first push (when an empty nonce would match its empty last nonce).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use weft_ca::SpiffeId;
use weft_ca::tls::{self, CredentialStore, TrustBundle};
use weft_proto::discovery as pb;
use weft_proto::discovery::discovery_service_client::DiscoveryServiceClient;

use crate::route::RouteTable;
use crate::shadow_diff::ShadowDiff;
use crate::snapshot::Snapshot;

/// Backoff bounds (ztunnel's xDS client: 10 ms doubling to 15 s; we start at 100 ms).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How often a changed shadow-diff report is sent.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Where and who: everything the discovery client needs.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// pilot's discovery address.
    pub pilot: String,
    /// The identity pilot must present.
    pub pilot_identity: SpiffeId,
    /// The mesh root.
    pub bundle: TrustBundle,
    /// This sidecar's node description.
    pub node: pb::Node,
    /// HTTP/2 keepalive of the stream's connection: a pilot gone silent ends the stream.
    pub keepalive: weft_ca::grpc::Keepalive,
}

/// Counters for `/stats` and `/config_dump`.
#[derive(Debug, Default)]
pub struct ControlStats {
    /// Pushes received.
    pub pushes: AtomicU64,
    /// Pushes rejected.
    pub nacks: AtomicU64,
    /// Streams opened.
    pub connects: AtomicU64,
    /// 1 while a stream to pilot is open, 0 between streams.
    pub connected: AtomicU64,
}

/// Runs the discovery client until `shutdown`. Publishes accepted tables on `tables`.
pub async fn run(
    cfg: ControlConfig,
    creds: Arc<CredentialStore>,
    tables: watch::Sender<Arc<Snapshot>>,
    stats: Arc<ControlStats>,
    shadow: Arc<ShadowDiff>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            r = session(&cfg, &creds, &tables, &stats, &shadow) => r,
        };
        stats.connected.store(0, Ordering::Relaxed);
        match outcome {
            // A stream that delivered config was healthy: start over quickly.
            Ok(true) => backoff = BACKOFF_MIN,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(pilot = %cfg.pilot, error = %e, retry_in = ?backoff, "discovery stream failed")
            }
        }
        // Full jitter keeps a fleet from reconnecting in lockstep after a pilot restart.
        let wait = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Errors of one discovery session.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] weft_ca::tls::SvidError),
    /// Bad pilot address.
    #[error(transparent)]
    Channel(#[from] weft_ca::grpc::ChannelError),
    /// The stream failed.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

/// One stream's life. Returns whether any config arrived (so the backoff can reset).
async fn session(
    cfg: &ControlConfig,
    creds: &Arc<CredentialStore>,
    tables: &watch::Sender<Arc<Snapshot>>,
    stats: &ControlStats,
    shadow: &ShadowDiff,
) -> Result<bool, ControlError> {
    let tls = tls::client_config(
        Some(creds.clone()),
        &cfg.bundle,
        vec![cfg.pilot_identity.clone()],
        &[tls::ALPN_H2],
    )?;
    let channel = weft_ca::grpc::tls_channel(&cfg.pilot, Arc::new(tls), &cfg.keepalive)?;
    let mut client = DiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    // The node goes first; the last accepted version lets pilot know what we run after a reconnect.
    let first = pb::DiscoveryRequest {
        node: Some(cfg.node.clone()),
        version_info: tables.borrow().routes.version.clone(),
        ..Default::default()
    };
    let _ = tx.send(first).await;
    let mut inbound = client
        .stream_config(ReceiverStream::new(rx))
        .await
        .map_err(ControlError::Status)?
        .into_inner();
    stats.connects.fetch_add(1, Ordering::Relaxed);
    stats.connected.store(1, Ordering::Relaxed);
    tracing::info!(pilot = %cfg.pilot, "discovery stream open");
    let mut got_config = false;
    // A new stream reports again (pilot may have restarted and lost the last one).
    let mut reported: Option<u64> = None;
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            // `next` on the stream is cancel-safe: a message half-read stays in the stream.
            m = inbound.next() => m,
            _ = tick.tick() => {
                let generation = shadow.generation();
                if got_config && generation > 0 && reported != Some(generation) {
                    reported = Some(generation);
                    let report = pb::DiscoveryRequest {
                        version_info: tables.borrow().routes.version.clone(),
                        mirror_report: Some(shadow.report()),
                        ..Default::default()
                    };
                    if tx.send(report).await.is_err() {
                        return Ok(got_config);
                    }
                }
                continue;
            }
        };
        let response = match next.transpose() {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(got_config),
            Err(status) if got_config => {
                tracing::info!(error = %status.message(), "discovery stream ended");
                return Ok(true);
            }
            Err(status) => return Err(ControlError::Status(status)),
        };
        stats.pushes.fetch_add(1, Ordering::Relaxed);
        let version = response.version_info.clone();
        let converted = response
            .config
            .ok_or(crate::route::InvalidConfig::Missing("config"))
            .and_then(|c| RouteTable::convert(version.clone(), c));
        let reply = match converted {
            Ok(table) => {
                got_config = true;
                tracing::info!(%version, "config accepted");
                let next = {
                    let previous = tables.borrow();
                    Snapshot::next(table, &previous)
                };
                tables.send_replace(Arc::new(next));
                pb::DiscoveryRequest {
                    version_info: version,
                    response_nonce: response.nonce,
                    ..Default::default()
                }
            }
            Err(e) => {
                stats.nacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%version, error = %e, "config rejected; keeping the last good one");
                pb::DiscoveryRequest {
                    version_info: tables.borrow().routes.version.clone(),
                    response_nonce: response.nonce,
                    error_detail: Some(pb::ErrorDetail {
                        message: e.to_string(),
                    }),
                    ..Default::default()
                }
            }
        };
        if tx.send(reply).await.is_err() {
            return Ok(got_config);
        }
    }
}
