//! Inbound mTLS mode from PeerAuthentication (§3.1).

use std::collections::BTreeMap;

use weft_proto::discovery as pb;

use crate::peer_authentication::{MtlsMode, PeerMtls};

use super::Workload;
use super::catalog::Catalog;

/// The node's inbound settings: its resolved mode and the per-port overrides.
pub(super) fn build(catalog: &Catalog<'_>, node: &Workload) -> pb::Inbound {
    let resolved = resolve(catalog, node);
    pb::Inbound {
        mode: to_pb(resolved.mode) as i32,
        port_modes: resolved
            .ports
            .into_iter()
            .map(|(port, mode)| (port, to_pb(mode) as i32))
            .collect(),
    }
}

/// The mode a workload accepts on one port (used for auto mTLS toward it).
pub(super) fn peer_mode(catalog: &Catalog<'_>, workload: &Workload, port: u32) -> MtlsMode {
    let resolved = resolve(catalog, workload);
    resolved.ports.get(&port).copied().unwrap_or(resolved.mode)
}

/// A workload's effective modes: never `Unset`.
#[derive(Debug, PartialEq, Eq)]
struct Resolved {
    mode: MtlsMode,
    ports: BTreeMap<u32, MtlsMode>,
}

/// Istio's `ComposePeerAuthentication`: start from PERMISSIVE, then apply the mesh-wide policy
/// (root namespace, no selector), the namespace policy (the workload's namespace, no selector) and
/// the workload policy (the workload's namespace, selector matching its labels); each level that
/// sets a mode other than UNSET overrides the one before. Selector policies in the root namespace
/// are ignored for other namespaces. At each level Istio takes the oldest policy; weft, which does
/// not keep creation times, takes the first by name. `portLevelMtls` counts only on the workload
/// policy (validation requires a selector for it); an UNSET port inherits the workload's mode,
/// so it is left out of the map.
fn resolve(catalog: &Catalog<'_>, workload: &Workload) -> Resolved {
    let root = catalog.mesh().root_namespace.as_str();
    let mesh = catalog.namespace_policy(root);
    let (namespace, selected) = if workload.namespace == root {
        (None, None)
    } else {
        (
            catalog.namespace_policy(&workload.namespace),
            catalog.workload_policy(workload),
        )
    };

    let mut mode = MtlsMode::Permissive;
    for pa in [mesh, namespace, selected].into_iter().flatten() {
        if let Some(m) = set_mode(pa.spec.mtls.as_ref()) {
            mode = m;
        }
    }
    let ports = selected
        .map(|pa| {
            pa.spec
                .port_level_mtls
                .iter()
                .filter_map(|(port, mtls)| Some((*port, set_mode(Some(mtls))?)))
                .collect()
        })
        .unwrap_or_default();
    Resolved { mode, ports }
}

/// The mode a level sets, `None` for UNSET/absent (inherit).
fn set_mode(mtls: Option<&PeerMtls>) -> Option<MtlsMode> {
    mtls.and_then(|m| m.mode).filter(|m| *m != MtlsMode::Unset)
}

fn to_pb(mode: MtlsMode) -> pb::MtlsMode {
    match mode {
        MtlsMode::Strict => pb::MtlsMode::Strict,
        MtlsMode::Disable => pb::MtlsMode::Disable,
        MtlsMode::Permissive | MtlsMode::Unset => pb::MtlsMode::Permissive,
    }
}
