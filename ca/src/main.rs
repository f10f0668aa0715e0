//! `ca`: weft's certificate authority (see `ca --help`).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    weft_ca::tls::install_default_provider();
    weft_ca::cli::run(weft_ca::cli::Cli::parse())
}
