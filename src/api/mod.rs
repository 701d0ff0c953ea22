//! The local status API: HTTP/1 on a Unix socket in the runtime directory.
//!
//! `GET /v1/status` (JSON), `GET /v1/health/live`, `GET /v1/health/ready` (200 or 503),
//! `GET /metrics` (Prometheus text; also on `[api] metrics_listen` over TCP).

pub mod client;
pub mod metrics;
mod server;
mod status;

pub use server::{ApiError, Sources, bind, connection, serve, serve_metrics};
pub use status::{
    CheckResultDoc, ComponentDoc, ConfigDoc, DurationHistogram, ErrorDoc, GpuDoc, MeshDoc,
    ServiceCheckDoc, ServicesDoc, StatusDoc, status_config,
};

/// Where the daemon listens unless `[api] socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/clawbernetes/clawnode.sock";
