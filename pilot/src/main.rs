//! `pilot`: weft's control plane and its command line (see `pilot --help`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    weft_ca::tls::install_default_provider();
    weft_pilot::cli::run(weft_pilot::cli::Cli::parse())
}
