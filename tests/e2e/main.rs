//! End-to-end tests: real binaries as processes, real gRPC over loopback. One test binary with a
//! module per area, so the workspace links one e2e executable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod addons;
mod ca;
mod chaos;
mod cli;
mod control_metrics;
mod discovery;
mod drain;
mod fidelity;
mod grpc;
mod h2reset;
mod identity;
mod image;
mod inject;
mod install;
mod kube;
mod lifetime;
mod mesh;
mod mirror;
mod mirror_report;
mod multinode;
mod otlp;
mod pilot;
mod resilience;
mod runtime;
mod shadow_diff;
mod traffic_policy;
mod transparent;
