#[cfg(test)] // the whole file is the test module; marks it for tools that scan for test code
use super::*;

fn parse(text: &str) -> Vec<Resource> {
    weft_pilot_config::parse_documents("test.yaml", text, "default").unwrap()
}

fn vs(name: &str, host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {name}\nspec:\n  hosts: [{host}]\n  http:\n  - route:\n    - destination:\n        host: {host}\n"
    )
}

fn svc(name: &str, cluster_ip: Option<&str>) -> String {
    let ip = cluster_ip.map_or(String::new(), |ip| format!("  clusterIP: {ip}\n"));
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n{ip}  ports:\n  - port: 80\n"
    )
}

fn outcomes(result: Vec<(ResourceKey, Outcome)>) -> Vec<Outcome> {
    result.into_iter().map(|(_, o)| o).collect()
}

fn ip_of(store: &Store, name: &str) -> String {
    let key = ResourceKey {
        kind: Kind::Service,
        namespace: "default".into(),
        name: name.into(),
    };
    let snapshot = store.snapshot();
    match &snapshot.get(&key).unwrap().resource {
        Resource::Service(s) => s.spec.cluster_ip.clone().unwrap(),
        other => panic!("not a Service: {other:?}"),
    }
}

#[test]
fn created_unchanged_configured_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.snapshot().revision(), 0);

    let first = store.apply(parse(&vs("a", "a"))).unwrap();
    assert_eq!(outcomes(first), [Outcome::Created]);
    let snap = store.snapshot();
    assert_eq!(snap.revision(), 1);
    let a = snap.of_kind(Kind::VirtualService).next().unwrap().clone();
    assert_eq!((a.resource_version, a.generation), (1, 1));

    assert_eq!(
        outcomes(store.apply(parse(&vs("a", "a"))).unwrap()),
        [Outcome::Unchanged]
    );
    assert_eq!(store.snapshot().revision(), 1);

    // A label change is a change, but not a spec change: the generation stays.
    let labelled = vs("a", "a").replace("name: a\n", "name: a\n  labels: {x: y}\n");
    assert_eq!(
        outcomes(store.apply(parse(&labelled)).unwrap()),
        [Outcome::Configured]
    );
    let a = store
        .snapshot()
        .of_kind(Kind::VirtualService)
        .next()
        .unwrap()
        .clone();
    assert_eq!((a.resource_version, a.generation), (2, 1));

    let respecced = labelled.replace("hosts: [a]", "hosts: [a, b]");
    let result = store
        .apply([parse(&respecced), parse(&vs("b", "b"))].concat())
        .unwrap();
    assert_eq!(outcomes(result), [Outcome::Configured, Outcome::Created]);
    let snap = store.snapshot();
    assert_eq!(snap.revision(), 3);
    let a = snap.of_kind(Kind::VirtualService).next().unwrap().clone();
    assert_eq!((a.resource_version, a.generation), (3, 2));
    assert_eq!(snap.of_kind(Kind::VirtualService).count(), 2);
    assert_eq!(snap.of_kind(Kind::Service).count(), 0);
}

#[test]
fn a_failing_apply_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.apply(parse(&svc("one", Some("10.96.0.50")))).unwrap();
    // The VirtualService comes first and is fine; the Service's IP is taken: neither is stored.
    let input = [parse(&vs("a", "a")), parse(&svc("two", Some("10.96.0.50")))].concat();
    let err = store.apply(input).unwrap_err();
    assert!(
        matches!(err, StoreError::ClusterIpTaken { ref owner, .. } if owner == "default/one"),
        "{err}"
    );
    let snap = store.snapshot();
    assert_eq!((snap.revision(), snap.len()), (1, 1));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.snapshot().len(), 1);
}

#[test]
fn cluster_ips_are_allocated_kept_checked_and_freed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .apply([parse(&svc("a", None)), parse(&svc("b", None))].concat())
        .unwrap();
    assert_eq!(ip_of(&store, "a"), "10.96.0.2");
    assert_eq!(ip_of(&store, "b"), "10.96.0.3");
    // The same YAML without clusterIP is unchanged and keeps the IP, also across a reopen.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        outcomes(store.apply(parse(&svc("a", None))).unwrap()),
        [Outcome::Unchanged]
    );
    assert_eq!(ip_of(&store, "a"), "10.96.0.2");
    // Stating the stored IP is unchanged too; another one is refused.
    assert_eq!(
        outcomes(store.apply(parse(&svc("a", Some("10.96.0.2")))).unwrap()),
        [Outcome::Unchanged]
    );
    for (ip, what) in [
        ("10.96.0.9", "immutable"),
        ("10.96.0.1", "not in the Service range"),
        ("192.168.0.1", "not in the Service range"),
    ] {
        let err = store.apply(parse(&svc("a", Some(ip)))).unwrap_err();
        assert!(err.to_string().contains(what), "{ip}: {err}");
    }
    // Deleting frees the IP: the next allocation reuses the lowest free address.
    let a = ResourceKey {
        kind: Kind::Service,
        namespace: "default".into(),
        name: "a".into(),
    };
    store.delete(&[a]).unwrap();
    store.apply(parse(&svc("c", None))).unwrap();
    assert_eq!(ip_of(&store, "c"), "10.96.0.2");
    // A user-given free IP is taken as is.
    store.apply(parse(&svc("d", Some("10.100.1.1")))).unwrap();
    assert_eq!(ip_of(&store, "d"), "10.100.1.1");
}

#[test]
fn delete_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.apply(parse(&vs("a", "a"))).unwrap();
    let key = |name: &str| ResourceKey {
        kind: Kind::VirtualService,
        namespace: "default".into(),
        name: name.into(),
    };
    let err = store.delete(&[key("a"), key("x"), key("y")]).unwrap_err();
    match err {
        StoreError::NotFound(missing) => assert_eq!(missing, [key("x"), key("y")]),
        other => panic!("{other}"),
    }
    assert_eq!(store.snapshot().len(), 1);
    assert_eq!(store.delete(&[key("a")]).unwrap(), 2);
    assert!(store.snapshot().is_empty());
}

#[test]
fn snapshots_are_published_only_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut rx = store.subscribe();
    assert!(!rx.has_changed().unwrap());
    store.apply(parse(&vs("a", "a"))).unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update().revision(), 1);
    store.apply(parse(&vs("a", "a"))).unwrap();
    assert!(!rx.has_changed().unwrap());
    store.dry_run(parse(&vs("b", "b"))).unwrap();
    assert!(!rx.has_changed().unwrap());
    assert_eq!(store.snapshot().len(), 1);
}

thread_local! {
    /// Table entries `allocate` visited on this thread (per thread: tests run in parallel).
    pub(super) static ALLOCATION_STEPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[test]
fn allocating_many_cluster_ips_walks_the_table_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.apply(parse(&svc("held", Some("10.96.0.4")))).unwrap();
    // Explicit claims between allocations in the same transaction are skipped, not reused.
    let mut text = [svc("x", None), svc("y", Some("10.96.0.3")), svc("z", None)].join("---\n");
    const N: usize = 1000;
    for i in 0..N {
        text.push_str("---\n");
        text.push_str(&svc(&format!("s{i}"), None));
    }
    ALLOCATION_STEPS.with(|s| s.set(0));
    store.apply(parse(&text)).unwrap();
    let steps = ALLOCATION_STEPS.with(std::cell::Cell::get);
    assert_eq!(ip_of(&store, "x"), "10.96.0.2");
    assert_eq!(ip_of(&store, "z"), "10.96.0.5");
    assert_eq!(ip_of(&store, "s0"), "10.96.0.6");
    let ips: std::collections::BTreeSet<String> = store
        .snapshot()
        .services()
        .filter_map(|s| s.spec.cluster_ip.clone())
        .collect();
    assert_eq!(ips.len(), N + 4, "every Service has its own address");
    // A scan from the range start for each Service visits about N²/2 = 500,000 entries; resuming
    // at the cursor visits each taken address about once.
    assert!(steps <= 2 * (N as u64 + 4), "{steps} table entries visited");
}
