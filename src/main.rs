//! The greenlight binary: Config -> logger -> Supervisor::bind -> run -> exit status.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::ExitCode;

use greenlight::{Config, Exit, Supervisor, log};
use slog::crit;

fn main() -> ExitCode {
    let config = Config::from_args();
    let log = log::root(config.log_format, config.log_level);
    let exit = match Supervisor::bind(&config, log.clone()) {
        Ok(server) => server.run(),
        Err(e) => {
            crit!(log, "cannot start server"; "error" => %e, "host" => %config.host, "port" => config.port);
            Exit::Forced
        }
    };
    ExitCode::from(exit.code())
}
