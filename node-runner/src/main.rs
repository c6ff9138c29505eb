//! `node-runner`: the agent a rig owner runs beside their GPUs. It enrolls with a gateway, keeps
//! an outbound tunnel open to it, supervises the rig's engines and reports heartbeats.
//!
//! This first version only carries the command line; enrollment, the tunnel, engines and
//! heartbeats land with the node-runner work (see the project's issues).

use clap::Parser;

#[derive(Parser)]
#[command(name = "node-runner", version, about = "Garage rig agent")]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("node-runner is not implemented yet: enrollment and the tunnel come next")
}
