//! Everything derived from greenlight's clap definition (`greenlight::Config`): the man page,
//! the shell completions and `/etc/default/greenlight`; and the packaged service unit
//! (`pkg/greenlight.service`), derived from `docs/systemd/greenlight.service`.
//!
//! `cargo xtask gen` writes [`files`] into the tree; `tests/generated.rs` (which includes this
//! file with `#[path]`) computes them again and compares them byte for byte with what is
//! committed, so a flag added to `Config` without a `cargo xtask gen` fails `cargo test`.

use clap::Command;
use clap_complete::Shell;
use clap_mangen::roff::{Roff, bold, roman};

/// The installed name, as the completions and the man page know it.
const BIN: &str = "greenlight";

/// Where `/etc/default/greenlight` comes from in the tree.
pub const DEFAULT_FILE: &str = "contrib/default/greenlight";

/// Where the packaged `greenlight.service` is kept, so that a plain `cargo deb` finds it.
pub const PACKAGED_SERVICE: &str = "pkg/greenlight.service";

/// The unit of `docs/systemd/`, which the packaged one is made from.
const DOCS_SERVICE: &str = include_str!("../../docs/systemd/greenlight.service");

/// Every generated file: its path from the repository root, and its contents.
pub fn files(command: &Command) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("docs/man/greenlight.1", man_page(command)),
        (
            "contrib/completions/greenlight.bash",
            completion(command, Shell::Bash),
        ),
        (
            "contrib/completions/_greenlight",
            completion(command, Shell::Zsh),
        ),
        (
            "contrib/completions/greenlight.fish",
            completion(command, Shell::Fish),
        ),
        (DEFAULT_FILE, default_file(command).into_bytes()),
        (PACKAGED_SERVICE, packaged_service_file()),
    ]
}

/// The packaged unit, from the docs unit this build was compiled with.
fn packaged_service_file() -> Vec<u8> {
    match packaged_service(DOCS_SERVICE) {
        Ok(unit) => unit.into_bytes(),
        // The docs unit is checked by the same function in tests/generated.rs.
        Err(e) => unreachable!("{e}"),
    }
}

/// `greenlight.1`: clap_mangen's page (every flag with its default and its `GREENLIGHT_*`
/// variable), plus a FILES section naming the environment file the unit reads.
fn man_page(command: &Command) -> Vec<u8> {
    let man = clap_mangen::Man::new(command.clone()).manual("User Commands");
    let mut page = Vec::new();
    man.render(&mut page)
        .unwrap_or_else(|e| unreachable!("writing to a Vec: {e}"));
    let mut files = Roff::new();
    files.control("SH", ["FILES"]);
    files.control("TP", []);
    files.text([bold("/etc/default/greenlight")]);
    files.text([roman(
        "GREENLIGHT_* variables for greenlight.service (EnvironmentFile=), one per flag, \
         commented out; a line there wins over the unit's own Environment= \
         (GREENLIGHT_ENV=production, GREENLIGHT_LOG_FORMAT=json).",
    )]);
    page.extend_from_slice(files.render().as_bytes());
    page
}

fn completion(command: &Command, shell: Shell) -> Vec<u8> {
    let mut command = command.clone();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, BIN, &mut script);
    script
}

/// `/etc/default/greenlight`: a commented `GREENLIGHT_*=default` line for every flag that has
/// a variable, under that flag's help text.
fn default_file(command: &Command) -> String {
    let mut out = String::from(
        "# /etc/default/greenlight: the environment of greenlight.service (EnvironmentFile=).\n\
         # One GREENLIGHT_<FLAG> variable per command-line flag; uncomment a line to set it (the\n\
         # value shown is greenlight's default). The unit itself sets GREENLIGHT_ENV=production\n\
         # and GREENLIGHT_LOG_FORMAT=json (Environment=); a line here wins over those. Under the\n\
         # socket units the listening addresses are their ListenStream= lines, and --host and\n\
         # --port are ignored.\n\
         # Takes effect at the next start: `systemctl restart greenlight.service` (the sockets\n\
         # stay open, so no request is lost); `systemctl reload` keeps the old environment.\n\
         #\n\
         # Generated from greenlight's flags by `cargo xtask gen`; see greenlight(1).\n",
    );
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        out.push('\n');
        let help = help.trim_end();
        let stop = if help.ends_with('.') { "" } else { "." };
        let mut text = format!("--{}: {help}{stop}", arg.get_long().unwrap_or_default());
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|value| !value.is_hide_set())
            .map(|value| value.get_name().to_owned())
            .collect();
        if !values.is_empty() {
            text.push_str(&format!(" One of: {}.", values.join(", ")));
        }
        if arg.get_default_values().is_empty() {
            text.push_str(" Unset by default.");
        }
        for line in wrap(&text, 78) {
            out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
        }
        let default: Vec<_> = arg
            .get_default_values()
            .iter()
            .map(|value| value.to_string_lossy())
            .collect();
        out.push_str(&format!(
            "#{}={}\n",
            env.to_string_lossy(),
            default.join(",")
        ));
    }
    out
}

/// Greedy word wrap at `width` columns, keeping the text's own line breaks.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for paragraph in text.lines() {
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

/// The unit in `docs/systemd/` runs `/usr/local/bin/greenlight` (where a manual install puts
/// it); the package's runs `/usr/bin/greenlight`. Nothing else differs.
pub const DOCS_EXEC_START: &str = "ExecStart=/usr/local/bin/greenlight";
/// What [`DOCS_EXEC_START`] becomes in the package.
pub const PACKAGED_EXEC_START: &str = "ExecStart=/usr/bin/greenlight";

/// The rest of `line` (its arguments and line end) if it is the docs unit's `ExecStart=`.
fn exec_start_rest(line: &str) -> Option<&str> {
    line.strip_prefix(DOCS_EXEC_START)
        .filter(|rest| rest.trim_end().is_empty() || rest.starts_with(' '))
}

/// The packaged `greenlight.service`: `docs/systemd/greenlight.service` with its one
/// `ExecStart=` line pointed at `/usr/bin/greenlight`. An error if that line is not there
/// exactly once, or if any other line names `/usr/local`.
pub fn packaged_service(docs_unit: &str) -> Result<String, String> {
    let starts = docs_unit
        .lines()
        .filter(|line| exec_start_rest(line).is_some())
        .count();
    if starts != 1 {
        return Err(format!(
            "docs/systemd/greenlight.service: expected exactly one {DOCS_EXEC_START:?} line, \
             found {starts}"
        ));
    }
    let packaged: String = docs_unit
        .split_inclusive('\n')
        .map(|line| match exec_start_rest(line) {
            Some(rest) => format!("{PACKAGED_EXEC_START}{rest}"),
            None => line.to_owned(),
        })
        .collect();
    let stray = packaged
        .lines()
        .filter(|line| !line.starts_with('#') && line.contains("/usr/local/bin"))
        .collect::<Vec<_>>();
    if !stray.is_empty() {
        return Err(format!(
            "docs/systemd/greenlight.service: only ExecStart= may name /usr/local/bin, \
             but so do: {stray:?}"
        ));
    }
    Ok(packaged)
}
