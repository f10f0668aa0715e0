//! weft's per-pod proxy: carries the pod's traffic over mTLS between sidecars, routed by the config
//! pilot pushes.

pub mod admin;
pub mod app;
pub mod appmetrics;
pub mod balance;
pub mod capture;
pub mod cli;
pub mod config;
pub mod control;
pub mod dns;
pub mod errors;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod h1;
pub mod headers;
pub mod inbound;
pub mod listener;
pub mod mirror;
pub mod outbound;
pub mod peer;
pub mod run;
pub mod sniff;
pub mod telemetry;
pub mod trace;
pub mod tunnel;
pub mod upstream;
