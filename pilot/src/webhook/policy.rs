//! Whether a pod gets the sidecar: Istio's injection policy, as istiod's webhook applies it.
//!
//! Inputs: the namespace label `istio-injection` (when known) and the pod's label or annotation
//! `sidecar.istio.io/inject` (the label wins over the annotation when both are set, as in istiod).
//! A pod value of `true`, `yes`, `y` or `on` (any case) is "enabled", an empty or missing one is
//! "unset", and anything else ("false", a typo) is "disabled". In order:
//!
//! | case                                                        | injected |
//! |-------------------------------------------------------------|----------|
//! | `spec.hostNetwork: true`                                    | no       |
//! | namespace kube-system, kube-public, kube-node-lease, local-path-storage | no |
//! | namespace `istio-injection=disabled`                        | no       |
//! | pod `sidecar.istio.io/inject` disabled                      | no       |
//! | pod enabled (namespace enabled or unlabelled)               | yes      |
//! | pod unset, namespace `istio-injection=enabled`              | yes      |
//! | pod unset, namespace unlabelled (or another value)          | no (Istio's `enableNamespacesByDefault: false`) |
//! | pod unset, namespace labels not known                       | yes (see below) |
//!
//! The AdmissionReview does not carry the namespace's labels. In a cluster the API server only calls
//! the webhook when the MutatingWebhookConfiguration's selectors match, and weft's (like Istio's)
//! has two entries: namespaceSelector `istio-injection=enabled` with objectSelector
//! `sidecar.istio.io/inject NotIn (false)`, and namespaceSelector `istio-injection DoesNotExist`
//! with objectSelector `sidecar.istio.io/inject In (true)`. So a call with unknown namespace labels
//! means one of those matched, and only the pod's own opt-out is left to check (istiod behaves the
//! same: it never reads the namespace). When a namespace-label lookup is given (the Kubernetes
//! registry's), the whole table applies, so a misconfigured webhook still does the right thing.
//!
//! Istio's `neverInjectSelector`/`alwaysInjectSelector` (empty by default) and revision labels
//! (`istio.io/rev`) are not supported: weft has one control plane revision.

use std::collections::BTreeMap;

use serde_json::Value;

/// The namespace label (Istio's).
pub const NAMESPACE_LABEL: &str = "istio-injection";
/// The pod label and annotation (Istio's).
pub const POD_KEY: &str = "sidecar.istio.io/inject";
/// Namespaces never injected, whatever their labels say (`pilot inject`'s list).
pub use crate::inject::SYSTEM_NAMESPACES;

/// The decision and, when the pod is left alone, why (shown as an admission warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Inject.
    Inject,
    /// Leave the pod as it is.
    Skip(String),
}

/// A tri-state injection setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    Enabled,
    Disabled,
    Unset,
}

/// Applies the table in the module docs to a pod object (JSON) in `namespace`, with the namespace's
/// labels when known.
pub fn decide(
    pod: &Value,
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Decision {
    if pod.pointer("/spec/hostNetwork") == Some(&Value::Bool(true)) {
        return Decision::Skip("the pod has host networking enabled".into());
    }
    if SYSTEM_NAMESPACES.contains(&namespace) {
        return Decision::Skip(format!("{namespace} is a system namespace"));
    }
    let namespace_setting = match namespace_labels.map(|l| l.get(NAMESPACE_LABEL)) {
        None => None,
        Some(Some(v)) if v == "enabled" => Some(Setting::Enabled),
        Some(Some(v)) if v == "disabled" => Some(Setting::Disabled),
        Some(_) => Some(Setting::Unset),
    };
    if namespace_setting == Some(Setting::Disabled) {
        return Decision::Skip(format!(
            "namespace {namespace} has {NAMESPACE_LABEL}=disabled"
        ));
    }
    match pod_setting(pod) {
        Setting::Disabled => Decision::Skip(format!("the pod has {POD_KEY} disabled")),
        Setting::Enabled => Decision::Inject,
        Setting::Unset => match namespace_setting {
            None | Some(Setting::Enabled) => Decision::Inject,
            Some(_) => Decision::Skip(format!(
                "neither namespace {namespace} ({NAMESPACE_LABEL}=enabled) nor the pod ({POD_KEY}=true) asks for injection"
            )),
        },
    }
}

/// The pod's own setting: its label, else its annotation.
fn pod_setting(pod: &Value) -> Setting {
    let value = ["labels", "annotations"]
        .iter()
        .find_map(|field| pod.get("metadata")?.get(field)?.get(POD_KEY));
    let text = match value {
        None | Some(Value::Null) => return Setting::Unset,
        Some(Value::String(s)) => s.to_ascii_lowercase(),
        // Not a string (a malformed object): whatever it is, it is not a "yes".
        Some(_) => return Setting::Disabled,
    };
    match text.as_str() {
        "" => Setting::Unset,
        "y" | "yes" | "true" | "on" => Setting::Enabled,
        _ => Setting::Disabled,
    }
}

/// Whether the pod's annotation says "disabled" while its label (which wins) says "enabled": the
/// inject handler then hides the annotation from `pilot inject`'s code, which honours either.
pub fn annotation_overridden(pod: &Value) -> bool {
    let get = |field: &str| {
        pod.get("metadata")
            .and_then(|m| m.get(field))
            .and_then(|m| m.get(POD_KEY))
            .is_some()
    };
    get("labels") && get("annotations") && pod_setting(pod) == Setting::Enabled
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, annotations: Value) -> Value {
        json!({"metadata": {"labels": labels, "annotations": annotations}, "spec": {}})
    }

    fn ns(value: Option<&str>) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([("kubernetes.io/metadata.name".into(), "x".into())]);
        if let Some(v) = value {
            labels.insert(NAMESPACE_LABEL.into(), v.into());
        }
        labels
    }

    #[test]
    fn the_documented_table() {
        let none = json!({});
        let on = json!({POD_KEY: "true"});
        let off = json!({POD_KEY: "false"});
        let enabled = ns(Some("enabled"));
        let disabled = ns(Some("disabled"));
        let unlabelled = ns(None);
        let other = ns(Some("maybe"));
        let inject = |p: &Value, labels: Option<&BTreeMap<String, String>>| {
            decide(p, "default", labels) == Decision::Inject
        };
        // (pod, namespace labels, injected)
        type Case<'a> = (Value, Option<&'a BTreeMap<String, String>>, bool);
        let cases: Vec<Case<'_>> = vec![
            (pod(none.clone(), none.clone()), Some(&enabled), true),
            (pod(none.clone(), none.clone()), Some(&unlabelled), false),
            (pod(none.clone(), none.clone()), Some(&other), false),
            (pod(none.clone(), none.clone()), Some(&disabled), false),
            (pod(none.clone(), none.clone()), None, true),
            (pod(on.clone(), none.clone()), Some(&unlabelled), true),
            (pod(on.clone(), none.clone()), Some(&enabled), true),
            (pod(on.clone(), none.clone()), Some(&disabled), false),
            (pod(none.clone(), on.clone()), Some(&unlabelled), true),
            (pod(off.clone(), none.clone()), Some(&enabled), false),
            (pod(none.clone(), off.clone()), Some(&enabled), false),
            (pod(off.clone(), none.clone()), None, false),
            (pod(none.clone(), off.clone()), None, false),
            // The label wins over the annotation, both ways.
            (pod(on.clone(), off.clone()), Some(&unlabelled), true),
            (pod(off.clone(), on.clone()), Some(&enabled), false),
            // istiod's spellings.
            (
                pod(json!({POD_KEY: "Yes"}), none.clone()),
                Some(&unlabelled),
                true,
            ),
            (
                pod(json!({POD_KEY: "on"}), none.clone()),
                Some(&unlabelled),
                true,
            ),
            (
                pod(json!({POD_KEY: "nope"}), none.clone()),
                Some(&enabled),
                false,
            ),
            (
                pod(json!({POD_KEY: ""}), none.clone()),
                Some(&enabled),
                true,
            ),
            (
                pod(json!({POD_KEY: false}), none.clone()),
                Some(&enabled),
                false,
            ),
        ];
        for (i, (p, labels, want)) in cases.iter().enumerate() {
            assert_eq!(inject(p, *labels), *want, "case {i}: {p} in {labels:?}");
        }
    }

    #[test]
    fn host_network_and_system_namespaces_are_never_injected() {
        let host =
            json!({"metadata": {"labels": {POD_KEY: "true"}}, "spec": {"hostNetwork": true}});
        assert!(
            matches!(decide(&host, "default", None), Decision::Skip(r) if r.contains("host networking"))
        );
        let p = pod(json!({POD_KEY: "true"}), json!({}));
        for namespace in SYSTEM_NAMESPACES {
            assert!(matches!(
                decide(&p, namespace, Some(&ns(Some("enabled")))),
                Decision::Skip(_)
            ));
        }
    }

    #[test]
    fn an_overriding_label_is_detected() {
        assert!(annotation_overridden(&pod(
            json!({POD_KEY: "true"}),
            json!({POD_KEY: "false"})
        )));
        assert!(!annotation_overridden(&pod(
            json!({POD_KEY: "true"}),
            json!({})
        )));
        assert!(!annotation_overridden(&pod(
            json!({POD_KEY: "false"}),
            json!({POD_KEY: "true"})
        )));
    }
}
