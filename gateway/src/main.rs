use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    garage_gateway::cli::run(garage_gateway::cli::Cli::parse()).await
}
