//! `node-runner`: the agent a rig owner runs beside their GPUs. It enrolls with a gateway, keeps
//! an outbound tunnel open to it, supervises the rig's engines and reports heartbeats.

pub mod agent;
pub mod cli;
pub mod config;
pub mod engines;
pub mod gpu;
