//! Shadow-diff annotations of a VirtualService (issue 20): `weft.io/mirror-compare` asks the client
//! sidecars to compare each mirror's answer with the primary's, and the two `-ignore-*` annotations
//! say what not to compare.
//!
//! Annotations, not spec fields, so the same YAML stays valid for Istio (which ignores annotations
//! it does not know). The values are checked at apply time like any field; an unknown
//! `weft.io/mirror-*` key is refused too, because a misspelt one (`weft.io/mirror-compare-ignore-header`)
//! would otherwise silently compare what the user meant to ignore. Other annotations, `weft.io/`
//! ones included, are left alone as before: weft has no other annotation yet, and an unknown
//! annotation is legal Kubernetes.

use std::collections::BTreeMap;

use crate::error::FieldPath;
use crate::validate::Report;

/// What to compare: a comma list of `status`, `headers`, `body` (any non-empty subset).
pub const MIRROR_COMPARE: &str = "weft.io/mirror-compare";
/// Response header names never compared, on top of [`DEFAULT_IGNORED_HEADERS`].
pub const MIRROR_COMPARE_IGNORE_HEADERS: &str = "weft.io/mirror-compare-ignore-headers";
/// JSON paths (`$.a.b`, `$.a[0]`, `$.a["x.y"]`) removed from JSON bodies before comparing.
pub const MIRROR_COMPARE_IGNORE_JSON: &str = "weft.io/mirror-compare-ignore-json";

/// Every annotation of the shadow-diff family; any other key with this prefix is refused.
const KNOWN: [&str; 3] = [
    MIRROR_COMPARE,
    MIRROR_COMPARE_IGNORE_HEADERS,
    MIRROR_COMPARE_IGNORE_JSON,
];
const FAMILY_PREFIX: &str = "weft.io/mirror-";

/// Headers that differ between any two answers of the same server (time, server name) or carry
/// per-request identity (request id, B3 and W3C trace context, Envoy's upstream time): comparing
/// them would make every copy a divergence. Pilot adds them to every compare.
pub const DEFAULT_IGNORED_HEADERS: [&str; 12] = [
    "date",
    "server",
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "traceparent",
    "tracestate",
    "x-envoy-upstream-service-time",
];

/// The compare a VirtualService asks for, as read from its annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorCompare {
    /// Compare the status codes.
    pub status: bool,
    /// Compare the response headers (except the ignored ones).
    pub headers: bool,
    /// Compare the bodies (JSON ones without the ignored paths).
    pub body: bool,
    /// The user's ignored headers, lowercased, in the order written, without duplicates (the
    /// defaults are not included; see [`MirrorCompare::all_ignored_headers`]).
    pub ignore_headers: Vec<String>,
    /// The user's ignored JSON paths, as written, without duplicates.
    pub ignore_json: Vec<String>,
}

impl MirrorCompare {
    /// The defaults followed by the user's headers not already among them.
    pub fn all_ignored_headers(&self) -> Vec<String> {
        let mut all: Vec<String> = DEFAULT_IGNORED_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect();
        for header in &self.ignore_headers {
            if !all.contains(header) {
                all.push(header.clone());
            }
        }
        all
    }
}

/// What the annotations say: the compare (when `weft.io/mirror-compare` is set and valid) and
/// whether an `-ignore-*` annotation is present (the analyzer warns when it is without a compare).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorAnnotations {
    /// The compare, `None` without `weft.io/mirror-compare`.
    pub compare: Option<MirrorCompare>,
    /// An `-ignore-*` annotation is set.
    pub has_ignore: bool,
}

/// Reads the shadow-diff annotations, leniently: an invalid value counts as absent. Validation
/// ([`validate`]) refuses such objects at apply time; this is for translation, which must still
/// work for objects stored before the rule existed.
pub fn read(annotations: &BTreeMap<String, String>) -> MirrorAnnotations {
    let mut report = Report::default();
    let parsed = parse(annotations, &mut report, &FieldPath::root());
    MirrorAnnotations {
        compare: parsed.compare.filter(|_| report.errors.is_empty()),
        has_ignore: parsed.has_ignore,
    }
}

/// Checks the shadow-diff annotations; `path` is `metadata.annotations`.
pub(crate) fn validate(
    annotations: &BTreeMap<String, String>,
    report: &mut Report,
    path: &FieldPath,
) {
    parse(annotations, report, path);
}

fn parse(
    annotations: &BTreeMap<String, String>,
    report: &mut Report,
    path: &FieldPath,
) -> MirrorAnnotations {
    for key in annotations.keys() {
        if key.starts_with(FAMILY_PREFIX) && !KNOWN.contains(&key.as_str()) {
            report.invalid(
                &path.key(key),
                format!(
                    "unknown weft shadow-diff annotation {key:?}, expected one of {}",
                    KNOWN.join(", ")
                ),
            );
        }
    }
    let mut compare = annotations.get(MIRROR_COMPARE).map(|value| {
        let at = path.key(MIRROR_COMPARE);
        let mut compare = MirrorCompare::default();
        let items = split_list(value);
        if items.iter().all(|i| i.is_empty()) {
            report.invalid(&at, "must name at least one of status, headers, body");
        } else {
            for item in items {
                let flag = match item {
                    "status" => &mut compare.status,
                    "headers" => &mut compare.headers,
                    "body" => &mut compare.body,
                    "" => {
                        report.invalid(&at, "empty item in the comma list");
                        continue;
                    }
                    other => {
                        report.invalid(
                            &at,
                            format!("unknown aspect {other:?}, expected status, headers or body"),
                        );
                        continue;
                    }
                };
                if *flag {
                    report.invalid(&at, format!("aspect {item:?} is listed twice"));
                }
                *flag = true;
            }
        }
        compare
    });
    let mut ignore_headers = Vec::new();
    if let Some(value) = annotations.get(MIRROR_COMPARE_IGNORE_HEADERS) {
        let at = path.key(MIRROR_COMPARE_IGNORE_HEADERS);
        for item in split_list(value) {
            if item.is_empty() {
                report.invalid(&at, "empty item in the comma list");
            } else if !is_header_name(item) {
                report.invalid(
                    &at,
                    format!(
                        "{item:?} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
                    ),
                );
            } else {
                let lower = item.to_ascii_lowercase();
                if !ignore_headers.contains(&lower) {
                    ignore_headers.push(lower);
                }
            }
        }
    }
    let mut ignore_json = Vec::new();
    if let Some(value) = annotations.get(MIRROR_COMPARE_IGNORE_JSON) {
        let at = path.key(MIRROR_COMPARE_IGNORE_JSON);
        for item in split_list(value) {
            match check_json_path(item) {
                Ok(()) if ignore_json.iter().any(|p| p == item) => {}
                Ok(()) => ignore_json.push(item.to_string()),
                Err(message) => report.invalid(&at, message),
            }
        }
    }
    if let Some(compare) = &mut compare {
        compare.ignore_headers = ignore_headers;
        compare.ignore_json = ignore_json;
    }
    MirrorAnnotations {
        compare,
        has_ignore: annotations.contains_key(MIRROR_COMPARE_IGNORE_HEADERS)
            || annotations.contains_key(MIRROR_COMPARE_IGNORE_JSON),
    }
}

/// Splits a comma list, trimming spaces around items; commas inside `"..."` (a quoted JSON key)
/// do not split.
fn split_list(value: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(value[start..].trim());
    items
}

/// RFC 9110 `token`: what a header field name may be.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The JSON path subset the sidecar implements: `$` then one or more of `.name`, `[3]`, `["any
/// text"]` (a name is letters, digits, `_` and `-`; quoted keys hold anything but `"` and `\`).
/// Bare `$` is refused: ignoring the whole body is `weft.io/mirror-compare` without `body`.
fn check_json_path(path: &str) -> Result<(), String> {
    let fail = |why: &str| {
        Err(format!(
            "{path:?} is not a JSON path weft supports ({why}); use $.name, $.name[0] or $[\"key.with.dots\"] steps"
        ))
    };
    if path.is_empty() {
        return Err("empty item in the comma list".to_string());
    }
    let Some(mut rest) = path.strip_prefix('$') else {
        return fail("it must start with $");
    };
    if rest.is_empty() {
        return fail(
            "bare $ would ignore the whole body; leave body out of weft.io/mirror-compare instead",
        );
    }
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .unwrap_or(after.len());
            if end == 0 {
                return fail("a . must be followed by a name");
            }
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix("[\"") {
            let Some(end) = after.find('"') else {
                return fail("unterminated quoted key");
            };
            let key = &after[..end];
            if key.contains('\\') {
                return fail("escapes in quoted keys are not supported");
            }
            let Some(after) = after[end + 1..].strip_prefix(']') else {
                return fail("a quoted key must be closed by \"]");
            };
            rest = after;
        } else if let Some(after) = rest.strip_prefix('[') {
            let end = after
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after.len());
            if end == 0 || !after[end..].starts_with(']') {
                return fail("an index is [digits]");
            }
            // The sidecar reads it as a usize (and NACKs the push if it cannot).
            if after[..end].parse::<usize>().is_err() {
                return fail("index out of range");
            }
            rest = &after[end + 1..];
        } else {
            return fail("expected . or [ after a step");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn errors(pairs: &[(&str, &str)]) -> Vec<String> {
        let mut report = Report::default();
        validate(
            &annotations(pairs),
            &mut report,
            &FieldPath::root().field("metadata").field("annotations"),
        );
        report.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn valid_annotations_are_read() {
        let read = read(&annotations(&[
            (MIRROR_COMPARE, " body , status"),
            (MIRROR_COMPARE_IGNORE_HEADERS, "X-Version, etag,x-version"),
            (
                MIRROR_COMPARE_IGNORE_JSON,
                r#"$.headers.Host, $.args[0], $["a.b,c"].d, $.headers.Host"#,
            ),
            ("weft.io/something-else", "kept"),
            ("example.com/other", "kept"),
        ]));
        assert_eq!(
            read.compare,
            Some(MirrorCompare {
                status: true,
                headers: false,
                body: true,
                ignore_headers: vec!["x-version".into(), "etag".into()],
                ignore_json: vec![
                    "$.headers.Host".into(),
                    "$.args[0]".into(),
                    r#"$["a.b,c"].d"#.into()
                ],
            })
        );
        assert!(read.has_ignore);
        assert!(errors(&[(MIRROR_COMPARE, "status,headers,body")]).is_empty());
    }

    #[test]
    fn absent_or_invalid_means_no_compare() {
        assert_eq!(read(&BTreeMap::new()), MirrorAnnotations::default());
        let only_ignore = read(&annotations(&[(MIRROR_COMPARE_IGNORE_HEADERS, "etag")]));
        assert_eq!(only_ignore.compare, None);
        assert!(only_ignore.has_ignore);
        assert_eq!(read(&annotations(&[(MIRROR_COMPARE, "x")])).compare, None);
    }

    #[test]
    fn each_invalid_form_is_refused_with_its_path() {
        let at = |key: &str, message: &str| format!("metadata.annotations[{key}]: {message}");
        assert_eq!(
            errors(&[(MIRROR_COMPARE, "status,x")]),
            [at(
                MIRROR_COMPARE,
                r#"unknown aspect "x", expected status, headers or body"#
            )]
        );
        assert_eq!(
            errors(&[(MIRROR_COMPARE, " ")]),
            [at(
                MIRROR_COMPARE,
                "must name at least one of status, headers, body"
            )]
        );
        assert_eq!(
            errors(&[(MIRROR_COMPARE, "status,,body")]),
            [at(MIRROR_COMPARE, "empty item in the comma list")]
        );
        assert_eq!(
            errors(&[(MIRROR_COMPARE, "body,body")]),
            [at(MIRROR_COMPARE, r#"aspect "body" is listed twice"#)]
        );
        assert_eq!(
            errors(&[(MIRROR_COMPARE_IGNORE_HEADERS, "x a")]),
            [at(
                MIRROR_COMPARE_IGNORE_HEADERS,
                r#""x a" is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"#
            )]
        );
        assert_eq!(
            errors(&[(MIRROR_COMPARE_IGNORE_HEADERS, "etag,")]),
            [at(
                MIRROR_COMPARE_IGNORE_HEADERS,
                "empty item in the comma list"
            )]
        );
        assert_eq!(
            errors(&[("weft.io/mirror-compare-ignore-header", "etag")]),
            [at(
                "weft.io/mirror-compare-ignore-header",
                r#"unknown weft shadow-diff annotation "weft.io/mirror-compare-ignore-header", expected one of weft.io/mirror-compare, weft.io/mirror-compare-ignore-headers, weft.io/mirror-compare-ignore-json"#
            )]
        );
        for (bad, why) in [
            ("headers.Host", "it must start with $"),
            ("$", "bare $ would ignore the whole body"),
            ("$.", "a . must be followed by a name"),
            ("$.a[x]", "an index is [digits]"),
            ("$.a[1", "an index is [digits]"),
            ("$.a[99999999999999999999999]", "index out of range"),
            (r#"$["a"#, "unterminated quoted key"),
            (r#"$["a\"b"]"#, "escapes in quoted keys are not supported"),
            (r#"$["a"x"#, "a quoted key must be closed by \"]"),
            ("$a", "expected . or [ after a step"),
            ("$.a b", "expected . or [ after a step"),
        ] {
            let found = errors(&[(MIRROR_COMPARE_IGNORE_JSON, bad)]);
            assert_eq!(found.len(), 1, "{bad}: {found:?}");
            assert!(
                found[0].starts_with(&at(
                    MIRROR_COMPARE_IGNORE_JSON,
                    &format!("{bad:?} is not a JSON path weft supports ({why}")
                )),
                "{bad}: {found:?}"
            );
        }
    }

    #[test]
    fn defaults_come_first_without_duplicates() {
        let compare = MirrorCompare {
            ignore_headers: vec!["date".into(), "etag".into()],
            ..MirrorCompare::default()
        };
        let all = compare.all_ignored_headers();
        assert_eq!(all.len(), DEFAULT_IGNORED_HEADERS.len() + 1);
        assert_eq!(all.first().map(String::as_str), Some("date"));
        assert_eq!(all.last().map(String::as_str), Some("etag"));
    }
}
