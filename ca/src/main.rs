//! `ca`: weft's certificate authority (see `ca --help`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    weft_ca::tls::install_default_provider();
    match weft_ca::cli::run(weft_ca::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, without a backtrace: this is for operators.
            eprintln!("error: {}", weft_ca::cli::report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
