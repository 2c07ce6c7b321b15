//! The greenlight binary: Config -> logger -> Supervisor::bind -> run -> exit status (told to
//! the process that started this one, in an upgrade).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::ExitCode;

use greenlight::{Config, Exit, Supervisor, log, upgrade};
use slog::crit;

fn main() -> ExitCode {
    // Started by an upgrade: the pipe the old process waits on (claimed before anything opens).
    let ready = upgrade::inherited_ready_pipe();
    let config = Config::from_args();
    let log = log::root(config.log_format, config.log_level);
    let exit = match Supervisor::bind(&config, log.clone()) {
        Ok(server) => server.announcing_to(ready).run(),
        Err(e) => {
            crit!(log, "cannot start server"; "error" => %e, "host" => %config.host, "port" => config.port);
            if let Some(pipe) = ready {
                upgrade::announce_exit(pipe, Exit::Forced.code());
            }
            Exit::Forced
        }
    };
    ExitCode::from(exit.code())
}
