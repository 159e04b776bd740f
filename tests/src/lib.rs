//! The test harness: in-process servers, personas, a Kubernetes API server,
//! log capture and store helpers.

pub mod app;
pub mod kube_server;
pub mod logs;
pub mod postgres;
pub mod stores;

pub use app::*;
