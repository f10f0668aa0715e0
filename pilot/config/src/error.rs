//! The one error type of this crate: where a problem is (file, document, object, field, line) and what it is.

use std::fmt;

use crate::resource::ResourceKey;

/// A 1-based line and column in the input file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// 1-based line number in the whole file (not in the document).
    pub line: u64,
    /// 1-based column.
    pub column: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One step of a [`FieldPath`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A struct field, rendered `.name`.
    Field(String),
    /// A list index, rendered `[3]`.
    Index(usize),
    /// A map key chosen by the user (a label, a header name), rendered `[key]` as Kubernetes does.
    Key(String),
}

/// A field path such as `spec.http[0].route[1].weight`; empty means "the whole document".
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FieldPath(Vec<Segment>);

impl FieldPath {
    /// The empty path (the document itself).
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// This path followed by struct field `name`.
    pub fn field(&self, name: &str) -> Self {
        self.with(Segment::Field(name.to_string()))
    }

    /// This path followed by list index `index`.
    pub fn index(&self, index: usize) -> Self {
        self.with(Segment::Index(index))
    }

    /// This path followed by map key `key`.
    pub fn key(&self, key: &str) -> Self {
        self.with(Segment::Key(key.to_string()))
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> &[Segment] {
        &self.0
    }

    /// Whether this is the root path.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    fn with(&self, segment: Segment) -> Self {
        let mut segments = self.0.clone();
        segments.push(segment);
        Self(segments)
    }

    /// Converts the path serde_path_to_error recorded; struct fields and map keys both arrive as `Map`.
    pub(crate) fn from_serde(path: &serde_path_to_error::Path) -> Self {
        let segments = path
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Seq { index } => Some(Segment::Index(*index)),
                serde_path_to_error::Segment::Map { key } => Some(Segment::Field(key.clone())),
                serde_path_to_error::Segment::Enum { variant } => {
                    Some(Segment::Field(variant.clone()))
                }
                serde_path_to_error::Segment::Unknown => None,
            })
            .collect();
        Self(segments)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Field(name) if i == 0 => f.write_str(name)?,
                Segment::Field(name) => write!(f, ".{name}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => write!(f, "[{key}]")?,
            }
        }
        Ok(())
    }
}

/// What is wrong, and where it helps, what is allowed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Problem {
    /// The text is not valid YAML.
    #[error("invalid YAML: {message}")]
    Syntax {
        /// The YAML parser's message.
        message: String,
    },
    /// The document is not a mapping with `apiVersion` and `kind`.
    #[error("{message}")]
    NotAnObject {
        /// What was found instead.
        message: String,
    },
    /// `kind` is not one weft knows at all.
    #[error(
        "unsupported kind {kind:?} (apiVersion {api_version:?}); weft supports {}",
        crate::resource::SUPPORTED_KINDS
    )]
    UnsupportedKind {
        /// The document's apiVersion.
        api_version: String,
        /// The document's kind.
        kind: String,
    },
    /// `kind` is a real Istio kind that weft does not implement yet.
    #[error(
        "known Istio kind {kind} ({api_version}) not implemented by weft yet; weft supports {}",
        crate::resource::SUPPORTED_KINDS
    )]
    KindNotImplemented {
        /// The document's apiVersion.
        api_version: String,
        /// The document's kind.
        kind: String,
    },
    /// The kind is supported but not under this apiVersion.
    #[error("apiVersion {api_version:?} is not supported for kind {kind}; use one of {allowed}")]
    UnsupportedApiVersion {
        /// The document's kind.
        kind: String,
        /// The document's apiVersion.
        api_version: String,
        /// The accepted apiVersions, comma separated.
        allowed: String,
    },
    /// A field that neither weft nor Istio (nor Kubernetes) has; usually a typo.
    #[error("unknown field `{field}`{}", allowed_suffix(.expected))]
    UnknownField {
        /// The field as written.
        field: String,
        /// The fields allowed at this place (empty when not known).
        expected: String,
    },
    /// A field Istio has but weft does not implement yet: an error, so it is never silently ignored.
    #[error("known Istio field not implemented by weft yet{}", hint_suffix(.hint))]
    NotImplemented {
        /// Extra detail, such as which values are implemented.
        hint: String,
    },
    /// A required field is absent or empty.
    #[error("is required{}", hint_suffix(.hint))]
    Required {
        /// Extra detail.
        hint: String,
    },
    /// A number outside its range.
    #[error("must be between {min} and {max}, got {got}")]
    OutOfRange {
        /// Smallest allowed value.
        min: String,
        /// Largest allowed value.
        max: String,
        /// The value found.
        got: String,
    },
    /// A value of the wrong shape or type, as reported while decoding it.
    #[error("{message}")]
    Type {
        /// The decoder's message.
        message: String,
    },
    /// A value that decodes but breaks a rule; the message says what is allowed.
    #[error("{message}")]
    Invalid {
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The same object appears twice in one input.
    #[error("duplicate object {key}: also defined in document {first_document}")]
    DuplicateObject {
        /// The object.
        key: ResourceKey,
        /// The document that defined it first (1-based).
        first_document: usize,
    },
}

fn allowed_suffix(expected: &str) -> String {
    if expected.is_empty() {
        String::new()
    } else {
        format!(", expected one of {expected}")
    }
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(" ({hint})")
    }
}

impl Problem {
    /// A rule violation with its explanation.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
        }
    }

    /// A known-but-unimplemented Istio field, with an optional hint.
    pub fn not_implemented(hint: impl Into<String>) -> Self {
        Self::NotImplemented { hint: hint.into() }
    }

    /// A missing required field, with an optional hint.
    pub fn required(hint: impl Into<String>) -> Self {
        Self::Required { hint: hint.into() }
    }

    /// A number outside `min..=max`.
    pub fn out_of_range(
        min: impl fmt::Display,
        max: impl fmt::Display,
        got: impl fmt::Display,
    ) -> Self {
        Self::OutOfRange {
            min: min.to_string(),
            max: max.to_string(),
            got: got.to_string(),
        }
    }
}

/// A problem at a field of one object, as found by [`crate::validate`] (no file context yet).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}{problem}", path_prefix(.path))]
pub struct FieldError {
    /// Where in the object.
    pub path: FieldPath,
    /// What is wrong.
    pub problem: Problem,
}

fn path_prefix(path: &FieldPath) -> String {
    if path.is_root() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

impl FieldError {
    /// A problem at `path`.
    pub fn new(path: FieldPath, problem: Problem) -> Self {
        Self { path, problem }
    }
}

/// A problem in one document of one input file, with everything known about where it is.
///
/// Displayed on one line:
/// `vs.yaml:14:17: document 2 (VirtualService default/httpbin): spec.http[0].route[1].weight: must not be negative, got -5`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct ConfigError {
    /// The file name the caller gave (`-` or `<stdin>` for standard input).
    pub file: String,
    /// 1-based index of the document in the file, counting non-empty documents only.
    pub document: usize,
    /// The object, when its kind and name could be read.
    pub object: Option<ResourceKey>,
    /// The field path and the problem.
    pub error: FieldError,
    /// Line and column in the file, when known.
    pub position: Option<Position>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(position) = self.position {
            write!(f, ":{position}")?;
        }
        write!(f, ": document {}", self.document)?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        write!(f, ": {}", self.error)
    }
}

/// Every problem found in one input; never empty when returned as an error.
#[derive(Clone, Debug, Default, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The individual errors, in input order.
    pub fn errors(&self) -> &[ConfigError] {
        &self.0
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}
