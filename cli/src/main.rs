use std::process::ExitCode;

use clap::Parser;

// One batch job at a time: a single-threaded runtime is plenty and starts faster.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match garage_cli::cli::run(garage_cli::cli::Cli::parse()).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
