use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    garage_node_runner::cli::run(garage_node_runner::cli::Cli::parse()).await
}
