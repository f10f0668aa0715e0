//! Multi-document YAML in, typed and validated resources out, with every error located.
//!
//! Each document is cut out of the file by its `---` lines and parsed twice: first leniently into
//! `TypeMeta` to pick the concrete type, then into that type. An internally tagged enum would be
//! one pass, but serde buffers its content and the line/column of errors is lost (ecosystem P9).

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_saphyr::{Location, MessageFormatter, Spanned, UserMessageFormatter};

use crate::error::{ConfigError, ConfigErrors, FieldError, FieldPath, Position, Problem, Segment};
use crate::resource::{Kind, Resource, ResourceKey, TypeMeta};
use crate::validate::validate;

/// Parses and validates every document of one input.
///
/// `file` is only used in messages. Objects without `metadata.namespace` get `default_ns`.
/// Documents are numbered from 1, counting only non-empty ones (as kubectl skips empty ones).
/// On failure, the error lists every problem of every document; no resource is returned, so a
/// caller can apply all or nothing.
pub fn parse_documents(
    file: &str,
    text: &str,
    default_ns: &str,
) -> Result<Vec<Resource>, ConfigErrors> {
    match parse_documents_until(file, text, default_ns, || Ok::<(), Infallible>(())) {
        Ok(parsed) => parsed,
        Err(never) => match never {},
    }
}

/// [`parse_documents`] that calls `check` before each document and stops with its error, so a
/// caller can abandon a large input (its client went away, the server is shutting down) after at
/// most one more document instead of after all of them. The work per document does not depend on
/// the number of documents: the cost is linear in the input.
pub fn parse_documents_until<E>(
    file: &str,
    text: &str,
    default_ns: &str,
    mut check: impl FnMut() -> Result<(), E>,
) -> Result<Result<Vec<Resource>, ConfigErrors>, E> {
    let mut resources = Vec::new();
    let mut errors = Vec::new();
    let mut first_seen: HashMap<ResourceKey, usize> = HashMap::new();
    for (i, document) in split_documents(text).into_iter().enumerate() {
        check()?;
        let context = DocumentContext {
            file,
            number: i + 1,
            line_offset: document.line_offset,
        };
        match parse_document(&context, document.text, default_ns) {
            Ok(resource) => {
                let key = resource.key();
                if let Some(first) = first_seen.get(&key) {
                    let path = FieldPath::root().field("metadata").field("name");
                    let position = PositionIndex::new(document.text)
                        .find(&path)
                        .and_then(|l| context.position(l));
                    errors.push(context.error(
                        Some(key.clone()),
                        FieldError::new(
                            path,
                            Problem::DuplicateObject {
                                key,
                                first_document: *first,
                            },
                        ),
                        position,
                    ));
                } else {
                    first_seen.insert(key, context.number);
                    resources.push(resource);
                }
            }
            Err(mut document_errors) => errors.append(&mut document_errors),
        }
    }
    Ok(if errors.is_empty() {
        Ok(resources)
    } else {
        Err(ConfigErrors(errors))
    })
}

/// Where a document sits in its file.
struct DocumentContext<'a> {
    file: &'a str,
    number: usize,
    /// Lines of the file before the document's first line.
    line_offset: u64,
}

impl DocumentContext<'_> {
    fn position(&self, location: Location) -> Option<Position> {
        (location.line() > 0).then(|| Position {
            line: location.line() + self.line_offset,
            column: location.column(),
        })
    }

    fn error(
        &self,
        object: Option<ResourceKey>,
        error: FieldError,
        position: Option<Position>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            document: self.number,
            object,
            error,
            position,
        }
    }
}

fn parse_document(
    context: &DocumentContext<'_>,
    text: &str,
    default_ns: &str,
) -> Result<Resource, Vec<ConfigError>> {
    let type_meta = match serde_saphyr::from_str::<TypeMeta>(text) {
        Ok(type_meta) => type_meta,
        Err(error) => {
            // Re-read without any typing: a failure then is a plain syntax error, reported as the
            // parser saw it; success means valid YAML that is not a mapping (a list, a scalar).
            let (problem, location) = match serde_saphyr::from_str::<serde::de::IgnoredAny>(text) {
                Err(syntax) => (
                    Problem::Syntax {
                        message: message_of(&syntax),
                    },
                    syntax.location(),
                ),
                Ok(_) => (
                    Problem::NotAnObject {
                        message: "a document must be a mapping with apiVersion, kind and metadata"
                            .to_string(),
                    },
                    error.location(),
                ),
            };
            let position = location.and_then(|l| context.position(l));
            let error = FieldError::new(FieldPath::root(), problem);
            return Err(vec![context.error(None, error, position)]);
        }
    };

    // Reading positions costs a third parse, so only documents with errors pay for it.
    let positions = std::cell::OnceCell::new();
    let located = |object: Option<&ResourceKey>, error: FieldError| {
        let position = positions
            .get_or_init(|| PositionIndex::new(text))
            .find(&error.path)
            .and_then(|l| context.position(l));
        context.error(object.cloned(), error, position)
    };

    let api_version = type_meta.api_version.clone().unwrap_or_default();
    let kind_text = type_meta.kind.clone().unwrap_or_default();
    let mut missing = Vec::new();
    for (field, value) in [("apiVersion", &api_version), ("kind", &kind_text)] {
        if value.is_empty() {
            let error = FieldError::new(FieldPath::root().field(field), Problem::required(""));
            missing.push(located(None, error));
        }
    }
    if !missing.is_empty() {
        return Err(missing);
    }
    let kind = Kind::resolve(&api_version, &kind_text).map_err(|problem| {
        let field = match problem {
            Problem::UnsupportedApiVersion { .. } => "apiVersion",
            _ => "kind",
        };
        vec![located(
            None,
            FieldError::new(FieldPath::root().field(field), problem),
        )]
    })?;
    let object = object_key(kind, &type_meta, default_ns);

    let parsed = match kind {
        Kind::VirtualService => typed(text).map(Resource::VirtualService),
        Kind::DestinationRule => typed(text).map(Resource::DestinationRule),
        Kind::PeerAuthentication => typed(text).map(Resource::PeerAuthentication),
        Kind::Service => typed(text).map(Resource::Service),
        Kind::Pod => typed(text).map(Resource::Pod),
    };
    let mut resource = match parsed {
        Ok(resource) => resource,
        Err(serde_error) => {
            let position = serde_error.location.and_then(|l| context.position(l));
            return Err(vec![context.error(
                Some(object),
                serde_error.error,
                position,
            )]);
        }
    };
    if resource.metadata().namespace.is_none() {
        resource.metadata_mut().namespace = Some(default_ns.to_string());
    }
    let problems = validate(&resource);
    if problems.is_empty() {
        Ok(resource)
    } else {
        Err(problems
            .into_iter()
            .map(|error| located(Some(&object), error))
            .collect())
    }
}

/// The object's identity as far as the lenient first pass could read it.
fn object_key(kind: Kind, type_meta: &TypeMeta, default_ns: &str) -> ResourceKey {
    let meta = type_meta.metadata.as_ref();
    let name = meta.and_then(|m| m.name.as_ref()).and_then(|n| n.0.clone());
    let namespace = meta
        .and_then(|m| m.namespace.as_ref())
        .and_then(|n| n.0.clone());
    ResourceKey {
        kind,
        namespace: namespace.unwrap_or_else(|| default_ns.to_string()),
        name: name.unwrap_or_else(|| "<no name>".to_string()),
    }
}

/// A decoding failure: the path and problem, and the position the YAML reader reported.
struct SerdeFailure {
    error: FieldError,
    location: Option<Location>,
}

fn typed<T: DeserializeOwned>(text: &str) -> Result<T, Box<SerdeFailure>> {
    let mut path = None;
    let result = serde_saphyr::with_deserializer_from_str(text, |deserializer| {
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            path = Some(FieldPath::from_serde(error.path()));
            error.into_inner()
        })
    });
    result.map_err(|error| {
        let message = message_of(&error);
        let (path, problem) = classify(path.unwrap_or_default(), &message);
        Box::new(SerdeFailure {
            error: FieldError::new(path, problem),
            location: error.location(),
        })
    })
}

/// Turns serde's message into a typed problem; "unknown field" and "missing field" get their own.
fn classify(path: FieldPath, message: &str) -> (FieldPath, Problem) {
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, tail)) = rest.split_once('`')
    {
        let expected = tail
            .strip_prefix(", expected one of ")
            .or_else(|| tail.strip_prefix(", expected "))
            .unwrap_or("")
            .replace('`', "");
        // serde_path_to_error already put the unknown field at the end of the path.
        let path = match path.segments().last() {
            Some(Segment::Field(last)) if last == field => path,
            _ => path.field(field),
        };
        return (
            path,
            Problem::UnknownField {
                field: field.to_string(),
                expected,
            },
        );
    }
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some((field, _)) = rest.split_once('`')
    {
        return (path.field(field), Problem::required(""));
    }
    let message = match message {
        "invalid i64" | "invalid u64" | "invalid i32" | "invalid u32" | "invalid u16" => {
            "expected an integer".to_string()
        }
        "invalid f64" | "invalid f32" => "expected a number".to_string(),
        "invalid bool" => "expected true or false".to_string(),
        other => other.to_string(),
    };
    (path, Problem::Type { message })
}

/// The YAML reader's message without its own position suffix or source snippet.
fn message_of(error: &serde_saphyr::Error) -> String {
    UserMessageFormatter
        .format_message(error.without_snippet())
        .into_owned()
}

// === documents ===

/// One document's text and where it starts.
#[derive(Debug, PartialEq)]
struct RawDocument<'a> {
    text: &'a str,
    line_offset: u64,
}

/// Cuts a YAML stream at its document markers, dropping documents with no content.
///
/// A `---` or `...` at the start of a line is always a marker in YAML (content may not start with
/// them), so a line-based cut is exact. The `---` line stays in its document so the parser sees it.
fn split_documents(text: &str) -> Vec<RawDocument<'_>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut documents = Vec::new();
    let mut start = 0usize;
    let mut start_line = 0u64;
    let mut offset = 0usize;
    for (line_number, line) in (0u64..).zip(text.split_inclusive('\n')) {
        let bare = line.trim_end_matches(['\n', '\r']);
        if is_marker(bare, "---") {
            push_document(&mut documents, &text[start..offset], start_line);
            start = offset;
            start_line = line_number;
        } else if is_marker(bare, "...") {
            push_document(
                &mut documents,
                &text[start..offset + line.len()],
                start_line,
            );
            start = offset + line.len();
            start_line = line_number + 1;
        }
        offset += line.len();
    }
    push_document(&mut documents, &text[start..], start_line);
    documents
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

fn push_document<'a>(documents: &mut Vec<RawDocument<'a>>, text: &'a str, line_offset: u64) {
    let has_content = text.lines().any(|line| {
        let line = line
            .strip_prefix("---")
            .filter(|_| is_marker(line, "---"))
            .unwrap_or(line);
        let line = line.trim();
        !line.is_empty() && !line.starts_with('#') && line != "..." && !line.starts_with('%')
    });
    if has_content {
        documents.push(RawDocument { text, line_offset });
    }
}

// === positions of fields ===

/// Line/column of every key and item of a document, to locate errors found after decoding.
struct PositionIndex {
    root: Option<Spanned<Node>>,
}

impl PositionIndex {
    fn new(text: &str) -> Self {
        Self {
            root: serde_saphyr::from_str::<Spanned<Node>>(text).ok(),
        }
    }

    /// The position of the deepest existing node on `path`: a key's own position for fields,
    /// an item's position for list indexes.
    fn find(&self, path: &FieldPath) -> Option<Location> {
        let root = self.root.as_ref()?;
        let mut node = &root.value;
        let mut found = root.referenced;
        for segment in path.segments() {
            match (segment, node) {
                (Segment::Field(name) | Segment::Key(name), Node::Map(entries)) => {
                    let Some(entry) = entries.iter().find(|e| e.key.value.0 == *name) else {
                        break;
                    };
                    found = entry.key.referenced;
                    node = &entry.value.value;
                }
                (Segment::Index(index), Node::Seq(items)) => {
                    let Some(item) = items.get(*index) else { break };
                    found = item.referenced;
                    node = &item.value;
                }
                _ => break,
            }
        }
        Some(found)
    }
}

/// A YAML node reduced to its shape.
#[derive(Debug)]
enum Node {
    Map(Vec<Entry>),
    Seq(Vec<Spanned<Node>>),
    Scalar,
}

#[derive(Debug)]
struct Entry {
    key: Spanned<KeyText>,
    value: Spanned<Node>,
}

/// A mapping key as text, whatever its scalar type (`8080:` keys are integers).
#[derive(Debug)]
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(KeyText(match value {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        }))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML node")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i128<E>(self, _: i128) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u128<E>(self, _: u128) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_bytes<E>(self, _: &[u8]) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Seq(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some((key, value)) = map.next_entry()? {
                    entries.push(Entry { key, value });
                }
                Ok(Node::Map(entries))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_keeps_line_offsets() {
        let text = "# header\n---\na: 1\n---\n\n---\n# only a comment\n---\nb: 2\n...\nc: 3\n";
        let docs = split_documents(text);
        let summary: Vec<(u64, &str)> = docs.iter().map(|d| (d.line_offset, d.text)).collect();
        assert_eq!(
            summary,
            vec![(1, "---\na: 1\n"), (7, "---\nb: 2\n...\n"), (10, "c: 3\n")]
        );
    }

    #[test]
    fn a_check_error_stops_before_the_next_document() {
        let text: String = (0..5)
            .map(|i| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{ports: [{{port: 80}}]}}\n---\n"))
            .collect();
        let mut checks = 0;
        let stopped = parse_documents_until("f", &text, "default", || {
            checks += 1;
            if checks == 3 { Err("stop") } else { Ok(()) }
        });
        assert_eq!(stopped, Err("stop"));
        assert_eq!(checks, 3, "two documents parsed, then stopped");
        let mut checks = 0;
        let all = parse_documents_until("f", &text, "default", || {
            checks += 1;
            Ok::<(), ()>(())
        });
        assert_eq!(all.map(|r| r.map(|v| v.len())), Ok(Ok(5)));
        assert_eq!(checks, 5);
    }

    #[test]
    fn a_marker_needs_a_separator_after_it() {
        let docs = split_documents("a: |\n  ---x\n----\n");
        assert_eq!(docs.len(), 1);
    }

    #[test]
    fn finds_key_positions() {
        let text = "spec:\n  http:\n  - route:\n    - weight: 1\n    - weight: 2\n";
        let index = PositionIndex::new(text);
        let path = FieldPath::root()
            .field("spec")
            .field("http")
            .index(0)
            .field("route")
            .index(1)
            .field("weight");
        let location = index.find(&path).map(|l| (l.line(), l.column()));
        assert_eq!(location, Some((5, 7)));
        // A path that leaves the document stops at the deepest node that exists.
        let missing = FieldPath::root().field("spec").field("nope");
        assert_eq!(index.find(&missing).map(|l| l.line()), Some(1));
    }
}
