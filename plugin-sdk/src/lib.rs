//! The SDK for Garage policy plugins (routing, rate limits, metering, rewards) written in Rust.
//!
//! Policies are WebAssembly components implementing the worlds of the `garage:policy` WIT
//! package in `wit/`. The bindings, helpers and native test harness land with the plugins work.
#![deny(missing_docs)]
