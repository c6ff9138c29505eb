//! Every integration test of the gateway, in one binary: one link of the gateway (and
//! wasmtime) instead of one per file. Each module is one surface; `support` starts what they
//! need (a real `redis-server` on a free port, simulated engines, gateways on port 0).
//!
//! Run one module with `cargo test -p garage-gateway --test all batch::` (or
//! `cargo nextest run -E 'test(/^batch::/)'`); the README names the groups.

mod support;

mod accounts;
mod api;
mod batch;
mod cli;
mod cluster;
mod cluster_nginx;
mod cluster_processes;
mod config_ui;
mod console;
mod counting;
mod hostile;
mod limiter_promises;
mod local_state;
mod market;
mod messages;
mod openapi;
mod operators;
mod payouts;
mod plugin_host;
mod plugins;
mod receipts;
mod redis_cluster;
mod redis_failover;
mod redis_leases;
mod redis_replicas;
mod replay;
mod rigs;
mod router_columns;
mod scale;
mod signals;
mod store_suite;
mod tls_upstream;
mod traces;
mod trust;
mod upstream;
mod usage;
mod warm_pool;
mod webhooks;
