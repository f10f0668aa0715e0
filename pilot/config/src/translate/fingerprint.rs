//! A config's fingerprint: a 64-bit hash pilot compares to decide whether a sidecar needs a push.
//!
//! It must not depend on the iteration order of prost's `map<>` fields (`HashMap`s, whose order
//! differs between two maps with the same entries), so neither the protobuf encoding nor `Debug` can
//! be hashed as they are. Rendering the canonical JSON and hashing that (what this replaced) was
//! stable but cost ~29 ms and tens of thousands of small allocations per 1000-Service view. Here
//! every message is walked once and its fields are fed straight into FNV-1a: maps in key order,
//! everything else in field order, each value framed (strings and lists carry their length, an
//! optional message a presence byte), so two different configs never feed the same bytes. Every
//! message is destructured without `..`: a field added to the proto does not compile until it is
//! hashed here, so a change to it can never be missed. Cost: one pass over the view, allocating only
//! to sort maps with more than one entry.

use weft_proto::discovery as pb;
use weft_proto::discovery::string_match::Kind as PbMatch;

use super::Outbound;

/// A stable 64-bit fingerprint of a config: equal configs give equal fingerprints whatever the
/// order of their maps, in any process (FNV-1a has no per-process seed) and in any build with the
/// same `discovery.proto`.
pub fn fingerprint(config: &pb::ProxyConfig) -> u64 {
    let mut h = Fnv::new();
    config.feed(&mut h);
    h.finish()
}

/// The fingerprint of an [`Outbound`] part: the same as [`fingerprint`] of a config holding only
/// these services and clusters, so it changes exactly when they do.
pub fn fingerprint_outbound(outbound: &Outbound) -> u64 {
    let Outbound { services, clusters } = outbound;
    let mut h = Fnv::new();
    feed_proxy_config(&mut h, None, services, clusters, None, None, &[]);
    h.finish()
}

/// The fingerprint of a config holding only these peers (`ProxyConfig.peers`).
pub fn fingerprint_peers(peers: &[pb::Peer]) -> u64 {
    let mut h = Fnv::new();
    feed_proxy_config(&mut h, None, &[], &[], None, None, peers);
    h.finish()
}

/// FNV-1a, 64 bits, with the framing helpers the [`Feed`] impls use.
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Self(Self::OFFSET)
    }

    fn finish(&self) -> u64 {
        self.0
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(Self::PRIME);
        }
    }

    /// An integer as a LEB128 varint (small values, the usual case, cost one byte).
    fn u64(&mut self, mut value: u64) {
        loop {
            let low = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                self.bytes(&[low]);
                return;
            }
            self.bytes(&[low | 0x80]);
        }
    }

    fn u32(&mut self, value: u32) {
        self.u64(u64::from(value));
    }

    /// Enums: any `i32`, including values this build does not know.
    fn i32(&mut self, value: i32) {
        self.u64(u64::from(value as u32));
    }

    fn bool(&mut self, value: bool) {
        self.bytes(&[u8::from(value)]);
    }

    /// `0.0` and `-0.0` compare equal, so they hash equal too.
    fn f64(&mut self, value: f64) {
        let bits = if value == 0.0 { 0 } else { value.to_bits() };
        self.bytes(&bits.to_le_bytes());
    }

    fn str(&mut self, value: &str) {
        self.u64(value.len() as u64);
        self.bytes(value.as_bytes());
    }

    fn strs(&mut self, values: &[String]) {
        self.u64(values.len() as u64);
        for value in values {
            self.str(value);
        }
    }

    fn list<T: Feed>(&mut self, values: &[T]) {
        self.u64(values.len() as u64);
        for value in values {
            value.feed(self);
        }
    }

    fn opt<T: Feed>(&mut self, value: Option<&T>) {
        match value {
            Some(v) => {
                self.bool(true);
                v.feed(self);
            }
            None => self.bool(false),
        }
    }

    /// A map's entries in key order (its own order is arbitrary). Maps in a view are small (labels,
    /// header operations): sorting references costs one small allocation, none for 0 or 1 entry.
    fn map<'a, K: Ord + 'a, V: 'a>(
        &mut self,
        entries: impl ExactSizeIterator<Item = (&'a K, &'a V)>,
        mut key: impl FnMut(&mut Self, &K),
        mut value: impl FnMut(&mut Self, &V),
    ) {
        self.u64(entries.len() as u64);
        let mut sorted: Vec<(&K, &V)> = entries.collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (k, v) in sorted {
            key(self, k);
            value(self, v);
        }
    }

    fn string_map(&mut self, map: &std::collections::HashMap<String, String>) {
        self.map(map.iter(), |h, k| h.str(k), |h, v| h.str(v));
    }
}

/// A message fed into the hash, field by field.
trait Feed {
    fn feed(&self, h: &mut Fnv);
}

impl Feed for pb::ProxyConfig {
    fn feed(&self, h: &mut Fnv) {
        let pb::ProxyConfig {
            mesh,
            services,
            clusters,
            inbound,
            tracing,
            peers,
        } = self;
        feed_proxy_config(
            h,
            mesh.as_ref(),
            services,
            clusters,
            inbound.as_ref(),
            tracing.as_ref(),
            peers,
        );
    }
}

/// `ProxyConfig`'s fields, shared by [`fingerprint`] and [`fingerprint_outbound`].
fn feed_proxy_config(
    h: &mut Fnv,
    mesh: Option<&pb::MeshSettings>,
    services: &[pb::OutboundService],
    clusters: &[pb::Cluster],
    inbound: Option<&pb::Inbound>,
    tracing: Option<&pb::Tracing>,
    peers: &[pb::Peer],
) {
    h.opt(mesh);
    h.list(services);
    h.list(clusters);
    h.opt(inbound);
    h.opt(tracing);
    h.list(peers);
}

impl Feed for pb::Peer {
    fn feed(&self, h: &mut Fnv) {
        let pb::Peer {
            identity,
            workload,
            namespace,
            labels,
            addresses,
        } = self;
        h.str(identity);
        h.str(workload);
        h.str(namespace);
        h.string_map(labels);
        h.strs(addresses);
    }
}

impl Feed for pb::MeshSettings {
    fn feed(&self, h: &mut Fnv) {
        let pb::MeshSettings {
            trust_domain,
            mirror_shadow_suffix,
        } = self;
        h.str(trust_domain);
        h.bool(*mirror_shadow_suffix);
    }
}

impl Feed for pb::OutboundService {
    fn feed(&self, h: &mut Fnv) {
        let pb::OutboundService {
            hostname,
            aliases,
            vip,
            ports,
            namespace,
            name,
        } = self;
        h.str(hostname);
        h.strs(aliases);
        h.str(vip);
        h.list(ports);
        h.str(namespace);
        h.str(name);
    }
}

impl Feed for pb::ServicePort {
    fn feed(&self, h: &mut Fnv) {
        let pb::ServicePort {
            name,
            port,
            target_port,
            protocol,
            routes,
        } = self;
        h.str(name);
        h.u32(*port);
        h.u32(*target_port);
        h.str(protocol);
        h.list(routes);
    }
}

impl Feed for pb::HttpRoute {
    fn feed(&self, h: &mut Fnv) {
        let pb::HttpRoute {
            name,
            matches,
            destinations,
            redirect,
            mirrors,
            timeout_ms,
            retries,
            fault,
            request_headers,
            response_headers,
            rewrite,
        } = self;
        h.str(name);
        h.list(matches);
        h.list(destinations);
        h.opt(redirect.as_ref());
        h.list(mirrors);
        h.u64(*timeout_ms);
        h.opt(retries.as_ref());
        h.opt(fault.as_ref());
        h.opt(request_headers.as_ref());
        h.opt(response_headers.as_ref());
        h.opt(rewrite.as_ref());
    }
}

impl Feed for pb::HttpMatch {
    fn feed(&self, h: &mut Fnv) {
        let pb::HttpMatch {
            uri,
            headers,
            query_params,
            method,
            port,
            ignore_uri_case,
            source_labels,
            without_headers,
        } = self;
        h.opt(uri.as_ref());
        h.map(headers.iter(), |h, k| h.str(k), |h, v| v.feed(h));
        h.map(query_params.iter(), |h, k| h.str(k), |h, v| v.feed(h));
        h.opt(method.as_ref());
        h.u32(*port);
        h.bool(*ignore_uri_case);
        h.string_map(source_labels);
        h.strs(without_headers);
    }
}

impl Feed for pb::StringMatch {
    fn feed(&self, h: &mut Fnv) {
        let pb::StringMatch { kind } = self;
        match kind {
            None => h.u32(0),
            Some(PbMatch::Exact(v)) => {
                h.u32(1);
                h.str(v);
            }
            Some(PbMatch::Prefix(v)) => {
                h.u32(2);
                h.str(v);
            }
            Some(PbMatch::Regex(v)) => {
                h.u32(3);
                h.str(v);
            }
        }
    }
}

impl Feed for pb::WeightedCluster {
    fn feed(&self, h: &mut Fnv) {
        let pb::WeightedCluster {
            cluster,
            weight,
            request_headers,
            response_headers,
        } = self;
        h.str(cluster);
        h.u32(*weight);
        h.opt(request_headers.as_ref());
        h.opt(response_headers.as_ref());
    }
}

impl Feed for pb::Mirror {
    fn feed(&self, h: &mut Fnv) {
        let pb::Mirror {
            cluster,
            percent,
            compare,
        } = self;
        h.str(cluster);
        h.f64(*percent);
        h.opt(compare.as_ref());
    }
}

impl Feed for pb::MirrorCompare {
    fn feed(&self, h: &mut Fnv) {
        let pb::MirrorCompare {
            status,
            headers,
            body,
            ignore_headers,
            ignore_json,
        } = self;
        h.bool(*status);
        h.bool(*headers);
        h.bool(*body);
        h.strs(ignore_headers);
        h.strs(ignore_json);
    }
}

impl Feed for pb::RetryPolicy {
    fn feed(&self, h: &mut Fnv) {
        let pb::RetryPolicy {
            attempts,
            per_try_timeout_ms,
            retry_on,
            backoff_base_ms,
        } = self;
        h.u32(*attempts);
        h.u64(*per_try_timeout_ms);
        h.strs(retry_on);
        h.u64(*backoff_base_ms);
    }
}

impl Feed for pb::Fault {
    fn feed(&self, h: &mut Fnv) {
        let pb::Fault {
            delay_ms,
            delay_percent,
            abort_status,
            abort_percent,
        } = self;
        h.u64(*delay_ms);
        h.f64(*delay_percent);
        h.u32(*abort_status);
        h.f64(*abort_percent);
    }
}

impl Feed for pb::HeaderOps {
    fn feed(&self, h: &mut Fnv) {
        let pb::HeaderOps { set, add, remove } = self;
        h.string_map(set);
        h.string_map(add);
        h.strs(remove);
    }
}

impl Feed for pb::Rewrite {
    fn feed(&self, h: &mut Fnv) {
        let pb::Rewrite { uri, authority } = self;
        h.str(uri);
        h.str(authority);
    }
}

impl Feed for pb::Redirect {
    fn feed(&self, h: &mut Fnv) {
        let pb::Redirect {
            uri,
            authority,
            port,
            scheme,
            code,
        } = self;
        h.str(uri);
        h.str(authority);
        h.u32(*port);
        h.str(scheme);
        h.u32(*code);
    }
}

impl Feed for pb::Cluster {
    fn feed(&self, h: &mut Fnv) {
        let pb::Cluster {
            name,
            service_hostname,
            port,
            subset,
            endpoints,
            lb_policy,
            tls_mode,
            connection_pool,
            outlier_detection,
        } = self;
        h.str(name);
        h.str(service_hostname);
        h.u32(*port);
        h.str(subset);
        h.list(endpoints);
        h.i32(*lb_policy);
        h.i32(*tls_mode);
        h.opt(connection_pool.as_ref());
        h.opt(outlier_detection.as_ref());
    }
}

impl Feed for pb::Endpoint {
    fn feed(&self, h: &mut Fnv) {
        let pb::Endpoint {
            address,
            port,
            dial_port,
            identity,
            labels,
            workload,
            workload_name,
        } = self;
        h.str(address);
        h.u32(*port);
        h.u32(*dial_port);
        h.str(identity);
        h.string_map(labels);
        h.str(workload);
        h.str(workload_name);
    }
}

impl Feed for pb::ConnectionPool {
    fn feed(&self, h: &mut Fnv) {
        let pb::ConnectionPool {
            max_connections,
            connect_timeout_ms,
            max_pending_requests,
            max_requests,
            max_requests_per_connection,
            idle_timeout_ms,
            max_retries,
        } = self;
        h.u32(*max_connections);
        h.u64(*connect_timeout_ms);
        h.u32(*max_pending_requests);
        h.u32(*max_requests);
        h.u32(*max_requests_per_connection);
        h.u64(*idle_timeout_ms);
        h.u32(*max_retries);
    }
}

impl Feed for pb::OutlierDetection {
    fn feed(&self, h: &mut Fnv) {
        let pb::OutlierDetection {
            consecutive_5xx,
            interval_ms,
            base_ejection_time_ms,
            max_ejection_percent,
            consecutive_gateway_errors,
            split_external_local_origin_errors,
            consecutive_local_origin_failures,
            min_health_percent,
        } = self;
        h.u32(*consecutive_5xx);
        h.u64(*interval_ms);
        h.u64(*base_ejection_time_ms);
        h.u32(*max_ejection_percent);
        h.u32(*consecutive_gateway_errors);
        h.bool(*split_external_local_origin_errors);
        h.u32(*consecutive_local_origin_failures);
        h.u32(*min_health_percent);
    }
}

impl Feed for pb::Inbound {
    fn feed(&self, h: &mut Fnv) {
        let pb::Inbound { mode, port_modes } = self;
        h.i32(*mode);
        h.map(port_modes.iter(), |h, k| h.u32(*k), |h, v| h.i32(*v));
    }
}

impl Feed for pb::Tracing {
    fn feed(&self, h: &mut Fnv) {
        let pb::Tracing {
            sampling_percent,
            service_name,
        } = self;
        h.f64(*sampling_percent);
        h.str(service_name);
    }
}
