//! `POST /validate`: the object of an AdmissionReview through `pilot apply`'s parse and validation
//! (`weft_pilot_config::parse_documents`, which validates), so `kubectl apply` of an object
//! `pilot apply` refuses is refused with the same field path and problem.
//!
//! Only the Istio kinds weft serves are validated (VirtualService, DestinationRule,
//! PeerAuthentication, in their groups); any other kind is allowed (another webhook or no one
//! validates it), and so is every DELETE (refusing a delete of a bad object would pin it).
//!
//! The refusal is `allowed: false`, `status.code` 400, `status.message` one line per problem:
//! `<Kind> <namespace>/<name>: <field path>: <problem>`, the line `pilot apply` prints without its
//! `file:line:column: document N` prefix (the API server's object has no file or line).

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use weft_pilot_config::Kind;

/// The name refusals give as the file (never shown: the message drops it).
const FILE: &str = "admission";

/// Answers one review: see the module docs.
pub fn review(request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(request);
    if request.operation == Operation::Delete || request.sub_resource.is_some() {
        return allowed;
    }
    let served = Kind::ALL.iter().any(|k| {
        !k.group().is_empty() && k.group() == request.kind.group && k.as_str() == request.kind.kind
    });
    let Some(object) = request.object.as_ref().filter(|_| served) else {
        return allowed;
    };
    let namespace = request
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let text = match serde_json::to_string(object) {
        Ok(text) => text,
        Err(e) => return refused(request, format!("cannot read the object: {e}")),
    };
    match weft_pilot_config::parse_documents(FILE, &text, namespace) {
        Ok(_) => allowed,
        Err(errors) => {
            let fallback = format!("{} {namespace}/{}", request.kind.kind, request.name);
            let message = errors
                .errors()
                .iter()
                .map(|e| {
                    let object = e
                        .object
                        .as_ref()
                        .map_or(fallback.clone(), ToString::to_string);
                    format!("{object}: {}", e.error)
                })
                .collect::<Vec<_>>()
                .join("\n");
            tracing::info!(%namespace, name = %request.name, kind = %request.kind.kind, %message, "object refused");
            refused(request, message)
        }
    }
}

fn refused(request: &AdmissionRequest<DynamicObject>, message: String) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(request).deny(message);
    response.result.code = 400;
    response.result.reason = "Invalid".into();
    response
}
