//! The durable config store: every applied object with its versions, in one redb file, plus the
//! immutable [`Snapshot`] published on a `watch` channel after every committed change.
//!
//! Writes are serialised by a mutex held across commit and publish, so snapshots are published in
//! commit order. Reads (`get`) come from the in-memory snapshot; redb is read only at open.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use weft_pilot_config::service::Service;
use weft_pilot_config::{Kind, Resource, ResourceKey};

/// The store's file inside `--data-dir`.
pub const STORE_FILE: &str = "pilot.redb";

/// Object key (`Kind/namespace/name`; names cannot contain `/`) -> JSON [`Record`].
const OBJECTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("objects");
/// Allocated or claimed Service IPv4 cluster IPs (as `u32`) -> object key of the owning Service.
const CLUSTER_IPS: TableDefinition<'_, u32, &str> = TableDefinition::new("cluster_ips");
/// Store-wide counters.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// First address Kubernetes' default Service range `10.96.0.0/12` allocates from: the network
/// address is skipped, and 10.96.0.1 is what Kubernetes gives the API server.
const CLUSTER_IP_FIRST: u32 = u32::from_be_bytes([10, 96, 0, 2]);
/// Last allocatable address (the broadcast address 10.111.255.255 is skipped).
const CLUSTER_IP_LAST: u32 = u32::from_be_bytes([10, 111, 255, 254]);
/// The range as users write it, for messages.
pub const CLUSTER_IP_RANGE: &str = "10.96.0.0/12";

/// Errors from the store. User mistakes (cluster IPs, missing objects) are distinct from storage
/// failures so the API can map them to the right status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The redb file could not be opened (another pilot may hold it).
    #[error("cannot open the store {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// A read, write or commit failed.
    #[error("store I/O failed: {0}")]
    Storage(#[from] redb::Error),
    /// A stored record could not be decoded (or an object could not be encoded).
    #[error("stored object {key} is unreadable: {source}")]
    Corrupt {
        /// The object key as stored.
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A user-given `spec.clusterIP` is not an allocatable IPv4 address of the Service range.
    #[error(
        "Service {key}: spec.clusterIP {ip:?} is not in the Service range {CLUSTER_IP_RANGE} \
         (10.96.0.0, 10.96.0.1 and 10.111.255.255 are reserved); omit it to have one allocated"
    )]
    ClusterIpOutOfRange {
        /// The Service.
        key: ResourceKey,
        /// The address as written.
        ip: String,
    },
    /// A user-given `spec.clusterIP` belongs to another Service.
    #[error("Service {key}: spec.clusterIP {ip} is already allocated to Service {owner}")]
    ClusterIpTaken {
        /// The Service being applied.
        key: ResourceKey,
        /// The address.
        ip: Ipv4Addr,
        /// The Service holding it (`namespace/name`).
        owner: String,
    },
    /// The applied Service names a different cluster IP than the stored one.
    #[error(
        "Service {key}: spec.clusterIP is immutable: it is {stored}, the applied object says {applied}; \
         delete the Service first to change it"
    )]
    ClusterIpImmutable {
        /// The Service.
        key: ResourceKey,
        /// The stored address.
        stored: Ipv4Addr,
        /// The address in the applied object.
        applied: String,
    },
    /// Every address of the Service range is taken.
    #[error("Service {0}: no free cluster IP left in {CLUSTER_IP_RANGE}")]
    ClusterIpsExhausted(ResourceKey),
    /// Objects asked for do not exist; nothing was changed.
    #[error("not found: {}", list(.0))]
    NotFound(Vec<ResourceKey>),
    /// The caller cancelled the write before it committed; nothing was changed.
    #[error("cancelled before anything was stored")]
    Cancelled,
}

fn list(keys: &[ResourceKey]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What an apply did to one object (kubectl's words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The object did not exist.
    Created,
    /// The object existed and changed.
    Configured,
    /// The object existed and is identical; nothing was bumped.
    Unchanged,
}

impl Outcome {
    /// `created`, `configured` or `unchanged`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// One stored object with its server-set fields.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredObject {
    /// The object as applied (a Service with its allocated `spec.clusterIP` filled in).
    pub resource: Resource,
    /// The store revision of the object's last change.
    pub resource_version: u64,
    /// Bumped when `spec` changes (not for label or annotation changes), starting at 1.
    pub generation: u64,
    /// When the object was first created (whole seconds).
    pub created: SystemTime,
}

/// The on-disk form of a [`StoredObject`].
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    object: serde_json::Value,
    resource_version: u64,
    generation: u64,
    created_unix: u64,
}

impl Record {
    fn decode(key: &str, bytes: &[u8]) -> Result<StoredObject, StoreError> {
        let corrupt = |source| StoreError::Corrupt {
            key: key.to_string(),
            source,
        };
        let record: Record = serde_json::from_slice(bytes).map_err(corrupt)?;
        Ok(StoredObject {
            resource: serde_json::from_value(record.object).map_err(corrupt)?,
            resource_version: record.resource_version,
            generation: record.generation,
            created: UNIX_EPOCH + Duration::from_secs(record.created_unix),
        })
    }

    fn encode(key: &str, object: &StoredObject) -> Result<Vec<u8>, StoreError> {
        let corrupt = |source| StoreError::Corrupt {
            key: key.to_string(),
            source,
        };
        let record = Record {
            object: serde_json::to_value(&object.resource).map_err(corrupt)?,
            resource_version: object.resource_version,
            generation: object.generation,
            created_unix: unix_seconds(object.created),
        };
        serde_json::to_vec(&record).map_err(corrupt)
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn object_key(key: &ResourceKey) -> String {
    format!("{}/{}/{}", key.kind.as_str(), key.namespace, key.name)
}

// === impl Snapshot ===

/// An immutable view of the whole store at one revision: what discovery consumes.
/// Cloning the `Arc` is cheap; objects are ordered by kind, namespace, name.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    revision: u64,
    objects: BTreeMap<ResourceKey, Arc<StoredObject>>,
}

impl Snapshot {
    /// A snapshot of objects that do not come from a store (the Kubernetes registry's view of the
    /// cluster, tests): `objects` at `revision`. A later object with the key of an earlier one
    /// replaces it.
    pub fn from_objects(revision: u64, objects: impl IntoIterator<Item = StoredObject>) -> Self {
        Self {
            revision,
            objects: objects
                .into_iter()
                .map(|object| (object.resource.key(), Arc::new(object)))
                .collect(),
        }
    }

    /// [`Snapshot::from_objects`] for plain resources, each at `revision`, generation 1, created now.
    pub fn from_resources(revision: u64, resources: Vec<Resource>) -> Self {
        let created = SystemTime::now();
        Self::from_objects(
            revision,
            resources.into_iter().map(|resource| StoredObject {
                resource,
                resource_version: revision,
                generation: 1,
                created,
            }),
        )
    }

    /// The store revision this snapshot shows (0 for an empty, never-written store).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the store holds no objects.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// One object.
    pub fn get(&self, key: &ResourceKey) -> Option<&Arc<StoredObject>> {
        self.objects.get(key)
    }

    /// Every object, by kind, namespace, name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<StoredObject>> {
        self.objects.values()
    }

    /// The objects of one kind, by namespace and name.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Arc<StoredObject>> {
        let start = ResourceKey {
            kind,
            namespace: String::new(),
            name: String::new(),
        };
        self.objects
            .range(start..)
            .take_while(move |(key, _)| key.kind == kind)
            .map(|(_, object)| object)
    }

    /// Every Service, with its cluster IP filled in.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.of_kind(Kind::Service)
            .filter_map(|object| match &object.resource {
                Resource::Service(service) => Some(service),
                _ => None,
            })
    }

    /// Every object as a plain resource (e.g. for the analyzer).
    pub fn resources(&self) -> Vec<Resource> {
        self.iter().map(|object| object.resource.clone()).collect()
    }

    /// The next snapshot: this one with `changes` applied (`None` removes the object).
    fn with_changes(
        &self,
        revision: u64,
        changes: BTreeMap<ResourceKey, Option<Arc<StoredObject>>>,
    ) -> Snapshot {
        let mut objects = self.objects.clone();
        for (key, change) in changes {
            match change {
                Some(object) => objects.insert(key, object),
                None => objects.remove(&key),
            };
        }
        Snapshot { revision, objects }
    }
}

// === impl Store ===

/// The durable config store. Methods block on disk I/O (a commit fsyncs): call them from
/// `spawn_blocking` in async code.
#[derive(Debug)]
pub struct Store {
    db: Database,
    /// Held from the start of a write transaction until its snapshot is published.
    writer: Mutex<()>,
    published: watch::Sender<Arc<Snapshot>>,
}

impl Store {
    /// Opens (or creates) the store file in `dir` and loads the current snapshot.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(STORE_FILE);
        let db = Database::create(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        // Create the tables up front so read transactions never see them missing.
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(OBJECTS).map_err(db_err)?;
            txn.open_table(CLUSTER_IPS).map_err(db_err)?;
            txn.open_table(META).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;

        let read = db.begin_read().map_err(db_err)?;
        let revision = read
            .open_table(META)
            .map_err(db_err)?
            .get(REVISION)
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(0);
        let mut objects = BTreeMap::new();
        for entry in read
            .open_table(OBJECTS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (key, value) = entry.map_err(db_err)?;
            let object = Record::decode(key.value(), value.value())?;
            objects.insert(object.resource.key(), Arc::new(object));
        }
        let (published, _) = watch::channel(Arc::new(Snapshot { revision, objects }));
        Ok(Store {
            db,
            writer: Mutex::new(()),
            published,
        })
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.published.borrow().clone()
    }

    /// A receiver that sees every snapshot published after a committed change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.published.subscribe()
    }

    /// Stores `resources` in one transaction: all of them, or none if any fails. Identical objects
    /// are `Unchanged`; if nothing changed there is no new revision and nothing is published.
    pub fn apply(
        &self,
        resources: Vec<Resource>,
    ) -> Result<Vec<(ResourceKey, Outcome)>, StoreError> {
        self.write_apply(resources, true, &|| false)
    }

    /// Computes what [`Store::apply`] would do (outcomes and errors) without storing anything.
    pub fn dry_run(
        &self,
        resources: Vec<Resource>,
    ) -> Result<Vec<(ResourceKey, Outcome)>, StoreError> {
        self.write_apply(resources, false, &|| false)
    }

    /// [`Store::apply`], or [`Store::dry_run`] when `dry_run`, that checks `cancelled` before each
    /// object and stops with [`StoreError::Cancelled`], storing nothing, once it returns true.
    pub fn apply_unless(
        &self,
        resources: Vec<Resource>,
        dry_run: bool,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<(ResourceKey, Outcome)>, StoreError> {
        self.write_apply(resources, !dry_run, cancelled)
    }

    /// Deletes `keys` in one transaction; if any is missing, nothing is deleted and the error lists
    /// every missing one. Frees the cluster IPs of deleted Services. Returns the new revision.
    pub fn delete(&self, keys: &[ResourceKey]) -> Result<u64, StoreError> {
        self.delete_existing(keys, &[], false)
            .map(|(revision, _)| revision)
    }

    /// [`Store::delete`] of `keys` plus those of `optional` that exist, in one transaction; with
    /// `skip_missing`, missing `keys` are skipped too. Returns the revision (unchanged when nothing
    /// was deleted) and the keys deleted, in order, each once.
    pub fn delete_existing(
        &self,
        keys: &[ResourceKey],
        optional: &[ResourceKey],
        skip_missing: bool,
    ) -> Result<(u64, Vec<ResourceKey>), StoreError> {
        let _writer = self.lock();
        let txn = self.db.begin_write().map_err(db_err)?;
        let mut changes = BTreeMap::new();
        let mut deleted = Vec::new();
        let mut missing = Vec::new();
        {
            let mut objects = txn.open_table(OBJECTS).map_err(db_err)?;
            let mut ips = txn.open_table(CLUSTER_IPS).map_err(db_err)?;
            let required = keys.iter().map(|k| (k, true));
            for (key, required) in required.chain(optional.iter().map(|k| (k, false))) {
                if changes.contains_key(key) {
                    continue;
                }
                let stored = objects
                    .remove(object_key(key).as_str())
                    .map_err(db_err)?
                    .map(|v| v.value().to_vec());
                let Some(bytes) = stored else {
                    if required {
                        missing.push(key.clone());
                    }
                    continue;
                };
                let object = Record::decode(&object_key(key), &bytes)?;
                if let Some(ip) = cluster_ip_of(&object.resource) {
                    ips.remove(u32::from(ip)).map_err(db_err)?;
                }
                changes.insert(key.clone(), None);
                deleted.push(key.clone());
            }
        }
        if !missing.is_empty() && !skip_missing {
            txn.abort().map_err(db_err)?;
            return Err(StoreError::NotFound(missing));
        }
        if changes.is_empty() {
            let revision = current_revision(&txn)?;
            txn.abort().map_err(db_err)?;
            return Ok((revision, deleted));
        }
        Ok((self.commit(txn, changes)?, deleted))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The mutex guards no data, only ordering, so a panic elsewhere cannot leave it inconsistent.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_apply(
        &self,
        resources: Vec<Resource>,
        commit: bool,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<(ResourceKey, Outcome)>, StoreError> {
        let _writer = self.lock();
        let txn = self.db.begin_write().map_err(db_err)?;
        let revision = current_revision(&txn)? + 1;
        let now = UNIX_EPOCH + Duration::from_secs(unix_seconds(SystemTime::now()));
        let mut outcomes = Vec::with_capacity(resources.len());
        let mut changes = BTreeMap::new();
        let mut stopped = false;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(db_err)?;
            let mut ips = txn.open_table(CLUSTER_IPS).map_err(db_err)?;
            let mut free_from = CLUSTER_IP_FIRST;
            for mut resource in resources {
                if cancelled() {
                    stopped = true;
                    break;
                }
                let key = resource.key();
                let id = object_key(&key);
                let stored = objects
                    .get(id.as_str())
                    .map_err(db_err)?
                    .map(|v| Record::decode(&id, v.value()))
                    .transpose()?;
                if let Resource::Service(service) = &mut resource {
                    let stored_ip = stored.as_ref().and_then(|o| cluster_ip_of(&o.resource));
                    assign_cluster_ip(&mut ips, &key, service, stored_ip, &mut free_from)?;
                }
                let (outcome, object) = match stored {
                    None => (
                        Outcome::Created,
                        StoredObject {
                            resource,
                            resource_version: revision,
                            generation: 1,
                            created: now,
                        },
                    ),
                    Some(old) if same(&old.resource, &resource, None)? => {
                        outcomes.push((key, Outcome::Unchanged));
                        continue;
                    }
                    Some(old) => {
                        let spec_changed = !same(&old.resource, &resource, Some("spec"))?;
                        (
                            Outcome::Configured,
                            StoredObject {
                                resource,
                                resource_version: revision,
                                generation: old.generation + u64::from(spec_changed),
                                created: old.created,
                            },
                        )
                    }
                };
                objects
                    .insert(id.as_str(), Record::encode(&id, &object)?.as_slice())
                    .map_err(db_err)?;
                outcomes.push((key.clone(), outcome));
                changes.insert(key, Some(Arc::new(object)));
            }
        }
        if stopped {
            txn.abort().map_err(db_err)?;
            return Err(StoreError::Cancelled);
        }
        if changes.is_empty() || !commit {
            txn.abort().map_err(db_err)?;
            return Ok(outcomes);
        }
        self.commit(txn, changes)?;
        Ok(outcomes)
    }

    /// Bumps the revision, commits, and publishes the next snapshot (caller holds the writer lock).
    fn commit(
        &self,
        txn: WriteTransaction,
        changes: BTreeMap<ResourceKey, Option<Arc<StoredObject>>>,
    ) -> Result<u64, StoreError> {
        let revision = current_revision(&txn)? + 1;
        txn.open_table(META)
            .map_err(db_err)?
            .insert(REVISION, revision)
            .map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        let next = self.snapshot().with_changes(revision, changes);
        self.published.send_replace(Arc::new(next));
        Ok(revision)
    }
}

/// Converts any of redb's error types through its unified [`redb::Error`].
fn db_err<E: Into<redb::Error>>(error: E) -> StoreError {
    StoreError::Storage(error.into())
}

fn current_revision(txn: &WriteTransaction) -> Result<u64, StoreError> {
    Ok(txn
        .open_table(META)
        .map_err(db_err)?
        .get(REVISION)
        .map_err(db_err)?
        .map(|v| v.value())
        .unwrap_or(0))
}

/// Compares two objects as they serialise (so server-ignored input fields never count), either
/// whole or one top-level field.
fn same(a: &Resource, b: &Resource, field: Option<&str>) -> Result<bool, StoreError> {
    let value = |r: &Resource| {
        serde_json::to_value(r).map_err(|source| StoreError::Corrupt {
            key: object_key(&r.key()),
            source,
        })
    };
    let (a, b) = (value(a)?, value(b)?);
    Ok(match field {
        None => a == b,
        Some(field) => a.get(field) == b.get(field),
    })
}

/// The IPv4 cluster IP a stored Service holds.
fn cluster_ip_of(resource: &Resource) -> Option<Ipv4Addr> {
    match resource {
        Resource::Service(service) => service.spec.cluster_ip.as_deref()?.parse().ok(),
        _ => None,
    }
}

/// Gives `service` its cluster IP: the stored one, the one the user wrote (checked against the
/// range and other Services), or the lowest free address of the range.
///
/// `free_from` is the transaction's allocation cursor: every address below it is known taken.
fn assign_cluster_ip(
    ips: &mut Table<'_, u32, &str>,
    key: &ResourceKey,
    service: &mut Service,
    stored: Option<Ipv4Addr>,
    free_from: &mut u32,
) -> Result<(), StoreError> {
    let owner = format!("{}/{}", key.namespace, key.name);
    let requested = service
        .spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty());
    let ip = match (requested, stored) {
        // Kubernetes keeps the allocated address when an apply omits it.
        (None, Some(stored)) => stored,
        (None, None) => allocate(ips, key, free_from)?,
        (Some(text), stored) => {
            let ip = text
                .parse::<Ipv4Addr>()
                .ok()
                .filter(|ip| (CLUSTER_IP_FIRST..=CLUSTER_IP_LAST).contains(&u32::from(*ip)))
                .ok_or_else(|| StoreError::ClusterIpOutOfRange {
                    key: key.clone(),
                    ip: text.to_string(),
                })?;
            match stored {
                Some(stored) if stored == ip => {}
                Some(stored) => {
                    return Err(StoreError::ClusterIpImmutable {
                        key: key.clone(),
                        stored,
                        applied: text.to_string(),
                    });
                }
                None => {
                    let holder = ips
                        .get(u32::from(ip))
                        .map_err(db_err)?
                        .map(|v| v.value().to_string());
                    if let Some(holder) = holder {
                        return Err(StoreError::ClusterIpTaken {
                            key: key.clone(),
                            ip,
                            owner: holder,
                        });
                    }
                }
            }
            ip
        }
    };
    ips.insert(u32::from(ip), owner.as_str()).map_err(db_err)?;
    service.spec.cluster_ip = Some(ip.to_string());
    Ok(())
}

/// The lowest free address of the range: the first gap in the ordered table at or above
/// `free_from`, which then moves past it.
///
/// Within one transaction addresses are only taken, never freed, so everything below the cursor
/// stays taken and each scan resumes where the last one stopped: allocating for N Services walks
/// the table once, not N times (a scan from the range start made a 4,000-Service apply quadratic).
fn allocate(
    ips: &Table<'_, u32, &str>,
    key: &ResourceKey,
    free_from: &mut u32,
) -> Result<Ipv4Addr, StoreError> {
    let mut candidate = *free_from;
    if candidate <= CLUSTER_IP_LAST {
        for entry in ips.range(candidate..=CLUSTER_IP_LAST).map_err(db_err)? {
            let (taken, _) = entry.map_err(db_err)?;
            #[cfg(test)]
            tests::ALLOCATION_STEPS.with(|steps| steps.set(steps.get() + 1));
            if taken.value() != candidate {
                break;
            }
            candidate += 1;
        }
    }
    if candidate > CLUSTER_IP_LAST {
        return Err(StoreError::ClusterIpsExhausted(key.clone()));
    }
    // The caller takes `candidate` now.
    *free_from = candidate + 1;
    Ok(Ipv4Addr::from(candidate))
}

#[cfg(test)]
mod tests;
