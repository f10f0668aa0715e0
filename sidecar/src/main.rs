//! `sidecar`: weft's per-pod proxy (see `sidecar --help`).

use clap::Parser;

/// mimalloc: the data path allocates many small short-lived buffers (headers, frames, records).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    weft_ca::tls::install_default_provider();
    match weft_sidecar::cli::run(weft_sidecar::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", weft_ca::cli::report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
