//! The registry of live workloads without Kubernetes: a sidecar's discovery stream, once admitted
//! ([`admit`]: the pod it names exists on the platform and its certificate is the pod's service
//! account), makes that pod an endpoint, with the Pod's labels and address; it stops being one
//! when the stream ends, after a grace period so that a reconnect does not make its endpoints flap,
//! or as soon as the Pod is deleted.
//!
//! Kept behind [`WorkloadSource`] so the Kubernetes registry (pods and endpoints from the API
//! server) replaces it without touching discovery.

pub mod admit;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use weft_pilot_config::translate::Workload;

use crate::store::Snapshot;

/// Where discovery gets the set of live workloads from.
pub trait WorkloadSource: Send + Sync + 'static {
    /// The current workloads, sorted by namespace and name, given the platform's objects `pods`
    /// (the snapshot the push is built from).
    fn workloads(&self, pods: &Snapshot) -> Arc<Vec<Workload>>;
    /// Changes whenever the set of workloads changes (the value is a generation counter).
    fn subscribe(&self) -> watch::Receiver<u64>;
}

/// The self-registration registry.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    changes: watch::Sender<u64>,
    grace: Duration,
    /// `--trust-workload-claims`: registrations are taken as the sidecars declared them.
    trust_claims: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// (namespace, name) -> the workload and the stream that owns it.
    entries: BTreeMap<(String, String), Entry>,
    next_conn: u64,
    generation: u64,
    /// The workloads as of the last [`WorkloadSource::workloads`] call...
    published: Arc<Vec<Workload>>,
    /// ...unless a change came since, or the call is for another snapshot than `published_for`:
    /// then the list is rebuilt on the next call, so that a burst of registrations (many sidecars
    /// connecting) costs one rebuild per push rather than one each.
    stale: bool,
    published_for: u64,
}

#[derive(Debug)]
struct Entry {
    workload: Workload,
    conn: u64,
    connected: bool,
}

/// Proof of registration; dropping it (the stream ended) schedules the workload's removal.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    key: (String, String),
    conn: u64,
}

impl Registry {
    /// An empty registry that keeps disconnected workloads for `grace`; `trust_claims` publishes
    /// registrations as declared instead of resolving them against their Pods.
    pub fn new(grace: Duration, trust_claims: bool) -> Arc<Self> {
        let (changes, _) = watch::channel(0);
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            changes,
            grace,
            trust_claims,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map half-updated (each change is one
        // insert or remove), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers (or re-registers, after a reconnect) a workload; the newest stream owns it.
    pub fn register(self: &Arc<Self>, workload: Workload) -> Registration {
        let key = (workload.namespace.clone(), workload.name.clone());
        let mut inner = self.lock();
        inner.next_conn += 1;
        let conn = inner.next_conn;
        let changed = inner
            .entries
            .get(&key)
            .is_none_or(|e| e.workload != workload);
        inner.entries.insert(
            key.clone(),
            Entry {
                workload,
                conn,
                connected: true,
            },
        );
        if changed {
            self.publish(&mut inner);
        }
        Registration {
            registry: self.clone(),
            key,
            conn,
        }
    }

    fn disconnected(self: &Arc<Self>, key: (String, String), conn: u64) {
        {
            let mut inner = self.lock();
            match inner.entries.get_mut(&key) {
                Some(e) if e.conn == conn => e.connected = false,
                _ => return,
            }
        }
        let registry = self.clone();
        let grace = self.grace;
        let remove = move || {
            let mut inner = registry.lock();
            // Only if no newer stream took the workload over in the meantime.
            if inner
                .entries
                .get(&key)
                .is_some_and(|e| e.conn == conn && !e.connected)
            {
                inner.entries.remove(&key);
                registry.publish(&mut inner);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    tokio::time::sleep(grace).await;
                    remove();
                });
            }
            Err(_) => remove(),
        }
    }

    fn publish(&self, inner: &mut Inner) {
        inner.generation += 1;
        inner.stale = true;
        self.changes.send_replace(inner.generation);
    }
}

impl WorkloadSource for Registry {
    fn workloads(&self, pods: &Snapshot) -> Arc<Vec<Workload>> {
        let mut inner = self.lock();
        if inner.stale || inner.published_for != pods.revision() {
            let entries = inner.entries.values().map(|e| &e.workload);
            let list = if self.trust_claims {
                entries.cloned().collect()
            } else {
                entries
                    .filter_map(|w| {
                        admit::resolve(w, admit::find_pod(pods, &w.namespace, &w.name)?)
                    })
                    .collect()
            };
            inner.published = Arc::new(list);
            inner.published_for = pods.revision();
            inner.stale = false;
        }
        inner.published.clone()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .disconnected(std::mem::take(&mut self.key), self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wl(name: &str, version: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "default".into(),
            service_account: "httpbin".into(),
            labels: [
                ("app".to_string(), "httpbin".to_string()),
                ("version".to_string(), version.to_string()),
            ]
            .into_iter()
            .collect(),
            ip: "10.0.0.1".into(),
            ports: vec![80],
            inbound_port: 15006,
            captured: true,
            workload_name: String::new(),
            no_sidecar: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn workloads_leave_after_the_grace_period_unless_they_reconnect() {
        let r = Registry::new(Duration::from_secs(10), true);
        let mut changes = r.subscribe();
        let reg = r.register(wl("v1", "v1"));
        assert_eq!(r.workloads(&Snapshot::default()).len(), 1);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();

        // Stream drops, and the pod reconnects within the grace period: no flap.
        drop(reg);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let again = r.register(wl("v1", "v1"));
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert_eq!(r.workloads(&Snapshot::default()).len(), 1);
        assert!(
            !changes.has_changed().unwrap(),
            "identical re-registration is not a change"
        );

        // Gone for good: removed once the grace period has passed, not before.
        drop(again);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(r.workloads(&Snapshot::default()).len(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(r.workloads(&Snapshot::default()).len(), 0);
        assert!(changes.has_changed().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn without_trusted_claims_workloads_are_their_pods() {
        use weft_pilot_config::Resource;
        use weft_pilot_config::pod::Pod;
        let r = Registry::new(Duration::from_secs(10), false);
        let pod = |version: &str, ip: &str| {
            let mut w = wl("p", version);
            w.service_account = "httpbin".into();
            Resource::Pod(Pod::new(
                "default",
                "p",
                "httpbin",
                w.labels,
                Some(ip.to_string()),
            ))
        };
        let _reg = r.register(wl("p", "v1"));
        // No pod: not an endpoint.
        assert!(r.workloads(&Snapshot::default()).is_empty());
        // The pod's labels and address, not the registration's.
        let s1 = Snapshot::from_resources(1, vec![pod("v2", "10.0.0.9")]);
        let list = r.workloads(&s1);
        assert_eq!(list[0].labels["version"], "v2");
        assert_eq!(list[0].ip, "10.0.0.9");
        // The pod deleted (a later revision without it): gone at once, no grace.
        let s2 = Snapshot::from_resources(2, vec![]);
        assert!(r.workloads(&s2).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_pod_replaces_the_old_registration() {
        let r = Registry::new(Duration::from_secs(10), true);
        let old = r.register(wl("p", "v1"));
        let _new = r.register(wl("p", "v2"));
        assert_eq!(r.workloads(&Snapshot::default())[0].labels["version"], "v2");
        // The old stream ending must not remove the new registration.
        drop(old);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(r.workloads(&Snapshot::default()).len(), 1);
    }
}
