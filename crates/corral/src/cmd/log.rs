//! `corral log`: query the audit store — filters, follow mode, JSON lines, read-only SQL.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use corral_model::{Outcome, SessionId, Source, UnixMillis};
use corral_store::{EventFilter, SqlRows, Store, StoreError, StoredEvent};

use crate::cli::{Global, SiteArg};
use crate::exit::{self, Code};

/// How often `--follow` looks for new events.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// Arguments of `corral log`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Times: --since/--until take a duration back from now (90s, 15m, 2h, 3days) or an RFC 3339 time
(2026-11-22T05:00:00Z). Times are shown in UTC.

Examples:
  corral log --since 2h --source cast            what cast did in the last two hours
  corral log --machine web01 --limit 1           when was web01 last seen, and doing what
  corral log --machine 52:54:00:12:34:56 -f      follow one machine live (Ctrl-C to stop)
  corral log --session 0123456789abcdef          one boot's whole timeline, DHCP to HTTP
  corral log --outcome fail --json | jq .reason  failures as JSON lines
  corral log --sql \"SELECT source, count(*) FROM events GROUP BY source\"
  corral log --db /var/lib/corral/corral.db --kind offer")]
pub(crate) struct LogArgs {
    #[command(flatten)]
    site: SiteArg,
    /// The store's database file. Default: the site's `[store] path` (state/corral.db).
    #[arg(long, value_name = "PATH")]
    db: Option<PathBuf>,
    /// Only events of this machine: a MAC address (any common spelling) or a hostname.
    #[arg(long, value_name = "MAC|HOSTNAME")]
    machine: Option<String>,
    /// Only events from this part of corral (dhcp, tftp, http, cast, sync, drift, api, cli,
    /// syslog, site, store).
    #[arg(long, value_name = "SOURCE")]
    source: Option<Source>,
    /// Only events of this kind (offer, read, verified...).
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// Only events of this session (16 hex digits).
    #[arg(long, value_name = "ID")]
    session: Option<SessionId>,
    /// Only events with this outcome (ok, info, warn, fail, denied).
    #[arg(long, value_name = "OUTCOME")]
    outcome: Option<Outcome>,
    /// Only events at or after this time: a duration ago (2h) or an RFC 3339 time.
    #[arg(long, value_name = "WHEN", value_parser = parse_when)]
    since: Option<UnixMillis>,
    /// Only events before this time: a duration ago (30m) or an RFC 3339 time.
    #[arg(long, value_name = "WHEN", value_parser = parse_when)]
    until: Option<UnixMillis>,
    /// Show the newest N matching events (0: all).
    #[arg(long, short = 'n', value_name = "N", default_value_t = 100)]
    limit: usize,
    /// Keep running and print new matching events as they arrive (like `tail -f`).
    #[arg(long, short = 'f', conflicts_with = "sql")]
    follow: bool,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Run one read-only SQL statement (SELECT, WITH, EXPLAIN, reading PRAGMAs) and print its
    /// result. Tables: events, machines.
    #[arg(
        long,
        value_name = "SELECT...",
        conflicts_with_all = ["machine", "source", "kind", "session", "outcome", "since", "until"]
    )]
    sql: Option<String>,
}

/// Where the store of the site directory `site_dir` lives: its `[store] path` (relative to
/// the site directory), else `state/corral.db`. The audit log must stay readable while the
/// site has errors (that is when people need it), so an invalid site still yields the path
/// written in its `site.toml` when that one key can be read.
pub(crate) fn store_path(site_dir: &Path) -> PathBuf {
    if let Ok(site) = corral_site::Site::load(site_dir) {
        return site.store.path.clone();
    }
    let written = fs_err::read_to_string(site_dir.join("site.toml"))
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("store")?.get("path")?.as_str().map(PathBuf::from));
    site_dir.join(written.unwrap_or_else(|| PathBuf::from(corral_site::DEFAULT_STORE_PATH)))
}

/// Parses `--since`/`--until`: a duration back from now, or an RFC 3339 time.
fn parse_when(s: &str) -> Result<UnixMillis, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        let now = UnixMillis::from_system_time(SystemTime::now());
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        return Ok(UnixMillis(now.0.saturating_sub(ms)));
    }
    match time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        Ok(t) => Ok(UnixMillis(
            i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX),
        )),
        Err(_) => Err(format!(
            "{s:?} is neither a duration (90s, 15m, 2h, 3days) nor an RFC 3339 time \
             (2026-11-22T05:00:00Z)"
        )),
    }
}

pub(crate) fn run(args: LogArgs, _global: &Global) -> anyhow::Result<Code> {
    let path = args
        .db
        .clone()
        .unwrap_or_else(|| store_path(&args.site.site));
    let mut out = Output::new(args.json);
    let result = if let Some(sql) = &args.sql {
        let rows = Store::query_sql(&path, sql).map_err(|e| store_error(e, &path))?;
        out.sql_rows(&rows)
    } else {
        let store = Store::open_read_only(&path).map_err(|e| store_error(e, &path))?;
        show_events(&store, &args, &mut out)
    };
    match result {
        Ok(()) => Ok(Code::Success),
        // `corral log | head` closes the pipe early: that is the reader's choice, not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Code::Success),
        Err(e) => Err(e).context("writing to standard output"),
    }
}

/// Turns a store error into the CLI's error, with exit code 3 when the file is the problem.
fn store_error(e: StoreError, path: &Path) -> anyhow::Error {
    match e {
        StoreError::NotFound { .. } => exit::bad_input(format!(
            "no audit store at {}\n  corral's services create it when they first record an event; \
             name an existing one with --db PATH or --site DIR",
            path.display()
        )),
        e if e.is_bad_file() => exit::bad_input(e.to_string()),
        e => anyhow::Error::new(e),
    }
}

fn show_events(store: &Store, args: &LogArgs, out: &mut Output) -> std::io::Result<()> {
    let mut filter = EventFilter {
        machine: args.machine.clone(),
        source: args.source,
        kind: args.kind.clone(),
        session: args.session,
        since: args.since,
        until: args.until,
        after_id: None,
        limit: (args.limit > 0).then_some(args.limit),
        outcome: args.outcome,
    };
    let events = store.events(&filter).map_err(std::io::Error::other)?;
    let mut last_id = events.last().map(|e| e.id);
    if events.is_empty() && !args.follow {
        eprintln!("no matching events in {}", store.path().display());
    }
    out.events(&events)?;
    if filter.limit == Some(events.len()) && std::io::stdout().is_terminal() {
        eprintln!(
            "(the newest {} matching events; --limit N for more, --limit 0 for all)",
            events.len()
        );
    }
    if !args.follow {
        return Ok(());
    }
    // Follow: from the newest id seen (or the newest in the store), poll for more. Runs until
    // Ctrl-C, which ends the process.
    filter.limit = None;
    if last_id.is_none() {
        last_id = Some(store.last_event_id().map_err(std::io::Error::other)?);
    }
    loop {
        std::thread::sleep(FOLLOW_INTERVAL);
        filter.after_id = last_id;
        let new = store.events(&filter).map_err(std::io::Error::other)?;
        if let Some(e) = new.last() {
            last_id = Some(e.id);
        }
        out.events(&new)?;
    }
}

/// Writes events or SQL rows as a table or as JSON lines.
struct Output {
    json: bool,
    header_done: bool,
    stdout: std::io::StdoutLock<'static>,
}

const HEADERS: [&str; 8] = [
    "TIME", "SOURCE", "KIND", "MACHINE", "IP", "SESSION", "OUTCOME", "REASON",
];
/// Minimum widths, so that follow mode's batches line up with the first one.
const MIN_WIDTHS: [usize; 8] = [24, 6, 8, 17, 11, 16, 7, 0];

impl Output {
    fn new(json: bool) -> Output {
        Output {
            json,
            header_done: false,
            stdout: std::io::stdout().lock(),
        }
    }

    fn events(&mut self, events: &[StoredEvent]) -> std::io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        if self.json {
            for e in events {
                serde_json::to_writer(&mut self.stdout, e).map_err(std::io::Error::other)?;
                self.stdout.write_all(b"\n")?;
            }
            return self.stdout.flush();
        }
        let rows: Vec<[String; 8]> = events.iter().map(event_row).collect();
        let mut widths = MIN_WIDTHS;
        for r in &rows {
            for (w, cell) in widths.iter_mut().zip(r) {
                *w = (*w).max(cell.chars().count());
            }
        }
        if !self.header_done {
            let header = HEADERS.map(str::to_owned);
            write_row(&mut self.stdout, &header, &widths)?;
            self.header_done = true;
        }
        for r in &rows {
            write_row(&mut self.stdout, r, &widths)?;
        }
        self.stdout.flush()
    }

    fn sql_rows(&mut self, rows: &SqlRows) -> std::io::Result<()> {
        if self.json {
            for r in &rows.rows {
                let obj: serde_json::Map<String, serde_json::Value> = rows
                    .columns
                    .iter()
                    .cloned()
                    .zip(r.iter().cloned())
                    .collect();
                serde_json::to_writer(&mut self.stdout, &obj).map_err(std::io::Error::other)?;
                self.stdout.write_all(b"\n")?;
            }
            return self.stdout.flush();
        }
        let cells: Vec<Vec<String>> = rows
            .rows
            .iter()
            .map(|r| r.iter().map(sql_cell).collect())
            .collect();
        let mut widths: Vec<usize> = rows.columns.iter().map(|c| c.chars().count()).collect();
        for r in &cells {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        write_row(&mut self.stdout, &rows.columns, &widths)?;
        for r in &cells {
            write_row(&mut self.stdout, r, &widths)?;
        }
        if std::io::stdout().is_terminal() {
            eprintln!(
                "({} row{})",
                cells.len(),
                if cells.len() == 1 { "" } else { "s" }
            );
        }
        self.stdout.flush()
    }
}

fn write_row(w: &mut impl Write, cells: &[String], widths: &[usize]) -> std::io::Result<()> {
    let last = cells.len().saturating_sub(1);
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if i == last {
            line.push_str(cell);
        } else {
            line.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count()) + 2;
            line.extend(std::iter::repeat_n(' ', pad));
        }
    }
    writeln!(w, "{}", line.trim_end())
}

fn event_row(e: &StoredEvent) -> [String; 8] {
    let ev = &e.event;
    let dash = || "-".to_owned();
    let machine = ev
        .hostname
        .clone()
        .or_else(|| ev.mac.map(|m| m.to_string()))
        .unwrap_or_else(dash);
    [
        format_time(ev.time),
        ev.source.to_string(),
        ev.kind.to_string(),
        machine,
        ev.ip.map_or_else(dash, |ip| ip.to_string()),
        ev.session.map_or_else(dash, |s| s.to_string()),
        ev.outcome.to_string(),
        ev.reason.replace('\n', " "),
    ]
}

/// `2026-11-22 05:07:37.123Z`: RFC 3339 with a space, in UTC.
fn format_time(t: UnixMillis) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.0) * 1_000_000)
        .ok()
        .and_then(|d| d.format(&fmt).ok())
        .unwrap_or_else(|| format!("@{}ms", t.0))
}

fn sql_cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "NULL".to_owned(),
        serde_json::Value::String(s) => s.replace('\n', " "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_parses_durations_and_rfc3339() {
        let now = UnixMillis::from_system_time(SystemTime::now()).0;
        let two_h = parse_when("2h").unwrap().0;
        assert!((now - 7_200_000 - two_h).abs() < 5_000);
        assert_eq!(
            parse_when("2026-11-22T05:00:00Z").unwrap(),
            UnixMillis(1_795_323_600_000)
        );
        assert!(
            parse_when("yesterday-ish")
                .unwrap_err()
                .contains("RFC 3339")
        );
    }

    #[test]
    fn times_format_in_utc() {
        assert_eq!(
            format_time(UnixMillis(1_795_323_600_123)),
            "2026-11-22 05:00:00.123Z"
        );
    }

    #[test]
    fn default_store_path_is_under_state() {
        assert_eq!(
            store_path(Path::new("/srv/site")),
            PathBuf::from("/srv/site/state/corral.db")
        );
    }
}
