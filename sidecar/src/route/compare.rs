//! Shadow-diff settings of a mirror (`Mirror.compare`, from the VirtualService's
//! `weft.io/mirror-compare*` annotations): what of the copy's answer is compared with the primary's.
//! Pure data; the comparing itself is `crate::shadow_diff`.

use std::fmt;

use http::HeaderName;

/// What to compare between a primary's answer and its mirror copy's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The status code.
    pub status: bool,
    /// The response headers (minus `ignore_headers` and framing).
    pub headers: bool,
    /// The body (JSON bodies minus `ignore_json`).
    pub body: bool,
    /// Response headers never compared (lowercase).
    pub ignore_headers: Vec<HeaderName>,
    /// JSON paths removed from JSON bodies before comparing.
    pub ignore_json: Vec<JsonPath>,
}

#[cfg(test)]
impl Compare {
    /// Status, headers and body, nothing ignored: the tests' usual setting.
    pub(crate) fn everything() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            status: true,
            headers: true,
            body: true,
            ignore_headers: vec![],
            ignore_json: vec![],
        })
    }
}

/// One step of a [`JsonPath`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// An object member (`.a` or `["a.b"]`).
    Key(String),
    /// An array element (`[0]`).
    Index(usize),
}

/// A JSON path of the subset the annotation takes: `$` followed by one or more of `.name`, `[N]`
/// and `["name"]` (a name holding `.`, `[`, `]` or spaces must be quoted; quoted names take no
/// escapes, so they cannot hold `"` or `\`). No wildcards, filters or recursive descent: a path names
/// exactly one place, so removing it and naming it in a report are both unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JsonPath(pub Vec<Step>);

/// Why a JSON path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON path {path:?}: {reason}")]
pub struct JsonPathError {
    /// The path as given.
    pub path: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl JsonPath {
    /// The root (`$`), as reports name a whole body.
    pub fn root() -> Self {
        JsonPath(Vec::new())
    }

    /// This path, one step deeper.
    pub fn child(&self, step: Step) -> Self {
        let mut steps = self.0.clone();
        steps.push(step);
        JsonPath(steps)
    }

    /// Parses the annotation's subset; the root alone is refused (it would ignore every body).
    pub fn parse(s: &str) -> Result<Self, JsonPathError> {
        let err = |reason| JsonPathError {
            path: s.to_owned(),
            reason,
        };
        let mut rest = s
            .strip_prefix('$')
            .ok_or_else(|| err("must start with `$`"))?;
        let mut steps = Vec::new();
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix('.') {
                let end = r.find(['.', '[']).unwrap_or(r.len());
                let name = &r[..end];
                if name.is_empty() {
                    return Err(err("empty name after `.`"));
                }
                if name.contains([']', '"', ' ', '\\', '*']) {
                    return Err(err(
                        "a name with `]`, `\"`, `\\`, `*` or spaces must be quoted",
                    ));
                }
                steps.push(Step::Key(name.to_owned()));
                rest = &r[end..];
            } else if let Some(r) = rest.strip_prefix("[\"") {
                let end = r.find('"').ok_or_else(|| err("unterminated `[\"`"))?;
                let name = &r[..end];
                if name.contains('\\') {
                    return Err(err("quoted names take no escapes"));
                }
                rest = r[end + 1..]
                    .strip_prefix(']')
                    .ok_or_else(|| err("`\"` not followed by `]`"))?;
                steps.push(Step::Key(name.to_owned()));
            } else if let Some(r) = rest.strip_prefix('[') {
                let end = r.find(']').ok_or_else(|| err("unterminated `[`"))?;
                let index = &r[..end];
                if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(err("an index is digits (no wildcards or filters)"));
                }
                steps.push(Step::Index(
                    index.parse().map_err(|_| err("index out of range"))?,
                ));
                rest = &r[end + 1..];
            } else {
                return Err(err("expected `.name`, `[N]` or `[\"name\"]`"));
            }
        }
        if steps.is_empty() {
            return Err(err("`$` alone would ignore the whole body"));
        }
        Ok(JsonPath(steps))
    }
}

impl fmt::Display for JsonPath {
    /// The canonical form: `.name` where the name needs no quotes, else `["name"]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("$")?;
        for step in &self.0 {
            match step {
                Step::Key(k)
                    if !k.is_empty() && !k.contains(['.', '[', ']', '"', ' ', '\\', '*']) =>
                {
                    write!(f, ".{k}")?
                }
                Step::Key(k) => write!(f, "[\"{k}\"]")?,
                Step::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subset_parses_and_prints_back() {
        for (text, steps) in [
            ("$.a.b", vec![Step::Key("a".into()), Step::Key("b".into())]),
            ("$.a[0]", vec![Step::Key("a".into()), Step::Index(0)]),
            (
                "$.a[\"x.y\"]",
                vec![Step::Key("a".into()), Step::Key("x.y".into())],
            ),
            (
                "$.headers.Host",
                vec![Step::Key("headers".into()), Step::Key("Host".into())],
            ),
            ("$[2]", vec![Step::Index(2)]),
        ] {
            let p = JsonPath::parse(text).unwrap();
            assert_eq!(p.0, steps, "{text}");
            assert_eq!(p.to_string(), text);
        }
        // Quotes that are not needed print without them.
        assert_eq!(JsonPath::parse("$[\"a\"]").unwrap().to_string(), "$.a");
    }

    #[test]
    fn paths_outside_the_subset_are_refused() {
        for bad in [
            "",
            "a.b",
            "$",
            "$.",
            "$..a",
            "$.a[*]",
            "$.a[-1]",
            "$.a[",
            "$.a[\"x",
            "$.a[\"x\"",
            "$.a[?(@.b)]",
            "$a",
            "$.a b",
            "$.*",
            "$[\"a\\\"\"]",
        ] {
            assert!(JsonPath::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
