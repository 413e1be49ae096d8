//! The TFTP hooks: the netboot engine steering `corral-tftp` (which iPXE binary to hand out,
//! local-boot refusals) and recording its transfers as events (source `tftp`).

use std::net::SocketAddr;
use std::sync::Arc;

use corral_model::{Outcome, Source};
use corral_tftp::{RequestOptions, TftpDecision, TftpEvent, TftpHooks};

use crate::engine::{Netboot, TftpAnswer};

/// [`TftpHooks`] backed by the engine.
#[derive(Debug, Clone)]
pub struct TftpPolicy(pub Arc<Netboot>);

impl TftpHooks for TftpPolicy {
    fn on_request(&self, peer: SocketAddr, path: &str, _opts: &RequestOptions) -> TftpDecision {
        match self.0.tftp_request(peer, path) {
            TftpAnswer::Serve => TftpDecision::Serve,
            TftpAnswer::Bytes(b) => TftpDecision::ServeBytes(b),
            TftpAnswer::Deny(m) => TftpDecision::Deny(m),
        }
    }

    fn on_event(&self, event: TftpEvent) {
        let e = &self.0;
        let (peer, kind, outcome, reason, details) = match event {
            TftpEvent::Started { .. } => return,
            TftpEvent::Finished {
                peer,
                path,
                bytes,
                elapsed,
            } => (
                peer,
                "sent",
                Outcome::Ok,
                format!(
                    "sent {path}: {bytes} bytes in {:.2} s",
                    elapsed.as_secs_f64()
                ),
                serde_json::json!({ "path": path, "bytes": bytes, "elapsed_ms": elapsed.as_millis() as u64 }),
            ),
            TftpEvent::Failed { peer, path, reason } => {
                // EDK2 aborts its first read once it has learnt tsize (error 8), then reads
                // again: expected, so a warning rather than a failure.
                let outcome = if reason.contains("error 8") {
                    Outcome::Warn
                } else {
                    Outcome::Fail
                };
                (
                    peer,
                    "failed",
                    outcome,
                    format!("{path}: {reason}"),
                    serde_json::json!({ "path": path }),
                )
            }
        };
        let mac = e.mac_for_ip(peer.ip());
        let ev = e
            .machine_event(Source::Tftp, kind, outcome, reason, mac, Some(peer.ip()))
            .with_details(details);
        e.recorder().record(ev);
    }
}
