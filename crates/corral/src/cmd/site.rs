//! `corral site init|check`: write the example site directory, validate one offline.

use std::path::PathBuf;

use corral_site::{Problem, Site, SiteError};

use crate::cli::{Global, SiteArg};
use crate::exit::{self, Code};

/// Site directory commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum SiteCommand {
    /// Write a commented, working example site directory (site.toml, profiles, machines, an
    /// iPXE template) to start from.
    #[command(after_help = "\
Refuses a directory that is not empty unless --force (then the example files are overwritten
and every other file is left alone). The files are the same as examples/site/ in the source.

Examples:
  corral site init ./site                   start a new site directory
  corral site init . --force                (re)write the example files here
  corral site init /etc/corral && corral site check --site /etc/corral")]
    Init(InitArgs),
    /// Validate a site directory offline and report every problem at once.
    #[command(after_help = "\
Prints every problem as FILE:LINE:COLUMN: error|warning: MESSAGE, then a summary line.
Exit status: 0 when the site is valid (warnings allowed), 3 when it has errors.

Examples:
  corral site check                         check $CORRAL_SITE, else the current directory
  corral site check --site ./site           check one directory
  corral site check --json | jq '.problems[] | select(.severity == \"error\")'
  corral site check --site site/ -q || exit 1   in a git pre-commit hook")]
    Check(CheckArgs),
}

/// Arguments of `corral site init`.
#[derive(Debug, clap::Args)]
pub(crate) struct InitArgs {
    /// The directory to write (created if missing).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Write into a non-empty directory, overwriting the example's files.
    #[arg(long)]
    force: bool,
}

/// Arguments of `corral site check`.
#[derive(Debug, clap::Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    site: SiteArg,
    /// Print the problems and counts as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(cmd: SiteCommand, _global: &Global) -> anyhow::Result<Code> {
    match cmd {
        SiteCommand::Init(a) => init(a),
        SiteCommand::Check(a) => check(a),
    }
}

fn init(a: InitArgs) -> anyhow::Result<Code> {
    match corral_site::init(&a.dir, a.force) {
        Ok(files) => {
            println!(
                "wrote an example site to {} ({} files)",
                a.dir.display(),
                files.len()
            );
            println!(
                "next: edit site.toml, profiles/ and machines/, then run: corral site check --site {}",
                a.dir.display()
            );
            Ok(Code::Success)
        }
        Err(e @ SiteError::NotEmpty { .. }) => Err(exit::bad_input(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Counts for the summary line and the JSON output.
#[derive(Debug, serde::Serialize)]
struct Summary<'a> {
    site: String,
    valid: bool,
    errors: usize,
    warnings: usize,
    /// Only for a valid site.
    machines: Option<usize>,
    profiles: Option<usize>,
    networks: Option<usize>,
    problems: &'a [Problem],
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn check(a: CheckArgs) -> anyhow::Result<Code> {
    let dir = &a.site.site;
    let loaded = Site::load(dir);
    let (problems, site) = match &loaded {
        Ok(site) => (site.warnings(), Some(site)),
        Err(e) => (e.problems(), None),
    };
    let errors = problems.iter().filter(|p| p.is_error()).count();
    let summary = Summary {
        site: dir.display().to_string(),
        valid: site.is_some(),
        errors,
        warnings: problems.len() - errors,
        machines: site.map(|s| s.machines().count()),
        profiles: site.map(|s| s.profiles().count()),
        networks: site.map(|s| s.dhcp.networks.len()),
        problems,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for p in problems {
            println!("{p}");
        }
        match site {
            Some(s) => {
                let mut line = format!(
                    "site OK: {}, {}, {}",
                    plural(s.machines().count(), "machine"),
                    plural(s.profiles().count(), "profile"),
                    plural(s.dhcp.networks.len(), "network")
                );
                if summary.warnings > 0 {
                    line += &format!(" ({})", plural(summary.warnings, "warning"));
                }
                println!("{line}");
            }
            None => println!(
                "{}, {}",
                plural(summary.errors, "error"),
                plural(summary.warnings, "warning")
            ),
        }
    }
    match loaded {
        Ok(_) => Ok(Code::Success),
        Err(SiteError::Invalid { .. }) => Err(exit::bad_input(format!(
            "site directory {} is invalid",
            dir.display()
        ))),
        Err(e) => Err(e.into()),
    }
}
