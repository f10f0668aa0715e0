//! `POST /inject`: the pod of an AdmissionReview through `pilot inject`'s code, answered with the
//! JSONPatch from the pod as received to the pod as `pilot inject` writes it.
//!
//! The pod goes to [`crate::inject::inject`] as text (JSON is YAML), exactly as `pilot inject -f`
//! would read it, and the injected YAML is read back; the patch is `json_patch::diff` of the two.
//! So the patched pod equals `pilot inject`'s output for the same pod, which the e2e test checks.

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use serde_json::Value;

use super::policy::{self, Decision};
use super::{Admission, allowed_with_warning};
use crate::inject::{PROXY_CONTAINER, STATUS_ANNOTATION};

/// Istio's injection status annotation: a pod Istio's injector already handled is left alone too.
pub const ISTIO_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Istio's sidecar container.
pub const ISTIO_PROXY_CONTAINER: &str = "istio-proxy";

/// Why a pod that should be injected could not be (answered as allowed with a warning).
#[derive(Debug, thiserror::Error)]
enum InjectFailure {
    #[error("the pod cannot be read: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("{0}")]
    Inject(#[from] crate::inject::InjectError),
    #[error("the injected pod cannot be read back: {0}")]
    ReadBack(String),
    #[error("cannot encode the patch: {0}")]
    Patch(String),
}

/// Answers one review: see the module docs and [`policy`].
pub fn review(
    admission: &Admission,
    request: &AdmissionRequest<DynamicObject>,
) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(request);
    if request.operation != Operation::Create
        || !request.kind.group.is_empty()
        || request.kind.kind != "Pod"
        || request.sub_resource.is_some()
    {
        return allowed;
    }
    let Some(object) = &request.object else {
        return allowed;
    };
    let pod = match serde_json::to_value(object) {
        Ok(pod) => pod,
        Err(e) => return failed(request, &InjectFailure::Encode(e)),
    };
    let namespace = request
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .or_else(|| pod.pointer("/metadata/namespace").and_then(Value::as_str))
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
        .to_string();
    if already_injected(&pod) {
        tracing::debug!(%namespace, name = %request.name, "pod already injected");
        return allowed;
    }
    let labels = admission.labels_of(&namespace);
    if let Decision::Skip(reason) = policy::decide(&pod, &namespace, labels.as_ref()) {
        tracing::debug!(%namespace, name = %request.name, %reason, "pod not injected");
        return allowed;
    }
    match patch_for(admission, pod, &namespace) {
        Ok((patch, warnings)) => {
            let mut response = if patch.0.is_empty() {
                allowed
            } else {
                // kube's response takes json-patch 4's type, the workspace has json-patch 5: the
                // same RFC 6902 document, carried across as JSON.
                let converted = serde_json::to_value(&patch)
                    .and_then(serde_json::from_value)
                    .map_err(|e| InjectFailure::Patch(e.to_string()))
                    .and_then(|p| {
                        allowed
                            .with_patch(p)
                            .map_err(|e| InjectFailure::Patch(e.to_string()))
                    });
                match converted {
                    Ok(r) => r,
                    Err(e) => return failed(request, &e),
                }
            };
            if !warnings.is_empty() {
                response.warnings = Some(warnings);
            }
            response
        }
        Err(e) => failed(request, &e),
    }
}

/// The patch from `pod` to `pilot inject`'s output for it, and `pilot inject`'s warnings.
fn patch_for(
    admission: &Admission,
    mut pod: Value,
    namespace: &str,
) -> Result<(json_patch::Patch, Vec<String>), InjectFailure> {
    // The API server sets metadata.namespace only after admission in some paths; `pilot inject`
    // reads it (system namespaces, messages). Both sides of the diff carry it, so the patch never
    // touches it.
    if let Some(metadata) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata
            .entry("namespace")
            .or_insert_with(|| Value::String(namespace.to_string()));
    }
    // A label "true" wins over an annotation "false" (Istio); `pilot inject` honours either "false",
    // so the annotation is hidden from it and put back afterwards.
    let hidden = if policy::annotation_overridden(&pod) {
        pod.pointer_mut("/metadata/annotations")
            .and_then(Value::as_object_mut)
            .and_then(|a| a.remove(policy::POD_KEY))
    } else {
        None
    };
    let text = serde_json::to_string(&pod)?;
    let injected = crate::inject::inject(&text, &admission.inject)?;
    let mut after: Value = serde_saphyr::from_str(&injected.yaml)
        .map_err(|e| InjectFailure::ReadBack(e.to_string()))?;
    if let Some(value) = hidden {
        for object in [&mut pod, &mut after] {
            if let Some(annotations) = object
                .pointer_mut("/metadata/annotations")
                .and_then(Value::as_object_mut)
            {
                annotations.insert(policy::POD_KEY.to_string(), value.clone());
            }
        }
    }
    Ok((json_patch::diff(&pod, &after), injected.warnings))
}

/// Allowed without a patch: never stop a pod because of the injector (see the module docs of
/// [`super`]); the warning tells the user, the log tells the operator.
fn failed(request: &AdmissionRequest<DynamicObject>, error: &InjectFailure) -> AdmissionResponse {
    tracing::warn!(namespace = ?request.namespace, name = %request.name, error = %error, "sidecar not injected");
    allowed_with_warning(request, format!("weft: sidecar not injected: {error}"))
}

/// weft's or Istio's status annotation, or either proxy container, is already there.
fn already_injected(pod: &Value) -> bool {
    let annotated = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .is_some_and(|a| {
            a.contains_key(STATUS_ANNOTATION) || a.contains_key(ISTIO_STATUS_ANNOTATION)
        });
    let has_proxy = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .is_some_and(|containers| {
            containers.iter().any(|c| {
                matches!(
                    c.get("name").and_then(Value::as_str),
                    Some(PROXY_CONTAINER | ISTIO_PROXY_CONTAINER)
                )
            })
        });
    annotated || has_proxy
}
