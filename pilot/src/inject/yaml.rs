//! A generic YAML value that keeps mapping keys in document order (serde_json's `Map` sorts them
//! unless its `preserve_order` feature is on, which would change key order for every crate in the
//! workspace), and the cutting of a YAML stream into its documents.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// One YAML node. Mapping keys are strings (Kubernetes objects are JSON); scalar keys of other
/// types (`80: x`) are read as their text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Yaml {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Yaml>),
    Map(Map),
}

/// A mapping in document order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Map(Vec<(String, Yaml)>);

// === impl Yaml ===

impl Yaml {
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Yaml::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_map(&self) -> Option<&Map> {
        match self {
            Yaml::Map(m) => Some(m),
            _ => None,
        }
    }

    pub(crate) fn as_map_mut(&mut self) -> Option<&mut Map> {
        match self {
            Yaml::Map(m) => Some(m),
            _ => None,
        }
    }

    pub(crate) fn as_seq_mut(&mut self) -> Option<&mut Vec<Yaml>> {
        match self {
            Yaml::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// The node at `path` of mapping keys.
    pub(crate) fn at(&self, path: &[&str]) -> Option<&Yaml> {
        path.iter()
            .try_fold(self, |node, key| node.as_map()?.get(key))
    }

    /// A scalar's text (`true`, `1`, `x`); `None` for null and collections.
    pub(crate) fn scalar_text(&self) -> Option<String> {
        match self {
            Yaml::Bool(b) => Some(b.to_string()),
            Yaml::Int(i) => Some(i.to_string()),
            Yaml::UInt(u) => Some(u.to_string()),
            Yaml::Float(f) => Some(f.to_string()),
            Yaml::Str(s) => Some(s.clone()),
            Yaml::Null | Yaml::Seq(_) | Yaml::Map(_) => None,
        }
    }

    /// A short name of the node's type, for error messages.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Yaml::Null => "null",
            Yaml::Bool(_) => "a boolean",
            Yaml::Int(_) | Yaml::UInt(_) | Yaml::Float(_) => "a number",
            Yaml::Str(_) => "a string",
            Yaml::Seq(_) => "a list",
            Yaml::Map(_) => "a mapping",
        }
    }
}

impl From<&str> for Yaml {
    fn from(s: &str) -> Self {
        Yaml::Str(s.to_string())
    }
}

impl From<String> for Yaml {
    fn from(s: String) -> Self {
        Yaml::Str(s)
    }
}

/// JSON built with `serde_json::json!`: keys sorted, as `kubectl get -o yaml` prints them, except
/// that `name` comes first.
impl From<serde_json::Value> for Yaml {
    fn from(value: serde_json::Value) -> Self {
        match value {
            serde_json::Value::Null => Yaml::Null,
            serde_json::Value::Bool(b) => Yaml::Bool(b),
            serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Yaml::Int(i),
                (None, Some(u), _) => Yaml::UInt(u),
                (None, None, Some(f)) => Yaml::Float(f),
                (None, None, None) => Yaml::Null,
            },
            serde_json::Value::String(s) => Yaml::Str(s),
            serde_json::Value::Array(items) => {
                Yaml::Seq(items.into_iter().map(Yaml::from).collect())
            }
            serde_json::Value::Object(map) => {
                let mut entries: Vec<(String, Yaml)> =
                    map.into_iter().map(|(k, v)| (k, Yaml::from(v))).collect();
                // `name` first, as people write containers, env vars and volumes.
                if let Some(i) = entries.iter().position(|(k, _)| k == "name") {
                    let name = entries.remove(i);
                    entries.insert(0, name);
                }
                Yaml::Map(Map(entries))
            }
        }
    }
}

// === impl Map ===

impl Map {
    pub(crate) fn get(&self, key: &str) -> Option<&Yaml> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut Yaml> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The node at `path` of mapping keys below this mapping.
    pub(crate) fn at(&self, path: &[&str]) -> Option<&Yaml> {
        let (first, rest) = path.split_first()?;
        let node = self.get(first)?;
        if rest.is_empty() {
            Some(node)
        } else {
            node.at(rest)
        }
    }

    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Yaml)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Sets `key`, keeping its place if it exists, else appending it.
    pub(crate) fn insert(&mut self, key: &str, value: Yaml) {
        match self.get_mut(key) {
            Some(slot) => *slot = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    /// Sets `key`, keeping its place if it exists, else inserting it before `before` (or at the end
    /// when `before` is absent).
    pub(crate) fn insert_before(&mut self, key: &str, value: Yaml, before: &str) {
        if let Some(slot) = self.get_mut(key) {
            *slot = value;
            return;
        }
        let at = self
            .0
            .iter()
            .position(|(k, _)| k == before)
            .unwrap_or(self.0.len());
        self.0.insert(at, (key.to_string(), value));
    }

    /// The mapping at `key`, created (at `position`, or the end) when the key is missing or null.
    /// `None` when the key holds something else than a mapping.
    pub(crate) fn map_entry(&mut self, key: &str, position: Option<usize>) -> Option<&mut Map> {
        let index = match self.0.iter().position(|(k, _)| k == key) {
            Some(i) => {
                if matches!(self.0[i].1, Yaml::Null) {
                    self.0[i].1 = Yaml::Map(Map::default());
                }
                i
            }
            None => {
                let at = position.unwrap_or(self.0.len()).min(self.0.len());
                self.0
                    .insert(at, (key.to_string(), Yaml::Map(Map::default())));
                at
            }
        };
        self.0.get_mut(index)?.1.as_map_mut()
    }
}

// === serde ===

impl Serialize for Yaml {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Yaml::Null => serializer.serialize_unit(),
            Yaml::Bool(b) => serializer.serialize_bool(*b),
            Yaml::Int(i) => serializer.serialize_i64(*i),
            Yaml::UInt(u) => serializer.serialize_u64(*u),
            Yaml::Float(f) => serializer.serialize_f64(*f),
            Yaml::Str(s) => serializer.serialize_str(s),
            Yaml::Seq(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Yaml::Map(map) => map.serialize(serializer),
        }
    }
}

impl Serialize for Map {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut out = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            out.serialize_entry(k, v)?;
        }
        out.end()
    }
}

impl<'de> Deserialize<'de> for Yaml {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(YamlVisitor)
    }
}

struct YamlVisitor;

impl<'de> Visitor<'de> for YamlVisitor {
    type Value = Yaml;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Yaml, E> {
        Ok(Yaml::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Yaml, E> {
        Ok(Yaml::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Yaml, E> {
        Ok(i64::try_from(v).map_or(Yaml::UInt(v), Yaml::Int))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Yaml, E> {
        Ok(Yaml::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Yaml, E> {
        Ok(Yaml::Str(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Yaml, E> {
        Ok(Yaml::Str(v))
    }

    fn visit_unit<E>(self) -> Result<Yaml, E> {
        Ok(Yaml::Null)
    }

    fn visit_none<E>(self) -> Result<Yaml, E> {
        Ok(Yaml::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Yaml, D::Error> {
        Yaml::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Yaml, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Yaml>()? {
            items.push(item);
        }
        Ok(Yaml::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Yaml, A::Error> {
        let mut map = Map::default();
        while let Some(key) = access.next_key::<Yaml>()? {
            let Some(key) = key.scalar_text() else {
                return Err(de::Error::custom(format!(
                    "a mapping key is {}; Kubernetes objects have string keys",
                    key.type_name()
                )));
            };
            let value = access.next_value::<Yaml>()?;
            map.insert(&key, value);
        }
        Ok(Yaml::Map(map))
    }
}

// === documents ===

/// One document of a YAML stream: its text without the `---` marker line, and where it starts.
#[derive(Debug, PartialEq)]
pub(crate) struct RawDocument<'a> {
    pub(crate) text: &'a str,
    /// Lines of the stream before the document's first line.
    pub(crate) line_offset: u64,
    /// The document holds only comments (no node); it is passed through as written.
    pub(crate) comments_only: bool,
}

/// Cuts a YAML stream at its `---` and `...` lines (at the start of a line they are always markers:
/// content cannot begin with them). Documents with only blank lines are dropped; documents with
/// only comments are kept (flagged) so their comments survive.
pub(crate) fn split_documents(text: &str) -> Vec<RawDocument<'_>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut documents = Vec::new();
    let mut start = 0usize;
    let mut start_line = 0u64;
    let mut offset = 0usize;
    for (line_number, line) in (0u64..).zip(text.split_inclusive('\n')) {
        let bare = line.trim_end_matches(['\n', '\r']);
        let end = offset + line.len();
        if let Some(rest) = marker(bare, "---") {
            push(&mut documents, &text[start..offset], start_line);
            // Content after `---` on the same line (`--- # note`) belongs to the next document.
            let rest_start = end - line.len() + (bare.len() - rest.len());
            let keep_rest = !rest.trim().is_empty();
            start = if keep_rest { rest_start } else { end };
            start_line = if keep_rest {
                line_number
            } else {
                line_number + 1
            };
        } else if marker(bare, "...").is_some() {
            push(&mut documents, &text[start..offset], start_line);
            start = end;
            start_line = line_number + 1;
        }
        offset = end;
    }
    push(&mut documents, &text[start..], start_line);
    documents
}

/// The rest of the line after a document marker, or `None` if the line is not one.
fn marker<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.strip_prefix(marker)
        .filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        .map(str::trim_start)
}

fn push<'a>(documents: &mut Vec<RawDocument<'a>>, text: &'a str, line_offset: u64) {
    let mut blank = true;
    let mut comments_only = true;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        blank = false;
        if !line.starts_with('#') && !line.starts_with('%') {
            comments_only = false;
        }
    }
    if !blank {
        documents.push(RawDocument {
            text,
            line_offset,
            comments_only,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(stream: &str) -> Vec<(&str, u64, bool)> {
        split_documents(stream)
            .into_iter()
            .map(|d| (d.text, d.line_offset, d.comments_only))
            .collect()
    }

    #[test]
    fn splits_at_markers() {
        assert_eq!(
            texts("---\na: 1\n---\n\n---\nb: 2\n...\n# tail\n"),
            vec![
                ("a: 1\n", 1, false),
                ("b: 2\n", 5, false),
                ("# tail\n", 7, true)
            ]
        );
        assert_eq!(
            texts("# head\n--- # note\nc: 3\n"),
            vec![("# head\n", 0, true), ("# note\nc: 3\n", 1, false)]
        );
        // `---x` and indented `---` are content, not markers.
        assert_eq!(texts("a: |\n  ---\n---x: 1\n").len(), 1);
    }

    #[test]
    fn keeps_key_order_and_types() {
        let value: Yaml =
            serde_saphyr::from_str("z: 1\na: \"false\"\nm: {b: true, a: null}\n8080: x\n").unwrap();
        let map = value.as_map().unwrap();
        let keys: Vec<&str> = map.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["z", "a", "m", "8080"]);
        assert_eq!(map.get("a"), Some(&Yaml::Str("false".into())));
        assert_eq!(value.at(&["m", "b"]), Some(&Yaml::Bool(true)));
        let text = serde_saphyr::to_string(&value).unwrap();
        assert!(text.starts_with("z: 1\na: 'false'\n") || text.starts_with("z: 1\na: \"false\"\n"));
    }
}
