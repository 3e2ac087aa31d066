//! The Trailmark binary's library: the one place that knows the concrete
//! backends and wires them to the services.
//!
//! - [`config`]: the typed configuration (file, `TRAILMARK_*` environment,
//!   flags).
//! - [`backends`]: opens the log and store named by URI.
//! - [`app`]: builds the shared state and routes for a role (and the admin
//!   listener's), creates the bootstrap workspace, runs until shutdown, and
//!   rebuilds projections.
//! - [`server`]: the serve loop, with the header, body and idle timeouts and
//!   the connection limit that `axum::serve` lacks.
//!
//! `main.rs` is only the command line on top of this.

pub mod app;
pub mod backends;
pub mod config;
pub mod server;
