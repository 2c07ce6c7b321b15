//! The healthcheck handler: the service status, environment and version.

use serde::Serialize;

use crate::config::Environment;

/// The body of `GET /v1/healthcheck`.
#[derive(Serialize)]
pub struct Report {
    status: &'static str,
    system_info: SystemInfo,
}

#[derive(Serialize)]
struct SystemInfo {
    environment: Environment,
    version: &'static str,
}

/// The report for this process.
pub fn report(environment: Environment) -> Report {
    Report {
        status: "available",
        system_info: SystemInfo {
            environment,
            version: env!("CARGO_PKG_VERSION"),
        },
    }
}
