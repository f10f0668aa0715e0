//! Compiles the `.proto` contracts with protox (pure Rust), so no `protoc` is needed anywhere.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/ca.proto",
        "proto/discovery.proto",
        "proto/config.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
