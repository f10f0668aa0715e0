//! Golden translation tests: each directory under `testdata/golden/` holds `input.yaml` (Istio and
//! Service objects), `workloads.json` (the live workloads, which one is the node, mesh options) and
//! `expected.json` (the node's `ProxyConfig` as canonical JSON). `UPDATE_GOLDEN=1 cargo test`
//! rewrites the expected files; review every change by eye before keeping it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use weft_pilot_config::translate::{MeshOptions, Workload, fingerprint, to_json, translate};
use weft_pilot_config::{Resource, parse_documents};

/// `workloads.json`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    /// Name of the workload whose view is translated.
    node: String,
    #[serde(default)]
    mesh: MeshFile,
    workloads: Vec<WorkloadFile>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeshFile {
    #[serde(default)]
    mirror_shadow_suffix: Option<bool>,
    #[serde(default)]
    sampling_percent: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default = "default_namespace")]
    service_account: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    ip: String,
    #[serde(default)]
    ports: Vec<u32>,
    #[serde(default = "default_inbound_port")]
    inbound_port: u32,
    #[serde(default = "yes")]
    captured: bool,
}

fn default_namespace() -> String {
    "default".to_string()
}

fn default_inbound_port() -> u32 {
    15006
}

fn yes() -> bool {
    true
}

struct Case {
    resources: Vec<Resource>,
    workloads: Vec<Workload>,
    node: Workload,
    mesh: MeshOptions,
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden")
}

fn load(dir: &Path) -> Case {
    let yaml = fs::read_to_string(dir.join("input.yaml")).unwrap();
    let resources = match parse_documents("input.yaml", &yaml, "default") {
        Ok(resources) => resources,
        Err(errors) => panic!("{}: input.yaml does not parse:\n{errors}", dir.display()),
    };
    let file: CaseFile =
        serde_json::from_str(&fs::read_to_string(dir.join("workloads.json")).unwrap()).unwrap();
    let workloads: Vec<Workload> = file
        .workloads
        .into_iter()
        .map(|w| Workload {
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
            labels: w.labels,
            ip: w.ip,
            ports: w.ports,
            inbound_port: w.inbound_port,
            captured: w.captured,
            workload_name: String::new(),
            no_sidecar: false,
        })
        .collect();
    let node = workloads
        .iter()
        .find(|w| w.name == file.node)
        .unwrap_or_else(|| panic!("{}: node {} not among workloads", dir.display(), file.node))
        .clone();
    let mut mesh = MeshOptions::default();
    if let Some(suffix) = file.mesh.mirror_shadow_suffix {
        mesh.mirror_shadow_suffix = suffix;
    }
    if let Some(percent) = file.mesh.sampling_percent {
        mesh.sampling_percent = percent;
    }
    Case {
        resources,
        workloads,
        node,
        mesh,
    }
}

fn cases() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn golden_cases() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let dirs = cases();
    assert!(
        dirs.len() >= 10,
        "expected the golden cases, found {dirs:?}"
    );
    let mut failures = Vec::new();
    for dir in dirs {
        let case = load(&dir);
        let config = translate(&case.resources, &case.workloads, &case.node, &case.mesh);
        let actual = serde_json::to_string_pretty(&to_json(&config)).unwrap() + "\n";
        let path = dir.join("expected.json");
        if update {
            fs::write(&path, &actual).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&path).unwrap_or_default();
        if expected != actual {
            let line = expected
                .lines()
                .zip(actual.lines())
                .position(|(e, a)| e != a)
                .unwrap_or(expected.lines().count().min(actual.lines().count()));
            failures.push(format!(
                "{}: differs from expected.json first at line {} (UPDATE_GOLDEN=1 rewrites it; review the diff)\n  expected: {:?}\n  actual:   {:?}",
                dir.display(),
                line + 1,
                expected.lines().nth(line).unwrap_or("<end>"),
                actual.lines().nth(line).unwrap_or("<end>"),
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The view must not depend on the order objects and workloads arrive in (the store and the
/// registry give no order guarantee), nor on the order of prost's hash maps.
#[test]
fn every_case_is_independent_of_input_order() {
    for dir in cases() {
        let case = load(&dir);
        let forward = translate(&case.resources, &case.workloads, &case.node, &case.mesh);
        let mut resources = case.resources.clone();
        resources.reverse();
        let mut workloads = case.workloads.clone();
        workloads.reverse();
        let backward = translate(&resources, &workloads, &case.node, &case.mesh);
        assert_eq!(forward, backward, "{}", dir.display());
        assert_eq!(
            fingerprint(&forward),
            fingerprint(&backward),
            "{}",
            dir.display()
        );
        assert_eq!(to_json(&forward), to_json(&backward), "{}", dir.display());
    }
}
