//! `pilot proxy-config`: a sidecar's `/config_dump` (its admin listener) as istioctl-like tables.
//!
//! The admin listener is loopback-only, so pilot (in another pod or network namespace) cannot
//! read it: the CLI reads it directly from `--admin ADDR`, run where that address is reachable
//! (the pod's network namespace, or `kubectl port-forward POD 15000`).

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest dump read (a sidecar of a big mesh holds every endpoint).
const MAX_DUMP_BYTES: u64 = 64 << 20;
/// How long the sidecar may take to answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What `proxy-config` shows, istioctl's sub-commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Per service and port: its routes and their weighted destinations and mirrors.
    Routes,
    /// Upstream clusters: service, port, subset, load balancing, TLS, endpoint count.
    Clusters,
    /// Every endpoint of every cluster, with its workload and identity.
    Endpoints,
    /// Outbound service addresses and ports the sidecar routes, and the inbound mTLS mode.
    Listeners,
    /// The workload certificate: identity and time to expiry.
    Secret,
}

/// Why a dump could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connecting, writing or reading failed.
    #[error("cannot read http://{addr}/config_dump: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("http://{0}/config_dump did not answer within {1:?}")]
    Timeout(String, Duration),
    /// Not a 200 with a JSON body.
    #[error("http://{addr}/config_dump: {why}")]
    Bad { addr: String, why: String },
}

/// GETs `http://ADDR/config_dump` (HTTP/1.0: the server closes after the body) and parses it.
pub async fn fetch(addr: &str) -> Result<Value, FetchError> {
    let io = |source| FetchError::Io {
        addr: addr.to_string(),
        source,
    };
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        stream
            .write_all(b"GET /config_dump HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .map_err(io)?;
        let mut raw = Vec::new();
        stream
            .take(MAX_DUMP_BYTES)
            .read_to_end(&mut raw)
            .await
            .map_err(io)?;
        Ok::<_, FetchError>(raw)
    };
    let raw = tokio::time::timeout(FETCH_TIMEOUT, read)
        .await
        .map_err(|_| FetchError::Timeout(addr.to_string(), FETCH_TIMEOUT))??;
    parse_response(&raw).map_err(|why| FetchError::Bad {
        addr: addr.to_string(),
        why,
    })
}

/// The JSON body of a raw HTTP/1.x 200 response.
fn parse_response(raw: &[u8]) -> Result<Value, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete HTTP response")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered {status:?}"));
    }
    serde_json::from_slice(&raw[split + 4..]).map_err(|e| format!("not a config dump: {e}"))
}

/// The part of the dump `-o json` prints for `section`.
pub fn json_of(dump: &Value, section: Section) -> Value {
    let pick = |key: &str| dump.get(key).cloned().unwrap_or(Value::Null);
    match section {
        Section::Routes => pick("services"),
        Section::Clusters => pick("clusters"),
        Section::Endpoints => Value::Array(
            endpoints(dump)
                .map(|(cluster, e)| {
                    let mut e = e.clone();
                    if let Some(map) = e.as_object_mut() {
                        map.insert("cluster".into(), cluster.into());
                    }
                    e
                })
                .collect(),
        ),
        Section::Listeners => serde_json::json!({
            "services": pick("services"),
            "inbound": pick("inbound"),
        }),
        Section::Secret => serde_json::json!({
            "identity": pick("identity"),
            "certificate_expires_in_s": pick("certificate_expires_in_s"),
        }),
    }
}

/// istioctl-like table of `section`.
pub fn table(dump: &Value, section: Section) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    match section {
        Section::Routes => {
            rows.push(cells(&[
                "SERVICE",
                "PORT",
                "PROTOCOL",
                "ROUTE",
                "DESTINATIONS",
                "MIRRORS",
            ]));
            for (service, port) in ports(dump) {
                for route in array(port, "routes") {
                    let destinations = array(route, "destinations")
                        .map(|d| format!("{} ({}%)", text(d, "cluster"), number(d, "weight")))
                        .collect::<Vec<_>>();
                    let mirrors = array(route, "mirrors")
                        .map(|m| format!("{} ({}%)", text(m, "cluster"), number(m, "percent")))
                        .collect::<Vec<_>>();
                    rows.push(vec![
                        text(service, "hostname"),
                        number(port, "port"),
                        text(port, "protocol"),
                        or_none(text(route, "name")),
                        or_none(destinations.join(",")),
                        or_none(mirrors.join(",")),
                    ]);
                }
            }
        }
        Section::Clusters => {
            rows.push(cells(&[
                "SERVICE FQDN",
                "PORT",
                "SUBSET",
                "DIRECTION",
                "LB",
                "TLS",
                "ENDPOINTS",
            ]));
            for cluster in array(dump, "clusters") {
                let name = text(cluster, "name");
                // `outbound|PORT|SUBSET|FQDN`, Istio's cluster names.
                let parts: Vec<&str> = name.split('|').collect();
                let (direction, port, subset, fqdn) = match parts[..] {
                    [direction, port, subset, fqdn] => (direction, port, subset, fqdn),
                    _ => ("", "", "", name.as_str()),
                };
                rows.push(vec![
                    fqdn.to_string(),
                    port.to_string(),
                    or_dash(subset),
                    direction.to_string(),
                    text(cluster, "lb"),
                    text(cluster, "tls"),
                    array(cluster, "endpoints").count().to_string(),
                ]);
            }
        }
        Section::Endpoints => {
            rows.push(cells(&["ENDPOINT", "WORKLOAD", "IDENTITY", "CLUSTER"]));
            for (cluster, endpoint) in endpoints(dump) {
                rows.push(vec![
                    text(endpoint, "address"),
                    or_none(text(endpoint, "workload")),
                    or_none(text(endpoint, "identity")),
                    cluster,
                ]);
            }
        }
        Section::Listeners => {
            rows.push(cells(&["ADDRESS", "PORT", "PROTOCOL", "DESTINATION"]));
            for (service, port) in ports(dump) {
                let vip = text(service, "vip");
                rows.push(vec![
                    if vip.is_empty() {
                        "0.0.0.0".to_string()
                    } else {
                        vip
                    },
                    number(port, "port"),
                    text(port, "protocol"),
                    format!(
                        "Route: {}:{}",
                        text(service, "hostname"),
                        number(port, "port")
                    ),
                ]);
            }
            let inbound = dump.get("inbound").unwrap_or(&Value::Null);
            let mut modes = vec![format!("mTLS {}", text(inbound, "mode"))];
            if let Some(per_port) = inbound.get("port_modes").and_then(Value::as_object) {
                modes.extend(per_port.iter().map(|(port, mode)| {
                    format!("port {port}: mTLS {}", mode.as_str().unwrap_or(""))
                }));
            }
            rows.push(vec![
                "0.0.0.0".into(),
                "*".into(),
                "inbound".into(),
                format!("Inbound: {}", modes.join(", ")),
            ]);
        }
        Section::Secret => {
            rows.push(cells(&["RESOURCE NAME", "TYPE", "IDENTITY", "EXPIRES IN"]));
            let expires = dump
                .get("certificate_expires_in_s")
                .and_then(Value::as_i64)
                .map(|s| format!("{s}s"))
                .unwrap_or_else(|| "<none>".into());
            rows.push(vec![
                "default".into(),
                "Cert Chain".into(),
                text(dump, "identity"),
                expires,
            ]);
        }
    }
    crate::table::columns(&rows)
}

fn cells(header: &[&str]) -> Vec<String> {
    header.iter().map(|s| (*s).to_string()).collect()
}

fn array<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    value
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn number(value: &Value, key: &str) -> String {
    text(value, key)
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// Every (service, port) of the dump.
fn ports(dump: &Value) -> impl Iterator<Item = (&Value, &Value)> {
    array(dump, "services").flat_map(|s| array(s, "ports").map(move |p| (s, p)))
}

/// Every (cluster name, endpoint) of the dump.
fn endpoints(dump: &Value) -> impl Iterator<Item = (String, &Value)> {
    array(dump, "clusters").flat_map(|c| {
        let name = text(c, "name");
        array(c, "endpoints").map(move |e| (name.clone(), e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> Value {
        serde_json::json!({
            "version": "3",
            "identity": "spiffe://cluster.local/ns/default/sa/sleep",
            "certificate_expires_in_s": 86000,
            "services": [{
                "hostname": "httpbin.default.svc.cluster.local",
                "vip": "10.96.0.2",
                "ports": [{"port": 8000, "protocol": "http", "routes": [{
                    "name": "v1-only",
                    "destinations": [{"cluster": "outbound|8000|v1|httpbin.default.svc.cluster.local", "weight": 100}],
                    "mirrors": [],
                }]}],
            }],
            "clusters": [{
                "name": "outbound|8000|v1|httpbin.default.svc.cluster.local",
                "lb": "RoundRobin",
                "tls": "IstioMutual",
                "endpoints": [{"address": "127.0.0.1:9001", "workload": "default/httpbin-1", "identity": "spiffe://cluster.local/ns/default/sa/httpbin"}],
            }, {"name": "outbound|8000||httpbin.default.svc.cluster.local", "lb": "RoundRobin", "tls": "IstioMutual", "endpoints": []}],
            "inbound": {"mode": "PERMISSIVE", "port_modes": {"9000": "STRICT"}},
        })
    }

    #[test]
    fn tables_read_like_istioctl() {
        let d = dump();
        assert_eq!(
            table(&d, Section::Clusters),
            "SERVICE FQDN                        PORT   SUBSET   DIRECTION   LB           TLS           ENDPOINTS\n\
             httpbin.default.svc.cluster.local   8000   v1       outbound    RoundRobin   IstioMutual   1\n\
             httpbin.default.svc.cluster.local   8000   -        outbound    RoundRobin   IstioMutual   0\n"
        );
        let routes = table(&d, Section::Routes);
        assert!(
            routes.lines().nth(1).unwrap().contains("8000   http       v1-only   outbound|8000|v1|httpbin.default.svc.cluster.local (100%)   <none>"),
            "{routes}"
        );
        let endpoints = table(&d, Section::Endpoints);
        assert!(
            endpoints
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("127.0.0.1:9001   default/httpbin-1   spiffe://"),
            "{endpoints}"
        );
        assert_eq!(endpoints.lines().count(), 2);
        let listeners = table(&d, Section::Listeners);
        assert!(
            listeners.contains(
                "10.96.0.2   8000   http       Route: httpbin.default.svc.cluster.local:8000"
            ),
            "{listeners}"
        );
        assert!(
            listeners.contains("Inbound: mTLS PERMISSIVE, port 9000: mTLS STRICT"),
            "{listeners}"
        );
        let secret = table(&d, Section::Secret);
        assert!(
            secret.contains(
                "default         Cert Chain   spiffe://cluster.local/ns/default/sa/sleep   86000s"
            ),
            "{secret}"
        );
        assert_eq!(
            json_of(&d, Section::Endpoints)[0]["cluster"],
            "outbound|8000|v1|httpbin.default.svc.cluster.local"
        );
    }

    #[test]
    fn only_a_200_with_json_is_a_dump() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"version\": \"1\"}";
        assert_eq!(parse_response(ok).unwrap()["version"], "1");
        assert!(parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nendpoints").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nnot json").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK").is_err());
    }
}
