//! The CRDs of the Istio kinds weft serves, under Istio's own names (so Istio's YAML applies
//! unchanged, and so they must not be applied over an existing Istio's: `pilot install
//! --skip-crds`).
//!
//! The schemas are structural and describe the fields weft reads, with their types; parts weft
//! passes through or checks itself (`match`, `fault`, `retries`, ...) are objects with
//! `x-kubernetes-preserve-unknown-fields`, as is `status` in Istio's CRDs. A field the schema does
//! not name is refused by `kubectl apply` (strict field validation), so every top-level field of
//! Istio's API is named here even where weft ignores it.

use serde_json::{Value, json};

/// An object whose contents the API server keeps as they are.
fn open() -> Value {
    json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn string() -> Value {
    json!({"type": "string"})
}

fn strings() -> Value {
    json!({"type": "array", "items": string()})
}

fn string_map() -> Value {
    json!({"type": "object", "additionalProperties": string()})
}

fn array_of(items: Value) -> Value {
    json!({"type": "array", "items": items})
}

fn destination() -> Value {
    json!({
        "type": "object",
        "required": ["host"],
        "properties": {
            "host": string(),
            "subset": string(),
            "port": {"type": "object", "properties": {
                "number": {"type": "integer", "minimum": 0, "maximum": 4294967295_u64}
            }},
        },
    })
}

fn percent() -> Value {
    json!({"type": "object", "properties": {"value": {"type": "number", "format": "double"}}})
}

fn virtual_service() -> Value {
    let route = json!({
        "type": "object",
        "properties": {
            "name": string(),
            "match": array_of(open()),
            "route": array_of(json!({
                "type": "object",
                "properties": {
                    "destination": destination(),
                    "weight": {"type": "integer", "format": "int32"},
                    "headers": open(),
                },
            })),
            "redirect": open(),
            "directResponse": open(),
            "delegate": open(),
            "rewrite": open(),
            "timeout": string(),
            "retries": open(),
            "fault": open(),
            "mirror": destination(),
            "mirrors": array_of(json!({
                "type": "object",
                "properties": {"destination": destination(), "percentage": percent()},
            })),
            "mirrorPercent": {"type": "integer", "nullable": true},
            "mirrorPercentage": percent(),
            "corsPolicy": open(),
            "headers": open(),
        },
    });
    json!({
        "type": "object",
        "properties": {
            "hosts": strings(),
            "gateways": strings(),
            "http": array_of(route),
            "tls": array_of(open()),
            "tcp": array_of(open()),
            "exportTo": strings(),
        },
    })
}

fn destination_rule() -> Value {
    let tls = json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {
            "mode": {"type": "string", "enum": ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]},
        },
    });
    let policy = json!({
        "type": "object",
        "properties": {
            "tls": tls,
            "loadBalancer": open(),
            "connectionPool": open(),
            "outlierDetection": open(),
            "portLevelSettings": array_of(open()),
            "tunnel": open(),
            "proxyProtocol": open(),
        },
    });
    json!({
        "type": "object",
        "required": ["host"],
        "properties": {
            "host": string(),
            "trafficPolicy": policy,
            "subsets": array_of(json!({
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": string(),
                    "labels": string_map(),
                    "trafficPolicy": policy,
                },
            })),
            "exportTo": strings(),
            "workloadSelector": {"type": "object", "properties": {"matchLabels": string_map()}},
        },
    })
}

fn peer_authentication() -> Value {
    let mode = json!({
        "type": "object",
        "properties": {
            "mode": {"type": "string", "enum": ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]},
        },
    });
    json!({
        "type": "object",
        "properties": {
            "selector": {"type": "object", "properties": {"matchLabels": string_map()}},
            "mtls": mode,
            "portLevelMtls": {"type": "object", "additionalProperties": mode},
        },
    })
}

/// The whole object's schema: the served spec, and status kept as written (Istio's).
fn schema(spec: Value) -> Value {
    json!({"openAPIV3Schema": {
        "type": "object",
        "properties": {
            "spec": spec,
            "status": open(),
        },
    }})
}

fn crd(
    group: &str,
    kind: &str,
    plural: &str,
    short: &str,
    versions: &[&str],
    spec: &Value,
) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|version| {
            json!({
                "name": version,
                "served": true,
                // v1 is stored: the API server converts nothing (the schemas are the same), so
                // every version reads and writes the same objects.
                "storage": *version == "v1",
                "schema": schema(spec.clone()),
                "subresources": {"status": {}},
            })
        })
        .collect();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.{group}"),
            "labels": super::labels(None),
        },
        "spec": {
            "group": group,
            "names": {
                "kind": kind,
                "listKind": format!("{kind}List"),
                "plural": plural,
                "singular": kind.to_ascii_lowercase(),
                "shortNames": [short],
                "categories": ["istio-io", format!("{}-istio-io", group.split('.').next().unwrap_or(group))],
            },
            "scope": "Namespaced",
            "versions": versions,
        },
    })
}

/// VirtualService and DestinationRule (`networking.istio.io` v1, v1beta1, v1alpha3) and
/// PeerAuthentication (`security.istio.io` v1, v1beta1); v1 stored.
pub fn crds() -> Vec<Value> {
    let networking = ["v1", "v1beta1", "v1alpha3"];
    vec![
        crd(
            "networking.istio.io",
            "VirtualService",
            "virtualservices",
            "vs",
            &networking,
            &virtual_service(),
        ),
        crd(
            "networking.istio.io",
            "DestinationRule",
            "destinationrules",
            "dr",
            &networking,
            &destination_rule(),
        ),
        crd(
            "security.istio.io",
            "PeerAuthentication",
            "peerauthentications",
            "pa",
            &["v1", "v1beta1"],
            &peer_authentication(),
        ),
    ]
}
