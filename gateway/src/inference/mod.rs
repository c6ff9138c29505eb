//! The request path of the OpenAI API: a request is read and checked ([`api`]), admitted and
//! routed by the policies ([`policy`]), sent to a backend and its answer streamed back
//! ([`forward`], reading server-sent events with [`sse`]), and billed when it ends.

pub mod api;
pub mod cost;
pub mod forward;
pub mod policy;
pub mod sse;
