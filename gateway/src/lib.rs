//! Garage AI gateway: an OpenAI-compatible inference gateway for a community GPU network.
//!
//! The `gateway` binary (`gateway/bin`: the command line and the demo) is a thin shell over
//! this library, so tests and benchmarks drive the same code; the library links no rig agent,
//! simulator or command-line parser.

pub mod admin;
pub mod api;
pub mod auth;
pub mod backends;
pub mod batch;
pub mod batch_api;
pub mod billing;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod node_api;
pub mod nodes;
pub mod openai;
pub mod plugins;
pub mod plugins_api;
pub mod policy;
pub mod request_id;
pub mod server;
pub mod sse;
pub mod state;
pub mod store;
pub mod upstream;
pub mod usage;
pub mod usage_api;

pub use config::Config;
pub use server::Gateway;
