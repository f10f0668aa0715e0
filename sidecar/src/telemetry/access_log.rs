//! Envoy's access log (Istio's default text format and its JSON variant), one line per request.

use std::time::SystemTime;

/// Access-log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    /// No access log.
    Off,
    /// Envoy/Istio's default text format.
    Text,
    /// Istio's JSON variant.
    Json,
}

/// One access-log entry (Envoy's default fields; missing values print as `-`).
#[derive(Debug, Default)]
pub struct LogEntry<'a> {
    /// Start of the request.
    pub start: Option<SystemTime>,
    /// Method.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'a str,
    /// Status (0 = none).
    pub code: u16,
    /// Envoy response flags (`-`, `NR`, `UH`, `UF`, `UT`...).
    pub flags: &'a str,
    /// Request body bytes.
    pub bytes_received: u64,
    /// Response body bytes.
    pub bytes_sent: u64,
    /// Milliseconds to the response head.
    pub duration_ms: u64,
    /// X-Forwarded-For.
    pub xff: Option<&'a str>,
    /// User-Agent.
    pub user_agent: Option<&'a str>,
    /// X-Request-Id.
    pub request_id: Option<&'a str>,
    /// Authority.
    pub authority: Option<&'a str>,
    /// Upstream host.
    pub upstream_host: Option<String>,
    /// Upstream cluster.
    pub upstream_cluster: Option<&'a str>,
    /// Downstream peer address.
    pub downstream_remote: Option<String>,
    /// Route name.
    pub route: Option<&'a str>,
}

fn dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// RFC 3339 UTC with milliseconds, as Envoy prints %START_TIME%.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

impl AccessLog {
    /// Formats an entry, or `None` when logging is off.
    pub fn format(self, e: &LogEntry<'_>) -> Option<String> {
        let start = e.start.map(rfc3339);
        match self {
            AccessLog::Off => None,
            AccessLog::Text => Some(format!(
                "[{}] \"{} {} {}\" {} {} - - \"-\" {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} - - {} - {}",
                dash(start),
                e.method,
                e.path,
                e.protocol,
                e.code,
                e.flags,
                e.bytes_received,
                e.bytes_sent,
                e.duration_ms,
                dash(e.xff),
                dash(e.user_agent),
                dash(e.request_id),
                dash(e.authority),
                dash(e.upstream_host.as_deref()),
                dash(e.upstream_cluster),
                dash(e.downstream_remote.as_deref()),
                dash(e.route),
            )),
            AccessLog::Json => Some(
                serde_json::json!({
                    "start_time": start,
                    "method": e.method,
                    "path": e.path,
                    "protocol": e.protocol,
                    "response_code": e.code,
                    "response_flags": e.flags,
                    "bytes_received": e.bytes_received,
                    "bytes_sent": e.bytes_sent,
                    "duration": e.duration_ms,
                    "x_forwarded_for": e.xff,
                    "user_agent": e.user_agent,
                    "request_id": e.request_id,
                    "authority": e.authority,
                    "upstream_host": e.upstream_host,
                    "upstream_cluster": e.upstream_cluster,
                    "downstream_remote_address": e.downstream_remote,
                    "route_name": e.route,
                })
                .to_string(),
            ),
        }
    }

    /// Writes an entry to stdout (one line).
    pub fn write(self, e: &LogEntry<'_>) {
        if let Some(line) = self.format(e) {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn access_log_lines_follow_envoys_default_format() {
        let e = LogEntry {
            start: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_551_470_563_123)),
            method: "GET",
            path: "/headers",
            protocol: "HTTP/1.1",
            code: 200,
            flags: "-",
            bytes_sent: 321,
            duration_ms: 3,
            user_agent: Some("curl/7.35.0"),
            request_id: Some("571c0fd6-98d4-4c93-af79-6a2fe2945847"),
            authority: Some("httpbin:8000"),
            upstream_host: Some("10.233.1.3:80".into()),
            upstream_cluster: Some("outbound|8000|v1|httpbin.default.svc.cluster.local"),
            route: Some("default/httpbin/0"),
            ..LogEntry::default()
        };
        let line = AccessLog::Text.format(&e).unwrap();
        assert!(
            line.starts_with("[2019-03-01T20:02:43.123Z] \"GET /headers HTTP/1.1\" 200 - "),
            "{line}"
        );
        assert!(line.contains("\"curl/7.35.0\" \"571c0fd6-98d4-4c93-af79-6a2fe2945847\" \"httpbin:8000\" \"10.233.1.3:80\" outbound|8000|v1|httpbin.default.svc.cluster.local"), "{line}");
        let json: serde_json::Value =
            serde_json::from_str(&AccessLog::Json.format(&e).unwrap()).unwrap();
        assert_eq!(json["response_code"], 200);
        assert_eq!(json["authority"], "httpbin:8000");
        assert!(AccessLog::Off.format(&e).is_none());
    }
}
