//! Compiles the `.proto` contracts with protox (pure Rust), so no `protoc` is needed anywhere.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/ca.proto",
        "proto/discovery.proto",
        "proto/config.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    // The descriptors themselves, for code that walks the schema rather than one message type
    // (the sidecar's test that every pushed field is read).
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("weft_descriptors.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
