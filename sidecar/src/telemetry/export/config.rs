//! The exporter's settings from the OpenTelemetry environment contract (the specification's
//! "OTLP Exporter Configuration" and "Environment Variable Specification" pages).
//!
//! Read once at start. `OTEL_EXPORTER_OTLP_TRACES_*` wins over `OTEL_EXPORTER_OTLP_*`; an empty value
//! is unset (as the specification says). A value that does not parse is reported once (the returned
//! warnings, logged by the caller) and the default is used, as the SDKs do; nothing here panics.
//!
//! weft's own choices where the specification leaves room or weft differs on purpose:
//! - no endpoint configured means no export (an SDK would send to `localhost:4317`; a sidecar doing
//!   so would hand every pod's spans to whatever listens there);
//! - without `_PROTOCOL`, gRPC when the endpoint's port is 4317, else `http/protobuf` (what weft did
//!   before the contract, and what the injector's `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` states anyway);
//! - an endpoint without a scheme is `https` unless `_INSECURE=true` (the specification's rule for
//!   gRPC, applied to both transports);
//! - the batch processor's defaults are weft's (queue 4096, 1 s, 512 spans), not the SDKs' (2048,
//!   5 s, 512): a sidecar's spans should reach the collector about as soon as the request is logged;
//! - `service.name`: `OTEL_SERVICE_NAME`, else `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, else the
//!   mesh's own name for the workload (the tracing config pilot pushes, or the pod name).

use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
    /// OTLP/HTTP with JSON bodies (the OTLP JSON mapping).
    HttpJson,
}

/// The batch span processor's settings (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Spans waiting beyond this are dropped (counted): `OTEL_BSP_MAX_QUEUE_SIZE`.
    pub queue: usize,
    /// Spans per export request: `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (at most `queue`).
    pub size: usize,
    /// Longest a span waits for its batch: `OTEL_BSP_SCHEDULE_DELAY`.
    pub delay: Duration,
    /// Longest one batch's export may take, retries included: `OTEL_BSP_EXPORT_TIMEOUT`.
    pub export_timeout: Duration,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            queue: 4096,
            size: 512,
            delay: Duration::from_secs(1),
            export_timeout: Duration::from_secs(30),
        }
    }
}

/// Everything the exporter needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where to send: for gRPC the collector's base URL, for HTTP the full traces URL.
    pub endpoint: String,
    /// How.
    pub protocol: Protocol,
    /// Extra request headers (`_HEADERS`, e.g. an API key).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Per attempt (`_TIMEOUT`, default 10 s).
    pub timeout: Duration,
    /// gzip request bodies (`_COMPRESSION=gzip`).
    pub gzip: bool,
    /// PEM file of the roots to trust instead of the system's (`_CERTIFICATE`).
    pub certificate: Option<PathBuf>,
    /// PEM client certificate chain and key for mTLS to the collector (`_CLIENT_CERTIFICATE`,
    /// `_CLIENT_KEY`; both or neither).
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// `OTEL_SERVICE_NAME`, or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`.
    pub service_name: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES` other than `service.name`, in order.
    pub resource: Vec<(String, String)>,
    /// `OTEL_BSP_*`.
    pub batch: Batch,
}

/// Why there is no exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Off {
    /// `OTEL_SDK_DISABLED=true`.
    SdkDisabled,
    /// `OTEL_TRACES_EXPORTER=none`.
    ExporterNone,
    /// No endpoint (or none that parses).
    NoEndpoint,
}

/// Default per-attempt timeout (`OTEL_EXPORTER_OTLP_TIMEOUT`).
const TIMEOUT: Duration = Duration::from_secs(10);

struct Env<'a, F> {
    get: F,
    warnings: &'a mut Vec<String>,
}

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    /// A set, non-empty value.
    fn var(&self, name: &str) -> Option<(String, String)> {
        let v = (self.get)(name)?;
        let v = v.trim();
        (!v.is_empty()).then(|| (name.to_owned(), v.to_owned()))
    }

    /// The traces-specific exporter variable, else the generic one: (name read, value).
    fn otlp(&self, key: &str) -> Option<(String, String)> {
        self.var(&format!("OTEL_EXPORTER_OTLP_TRACES_{key}"))
            .or_else(|| self.var(&format!("OTEL_EXPORTER_OTLP_{key}")))
    }

    fn warn(&mut self, name: &str, value: &str, what: &str) {
        self.warnings
            .push(format!("{name}={value:?} is not {what}; using the default"));
    }

    fn bool(&mut self, found: Option<(String, String)>) -> bool {
        match found {
            None => false,
            Some((_, v)) if v.eq_ignore_ascii_case("true") => true,
            Some((_, v)) if v.eq_ignore_ascii_case("false") => false,
            Some((name, v)) => {
                self.warn(&name, &v, "true or false");
                false
            }
        }
    }

    /// Milliseconds (a non-negative integer).
    fn millis(&mut self, found: Option<(String, String)>, default: Duration) -> Duration {
        match found {
            None => default,
            Some((name, v)) => match v.parse::<u64>() {
                Ok(ms) => Duration::from_millis(ms),
                Err(_) => {
                    self.warn(&name, &v, "a number of milliseconds");
                    default
                }
            },
        }
    }

    /// A positive count.
    fn count(&mut self, name: &str, default: usize) -> usize {
        match self.var(name) {
            None => default,
            Some((name, v)) => match v.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    self.warn(&name, &v, "a positive integer");
                    default
                }
            },
        }
    }
}

/// Percent-decodes a `key=value` list value; `None` when it is not UTF-8 once decoded.
fn decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s.trim())
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// Parses a W3C-baggage-like `k=v,k2=v2` list (`_HEADERS`, `OTEL_RESOURCE_ATTRIBUTES`): entries split
/// on `,`, key and value on the first `=`, both trimmed and percent-decoded. Bad entries (no `=`,
/// empty key, not UTF-8 once decoded) are returned apart, as `Err` items.
pub fn key_values(s: &str) -> Vec<Result<(String, String), String>> {
    s.split(',')
        .filter(|e| !e.trim().is_empty())
        .map(|entry| {
            let (k, v) = entry
                .split_once('=')
                .ok_or_else(|| entry.trim().to_owned())?;
            match (decode(k), decode(v)) {
                (Some(k), Some(v)) if !k.is_empty() => Ok((k, v)),
                _ => Err(entry.trim().to_owned()),
            }
        })
        .collect()
}

/// `_HEADERS` as header name/value pairs; entries that do not make a valid header are skipped with a
/// warning (the others still apply).
fn headers(env: &mut Env<'_, impl Fn(&str) -> Option<String>>) -> Vec<(HeaderName, HeaderValue)> {
    let Some((name, value)) = env.otlp("HEADERS") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in key_values(&value) {
        let parsed = entry.and_then(|(k, v)| {
            let key = HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("{k}=..."))?;
            let mut val = HeaderValue::from_str(&v).map_err(|_| format!("{k}=..."))?;
            // Credentials (API keys) stay out of HPACK's table and out of debug output.
            val.set_sensitive(true);
            Ok((key, val))
        });
        match parsed {
            Ok(h) => out.push(h),
            // The value may be a secret: only the key (or the malformed entry's start) is shown.
            Err(bad) => env.warnings.push(format!(
                "{name}: skipped the entry {:?}: not a valid header",
                bad.chars().take(24).collect::<String>()
            )),
        }
    }
    out
}

fn protocol(env: &mut Env<'_, impl Fn(&str) -> Option<String>>) -> Option<Protocol> {
    let (name, v) = env.otlp("PROTOCOL")?;
    match v.as_str() {
        "grpc" => Some(Protocol::Grpc),
        "http/protobuf" => Some(Protocol::HttpProtobuf),
        "http/json" => Some(Protocol::HttpJson),
        _ => {
            env.warn(&name, &v, "grpc, http/protobuf or http/json");
            None
        }
    }
}

/// The endpoint URL for `protocol` (`None` when none is set or it does not parse).
fn endpoint(
    env: &mut Env<'_, impl Fn(&str) -> Option<String>>,
    protocol: Option<Protocol>,
    insecure: bool,
) -> Option<(String, Protocol)> {
    let (name, raw, specific) = match env.var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        Some((n, v)) => (n, v, true),
        None => {
            let (n, v) = env.var("OTEL_EXPORTER_OTLP_ENDPOINT")?;
            (n, v, false)
        }
    };
    let url = if raw.contains("://") {
        raw.clone()
    } else {
        format!("{}://{raw}", if insecure { "http" } else { "https" })
    };
    let uri = match url.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => u,
        _ => {
            env.warnings.push(format!(
                "{name}={raw:?} is not an http(s) URL; spans are not exported"
            ));
            return None;
        }
    };
    let protocol = protocol.unwrap_or(if uri.port_u16() == Some(4317) {
        Protocol::Grpc
    } else {
        Protocol::HttpProtobuf
    });
    let url = match protocol {
        Protocol::Grpc => url.trim_end_matches('/').to_owned(),
        // The signal-specific URL is used as is; the generic one is a base for `/v1/traces`.
        Protocol::HttpProtobuf | Protocol::HttpJson if specific => url,
        Protocol::HttpProtobuf | Protocol::HttpJson => {
            format!("{}/v1/traces", url.trim_end_matches('/'))
        }
    };
    Some((url, protocol))
}

impl Config {
    /// Reads the environment through `get`; `Err` says why spans are not exported. Values that were
    /// set but unusable are described in `warnings` (to be logged once).
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
        warnings: &mut Vec<String>,
    ) -> Result<Self, Off> {
        let mut env = Env { get, warnings };
        let found = env.var("OTEL_SDK_DISABLED");
        if env.bool(found) {
            return Err(Off::SdkDisabled);
        }
        if let Some((name, v)) = env.var("OTEL_TRACES_EXPORTER") {
            // A list; weft exports OTLP only: `none` alone turns export off.
            let list: Vec<&str> = v.split(',').map(str::trim).collect();
            if list == ["none"] {
                return Err(Off::ExporterNone);
            }
            if list.iter().any(|e| *e != "otlp" && *e != "none") {
                env.warnings
                    .push(format!("{name}={v:?}: weft exports otlp only; using otlp"));
            }
        }
        let found = env.otlp("INSECURE");
        let insecure = env.bool(found);
        let protocol = protocol(&mut env);
        let (endpoint, protocol) = endpoint(&mut env, protocol, insecure).ok_or(Off::NoEndpoint)?;
        let headers = headers(&mut env);
        let found = env.otlp("TIMEOUT");
        let timeout = env.millis(found, TIMEOUT);
        let gzip = match env.otlp("COMPRESSION") {
            None => false,
            Some((_, v)) if v == "gzip" => true,
            Some((_, v)) if v == "none" => false,
            Some((name, v)) => {
                env.warn(&name, &v, "gzip or none");
                false
            }
        };
        let certificate = env.otlp("CERTIFICATE").map(|(_, v)| PathBuf::from(v));
        let client_identity = match (env.otlp("CLIENT_CERTIFICATE"), env.otlp("CLIENT_KEY")) {
            (Some((_, c)), Some((_, k))) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some((name, _)), None) | (None, Some((name, _))) => {
                env.warnings.push(format!(
                    "{name} is set without its pair (_CLIENT_CERTIFICATE and _CLIENT_KEY go together); no client certificate"
                ));
                None
            }
        };
        let mut service_name = env.var("OTEL_SERVICE_NAME").map(|(_, v)| v);
        let mut resource = Vec::new();
        if let Some((name, v)) = env.var("OTEL_RESOURCE_ATTRIBUTES") {
            let parsed: Result<Vec<_>, String> = key_values(&v).into_iter().collect();
            match parsed {
                // The specification: on any error the whole value is discarded.
                Err(bad) => env.warnings.push(format!(
                    "{name}: the entry {bad:?} is not key=value (percent-encoded); the variable is ignored"
                )),
                Ok(pairs) => {
                    for (k, v) in pairs {
                        if k == "service.name" {
                            service_name.get_or_insert(v);
                        } else {
                            resource.push((k, v));
                        }
                    }
                }
            }
        }
        let defaults = Batch::default();
        let mut batch = Batch {
            queue: env.count("OTEL_BSP_MAX_QUEUE_SIZE", defaults.queue),
            size: env.count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", defaults.size),
            delay: {
                let found = env.var("OTEL_BSP_SCHEDULE_DELAY");
                env.millis(found, defaults.delay)
            },
            export_timeout: {
                let found = env.var("OTEL_BSP_EXPORT_TIMEOUT");
                env.millis(found, defaults.export_timeout)
            },
        };
        if batch.size > batch.queue {
            env.warnings.push(format!(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE={} is above OTEL_BSP_MAX_QUEUE_SIZE={}; using {}",
                batch.size, batch.queue, batch.queue
            ));
            batch.size = batch.queue;
        }
        Ok(Config {
            endpoint,
            protocol,
            headers,
            timeout,
            gzip,
            certificate,
            client_identity,
            service_name,
            resource,
            batch,
        })
    }
}
