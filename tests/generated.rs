//! The man page, the shell completions and /etc/default/greenlight are generated from the clap
//! definition by `cargo xtask gen` and committed; these tests regenerate them in memory with the
//! same code and fail when the committed files are stale (a flag added, renamed, re-documented).

#[path = "../xtask/src/generate.rs"]
mod generate;

use std::path::Path;

use clap::CommandFactory;

#[test]
fn committed_man_page_completions_and_default_file_are_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for (path, expected) in generate::files(&greenlight::Config::command()) {
        let committed = std::fs::read(root.join(path)).unwrap_or_default();
        if committed != expected {
            stale.push(path);
        }
    }
    assert!(
        stale.is_empty(),
        "stale generated files {stale:?}: run `cargo xtask gen` and commit the result"
    );
}

#[test]
fn every_flag_has_a_line_in_the_default_file() {
    let (_, default_file) = generate::files(&greenlight::Config::command())
        .into_iter()
        .find(|(path, _)| *path == generate::DEFAULT_FILE)
        .unwrap();
    let default_file = String::from_utf8(default_file).unwrap();
    for arg in greenlight::Config::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let env = arg
            .get_env()
            .unwrap_or_else(|| panic!("--{long} has no GREENLIGHT_* variable"));
        let line = format!("\n#{}=", env.to_string_lossy());
        assert!(default_file.contains(&line), "no {line:?} for --{long}");
    }
}

#[test]
fn the_packaged_unit_differs_from_the_docs_unit_only_in_exec_start() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = std::fs::read_to_string(root.join("docs/systemd/greenlight.service")).unwrap();
    let packaged = generate::packaged_service(&docs).unwrap();
    let differing: Vec<(&str, &str)> = docs
        .lines()
        .zip(packaged.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(differing.len(), 1, "{differing:?}");
    assert_eq!(differing[0].1, "ExecStart=/usr/bin/greenlight");
    assert_eq!(docs.lines().count(), packaged.lines().count());
    assert!(
        docs.lines()
            .any(|line| line == "EnvironmentFile=-/etc/default/greenlight"),
        "the unit must read /etc/default/greenlight (the package's conffile)"
    );
}

#[test]
fn the_debian_changelog_names_this_version() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let changelog = std::fs::read_to_string(root.join("pkg/changelog")).unwrap();
    let first = changelog.lines().next().unwrap_or_default();
    let expected = format!("greenlight ({}-1) ", env!("CARGO_PKG_VERSION"));
    assert!(
        first.starts_with(&expected),
        "pkg/changelog starts {first:?}: add an entry for {expected:?} (the .deb's version)"
    );
}
