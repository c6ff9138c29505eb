//! Every integration test of node-runner, in one binary: engine drivers (process with the real
//! `sim-engine`, docker against a fake Docker API, simulated), the supervisor, config golden
//! errors and the example configs; rigs failing over between real gateway replicas.

mod config_ui;
mod engines_docker;
mod engines_group;
mod engines_process;
mod engines_simulated;
mod examples;
mod failover;
mod health_cmd;
mod setup_doctor;
mod support;
