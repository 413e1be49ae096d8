//! Lock-step transfers (windowsize 1, RFC 1350) on a thread of their own with a blocking
//! socket.
//!
//! In lock-step every block costs a round trip, so the rate is set by how soon the next DATA
//! leaves after its ACK arrives. On the runtime each block costs a readiness wake-up, an
//! `epoll_wait`, the `recvfrom`, the `sendto` and, when the next ACK is not there yet, a
//! `recvfrom` that fails with `EAGAIN`; here the kernel wakes the blocked `recvfrom` directly
//! and a block costs that `recvfrom` and one `sendto` (plus a `pread` per read-ahead chunk).
//!
//! The retransmit deadline is the socket's `SO_RCVTIMEO`, which is only set again when the wait
//! wanted differs from the one in force (in lock-step the deadline moves by the same timeout
//! with every block, so the normal path never re-arms). Waits are capped at [`POLL_CAP`] so the
//! thread notices cancellation promptly.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use corral_tftp_proto::{ErrorCode, Rejection, Transfer};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::{Failure, TftpMetrics};
use crate::{Content, Delivered, Ended};

/// Longest single blocking wait: how late a cancelled transfer notices.
pub(crate) const POLL_CAP: Duration = Duration::from_millis(250);

/// A receive timeout this much longer than the wait wanted is re-armed; a shorter one only
/// wakes the thread early, which costs a loop turn, not correctness.
const SLACK: Duration = Duration::from_millis(2);

/// How long the next blocking receive may wait, given the transfer's deadline.
pub(crate) fn wait_for(deadline: Option<Instant>, now: Instant) -> Duration {
    deadline
        .map_or(POLL_CAP, |d| d.saturating_duration_since(now))
        .min(POLL_CAP)
}

/// Whether a receive timeout of `set` must be changed to wait `want`: when it would wait past
/// the deadline, or wake far too early (more than twice as early as needed).
pub(crate) fn needs_rearm(set: Option<Duration>, want: Duration) -> bool {
    match set {
        None => true,
        Some(s) => want + SLACK < s || want > s * 2,
    }
}

fn send_rejection(sock: &UdpSocket, peer: SocketAddr, r: &Rejection, m: &TftpMetrics) {
    let mut buf = [0u8; 600];
    let n = r.encode(&mut buf);
    match sock.send_to(&buf[..n], peer) {
        Ok(_) => m.sent(&buf[..n]),
        Err(e) => debug!(%peer, error = %e, "cannot send TFTP error"),
    }
}

/// Runs the state machine on the blocking `sock` until it is done. Returns the bytes
/// delivered, or why not.
pub(crate) fn drive(
    sock: &UdpSocket,
    peer: SocketAddr,
    mut t: Transfer<Content>,
    cancel: &CancellationToken,
    m: &TftpMetrics,
) -> Result<Delivered, Ended> {
    let mut out = vec![0u8; t.max_packet_len()];
    let mut inbuf = vec![0u8; 2048];
    let mut set: Option<Duration> = None;
    let mut outcome = None;
    loop {
        let now = Instant::now();
        while let Some(n) = t.poll_transmit(now, &mut out) {
            match sock.send_to(&out[..n], peer) {
                Ok(_) => m.sent(&out[..n]),
                // A full send queue or an ICMP error: the retransmit timer covers it.
                Err(e) => debug!(%peer, error = %e, "TFTP send failed"),
            }
        }
        while let Some(ev) = t.poll_event() {
            outcome = Some(ev);
        }
        if t.is_done() {
            break;
        }
        if cancel.is_cancelled() {
            let r = Rejection::new(ErrorCode::Undefined, "server shutting down", None);
            send_rejection(sock, peer, &r, m);
            return Err(Ended::new(Failure::Shutdown, "server shutting down"));
        }
        let want = wait_for(t.poll_timeout(), Instant::now());
        if want.is_zero() {
            t.handle_timeout(Instant::now());
            continue;
        }
        // SO_RCVTIMEO has microsecond resolution and 0 means "forever".
        let want = want.max(Duration::from_millis(1));
        if needs_rearm(set, want) {
            sock.set_read_timeout(Some(want)).map_err(|e| {
                Ended::new(
                    Failure::Other,
                    format!("cannot set the receive timeout: {e}"),
                )
            })?;
            set = Some(want);
        }
        match sock.recv_from(&mut inbuf) {
            Ok((n, from)) if from == peer => t.handle_input(Instant::now(), &inbuf[..n]),
            Ok((_, from)) => {
                // RFC 1350 §4: a packet from another port is answered with error 5 and does
                // not disturb the transfer.
                let r = Rejection::new(ErrorCode::UnknownTransferId, "unknown transfer ID", None);
                send_rejection(sock, from, &r, m);
            }
            // The wait ran out; a no-op when the deadline is still ahead.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                t.handle_timeout(Instant::now());
            }
            Err(e) => {
                debug!(%peer, error = %e, "TFTP receive error");
                t.handle_timeout(Instant::now());
            }
        }
    }
    crate::outcome(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_deadline_but_never_past_the_cap() {
        let now = Instant::now();
        assert_eq!(wait_for(None, now), POLL_CAP);
        assert_eq!(
            wait_for(Some(now + Duration::from_millis(40)), now),
            Duration::from_millis(40)
        );
        assert_eq!(wait_for(Some(now + Duration::from_secs(30)), now), POLL_CAP);
        assert_eq!(
            wait_for(Some(now - Duration::from_millis(5)), now),
            Duration::ZERO
        );
    }

    #[test]
    fn rearms_only_when_the_timeout_in_force_is_wrong() {
        let ms = Duration::from_millis;
        assert!(needs_rearm(None, ms(250)));
        // The lock-step steady state: same wait every block, no system call.
        assert!(!needs_rearm(Some(ms(250)), ms(250)));
        assert!(!needs_rearm(Some(ms(250)), ms(249)));
        // Would sleep past the deadline.
        assert!(needs_rearm(Some(ms(250)), ms(100)));
        // Would wake far too early and spin.
        assert!(needs_rearm(Some(ms(1)), ms(250)));
        assert!(!needs_rearm(Some(ms(200)), ms(250)));
    }
}
