//! The `gateway` binary: parses the command line and hands it to [`cli::main`]. The gateway
//! itself is the `garage-gateway` library; the demo's simulated rigs live here, so the library
//! links no rig agent or simulator.

mod cli;
mod demo;

use clap::Parser;

/// mimalloc instead of glibc's malloc: a proxy allocates and frees small buffers on every
/// request from two or more worker threads, where glibc's arenas contend (futex waits) and
/// consolidate. Measured in docs/journal/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    cli::main(cli::Cli::parse())
}
