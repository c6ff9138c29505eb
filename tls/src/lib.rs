//! TLS for the gateway, its rigs and the simulated engine, with ring as the provider (the
//! workspace builds rustls without a default one).
//!
//! - [`client_config`]: whom a client trusts, the public web roots plus an operator's CA file.
//!   The gateway uses it for `https` upstreams, a rig's agent for the gateway.
//! - [`server_config`] and [`TlsListener`]: serving HTTPS from PEM files, with axum. The
//!   gateway serves its API that way when configured to, the simulated engine as vLLM does with
//!   `--ssl-certfile` and `--ssl-keyfile`.

mod roots;
mod server;

pub use roots::{CaFileError, client_config};
pub use server::{TlsListener, server_config};
