//! weft's per-pod proxy: carries the pod's traffic over mTLS between sidecars, routed by the config
//! pilot pushes.
//!
//! Folders follow the request path (ARCHITECTURE.md, "Request path"): `outbound/` and `inbound/`
//! are the two listeners with their stages in pipeline order, `route/` the pure route model pilot's
//! push becomes, `upstream/` where requests go (balancing, outlier ejection, pool limits, retries,
//! the connections), `http/` the codecs, and `telemetry/` what every request reports.

pub mod admin;
pub mod capture;
pub mod cli;
pub mod control;
pub mod dns;
pub mod errors;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod inbound;
pub mod listener;
pub mod outbound;
pub mod route;
pub mod run;
pub mod shadow_diff;
pub mod snapshot;
pub mod stream;
pub mod telemetry;
pub mod upstream;
