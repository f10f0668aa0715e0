//! weft's gRPC contracts, generated from `proto/*.proto` at build time (protox, no `protoc`).

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// The CA service, wire-compatible with Istio's `istio.v1.auth.IstioCertificateService`.
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// The generated code nested as the packages are, so that a message of one package naming one of
/// another (`weft.config.v1` using `weft.discovery.v1.MirrorReport`) resolves: prost writes such
/// references as `super::super::discovery::v1::…`.
mod packages {
    pub mod weft {
        pub mod discovery {
            pub mod v1 {
                tonic::include_proto!("weft.discovery.v1");
            }
        }
        pub mod config {
            pub mod v1 {
                tonic::include_proto!("weft.config.v1");
            }
        }
    }
}

/// The discovery service pilot serves to sidecars.
pub mod discovery {
    pub use crate::packages::weft::discovery::v1::*;
}

/// The config API `pilot apply|get|delete|analyze` call on pilot's unix socket.
pub mod config {
    pub use crate::packages::weft::config::v1::*;
}

/// Every `.proto` above as an encoded `google.protobuf.FileDescriptorSet`: the schema, for code
/// that walks the messages' fields generically.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weft_descriptors.bin"));
