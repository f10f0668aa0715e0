//! Discovery responses on the wire, assembled from pre-encoded pieces.
//!
//! A push to many sidecars carries the same services and clusters to every sidecar with the same
//! [`OutboundKey`](weft_pilot_config::translate::OutboundKey). Protobuf lets a message be written
//! field by field, and a repeated field's elements be written one after the other, so the encoding
//! of a `DiscoveryResponse` is the concatenation of: the version and nonce fields, the `config`
//! field's key and length, the node's own `mesh` field, the shared `services` and `clusters` fields
//! (encoded once per key and per push, see [`encode_outbound`]), the node's own `inbound` and
//! `tracing` fields, and the mesh-wide `peers` (encoded once per push, see [`encode_peers`]). Those are the bytes prost writes for the same `DiscoveryResponse` (fields in
//! number order), so sidecars decode exactly the `ProxyConfig` that `translate` returns.
//!
//! The shared piece is a [`Bytes`]: every stream's response refers to the same allocation, and
//! hyper hands it to h2 without copying, so pilot holds one copy of each key's outbound part however
//! many streams it is being sent to. To get that, the `StreamConfig` method is served by hand (a
//! tower service, see [`super::Discovery`]) instead of through the generated server, whose codec
//! would encode each stream's response into a buffer of its own: requests are still decoded with
//! the generated prost types, and responses are framed here as gRPC length-prefixed messages.
//!
//! Between a stream's session and its body sits an [`Outbox`]: one slot, not a queue. A push that
//! finds the previous one still waiting replaces it, since a sidecar only needs the newest view; so
//! a slow sidecar holds at most the response being written plus one waiting, never a backlog of
//! stale views (each of which would keep an old push's shared bytes alive).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http::header::HeaderValue;
use http_body::Frame;
use prost::encoding::{self, WireType};
use weft_pilot_config::translate::Outbound;
use weft_proto::discovery as pb;

/// The gRPC path of the one method this service has.
pub(super) const STREAM_CONFIG_PATH: &str = "/weft.discovery.v1.DiscoveryService/StreamConfig";
/// The gRPC service name (the path's first segment).
pub(super) const SERVICE_NAME: &str = "weft.discovery.v1.DiscoveryService";

/// Field numbers of `DiscoveryResponse` and `ProxyConfig` in `discovery.proto`.
mod field {
    pub(super) const VERSION_INFO: u32 = 1;
    pub(super) const NONCE: u32 = 2;
    pub(super) const CONFIG: u32 = 3;
    pub(super) const MESH: u32 = 1;
    pub(super) const SERVICES: u32 = 2;
    pub(super) const CLUSTERS: u32 = 3;
    pub(super) const INBOUND: u32 = 4;
    pub(super) const TRACING: u32 = 5;
    pub(super) const PEERS: u32 = 6;
}

/// An outbound part encoded as `ProxyConfig` fields: every service as field 2, then every
/// cluster as field 3, exactly as prost encodes them inside a whole `ProxyConfig`.
pub(super) fn encode_outbound(outbound: &Outbound) -> Bytes {
    let Outbound { services, clusters } = outbound;
    let len = encoding::message::encoded_len_repeated(field::SERVICES, services)
        + encoding::message::encoded_len_repeated(field::CLUSTERS, clusters);
    let mut buf = BytesMut::with_capacity(len);
    encoding::message::encode_repeated(field::SERVICES, services, &mut buf);
    encoding::message::encode_repeated(field::CLUSTERS, clusters, &mut buf);
    buf.freeze()
}

/// The mesh's peers encoded as `ProxyConfig` field 6, as prost encodes them in a whole config.
pub(super) fn encode_peers(peers: &[pb::Peer]) -> Bytes {
    let mut buf =
        BytesMut::with_capacity(encoding::message::encoded_len_repeated(field::PEERS, peers));
    encoding::message::encode_repeated(field::PEERS, peers, &mut buf);
    buf.freeze()
}

/// One `DiscoveryResponse` as a gRPC message (5-byte length prefix included), in pieces: the part
/// written for this stream, the shared outbound bytes, this node's trailing fields, and the shared
/// peers.
#[derive(Debug, Clone)]
pub(super) struct Message {
    pieces: [Bytes; 4],
}

impl Message {
    /// The response `{version_info, nonce, config}` whose config is `local` (the node's own part:
    /// mesh, inbound, tracing; its services and clusters are not used) with the services and
    /// clusters `shared` holds (from [`encode_outbound`]) and the peers `peers` holds (from
    /// [`encode_peers`]). `None` if it would exceed the 4 GiB a gRPC message can have.
    pub(super) fn response(
        version: &str,
        nonce: &str,
        local: &pb::ProxyConfig,
        shared: &Bytes,
        peers: &Bytes,
    ) -> Option<Self> {
        let mesh_len = local
            .mesh
            .as_ref()
            .map_or(0, |m| encoding::message::encoded_len(field::MESH, m));
        let tail_len = local
            .inbound
            .as_ref()
            .map_or(0, |m| encoding::message::encoded_len(field::INBOUND, m))
            + local
                .tracing
                .as_ref()
                .map_or(0, |m| encoding::message::encoded_len(field::TRACING, m));
        let config_len = mesh_len + shared.len() + tail_len + peers.len();
        let string_len = |tag: u32, value: &str| {
            if value.is_empty() {
                0
            } else {
                encoding::key_len(tag)
                    + encoding::encoded_len_varint(value.len() as u64)
                    + value.len()
            }
        };
        let response_len = string_len(field::VERSION_INFO, version)
            + string_len(field::NONCE, nonce)
            + encoding::key_len(field::CONFIG)
            + encoding::encoded_len_varint(config_len as u64)
            + config_len;
        let prefix = u32::try_from(response_len).ok()?;

        let head_len = 5 + response_len - shared.len() - tail_len - peers.len();
        let mut head = BytesMut::with_capacity(head_len);
        // gRPC framing: not compressed, then the length (big-endian).
        head.put_u8(0);
        head.put_u32(prefix);
        if !version.is_empty() {
            encoding::encode_key(field::VERSION_INFO, WireType::LengthDelimited, &mut head);
            encoding::encode_varint(version.len() as u64, &mut head);
            head.put_slice(version.as_bytes());
        }
        if !nonce.is_empty() {
            encoding::encode_key(field::NONCE, WireType::LengthDelimited, &mut head);
            encoding::encode_varint(nonce.len() as u64, &mut head);
            head.put_slice(nonce.as_bytes());
        }
        encoding::encode_key(field::CONFIG, WireType::LengthDelimited, &mut head);
        encoding::encode_varint(config_len as u64, &mut head);
        if let Some(mesh) = &local.mesh {
            encoding::message::encode(field::MESH, mesh, &mut head);
        }
        let mut tail = BytesMut::with_capacity(tail_len);
        if let Some(inbound) = &local.inbound {
            encoding::message::encode(field::INBOUND, inbound, &mut tail);
        }
        if let Some(tracing) = &local.tracing {
            encoding::message::encode(field::TRACING, tracing, &mut tail);
        }
        Some(Self {
            pieces: [head.freeze(), shared.clone(), tail.freeze(), peers.clone()],
        })
    }

    /// The encoded length, gRPC prefix included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }
}

/// The sending side of a stream's one-slot mailbox (see the module docs). Dropping it ends the
/// body once the last response has been written.
#[derive(Debug)]
pub(super) struct Outbox {
    slot: Arc<Mutex<Slot>>,
}

/// Why a response could not be posted: the body is gone (the call ended).
#[derive(Debug)]
pub(super) struct Closed;

#[derive(Debug, Default)]
struct Slot {
    /// The response waiting to be written, if any.
    waiting: Option<Message>,
    /// The body's task, to wake when a response arrives or the outbox goes.
    waker: Option<Waker>,
    /// The outbox was dropped: end the body after what is left.
    sender_gone: bool,
    /// The body was dropped: nobody will write what is posted.
    body_gone: bool,
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// A stream's outbox and the body that writes what is posted to it.
pub(super) fn outbox() -> (Outbox, ResponseBody) {
    let slot = Arc::new(Mutex::new(Slot::default()));
    (
        Outbox { slot: slot.clone() },
        ResponseBody {
            slot,
            pieces: VecDeque::new(),
            done: false,
        },
    )
}

impl Outbox {
    /// Posts `message`, replacing one that is still waiting (it was never started, so the sidecar
    /// never sees it; the newer view supersedes it). Never waits.
    pub(super) fn post(&self, message: Message) -> Result<(), Closed> {
        let waker = {
            let mut slot = lock(&self.slot);
            if slot.body_gone {
                return Err(Closed);
            }
            slot.waiting = Some(message);
            slot.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let waker = {
            let mut slot = lock(&self.slot);
            slot.sender_gone = true;
            slot.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The response body of one `StreamConfig` call: the messages the session posts, each as its
/// pieces (the shared one handed on without copying), then the trailers of a call that ended
/// normally (`grpc-status: 0`) once the session drops its outbox, as tonic ends a stream.
#[derive(Debug)]
pub(super) struct ResponseBody {
    slot: Arc<Mutex<Slot>>,
    /// The rest of the message being written.
    pieces: VecDeque<Bytes>,
    done: bool,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let mut slot = lock(&self.slot);
        slot.body_gone = true;
        // Nothing will write it; do not keep its shared bytes alive until the session notices.
        slot.waiting = None;
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(piece) = this.pieces.pop_front() {
                if piece.is_empty() {
                    continue;
                }
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let mut slot = lock(&this.slot);
            if let Some(message) = slot.waiting.take() {
                drop(slot);
                this.pieces.extend(message.pieces);
                continue;
            }
            if slot.sender_gone {
                drop(slot);
                this.done = true;
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            slot.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pieces.is_empty()
    }
}

#[cfg(test)]
mod tests;
