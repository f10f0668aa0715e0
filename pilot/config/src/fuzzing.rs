//! Thin wrappers over `pilot apply`'s parsing of YAML from outside, for the cargo-fuzz targets in
//! `fuzz/` (feature `fuzzing`) and for [`tests`], which replays the committed corpus through the
//! same function on every `cargo test`.

// A broken invariant panics on purpose here: a panic is what libFuzzer reports.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;

use weft_proto::discovery as pb;

use crate::translate::{MeshOptions, Workload, translate};
use crate::{analyze, parse_documents, validate};

/// The workloads the fuzzed objects are translated for: the seed's pods (sleep calls httpbin v1/v2).
pub fn workloads() -> Vec<Workload> {
    let pod = |name: &str, labels: &[(&str, &str)], ip: &str| Workload {
        name: name.into(),
        namespace: "default".into(),
        service_account: labels[0].1.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        ip: ip.into(),
        ports: vec![80],
        inbound_port: 15006,
        captured: true,
        workload_name: String::new(),
        no_sidecar: false,
    };
    vec![
        pod("sleep-0", &[("app", "sleep")], "10.233.0.9"),
        pod(
            "httpbin-v1-0",
            &[("app", "httpbin"), ("version", "v1")],
            "10.233.0.10",
        ),
        pod(
            "httpbin-v2-0",
            &[("app", "httpbin"), ("version", "v2")],
            "10.233.0.11",
        ),
    ]
}

/// `pilot apply` on `data`: parse and validate every document (never a panic); what is accepted is
/// valid by [`validate`] on its own, analyses, and translates into the view pilot would push to the
/// seed's sleep pod, which is returned. A refusal names at least one problem, each printable.
pub fn apply_yaml(data: &[u8]) -> Option<pb::ProxyConfig> {
    // The CLI reads files as UTF-8 text before anything parses them.
    let text = std::str::from_utf8(data).ok()?;
    match parse_documents("fuzz.yaml", text, "default") {
        Ok(resources) => {
            for resource in &resources {
                let problems = validate(resource);
                assert!(problems.is_empty(), "accepted but invalid: {problems:?}");
            }
            let _ = analyze(&resources);
            let workloads = workloads();
            Some(translate(
                &resources,
                &workloads,
                &workloads[0],
                &MeshOptions::default(),
            ))
        }
        Err(errors) => {
            assert!(!errors.errors().is_empty(), "refused without a reason");
            for error in errors.errors() {
                assert!(!error.to_string().is_empty());
            }
            None
        }
    }
}

#[cfg(test)]
mod tests;
