//! Istio and Kubernetes config model, validation and translation for pilot (pure, no I/O).
//!
//! [`parse_documents`] turns one YAML input into typed [`Resource`]s, or into [`ConfigErrors`]
//! listing every problem with file, document, object, field path and line. [`validate`] checks a
//! single object again (e.g. one read back from the store), and [`analyze`] gives Istio-style
//! warnings over a whole set of objects. See `README.md` for the decisions behind the rules.
#![forbid(unsafe_code)]

pub mod analyze;
pub mod destination_rule;
pub mod duration;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
mod parse;
pub mod peer_authentication;
pub mod pod;
pub mod resource;
pub mod service;
pub mod translate;
mod validate;
pub mod virtual_service;

pub use analyze::{Level, Warning, analyze};
pub use error::{ConfigError, ConfigErrors, FieldError, FieldPath, Position, Problem};
pub use parse::{parse_documents, parse_documents_until};
pub use resource::{Kind, ObjectMeta, Resource, ResourceKey};
pub use validate::validate;
