//! Who is calling, as the mTLS handshake proved it, and nothing else: the caller's SPIFFE ID comes
//! from the certificate the SPIFFE verifier accepted (`weft_ca::tls`), once per connection. Every
//! request of that connection then carries it to the app in `x-forwarded-client-cert`, replacing
//! whatever the caller wrote there; a caller outside the mesh loses its claims in the mesh's own
//! headers (`x-envoy-*`, `x-weft-*`) and cannot pass the app-protocol hint.

use std::net::SocketAddr;
use std::sync::Arc;

use weft_ca::SpiffeId;

use super::Inbound;
use crate::http::headers::strip_mesh_internal;
use crate::outbound::APP_PROTOCOL_HEADER;
use crate::telemetry::{Labels, Workload, workload_labels};

/// Header naming the verified caller, as Envoy sets it on sidecar inbound.
const XFCC: http::HeaderName = http::HeaderName::from_static("x-forwarded-client-cert");

/// What every request of one inbound connection shares: who called, as the handshake proved it.
#[derive(Debug)]
pub struct Caller {
    /// The peer's SPIFFE ID (mTLS only).
    pub identity: Option<SpiffeId>,
    /// The `x-forwarded-client-cert` value naming it.
    xfcc: Option<http::HeaderValue>,
    /// Its metric labels.
    pub source: Labels,
    /// `127.0.0.1:<app port>`.
    pub app_authority: http::uri::Authority,
    /// The connection's remote address.
    pub peer: SocketAddr,
    /// Envoy's name of the inbound cluster (`inbound|<port>||`), for the access log.
    pub cluster: String,
}

/// What the requests of one connection share, worked out once.
pub(super) fn caller_context(
    inbound: &Inbound,
    app_port: u16,
    caller: Option<SpiffeId>,
    peer: SocketAddr,
) -> Result<Arc<Caller>, String> {
    // The caller's metric labels, once per connection: its identity comes from the handshake, and
    // its workload from what pilot knows of the pods with that identity (see
    // `TableLabels::caller`), never from anything the caller sent.
    let source = match &caller {
        Some(id) => inbound
            .snapshots
            .borrow()
            .labels
            .caller(id.as_str(), peer.ip())
            .cloned()
            .unwrap_or_else(|| {
                workload_labels(
                    "source",
                    &Workload {
                        namespace: id.namespace(),
                        principal: id.as_str(),
                        ..Workload::default()
                    },
                )
            }),
        None => inbound.unknown_source.clone(),
    };
    // XFCC and the app's URI authority are the same for every request of this connection.
    let xfcc = caller.as_ref().and_then(|c| {
        http::HeaderValue::from_str(&format!("By={};URI={}", inbound.identity, c)).ok()
    });
    let app_authority = http::uri::Authority::try_from(format!("127.0.0.1:{app_port}"))
        .map_err(|e| format!("app authority: {e}"))?;
    Ok(Arc::new(Caller {
        identity: caller,
        xfcc,
        source,
        app_authority,
        peer,
        cluster: format!("inbound|{app_port}||"),
    }))
}

impl Caller {
    /// Puts the verified caller on a request's headers and takes off what only the mesh may say.
    /// Returns whether a mesh peer said the app speaks HTTP/2.
    pub fn stamp(&self, headers: &mut http::HeaderMap) -> bool {
        if self.identity.is_none() {
            // From outside the mesh: its claims in the mesh's own headers go, as Envoy strips
            // `x-envoy-*` from external requests.
            strip_mesh_internal(headers);
        }
        // Only a mesh peer (mTLS) may say the app speaks HTTP/2; the hint never reaches the app.
        let h2_app = headers
            .remove(APP_PROTOCOL_HEADER)
            .is_some_and(|v| v == "h2")
            && self.identity.is_some();
        // Never pass on a caller's claim about who it is; only the handshake says that. (`insert`
        // replaces every value a caller sent.)
        match &self.xfcc {
            Some(v) => {
                headers.insert(XFCC, v.clone());
            }
            None => {
                headers.remove(XFCC);
            }
        }
        h2_app
    }
}
