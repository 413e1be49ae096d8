//! `corral machine`: the fleet as the site declares it and the store has seen it — list,
//! show, schedule a reinstall, adopt a discovered machine into `machines/NAME.toml`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;
use corral_model::{Event, LifecycleState, MacAddr, Outcome, Source, UnixMillis};
use corral_site::Site;
use corral_store::{EventFilter, Machine as Seen, Store, StoreError};

use crate::cli::{Global, SiteArg};
use crate::exit::{self, Code};

/// Arguments of `corral machine`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Lifecycle: new -> discovered -> install -> installed -> local. A declared machine never seen
installs its profile on its first network boot; when the installer calls its done URL it becomes
installed and every later boot goes to the local disk. `reinstall` schedules the next install.

Examples:
  corral machine list --site ./site                 the fleet: state, IP, last seen
  corral machine list --json | jq 'select(.state == \"discovered\")'
  corral machine show web01                         one machine and its recent events
  corral machine reinstall web01                    install again on its next network boot
  corral machine adopt 52:54:00:12:34:99 --name web03 --profile debian")]
pub(crate) struct Args {
    #[command(subcommand)]
    command: MachineCommand,
}

#[derive(Debug, clap::Subcommand)]
enum MachineCommand {
    /// Every machine the site declares or the store has seen: state, IP, last seen.
    #[command(after_help = "\
Examples:
  corral machine list --site ./site                 the fleet: state, IP, last seen
  corral machine list --json | jq 'select(.state == \"discovered\")'   machines to adopt")]
    List {
        #[command(flatten)]
        site: SiteArg,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One machine (name, hostname or MAC): site entry, stored state, recent events.
    #[command(after_help = "\
Examples:
  corral machine show web01                         by name or hostname
  corral machine show 52:54:00:12:34:56 --json      by MAC, as JSON")]
    Show {
        #[command(flatten)]
        site: SiteArg,
        /// Machine name, hostname or MAC address.
        name: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Schedule an install: the machine's next network boot installs its profile.
    #[command(after_help = "\
Examples:
  corral machine reinstall web01 --site ./site      install again on its next network boot
  corral machine show web01                         its state is now install")]
    Reinstall {
        #[command(flatten)]
        site: SiteArg,
        /// Machine name, hostname or MAC address (a declared machine).
        name: String,
    },
    /// Declare a discovered machine: write machines/NAME.toml (atomically) for its MAC.
    #[command(after_help = "\
Examples:
  corral machine list --json | jq -r 'select(.state == \"discovered\") | .mac'
  corral machine adopt 52:54:00:12:34:99 --name web03 --profile debian
  git -C ./site add machines/web03.toml             the site directory stays in git")]
    Adopt {
        #[command(flatten)]
        site: SiteArg,
        /// The machine's MAC address.
        mac: String,
        /// The new machine's name (file machines/NAME.toml, default hostname).
        #[arg(long)]
        name: String,
        /// Its profile. Default: the site's discovery profile.
        #[arg(long)]
        profile: Option<String>,
    },
}

#[derive(Debug, serde::Serialize)]
struct Row {
    name: Option<String>,
    mac: MacAddr,
    hostname: Option<String>,
    profile: Option<String>,
    declared: bool,
    state: String,
    ip: Option<String>,
    last_seen: Option<String>,
    next_action: Option<String>,
}

pub(crate) fn run(args: Args, _global: &Global) -> anyhow::Result<Code> {
    let dir = match &args.command {
        MachineCommand::List { site, .. }
        | MachineCommand::Show { site, .. }
        | MachineCommand::Reinstall { site, .. }
        | MachineCommand::Adopt { site, .. } => site.site.clone(),
    };
    let site = Site::load(&dir).map_err(|e| {
        let mut m = e.to_string();
        for p in e.problems() {
            m.push_str(&format!("\n  {p}"));
        }
        exit::bad_input(m)
    })?;
    let db = site.store.path.clone();
    match args.command {
        MachineCommand::List { json, .. } => list(&site, &db, json),
        MachineCommand::Show { name, json, .. } => show(&site, &db, &name, json),
        MachineCommand::Reinstall { name, .. } => reinstall(&site, &db, &name),
        MachineCommand::Adopt {
            mac, name, profile, ..
        } => adopt(&site, &db, &mac, &name, profile),
    }
}

fn seen_machines(db: &Path) -> anyhow::Result<Vec<Seen>> {
    match Store::open_read_only(db) {
        Ok(s) => Ok(s.machines()?),
        Err(StoreError::NotFound { .. }) => Ok(Vec::new()),
        Err(e) if e.is_bad_file() => Err(exit::bad_input(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

fn time_text(t: UnixMillis) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.0) * 1_000_000)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.0.to_string())
}

fn rows(site: &Site, db: &Path) -> anyhow::Result<Vec<Row>> {
    let seen: BTreeMap<MacAddr, Seen> =
        seen_machines(db)?.into_iter().map(|m| (m.mac, m)).collect();
    let mut out = Vec::new();
    let mut covered = std::collections::HashSet::new();
    for m in site.machines() {
        // A machine with several cards: the most recently seen card speaks for it.
        let rec = m
            .macs
            .iter()
            .filter_map(|mac| seen.get(mac))
            .max_by_key(|s| s.last_seen);
        covered.extend(m.macs.iter().copied());
        out.push(Row {
            name: Some(m.name.to_string()),
            mac: rec.map_or(m.macs[0], |r| r.mac),
            hostname: Some(m.hostname.to_string()),
            profile: Some(m.profile.to_string()),
            declared: true,
            state: rec
                .and_then(|r| r.state)
                .unwrap_or(LifecycleState::New)
                .to_string(),
            ip: rec
                .and_then(|r| r.last_ip)
                .map(|i| i.to_string())
                .or(m.ip.map(|i| i.to_string())),
            last_seen: rec.and_then(|r| r.last_seen).map(time_text),
            next_action: rec.and_then(|r| r.next_action.clone()),
        });
    }
    for (mac, r) in &seen {
        if covered.contains(mac) {
            continue;
        }
        out.push(Row {
            name: None,
            mac: *mac,
            hostname: r.hostname.clone(),
            profile: site.discovery.profile.as_ref().map(|p| p.to_string()),
            declared: false,
            state: r.state.unwrap_or(LifecycleState::Discovered).to_string(),
            ip: r.last_ip.map(|i| i.to_string()),
            last_seen: r.last_seen.map(time_text),
            next_action: r.next_action.clone(),
        });
    }
    Ok(out)
}

fn list(site: &Site, db: &Path, json: bool) -> anyhow::Result<Code> {
    let rows = rows(site, db)?;
    let mut out = std::io::stdout().lock();
    let r = (|| -> std::io::Result<()> {
        if json {
            for r in &rows {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(r).map_err(std::io::Error::other)?
                )?;
            }
        } else {
            writeln!(
                out,
                "{:<16} {:<17} {:<10} {:<11} {:<15} {:<25} NEXT BOOT",
                "NAME", "MAC", "PROFILE", "STATE", "IP", "LAST SEEN"
            )?;
            for r in &rows {
                writeln!(
                    out,
                    "{:<16} {:<17} {:<10} {:<11} {:<15} {:<25} {}",
                    r.name.as_deref().unwrap_or("(unknown)"),
                    r.mac,
                    r.profile.as_deref().unwrap_or("-"),
                    r.state,
                    r.ip.as_deref().unwrap_or("-"),
                    r.last_seen.as_deref().unwrap_or("never"),
                    r.next_action.as_deref().unwrap_or("-"),
                )?;
            }
        }
        Ok(())
    })();
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing to standard output")
        }
        _ => Ok(Code::Success),
    }
}

/// The MACs `name` designates: a declared machine (name or hostname) or a MAC address.
fn resolve(site: &Site, name: &str) -> Option<(Option<String>, Vec<MacAddr>)> {
    if let Some(m) = site
        .machine(name)
        .or_else(|| site.machines().find(|m| m.hostname.as_str() == name))
    {
        return Some((Some(m.name.to_string()), m.macs.clone()));
    }
    let mac: MacAddr = name.parse().ok()?;
    Some((
        site.machine_by_mac(&mac).map(|m| m.name.to_string()),
        vec![mac],
    ))
}

fn show(site: &Site, db: &Path, name: &str, json: bool) -> anyhow::Result<Code> {
    let (_, macs) = resolve(site, name).ok_or_else(|| not_found(name))?;
    let row = rows(site, db)?
        .into_iter()
        .find(|r| macs.contains(&r.mac))
        .ok_or_else(|| not_found(name))?;
    let events = match Store::open_read_only(db) {
        Ok(s) => s.events(&EventFilter {
            machine: Some(row.mac.to_string()),
            limit: Some(10),
            ..EventFilter::default()
        })?,
        Err(_) => Vec::new(),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "machine": row, "events": events })
        );
        return Ok(Code::Success);
    }
    println!(
        "name:       {}",
        row.name.as_deref().unwrap_or("(not declared)")
    );
    println!("mac:        {}", row.mac);
    println!("hostname:   {}", row.hostname.as_deref().unwrap_or("-"));
    println!("profile:    {}", row.profile.as_deref().unwrap_or("-"));
    println!("state:      {}", row.state);
    println!("ip:         {}", row.ip.as_deref().unwrap_or("-"));
    println!(
        "last seen:  {}",
        row.last_seen.as_deref().unwrap_or("never")
    );
    println!("next boot:  {}", row.next_action.as_deref().unwrap_or("-"));
    if !events.is_empty() {
        println!("recent events:");
        for e in events {
            println!(
                "  {} {:<6} {:<9} {}",
                time_text(e.event.time),
                e.event.source,
                e.event.kind,
                e.event.reason
            );
        }
    }
    Ok(Code::Success)
}

fn not_found(name: &str) -> anyhow::Error {
    exit::bad_input(format!(
        "no machine {name:?}: not a name or hostname in machines/, nor a MAC the store has seen \
         (corral machine list shows them all)"
    ))
}

fn record(
    store: &mut Store,
    mac: MacAddr,
    hostname: Option<&str>,
    reason: String,
    state: LifecycleState,
) -> anyhow::Result<()> {
    let mut ev = Event::new(
        UnixMillis::from_system_time(SystemTime::now()),
        Source::Cli,
        "lifecycle",
        Outcome::Ok,
        reason,
    )
    .with_mac(mac)
    .with_details(serde_json::json!({ "state": state }));
    if let Some(h) = hostname {
        ev = ev.with_hostname(h);
    }
    store.insert_event(&ev)?;
    Ok(())
}

fn reinstall(site: &Site, db: &Path, name: &str) -> anyhow::Result<Code> {
    let (declared, macs) = resolve(site, name).ok_or_else(|| not_found(name))?;
    let Some(mname) = declared else {
        return Err(exit::bad_input(format!(
            "{name} is not declared in machines/: adopt it first (corral machine adopt {name} --name NAME --profile P)"
        )));
    };
    let m = site.machine(&mname).ok_or_else(|| not_found(name))?;
    let mut store =
        Store::open(db).with_context(|| format!("opening the audit store {}", db.display()))?;
    let now = UnixMillis::from_system_time(SystemTime::now());
    for mac in &macs {
        store.set_machine_state(*mac, LifecycleState::Install, now)?;
        store.set_machine_next_action(
            *mac,
            Some(&format!("install profile {}", m.profile)),
            now,
        )?;
        record(
            &mut store,
            *mac,
            Some(m.hostname.as_str()),
            format!(
                "operator scheduled a reinstall of {mname} (profile {})",
                m.profile
            ),
            LifecycleState::Install,
        )?;
    }
    println!(
        "{mname}: its next network boot installs profile {}",
        m.profile
    );
    Ok(Code::Success)
}

fn adopt(
    site: &Site,
    db: &Path,
    mac: &str,
    name: &str,
    profile: Option<String>,
) -> anyhow::Result<Code> {
    let mac: MacAddr = mac
        .parse()
        .map_err(|e: corral_model::MacParseError| exit::bad_input(e.to_string()))?;
    if let Some(m) = site.machine_by_mac(&mac) {
        return Err(exit::bad_input(format!(
            "{mac} is already declared as machine {}",
            m.name
        )));
    }
    let valid_name = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.starts_with('-');
    if !valid_name {
        return Err(exit::bad_input(format!(
            "--name {name:?}: use letters, digits, - and _ (it becomes machines/{name}.toml and the hostname)"
        )));
    }
    let profile = match profile.or_else(|| site.discovery.profile.as_ref().map(|p| p.to_string())) {
        Some(p) => p,
        None => {
            return Err(exit::bad_input(
                "give --profile NAME: the site has no [discovery] profile to default to",
            ));
        }
    };
    if site.profile(&profile).is_none() {
        let known: Vec<String> = site.profiles().map(|p| p.name.to_string()).collect();
        return Err(exit::bad_input(format!(
            "no profile {profile:?}; known: {}",
            known.join(", ")
        )));
    }
    let dir = site.dir().join("machines");
    let path = dir.join(format!("{name}.toml"));
    if path.exists() {
        return Err(exit::bad_input(format!(
            "{} exists already; choose another --name",
            path.display()
        )));
    }
    let seen = seen_machines(db)?.into_iter().find(|m| m.mac == mac);
    let mut text = format!(
        "# Adopted by `corral machine adopt` from the discovered machine {mac}.\nmac = \"{mac}\"\nprofile = \"{profile}\"\n"
    );
    if seen.is_none() {
        eprintln!("corral: note: the store has never seen {mac}; declaring it anyway");
    }
    if let Some(h) = seen
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .filter(|h| corral_site::Hostname::parse(h).is_some())
    {
        text.push_str(&format!("# hostname reported while discovered: {h}\n"));
    }
    fs_err::create_dir_all(&dir)?;
    // Atomic: a temp file in the same directory, fsynced, then renamed over the final name,
    // so the site watcher of a running `corral serve` never sees half a file.
    let mut tmp = tempfile::Builder::new()
        .prefix(".adopt-")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(&path)
        .map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error))?;
    // The new file must leave the site valid; if not, take it back.
    if let Err(e) = Site::load(site.dir()) {
        let _ = fs_err::remove_file(&path);
        let mut m = format!("adopting would make the site invalid, nothing written: {e}");
        for p in e.problems() {
            m.push_str(&format!("\n  {p}"));
        }
        return Err(exit::bad_input(m));
    }
    if let Ok(mut store) = Store::open(db) {
        let _ = record(
            &mut store,
            mac,
            Some(name),
            format!(
                "operator adopted {mac} as machine {name} (profile {profile}): its next boot installs it"
            ),
            LifecycleState::Discovered,
        );
    }
    println!(
        "wrote {}: {name} ({mac}) with profile {profile}; its next network boot installs it",
        path.display()
    );
    Ok(Code::Success)
}
