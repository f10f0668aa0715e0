//! weft's control plane: the durable config store, the config API, and the `pilot` command line.
#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod discovery;
pub mod inject;
pub mod install;
pub mod kube;
pub mod mesh_config;
pub mod mirror_report;
pub mod proxy_config;
pub mod registry;
pub mod serve;
pub mod store;
pub mod table;
pub mod webhook;
