//! Thin wrappers over the sidecar's parsers of bytes from outside the process, for the cargo-fuzz
//! targets in `fuzz/` (feature `fuzzing`) and for [`tests`], which replays the committed corpora
//! through the same functions on every `cargo test`.
//!
//! A wrapper panics only when a parser broke a promise it makes (documented in the parser's module):
//! that is what the fuzzer reports. Malformed input that is refused is not a failure.

// A broken invariant panics on purpose here: a panic is what libFuzzer reports.
#![allow(clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{self, HeaderName};
use prost::Message;
use weft_proto::discovery as pb;

use crate::http::h1::client::fuzzing as client;
use crate::http::h1::server::fuzzing as server;
use crate::http::h1::{MAX_HEAD, MAX_HEADERS};
use crate::http::headers;
use crate::route::{RequestView, RouteTable};

/// A raw request head as httparse reads it with hyper's header limit: the reference the parsers are
/// held to. `None` when it is not a complete, well-formed head.
struct RawHead {
    len: usize,
    method: String,
    path: String,
    version: u8,
    headers: Vec<(String, Vec<u8>)>,
}

impl RawHead {
    fn parse(data: &[u8]) -> Option<Self> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut slots);
        let httparse::Status::Complete(len) = req.parse(data).ok()? else {
            return None;
        };
        Some(Self {
            len,
            method: req.method?.to_owned(),
            path: req.path?.to_owned(),
            version: req.version?,
            headers: req
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect(),
        })
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    fn has(&self, name: &str) -> bool {
        self.values(name).next().is_some()
    }

    /// Both Content-Length and Transfer-Encoding: the smuggling shape weft refuses outright.
    fn ambiguous(&self) -> bool {
        self.has("content-length") && self.has("transfer-encoding")
    }
}

/// The headers as a sorted multiset of (lowercase name, value).
fn multiset(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<_> = headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    all.sort();
    all
}

/// `h1::server`'s request head parser: what it takes is exactly what the bytes say, what it does not
/// take is left untouched for hyper, and it refuses only the ambiguous framing it documents.
pub fn h1_request(data: &[u8]) {
    let (decision, left) = server::parse(data);
    match decision {
        server::Decision::Partial => {
            assert_eq!(left, data, "a partial head must leave the buffer as it was");
            assert!(data.len() < MAX_HEAD, "a partial head past the limit");
        }
        server::Decision::Other => {
            assert_eq!(left, data, "a head for hyper must reach it whole");
        }
        server::Decision::Refused(reason) => {
            let raw = RawHead::parse(data).expect("only a complete head is refused"); // ok: a fuzz oracle (only built for tests and `cargo fuzz`): a panic is the finding
            assert!(
                refusable(data, &raw),
                "refused ({reason}) what the framing rules take"
            );
        }
        server::Decision::Taken(head) => {
            let raw = RawHead::parse(data).expect("only a complete head is taken"); // ok: a fuzz oracle (only built for tests and `cargo fuzz`): a panic is the finding
            assert_eq!(&data[raw.len..], &left[..], "what follows the head stays");
            assert_eq!(head.method.as_str(), raw.method);
            assert_eq!(Some(&head.uri), raw.path.parse::<http::Uri>().ok().as_ref());
            assert_eq!(
                multiset(&head.headers),
                {
                    let mut h = raw.headers.clone();
                    h.sort();
                    h
                },
                "headers taken as sent"
            );
            // Only requests without a body, upgrade or expectation are taken (the module's promise).
            assert!(!raw.has("transfer-encoding"), "a body taken");
            assert!(raw.values("content-length").all(|v| v == b"0"), "a body");
            assert!(raw.values("content-length").count() <= 1);
            assert!(!raw.has("upgrade") && !raw.has("expect"));
            assert_ne!(raw.method, "CONNECT");
            let tokens = |name| {
                raw.values(name)
                    .flat_map(headers::tokens)
                    .map(<[u8]>::to_ascii_lowercase)
                    .collect::<Vec<_>>()
            };
            let connection = tokens("connection");
            assert!(!connection.iter().any(|t| t == b"upgrade"));
            let close = connection.iter().any(|t| t == b"close");
            let keep = connection.iter().any(|t| t == b"keep-alive");
            let expected = match raw.version {
                0 => keep && !close,
                _ => !close,
            };
            assert_eq!(head.keep_alive, expected, "keep-alive");
            assert_eq!(head.trailers, tokens("te").iter().any(|t| t == b"trailers"));
            assert_eq!(
                head.version,
                if raw.version == 0 {
                    http::Version::HTTP_10
                } else {
                    http::Version::HTTP_11
                }
            );
        }
    }
}

/// `h1::client`'s response head parser: an incomplete head leaves the buffer as it was, a complete
/// one is never complete earlier (a prefix of it does not parse as another head), and the framing
/// it reads matches the headers.
pub fn h1_response(data: &[u8]) {
    let (parsed, left) = client::parse(data);
    match parsed {
        Ok(None) => {
            assert_eq!(
                left, data,
                "an incomplete head must leave the buffer as it was"
            );
            assert!(data.len() < MAX_HEAD);
        }
        Err(_) => {}
        Ok(Some(head)) => {
            let len = data.len() - head.rest.len();
            assert_eq!(&data[len..], &head.rest[..], "what follows the head stays");
            assert!(len <= MAX_HEAD && head.headers.len() <= MAX_HEADERS);
            if len > 0 {
                // One byte short of the end of the head, it must not be complete yet.
                let (shorter, _) = client::parse(&data[..len - 1]);
                assert!(
                    !matches!(shorter, Ok(Some(_))),
                    "a head also complete one byte earlier"
                );
            }
            let lengths: Vec<_> = head
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| headers::length_value(v.as_bytes()))
                .collect();
            match head.declared {
                Ok(d) => {
                    assert!(lengths.iter().all(|l| l.is_some() && *l == d.length));
                    assert_eq!(
                        d.chunked.is_some(),
                        head.headers.contains_key(header::TRANSFER_ENCODING)
                    );
                }
                Err(_) => assert!(
                    lengths.iter().any(Option::is_none) || lengths.windows(2).any(|w| w[0] != w[1]),
                    "framing refused with valid, equal Content-Lengths"
                ),
            }
        }
    }
}

/// The chunked decoder: the same bytes give the same body however the reads split them (the
/// first input byte picks the split), and the body is never longer than its encoding.
pub fn h1_chunked(data: &[u8]) {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let whole = client::dechunk([body]);
    assert!(whole.0.len() <= body.len(), "more data than bytes");
    let step = usize::from(split % 32) + 1;
    let pieces = client::dechunk(body.chunks(step));
    assert_eq!(whole, pieces, "reads of {step} bytes decode differently");
    if split >= 0x80 {
        let bytes = client::dechunk(body.chunks(1));
        assert_eq!(whole, bytes, "byte-by-byte reads decode differently");
    }
    if let (data, client::ChunkedEnd::Complete(trailers, _)) = &whole {
        // What decoded re-encodes and decodes to the same thing.
        let mut again = format!("{:x}\r\n", data.len()).into_bytes();
        again.extend_from_slice(data);
        again.extend_from_slice(b"\r\n");
        if data.is_empty() {
            again.clear();
        }
        again.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            again.extend_from_slice(name.as_str().as_bytes());
            again.extend_from_slice(b": ");
            again.extend_from_slice(value.as_bytes());
            again.extend_from_slice(b"\r\n");
        }
        again.extend_from_slice(b"\r\n");
        let (redata, reend) = client::dechunk([again.as_slice()]);
        assert_eq!(&redata, data);
        assert_eq!(
            reend,
            client::ChunkedEnd::Complete(trailers.clone(), Bytes::new())
        );
    }
}

/// Header hygiene over a raw head: a head hyper would take with both framings is refused by the
/// framing rules every HTTP/1.1 path applies (`h1::framing`), any head hyper would take is sniffed as
/// HTTP (never spliced raw to an app), `check_framing` counts as the head says, and nothing
/// hop-by-hop survives stripping. The guard also runs over every input, as a byte stream.
pub fn framing(data: &[u8]) {
    let raw = RawHead::parse(data);
    let judged = crate::http::h1::framing::judge(data);
    if let Some(raw) = &raw
        && raw.ambiguous()
        && data.len() <= crate::http::h1::MAX_HEAD
    {
        assert!(
            matches!(judged, Err((_, _, true))),
            "a head with both framings passed the guard: {judged:?}"
        );
    }
    if raw.is_some() {
        assert_eq!(
            crate::http::sniff::classify(data),
            crate::http::sniff::Verdict::Http,
            "a request hyper would take is not sniffed as HTTP"
        );
    }
    for (_, value) in raw.iter().flat_map(|r| r.headers.iter()) {
        let parsed = std::str::from_utf8(value)
            .ok()
            .filter(|s| s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok());
        assert_eq!(
            headers::length_value(value),
            parsed,
            "Content-Length {value:?}"
        );
    }
    let Some(raw) = raw else {
        return;
    };
    let mut map = HeaderMap::new();
    for (name, value) in &raw.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) else {
            return;
        };
        map.append(name, value);
    }
    let count = |name: &str| raw.values(name).count();
    let expected = (count("content-length") == 0 || count("transfer-encoding") == 0)
        && count("content-length") <= 1
        && count("host") <= 1;
    assert_eq!(
        headers::check_framing(&map).is_ok(),
        expected,
        "check_framing"
    );
    let listed: Vec<HeaderName> = raw
        .values("connection")
        .flat_map(headers::tokens)
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    headers::strip_hop_by_hop(&mut map);
    // A name the Connection header lists is hop-by-hop too (RFC 9110 §7.6.1), whatever else the
    // value holds.
    for name in listed {
        assert!(
            !map.contains_key(&name),
            "{name}, listed in Connection, survived"
        );
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        assert!(!map.contains_key(&name), "{name} survived stripping");
    }
    // HTTP/2 allows `te` only as `trailers`: any other value would break the hop between sidecars.
    for te in map.get_all(header::TE) {
        assert!(
            te.as_bytes().eq_ignore_ascii_case(b"trailers"),
            "te: {te:?} survived stripping"
        );
    }
}

/// The routing table the DNS wrapper answers from.
fn dns_table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let service = |host: &str, vip: &str| pb::OutboundService {
            hostname: format!("{host}.default.svc.cluster.local"),
            aliases: vec![host.into(), format!("{host}.default")],
            vip: vip.into(),
            ..Default::default()
        };
        RouteTable::try_from(pb::ProxyConfig {
            mesh: Some(pb::MeshSettings::default()),
            services: vec![service("httpbin", "10.96.0.2"), service("v6", "fd00::2")],
            ..Default::default()
        })
        .unwrap_or_else(|_| RouteTable::empty())
    })
}

/// The DNS proxy: a query parses to a lowercase name within DNS's limits, and every local answer
/// echoes the query's id and question and says it is a response.
pub fn dns_query(data: &[u8]) {
    let parsed = crate::dns::parse_query(data);
    if let Ok(q) = &parsed {
        assert!(!q.name.chars().any(|c| c.is_ascii_uppercase()));
        assert!(q.name.len() <= 253, "name of {} bytes", q.name.len());
    }
    match crate::dns::answer(data, dns_table()) {
        crate::dns::Answer::Forward => {
            assert!(parsed.is_ok(), "forwarded a packet it cannot parse")
        }
        crate::dns::Answer::Local(resp) if resp.is_empty() => {
            assert!(parsed.is_err(), "an empty answer to a query");
        }
        crate::dns::Answer::Local(resp) => {
            assert!(resp.len() >= 12 && resp[..2] == data[..2], "id echoed");
            assert!(resp[2] & 0x80 != 0, "QR set");
            if parsed.is_ok() {
                let question = crate::dns::parse_query(&{
                    let mut q = resp.clone();
                    q[2] &= 0x7f;
                    q
                });
                assert_eq!(question.ok().map(|q| q.name), parsed.ok().map(|q| q.name));
            }
        }
    }
}

/// A discovery push from protobuf bytes: decoding and conversion never panic, and a converted table
/// answers every lookup it is asked.
pub fn route_table(data: &[u8]) {
    let Ok(response) = pb::DiscoveryResponse::decode(data) else {
        return;
    };
    let Some(config) = response.config else {
        return;
    };
    let Ok(table) = RouteTable::convert(response.version_info, config) else {
        return;
    };
    let request = HeaderMap::new();
    let view = RequestView {
        method: "GET",
        path: "/headers",
        query: Some("a=1&b"),
        headers: &request,
    };
    for (host, service) in table.hosts() {
        assert!(table.service_by_host(host).is_some());
        // Authorities are looked up by DNS names; other strings pilot would never send.
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            continue;
        }
        for port in &service.ports {
            let (_, found) = table
                .by_authority(&format!("{host}:{}", port.port), 80)
                .expect("a listed host and port"); // ok: a fuzz oracle (only built for tests and `cargo fuzz`): a panic is the finding
            assert_eq!(found.port, port.port);
            if let Some(vip) = service.vip {
                assert!(table.by_vip(SocketAddr::new(vip, port.port)).is_some());
            }
            if let Some(route) = port.route(&view)
                && let crate::route::Action::Forward { total_weight, .. } = &route.action
            {
                for roll in [0, 1, total_weight / 2, total_weight - 1, u32::MAX] {
                    assert!(route.pick(roll).is_some());
                }
            }
        }
    }
    let _ = table.by_vip(SocketAddr::new(IpAddr::from([10, 96, 0, 2]), 80));
}

/// A request head as compared: method, target, version, headers (sorted, lowercase names).
type ComparedHead = (http::Method, String, http::Version, Vec<(String, Vec<u8>)>);

/// What hyper's HTTP/1 server made of the same bytes: the first request's head, if it took one.
fn hyper_head(data: &[u8]) -> Option<ComparedHead> {
    use std::cell::RefCell;
    use std::rc::Rc;
    use tokio::io::AsyncWriteExt;

    thread_local! {
        // One single-threaded runtime for every input: building one per input would cost more than
        // the parse.
        static RT: Option<tokio::runtime::Runtime> =
            tokio::runtime::Builder::new_current_thread().build().ok();
    }
    let seen = Rc::new(RefCell::new(None));
    let record = seen.clone();
    let data = data.to_vec();
    RT.with(|rt| {
        let Some(rt) = rt else {
            return;
        };
        rt.block_on(async move {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            // All the bytes, then the end of the connection: hyper sees exactly this input.
            if client.write_all(&data).await.is_err() {
                return;
            }
            drop(client);
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let mut first = record.borrow_mut();
                    if first.is_none() {
                        *first = Some((
                            req.method().clone(),
                            req.uri().to_string(),
                            req.version(),
                            multiset(req.headers()),
                        ));
                    }
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Empty::<Bytes>::new(),
                        ))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(None)
                .serve_connection(hyper_util::rt::TokioIo::new(server), service)
                .await;
        });
    });
    seen.take()
}

/// Whether `h1::framing`'s rules refuse this complete head (its framing, or a bare LF in it).
fn refusable(data: &[u8], raw: &RawHead) -> bool {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let framing_refused = matches!(req.parse(data), Ok(httparse::Status::Complete(_)))
        && crate::http::h1::framing::request_framing(&req).is_err();
    framing_refused || crate::http::h1::framing::has_bare_lf(&data[..raw.len])
}

/// Differential: `h1::server` and hyper's HTTP/1 server on the same request bytes.
///
/// What `h1::server` does not take goes to hyper with these very bytes (`Outcome::HandOver`), so
/// only its own decisions are compared: a head it takes must be one hyper takes, read the same way
/// (method, target, version, headers as a multiset); a head it waits on must not be one hyper would
/// already take. Where weft is stricter on purpose, the difference is spelled out below rather than
/// ignored.
pub fn h1_differential(data: &[u8]) {
    let (decision, _) = server::parse(data);
    let theirs = hyper_head(data);
    match decision {
        server::Decision::Taken(head) => {
            let Some((method, target, version, headers)) = theirs else {
                panic!("weft took a head hyper refuses: {head:?}");
            };
            assert_eq!(head.method, method, "method");
            assert_eq!(head.uri.to_string(), target, "target");
            assert_eq!(head.version, version, "version");
            assert_eq!(multiset(&head.headers), headers, "headers");
        }
        // Deliberately stricter (`h1::framing`, the rules of every HTTP/1.1 path): CL+TE, several
        // Content-Length headers (hyper takes equal ones), a Content-Length that is not plain digits,
        // a Transfer-Encoding not ending in chunked, and a bare LF (hyper accepts it) are refused
        // with 400. Any other refusal is a disagreement.
        server::Decision::Refused(reason) => {
            let raw = RawHead::parse(data).expect("only a complete head is refused"); // ok: a fuzz oracle (only built for tests and `cargo fuzz`): a panic is the finding
            assert!(
                refusable(data, &raw),
                "weft refused ({reason}) what its framing rules take"
            );
        }
        server::Decision::Partial => {
            assert!(
                theirs.is_none(),
                "weft waits for more of a head hyper takes"
            );
        }
        // hyper decides, on the same bytes: nothing to compare.
        server::Decision::Other => {}
    }
}

#[cfg(test)]
mod tests;
