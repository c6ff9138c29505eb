//! The `garage` command line: batch jobs against a Garage gateway's OpenAI Files and Batches
//! API, and policy plugins from a new project to a promoted canary (`plugin`).
//! The binary's `main` only parses the command line and calls [`cli::run`].

pub mod cli;
pub mod client;
pub mod input;
pub mod openai;
pub mod plugin;
pub mod render;
mod wait;
