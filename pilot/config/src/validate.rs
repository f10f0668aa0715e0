//! Semantic validation as Istio and Kubernetes do it, collecting every problem of an object.

use std::collections::BTreeMap;

use crate::duration::Duration;
use crate::error::{FieldError, FieldPath, Problem};
use crate::resource::{Kind, ObjectMeta, Resource};

/// Checks one object and returns every problem found (empty when valid).
///
/// Cross-object checks (a subset no DestinationRule defines, a host with no Service) are warnings
/// from [`crate::analyze`], as in Istio.
pub fn validate(resource: &Resource) -> Vec<FieldError> {
    let mut report = Report::default();
    validate_metadata(&mut report, resource.kind(), resource.metadata());
    if let Resource::VirtualService(vs) = resource {
        crate::virtual_service::mirror_compare::validate(
            &vs.metadata.annotations,
            &mut report,
            &FieldPath::root().field("metadata").field("annotations"),
        );
    }
    let spec = FieldPath::root().field("spec");
    match resource {
        Resource::VirtualService(o) => o.spec.validate(&mut report, &spec),
        Resource::DestinationRule(o) => o.spec.validate(&mut report, &spec),
        Resource::PeerAuthentication(o) => o.spec.validate(&mut report, &spec),
        Resource::Service(o) => o.spec.validate(&mut report, &spec),
        Resource::Pod(o) => o.validate(&mut report),
    }
    report.errors
}

fn validate_metadata(report: &mut Report, kind: Kind, meta: &ObjectMeta) {
    let path = FieldPath::root().field("metadata");
    match meta.name.as_deref() {
        None | Some("") => report.push(&path.field("name"), Problem::required("")),
        // Kubernetes requires Service names to be DNS-1035 labels because they become DNS labels.
        Some(name) if kind == Kind::Service => report.dns1035_label(&path.field("name"), name),
        Some(name) => report.dns1123_subdomain(&path.field("name"), name),
    }
    if let Some(namespace) = meta.namespace.as_deref() {
        report.dns1123_label(&path.field("namespace"), namespace);
    }
    report.labels(&path.field("labels"), &meta.labels);
    for key in meta.annotations.keys() {
        if let Err(message) = qualified_name(key) {
            report.push(
                &path.field("annotations").key(key),
                Problem::invalid(format!("invalid annotation key: {message}")),
            );
        }
    }
}

/// Collects problems while walking an object.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) errors: Vec<FieldError>,
}

impl Report {
    pub(crate) fn push(&mut self, path: &FieldPath, problem: Problem) {
        self.errors.push(FieldError::new(path.clone(), problem));
    }

    pub(crate) fn invalid(&mut self, path: &FieldPath, message: impl Into<String>) {
        self.push(path, Problem::invalid(message));
    }

    /// Reports a known-but-unimplemented field if it is set to anything but null or empty.
    pub(crate) fn not_implemented(
        &mut self,
        path: &FieldPath,
        value: &Option<serde_json::Value>,
        hint: &str,
    ) {
        if value.as_ref().is_some_and(is_set) {
            self.push(path, Problem::not_implemented(hint));
        }
    }

    /// Reports a typed Istio field translation would drop: an error when `dropped` (the field is
    /// set to something other than what weft already does), so a knob is never silently ignored.
    pub(crate) fn not_implemented_if(&mut self, path: &FieldPath, dropped: bool, hint: &str) {
        if dropped {
            self.push(path, Problem::not_implemented(hint));
        }
    }

    pub(crate) fn range(&mut self, path: &FieldPath, value: i64, min: i64, max: i64) {
        if value < min || value > max {
            self.push(path, Problem::out_of_range(min, max, value));
        }
    }

    pub(crate) fn port(&mut self, path: &FieldPath, value: i64) {
        self.range(path, value, 1, 65535);
    }

    pub(crate) fn non_negative(&mut self, path: &FieldPath, value: Option<i64>) {
        if let Some(value) = value.filter(|v| *v < 0) {
            self.invalid(path, format!("must not be negative, got {value}"));
        }
    }

    pub(crate) fn percent(&mut self, path: &FieldPath, value: f64) {
        if !(0.0..=100.0).contains(&value) {
            self.push(path, Problem::out_of_range(0, 100, value));
        }
    }

    /// Istio's duration rule (≥ 1ms, whole milliseconds) for an optional duration field.
    pub(crate) fn duration(&mut self, path: &FieldPath, value: &Option<Duration>) {
        if let Some(problem) = value.as_ref().and_then(Duration::istio_problem) {
            self.invalid(path, problem);
        }
    }

    pub(crate) fn regex(&mut self, path: &FieldPath, pattern: &str) {
        // Istio uses RE2 with full-string matching; anchor the same way the matcher will.
        if let Err(error) = regex::Regex::new(&format!("^(?:{pattern})$")) {
            // Report the error of the pattern as written, not of our anchored copy; the parser's
            // message ends with an `error: ...` line after a drawing of the pattern.
            let error = regex::Regex::new(pattern).err().unwrap_or(error);
            let text = error.to_string();
            let detail = text
                .lines()
                .rev()
                .find_map(|line| line.trim().strip_prefix("error: "))
                .unwrap_or(text.as_str())
                .to_string();
            self.invalid(
                path,
                format!("invalid regex {pattern:?} (RE2 syntax expected): {detail}"),
            );
        }
    }

    pub(crate) fn dns1123_label(&mut self, path: &FieldPath, value: &str) {
        if let Err(message) = dns1123_label(value) {
            self.invalid(path, message);
        }
    }

    fn dns1035_label(&mut self, path: &FieldPath, value: &str) {
        let starts_with_letter = value.chars().next().is_some_and(|c| c.is_ascii_lowercase());
        match dns1123_label(value) {
            Ok(()) if starts_with_letter => {}
            _ => self.invalid(
                path,
                format!(
                    "{value:?} is not a valid DNS-1035 label: use at most 63 lowercase letters, digits or '-', starting with a letter and ending with a letter or digit"
                ),
            ),
        }
    }

    pub(crate) fn dns1123_subdomain(&mut self, path: &FieldPath, value: &str) {
        let ok = value.len() <= 253 && value.split('.').all(|label| dns1123_label(label).is_ok());
        if !ok {
            self.invalid(
                path,
                format!(
                    "{value:?} is not a valid DNS-1123 subdomain: use lowercase letters, digits, '-' and '.', at most 253 characters, each part starting and ending with a letter or digit"
                ),
            );
        }
    }

    /// Kubernetes label rules for a selector or label map.
    pub(crate) fn labels(&mut self, path: &FieldPath, labels: &BTreeMap<String, String>) {
        for (key, value) in labels {
            let at = path.key(key);
            if let Err(message) = qualified_name(key) {
                self.invalid(&at, format!("invalid label key: {message}"));
            }
            if let Err(message) = label_value(value) {
                self.invalid(&at, format!("invalid label value: {message}"));
            }
        }
    }
}

/// Whether a JSON value counts as "set" (null, `[]` and `{}` do not).
fn is_set(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null => false,
        serde_json::Value::Array(items) => !items.is_empty(),
        serde_json::Value::Object(fields) => !fields.is_empty(),
        _ => true,
    }
}

/// A DNS-1123 label: 1-63 lowercase alphanumerics or '-', starting and ending alphanumeric.
pub(crate) fn dns1123_label(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid DNS-1123 label: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
        ))
    }
}

/// The name part of a label key, or a label value: ≤ 63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn label_name(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric())
}

/// A Kubernetes qualified name (`[prefix/]name`), as used for label and annotation keys.
fn qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        p.len() <= 253 && !p.is_empty() && p.split('.').all(|label| dns1123_label(label).is_ok())
    });
    if prefix_ok && !name.is_empty() && label_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{key:?}: expected an optional DNS subdomain prefix and '/', then at most 63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "{value:?}: expected at most 63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        assert!(dns1123_label("v2-mysql-vm").is_ok());
        assert!(dns1123_label("V1").is_err());
        assert!(dns1123_label("").is_err());
        assert!(dns1123_label("-a").is_err());
        assert!(qualified_name("app").is_ok());
        assert!(qualified_name("app.kubernetes.io/name").is_ok());
        assert!(qualified_name("security.istio.io/tlsMode").is_ok());
        assert!(qualified_name("bad key").is_err());
        assert!(qualified_name("/x").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_3").is_ok());
        assert!(label_value("-v1").is_err());
    }
}
