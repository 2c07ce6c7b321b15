//! Build tasks for greenlight, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! - `cargo xtask gen`: writes the man page, the shell completions and `/etc/default/greenlight`
//!   from the clap definition (`greenlight::Config`), and the packaged `pkg/greenlight.service`
//!   (the one in `docs/systemd/`, with `ExecStart=` at `/usr/bin`). Never edit those by hand.
//! - `cargo xtask deb [ARGS]`: checks that those files are up to date and that cargo-deb is a
//!   version that keeps units in `/lib/systemd/system`, then runs `cargo deb --locked ARGS`
//!   (`target/debian/greenlight_*.deb`); plain `cargo deb` builds the same package unchecked.

mod generate;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::CommandFactory;

const USAGE: &str = "usage: cargo xtask gen | cargo xtask deb [CARGO-DEB ARGS]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.split_first() {
        Some((task, [])) if task == "gen" => write_generated(),
        Some((task, rest)) if task == "deb" => deb(rest),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the greenlight package).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

fn write_generated() -> Result<(), String> {
    let root = root();
    for (path, contents) in generate::files(&greenlight::Config::command()) {
        let target = root.join(path);
        if fs::read(&target).ok().as_deref() == Some(&contents[..]) {
            println!("unchanged {path}");
            continue;
        }
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        fs::write(&target, contents).map_err(|e| format!("{path}: {e}"))?;
        println!("wrote     {path}");
    }
    Ok(())
}

fn deb(cargo_deb_args: &[String]) -> Result<(), String> {
    let root = root();
    let stale: Vec<&str> = generate::files(&greenlight::Config::command())
        .into_iter()
        .filter(|(path, contents)| fs::read(root.join(path)).ok().as_ref() != Some(contents))
        .map(|(path, _)| path)
        .collect();
    if !stale.is_empty() {
        return Err(format!(
            "stale generated files {stale:?}: run `cargo xtask gen` first"
        ));
    }

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    check_cargo_deb(&cargo)?;
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["deb", "--locked"])
        .args(cargo_deb_args)
        .status()
        .map_err(|e| format!("cannot run cargo deb: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo deb failed ({status})"))
    }
}

/// cargo-deb 3.2 and later install units into /usr/lib/systemd/system; Debian 12 (its
/// debhelper, its systemd) into /lib/systemd/system, where the package keeps them: moving a file
/// between the two in a later version can lose it on upgrade (dpkg does not know they are one).
fn check_cargo_deb(cargo: &std::ffi::OsStr) -> Result<(), String> {
    const INSTALL: &str = "cargo install cargo-deb --version 3.1.0 --locked";
    let output = Command::new(cargo)
        .args(["deb", "--version"])
        .output()
        .map_err(|e| format!("cannot run cargo deb: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.trim().strip_prefix("cargo-deb ").unwrap_or_default();
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) if (2..=3).contains(&major) && (major, minor) < (3, 2) => Ok(()),
        _ if !output.status.success() => Err(format!("cargo-deb is not installed: {INSTALL}")),
        _ => Err(format!(
            "cargo-deb {version:?} would put the units in /usr/lib/systemd/system, not \
             /lib/systemd/system as on Debian 12: {INSTALL}"
        )),
    }
}
