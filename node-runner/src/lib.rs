//! `node-runner`: the agent a rig owner runs beside their GPUs. It enrolls with a gateway, keeps
//! an outbound tunnel open to it, supervises the rig's engines and reports heartbeats; when the
//! engines have room, it pulls Batch API work.

pub mod agent;
pub mod batch;
pub mod catalogue;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod engines;
pub mod gateways;
pub mod gpu;
pub mod probe;
pub mod receipts;
pub mod setup;
