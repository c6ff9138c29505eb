//! The `garage` command line: batch jobs against a Garage gateway's OpenAI Files and Batches
//! API. The binary's `main` only parses the command line and calls [`cli::run`].

pub mod cli;
pub mod client;
pub mod input;
pub mod openai;
pub mod render;
mod wait;
