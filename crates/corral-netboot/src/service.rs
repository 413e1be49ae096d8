//! The long-running parts besides HTTP: the syslog receiver and the site watcher.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use corral_model::{Event, Outcome, Source, UnixMillis};
use corral_site::ReloadOutcome;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::engine::{Netboot, kinds};
use crate::syslog;

/// Receives syslog datagrams on `socket` until `cancel`, storing each as an event (source
/// `syslog`) of the machine that sent it (by IP). Malformed datagrams are counted, logged
/// at debug level and dropped.
pub async fn syslog_receiver(socket: UdpSocket, engine: Arc<Netboot>, cancel: CancellationToken) {
    let mut buf = vec![0u8; 8192];
    if let Ok(a) = socket.local_addr() {
        tracing::info!(addr = %a, "syslog receiver listening");
    }
    loop {
        let (n, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "syslog receive failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let msg = match syslog::parse(&buf[..n]) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "dropping a datagram that is not syslog");
                continue;
            }
        };
        let ip: IpAddr = match peer.ip() {
            IpAddr::V6(v) => v.to_ipv4_mapped().map_or(IpAddr::V6(v), IpAddr::V4),
            v => v,
        };
        let e2 = engine.clone();
        let mac = tokio::task::spawn_blocking(move || e2.mac_for_ip(ip))
            .await
            .ok()
            .flatten();
        let outcome = match msg.severity {
            0..=3 => Outcome::Fail,
            4 => Outcome::Warn,
            _ => Outcome::Info,
        };
        let reason = match &msg.app {
            Some(app) => format!("{app}: {}", msg.message),
            None => msg.message.clone(),
        };
        let mut ev = engine.machine_event(
            Source::Syslog,
            kinds::MESSAGE,
            outcome,
            reason,
            mac,
            Some(ip),
        );
        if ev.hostname.is_none() {
            ev.hostname = msg.hostname.clone();
        }
        ev.details = serde_json::json!({
            "facility": msg.facility,
            "severity": msg.severity,
            "hostname": msg.hostname,
            "app": msg.app,
            "rfc5424": msg.rfc5424,
        });
        engine.recorder().record(ev);
    }
}

/// Polls the site directory every `interval` and reloads it on change: a valid edit is
/// swapped in at once; an invalid one is logged and recorded (source `site`) and the last
/// good site stays in force. Polling rather than inotify: it works on every file system
/// (NFS, bind mounts, editors that replace files) and costs a few `stat`s per second.
pub async fn watch_site(engine: Arc<Netboot>, interval: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let site = engine.site().clone();
        let Ok(result) = tokio::task::spawn_blocking(move || site.reload_if_changed()).await else {
            continue;
        };
        let now = UnixMillis::from_system_time(std::time::SystemTime::now());
        let ev = match result {
            Ok(ReloadOutcome::Unchanged) => continue,
            Ok(ReloadOutcome::Swapped {
                current, warnings, ..
            }) => Event::new(
                now,
                Source::Site,
                kinds::RELOAD,
                Outcome::Ok,
                format!(
                    "site reloaded: {} machines, {} profiles, {} warnings",
                    current.machines().count(),
                    current.profiles().count(),
                    warnings.len()
                ),
            ),
            Err(e) => {
                let problems: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
                tracing::warn!(error = %e, "invalid site edit; the last good site stays in force");
                Event::new(
                    now,
                    Source::Site,
                    kinds::RELOAD,
                    Outcome::Fail,
                    format!(
                        "site edit rejected, the last good site stays in force: {}",
                        problems.join("; ")
                    ),
                )
                .with_details(serde_json::json!({ "problems": problems }))
            }
        };
        engine.recorder().record(ev);
    }
}
