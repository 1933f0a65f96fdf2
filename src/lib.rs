//! Atlas Runner: runs Minecraft servers on Kubernetes and on plain hosts.
//!
//! The binary (`src/main.rs`) is a thin CLI over these modules.

pub mod api;
pub mod telemetry;
