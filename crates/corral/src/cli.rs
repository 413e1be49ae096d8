//! The command line: global flags and the subcommand list. Each subcommand's own flags live
//! beside the code that runs it, in `cmd/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cmd;

/// corral takes machines from an unknown state to a known state, fast, and keeps them there:
/// network boot (DHCP, TFTP, HTTP, iPXE), multicast disk imaging, tree synchronisation, and an
/// audit store of every decision with its reason.
#[derive(Debug, Parser)]
#[command(
    name = "corral",
    version,
    propagate_version = true,
    max_term_width = 100
)]
#[command(after_help = "\
Exit codes:
  0  success
  1  runtime failure (I/O, network, a peer or receiver failed)
  2  usage error (unknown flag, missing argument)
  3  bad input (invalid site directory, corrupt or foreign file, failed verification)
  4  differences found (corral drift: a child drifted; every child was compared)

Examples:
  corral demo                          cast an image to 3 receivers in network namespaces
  corral site init ./site              write a commented example site directory
  corral site check --site ./site      validate a site directory offline
  corral log --since 2h --source cast  what happened in the last two hours")]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Flags accepted by every subcommand.
#[derive(Debug, Args)]
pub(crate) struct Global {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub(crate) verbose: u8,
    /// Less log output: errors only.
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
    /// Log line format on stderr: `text` for people, `json` for daemons and collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The site directory a command works on.
#[derive(Debug, Clone, Args)]
pub(crate) struct SiteArg {
    /// Site directory (site.toml, profiles/, machines/). Default: $CORRAL_SITE, else the
    /// current directory.
    #[arg(long, env = "CORRAL_SITE", default_value = ".", value_name = "DIR")]
    pub(crate) site: PathBuf,
}

/// corral's subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the built-in demo: cast an image to several receivers in network namespaces.
    Demo(cmd::demo::DemoArgs),
    /// Create and validate site directories.
    #[command(subcommand)]
    Site(cmd::site::SiteCommand),
    /// Query the audit store: every event with its reason.
    Log(cmd::log::LogArgs),
    /// Multicast an image to many machines at once, verified block by block.
    #[command(subcommand)]
    Cast(cmd::cast::CastCommand),
    /// Serve network boot (DHCP, ProxyDHCP, TFTP, HTTP, iPXE) from the site directory.
    Serve(cmd::serve::Args),
    /// List, inspect, adopt and reinstall machines.
    Machine(cmd::machine::Args),
    /// Keep file trees identical to a master, through tiers.
    Sync(cmd::sync::Args),
    /// Compare children with their master by content and report drift.
    Drift(cmd::drift::Args),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `ExecStart=` lines of the shipped systemd units, continuation lines joined and
    /// `%i` replaced by a tree name.
    fn unit_command_lines() -> Vec<(String, Vec<String>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/systemd");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "service") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap().replace("\\\n", " ");
            for line in text.lines() {
                if let Some(cmd) = line.strip_prefix("ExecStart=") {
                    let argv = cmd.replace("%i", "web");
                    let argv: Vec<String> = argv.split_whitespace().map(String::from).collect();
                    out.push((path.display().to_string(), argv));
                }
            }
        }
        out
    }

    #[test]
    fn every_shipped_systemd_unit_runs_a_command_line_corral_accepts() {
        let units = unit_command_lines();
        assert!(
            units.len() >= 3,
            "expected the serve, cast and drift units, found {units:?}"
        );
        for (unit, argv) in units {
            assert_eq!(argv[0], "/usr/local/bin/corral", "{unit}");
            if let Err(e) = Cli::try_parse_from(&argv) {
                panic!(
                    "{unit}: `{}` is not a valid corral command line: {e}",
                    argv.join(" ")
                );
            }
        }
    }

    /// Every command a user can run (each leaf of the command tree, and `demo`) shows
    /// examples in its `--help`: the quality bar, kept as commands are added.
    #[test]
    fn every_command_has_examples_in_its_help() {
        use clap::CommandFactory;
        fn leaves(c: &clap::Command, path: String, out: &mut Vec<(String, String)>) {
            let subs: Vec<&clap::Command> = c
                .get_subcommands()
                .filter(|s| s.get_name() != "help")
                .collect();
            for s in &subs {
                leaves(s, format!("{path} {}", s.get_name()), out);
            }
            if subs.is_empty() {
                let help = c
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default()
                    + &c.get_after_long_help()
                        .map(|h| h.to_string())
                        .unwrap_or_default();
                out.push((path, help));
            }
        }
        let mut all = Vec::new();
        leaves(&Cli::command(), "corral".into(), &mut all);
        assert!(all.len() >= 15, "too few commands found: {all:?}");
        let missing: Vec<&str> = all
            .iter()
            .filter(|(_, help)| !help.contains("Example"))
            .map(|(path, _)| path.as_str())
            .collect();
        assert!(missing.is_empty(), "no examples in --help: {missing:?}");
    }
}
