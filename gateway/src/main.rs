use clap::Parser;

/// mimalloc instead of glibc's malloc: a proxy allocates and frees small buffers on every
/// request from two or more worker threads, where glibc's arenas contend (futex waits) and
/// consolidate. Measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    garage_gateway::cli::main(garage_gateway::cli::Cli::parse())
}
