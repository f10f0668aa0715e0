//! weft's gRPC contracts, generated from `proto/*.proto` at build time (protox, no `protoc`).

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// The CA service, wire-compatible with Istio's `istio.v1.auth.IstioCertificateService`.
pub mod ca {
    tonic::include_proto!("istio.v1.auth");
}

/// The discovery service pilot serves to sidecars.
pub mod discovery {
    tonic::include_proto!("weft.discovery.v1");
}

/// The config API `pilot apply|get|delete|analyze` call on pilot's unix socket.
pub mod config {
    tonic::include_proto!("weft.config.v1");
}

/// Every `.proto` above as an encoded `google.protobuf.FileDescriptorSet`: the schema, for code
/// that walks the messages' fields generically.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weft_descriptors.bin"));
