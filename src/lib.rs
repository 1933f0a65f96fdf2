//! Atlas Runner: runs Minecraft servers on Kubernetes and on plain hosts.
//!
//! The binary (`src/main.rs`) is a thin CLI over these modules.

pub mod agent;
pub mod api;
pub mod backup;
pub mod http;
pub mod metrics;
pub mod operator;
pub mod pack;
pub mod rcon;
pub mod runner;
pub mod server;
pub mod supervisor;
pub mod telemetry;
pub mod troubleshooting;
