//! The DNS proxy: answers A/AAAA queries for mesh Service names with the Service's VIP, so apps can
//! call `http://httpbin:8000` without cluster DNS; everything else goes to the pod's real resolver, or
//! gets a quick SERVFAIL when that resolver does not answer. It never leaves a query hanging.
//!
//! iptables sends the pod's port-53 traffic here (`sidecar init`), except the proxy's own, so forwarding
//! to the original resolver does not loop. Names are matched as the table lists them for this pod's
//! namespace (`httpbin`, `httpbin.default`, `httpbin.default.svc`, the FQDN); the glibc search list
//! (`default.svc.cluster.local ...`) turns a short name into one of those.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use tokio_util::sync::CancellationToken;

use crate::route::RouteTable;

/// How long the upstream resolver gets before the client receives SERVFAIL.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// TTL of answers for mesh names: short, so VIP changes are picked up quickly.
const TTL: u32 = 30;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;

/// A parsed query: the parts the answer needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Query {
    id: u16,
    rd: bool,
    /// Lowercase, without the trailing dot.
    pub name: String,
    /// Query type.
    pub qtype: u16,
    qclass: u16,
    /// End of the question section in the packet.
    question_end: usize,
}

/// Why a packet is not a query we can answer locally.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// Shorter than a header, or truncated inside the question.
    #[error("truncated packet")]
    Truncated,
    /// A response, a non-QUERY opcode, or not exactly one question.
    #[error("not a standard single-question query")]
    NotAQuery,
    /// Compression pointers or oversized labels in a question.
    #[error("malformed name")]
    BadName,
}

/// Parses a query packet.
pub fn parse_query(pkt: &[u8]) -> Result<Query, DnsError> {
    if pkt.len() < 12 {
        return Err(DnsError::Truncated);
    }
    let id = u16::from_be_bytes([pkt[0], pkt[1]]);
    let flags = pkt[2];
    let qr = flags & 0x80 != 0;
    let opcode = (flags >> 3) & 0x0f;
    let rd = flags & 0x01 != 0;
    let qdcount = u16::from_be_bytes([pkt[4], pkt[5]]);
    if qr || opcode != 0 || qdcount != 1 {
        return Err(DnsError::NotAQuery);
    }
    let mut i = 12;
    let mut name = String::new();
    loop {
        let len = *pkt.get(i).ok_or(DnsError::Truncated)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return Err(DnsError::BadName);
        }
        let label = pkt.get(i..i + len).ok_or(DnsError::Truncated)?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            name.push(char::from(b.to_ascii_lowercase()));
        }
        if name.len() > 253 {
            return Err(DnsError::BadName);
        }
        i += len;
    }
    let tail = pkt.get(i..i + 4).ok_or(DnsError::Truncated)?;
    Ok(Query {
        id,
        rd,
        name,
        qtype: u16::from_be_bytes([tail[0], tail[1]]),
        qclass: u16::from_be_bytes([tail[2], tail[3]]),
        question_end: i + 4,
    })
}

/// Builds a response to `q` (whose packet is `pkt`) with `answers` and `rcode`.
fn response(pkt: &[u8], q: &Query, rcode: u8, answer: Option<IpAddr>) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.question_end + 32);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, opcode 0, AA, RD as asked; RA.
    out.push(0x80 | 0x04 | u8::from(q.rd));
    out.push(0x80 | (rcode & 0x0f));
    out.extend_from_slice(&1u16.to_be_bytes()); // qdcount
    out.extend_from_slice(&u16::from(answer.is_some()).to_be_bytes()); // ancount
    out.extend_from_slice(&0u16.to_be_bytes()); // nscount
    out.extend_from_slice(&0u16.to_be_bytes()); // arcount
    out.extend_from_slice(pkt.get(12..q.question_end).unwrap_or_default());
    if let Some(ip) = answer {
        out.extend_from_slice(&[0xc0, 0x0c]); // name: pointer to the question
        let (rtype, rdata): (u16, Vec<u8>) = match ip {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&u16::try_from(rdata.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    out
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Reply with this packet.
    Local(Vec<u8>),
    /// Not a mesh name: ask the upstream resolver.
    Forward,
}

/// Answers `pkt` from the table if it names a mesh Service.
pub fn answer(pkt: &[u8], table: &RouteTable) -> Answer {
    let q = match parse_query(pkt) {
        Ok(q) => q,
        Err(DnsError::NotAQuery) if pkt.len() >= 12 => {
            // Header-only NOTIMP: never leave a client waiting on something we will not do.
            let mut out = pkt[..12].to_vec();
            out[2] = 0x80 | (pkt[2] & 0x79);
            out[3] = 0x80 | RCODE_NOTIMP;
            out[4..12].fill(0);
            return Answer::Local(out);
        }
        Err(_) => return Answer::Local(Vec::new()),
    };
    match table.service_by_host(&q.name) {
        Some(s) if q.qclass == CLASS_IN => {
            let ip = match (q.qtype, s.vip) {
                (TYPE_A, Some(ip @ IpAddr::V4(_))) | (TYPE_AAAA, Some(ip @ IpAddr::V6(_))) => {
                    Some(ip)
                }
                // The name exists but has no record of this type: NOERROR, no answer (NODATA).
                _ => None,
            };
            Answer::Local(response(pkt, &q, 0, ip))
        }
        // The cluster domain is ours: a name under it that is not a Service does not exist.
        _ if q.name.ends_with(".svc.cluster.local") => {
            Answer::Local(response(pkt, &q, RCODE_NXDOMAIN, None))
        }
        _ => Answer::Forward,
    }
}

fn servfail(pkt: &[u8]) -> Vec<u8> {
    match parse_query(pkt) {
        Ok(q) => response(pkt, &q, RCODE_SERVFAIL, None),
        Err(_) => Vec::new(),
    }
}

/// Asks the upstream resolver over UDP; SERVFAIL if it does not answer in time.
async fn forward(pkt: &[u8], upstream: Option<SocketAddr>) -> Vec<u8> {
    let Some(upstream) = upstream else {
        return servfail(pkt);
    };
    let ask = async {
        let bind: SocketAddr = if upstream.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(bind).await?;
        sock.connect(upstream).await?;
        sock.send(pkt).await?;
        let mut buf = vec![0u8; 4096];
        let n = sock.recv(&mut buf).await?;
        buf.truncate(n);
        Ok::<_, std::io::Error>(buf)
    };
    match tokio::time::timeout(UPSTREAM_TIMEOUT, ask).await {
        Ok(Ok(resp)) => resp,
        _ => servfail(pkt),
    }
}

/// The first `nameserver` of a resolv.conf text, port 53.
pub fn upstream_from_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
}

/// Serves DNS on UDP and TCP `port` of `ip` until `shutdown`.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    tables: crate::snapshot::Snapshots,
    upstream: Option<SocketAddr>,
    shutdown: CancellationToken,
) {
    let udp = Arc::new(udp);
    let udp_task = {
        let udp = udp.clone();
        let tables = tables.clone();
        let shutdown = shutdown.clone();
        async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, peer) = tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = udp.recv_from(&mut buf) => match r {
                        Ok(r) => r,
                        Err(_) => continue,
                    },
                };
                let pkt = buf[..n].to_vec();
                let snapshot = tables.borrow().clone();
                match answer(&pkt, &snapshot.routes) {
                    Answer::Local(resp) if !resp.is_empty() => {
                        let _ = udp.send_to(&resp, peer).await;
                    }
                    Answer::Local(_) => {}
                    Answer::Forward => {
                        let udp = udp.clone();
                        tokio::spawn(async move {
                            let resp = forward(&pkt, upstream).await;
                            if !resp.is_empty() {
                                let _ = udp.send_to(&resp, peer).await;
                            }
                        });
                    }
                }
            }
        }
    };
    let tcp_task = async move {
        let mut backoff = crate::listener::Backoff::default();
        loop {
            let (mut stream, _) = tokio::select! {
                () = shutdown.cancelled() => return,
                c = crate::listener::accept(&tcp, "dns", &mut backoff) => c,
            };
            let tables = tables.clone();
            tokio::spawn(async move {
                // One query per connection is what resolvers send; bounded by a timeout.
                let work = async {
                    let len = stream.read_u16().await? as usize;
                    let mut pkt = vec![0u8; len];
                    stream.read_exact(&mut pkt).await?;
                    let snapshot = tables.borrow().clone();
                    let resp = match answer(&pkt, &snapshot.routes) {
                        Answer::Local(r) => r,
                        Answer::Forward => forward(&pkt, upstream).await,
                    };
                    stream
                        .write_u16(u16::try_from(resp.len()).unwrap_or(0))
                        .await?;
                    stream.write_all(&resp).await?;
                    Ok::<_, std::io::Error>(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), work).await;
            });
        }
    };
    tokio::join!(udp_task, tcp_task);
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::discovery as pb;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&CLASS_IN.to_be_bytes());
        p
    }

    fn table() -> RouteTable {
        RouteTable::try_from(pb::ProxyConfig {
            mesh: Some(pb::MeshSettings {
                trust_domain: "cluster.local".into(),
                mirror_shadow_suffix: true,
            }),
            services: vec![pb::OutboundService {
                hostname: "httpbin.default.svc.cluster.local".into(),
                aliases: vec![
                    "httpbin".into(),
                    "httpbin.default".into(),
                    "httpbin.default.svc".into(),
                ],
                vip: "10.96.0.2".into(),
                ports: vec![],
                namespace: "default".into(),
                name: "httpbin".into(),
            }],
            ..Default::default()
        })
        .unwrap()
    }

    fn rcode(resp: &[u8]) -> u8 {
        resp[3] & 0x0f
    }

    #[test]
    fn answers_mesh_names_with_the_vip() {
        let t = table();
        for name in [
            "httpbin",
            "HTTPBIN.default",
            "httpbin.default.svc.cluster.local",
        ] {
            let Answer::Local(resp) = answer(&query(name, TYPE_A), &t) else {
                panic!("{name} forwarded")
            };
            assert_eq!(&resp[0..2], &[0x12, 0x34], "id echoed");
            assert_eq!(rcode(&resp), 0);
            assert_eq!(u16::from_be_bytes([resp[6], resp[7]]), 1, "one answer");
            assert_eq!(&resp[resp.len() - 4..], &[10, 96, 0, 2], "{name}");
        }
        // AAAA for a v4-only Service: NOERROR with no answer, so resolvers fall back to A.
        let Answer::Local(resp) = answer(&query("httpbin", TYPE_AAAA), &t) else {
            panic!()
        };
        assert_eq!(
            (rcode(&resp), u16::from_be_bytes([resp[6], resp[7]])),
            (0, 0)
        );
    }

    #[test]
    fn unknown_cluster_names_do_not_exist_and_others_are_forwarded() {
        let t = table();
        let Answer::Local(resp) = answer(&query("nosuch.default.svc.cluster.local", TYPE_A), &t)
        else {
            panic!()
        };
        assert_eq!(rcode(&resp), RCODE_NXDOMAIN);
        assert_eq!(answer(&query("example.com", TYPE_A), &t), Answer::Forward);
    }

    #[test]
    fn garbage_never_panics_and_non_queries_get_notimp() {
        let t = table();
        assert_eq!(answer(&[1, 2, 3], &t), Answer::Local(Vec::new()));
        let mut q = query("httpbin", TYPE_A);
        q[2] |= 0x80; // a response, not a query
        let Answer::Local(resp) = answer(&q, &t) else {
            panic!()
        };
        assert_eq!(rcode(&resp), RCODE_NOTIMP);
        let mut bad = query("httpbin", TYPE_A);
        bad[12] = 200; // label longer than 63
        assert!(matches!(answer(&bad, &t), Answer::Local(_)));
        for len in 0..bad.len() {
            let _ = answer(&bad[..len], &t);
        }
    }

    #[tokio::test]
    async fn a_dead_upstream_yields_servfail_quickly() {
        // A bound socket that never answers: the proxy must give up within its timeout.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream = silent.local_addr().unwrap();
        let started = std::time::Instant::now();
        let resp = forward(&query("example.com", TYPE_A), Some(upstream)).await;
        assert_eq!(rcode(&resp), RCODE_SERVFAIL);
        assert!(started.elapsed() < UPSTREAM_TIMEOUT + Duration::from_secs(1));
        assert_eq!(
            upstream_from_resolv_conf("search x\nnameserver 10.0.0.53\nnameserver 1.1.1.1\n"),
            Some("10.0.0.53:53".parse().unwrap())
        );
    }
}
