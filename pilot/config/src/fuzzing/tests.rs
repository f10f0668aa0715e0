//! The committed `pilot_yaml` corpus, replayed through the fuzz target's own function; and the
//! generator of the `route_table` seeds (real pushes, from the examples).

use std::path::PathBuf;

use prost::Message;

use super::apply_yaml;

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(name)
}

fn seeds(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let data = std::fs::read(&f).unwrap();
            (f, data)
        })
        .collect()
}

#[test]
fn pilot_yaml_corpus() {
    let seeds = seeds("pilot_yaml");
    assert!(seeds.len() >= 10, "{} seeds", seeds.len());
    let mut accepted = 0;
    for (file, data) in seeds {
        let run = std::panic::catch_unwind(|| apply_yaml(&data));
        assert!(run.is_ok(), "{} fails", file.display());
        accepted += usize::from(matches!(run, Ok(Some(_))));
    }
    // The examples themselves are valid: a parser that refused everything would pass the rest.
    assert!(accepted >= 5, "only {accepted} seeds accepted");
}

/// Writes `fuzz/corpus/route_table/` from the examples: the pushes pilot makes to the seed's sleep
/// pod, as the discovery response bytes the sidecar decodes. Run by hand after a proto change:
/// `cargo test -p weft-pilot-config write_route_table_seeds -- --ignored`.
#[test]
#[ignore = "writes the corpus"]
fn write_route_table_seeds() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples");
    let service = std::fs::read(examples.join("httpbin-service.yaml")).unwrap();
    let pilot_yaml = corpus("pilot_yaml");
    for name in [
        "example-all-v1.yaml",
        "example-mirror-v2.yaml",
        "redirect-rewrite-mirror.yaml",
        "istio-fault-injection-details-v1.yaml",
    ] {
        let mut text = service.clone();
        text.extend_from_slice(b"\n---\n");
        text.extend(std::fs::read(pilot_yaml.join(name)).unwrap());
        let config = apply_yaml(&text).expect("the examples are valid");
        let response = weft_proto::discovery::DiscoveryResponse {
            version_info: "1".into(),
            nonce: "n1".into(),
            config: Some(config),
        };
        let out = corpus("route_table").join(name.replace(".yaml", ".pb"));
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        std::fs::write(out, response.encode_to_vec()).unwrap();
    }
}
