//! Whether a run's file data travels zstd-compressed or raw, decided per run by measurement.
//!
//! Compressing file data is what makes a full copy fast over a real link (a system tree
//! shrinks by a third or more) and what keeps a small update's bytes on the wire low; but
//! where the stream is bound by the CPU (ssh over loopback, a fast LAN with slow cores),
//! compressing and decompressing cost more CPU than the smaller stream saves in ssh. Neither
//! the link's speed nor the CPU's load is known in advance, and back-pressure alone cannot
//! tell them apart (on two cores the stream always waits for somebody), so [`Compress::Auto`]
//! measures: a plan with less than [`AUTO_MIN`] bytes of data is always compressed; a larger
//! one is sent in [`WINDOW`]-byte windows alternately compressed and raw
//! ([`PROBE_ORDER`], ABBA so that a trend in the data or the load cancels out), each
//! window's *input* bytes per second (file bytes delivered, what the user waits for) are
//! measured once the pipeline has refilled in its mode ([`WARMUP`]), and the faster mode is
//! kept for the next [`REPROBE`] bytes, after which it probes again; each probe that agrees
//! with the one before doubles that interval (up to [`REPROBE_MAX`]), since every probe
//! sends two windows in the slower mode, and a decisive probe (one mode [`DECISIVE`] times
//! as fast as the other) stretches it [`DECISIVE_STRETCH`] times: conditions that flip such a
//! margin are rarer than the cost of two windows in a mode that slow is certain.
//!
//! What this is not: a driver. [`Chooser`] is a state machine fed the time and size of each
//! step as the master sent it ([`Chooser::on_sent`]); the caller owns the clock and tells its
//! reader threads the current [`Chooser::mode`].

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How file data is encoded on the wire (`--compress`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// Decide by measurement, per run (see the module doc).
    #[default]
    Auto,
    /// Compress every chunk that a sample shows to be compressible.
    Always,
    /// Send every chunk raw (deltas' literals are still compressed).
    Never,
}

impl std::str::FromStr for Compress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Compress::Auto),
            "always" => Ok(Compress::Always),
            "never" => Ok(Compress::Never),
            _ => Err(format!(
                "compression {s:?}: give auto (measure per run), always or never"
            )),
        }
    }
}

impl std::fmt::Display for Compress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compress::Auto => "auto",
            Compress::Always => "always",
            Compress::Never => "never",
        })
    }
}

/// The encoding the master's readers use for the data of the steps they prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// zstd where a sample compresses.
    Zstd,
    /// Raw bytes.
    Raw,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Zstd => "zstd",
            Mode::Raw => "raw",
        })
    }
}

/// Plans with less data than this are always compressed under [`Compress::Auto`]: probing
/// needs [`PROBE_ORDER`]`.len()` windows, and a small update's bytes on the wire matter more
/// than its seconds.
pub const AUTO_MIN: u64 = 64 << 20;
/// Input bytes of one probe window (64 MiB timed: a fraction of a second on a fast path,
/// long enough that a run's noise does not decide).
pub const WINDOW: u64 = 96 << 20;
/// Input bytes at the start of each window that are not timed: the steps prepared ahead in
/// the previous mode, the pipe, ssh's and the sockets' buffers and the receiver's read-ahead
/// drain and refill in the window's mode meanwhile. That is 10-25 MiB of input on a
/// loopback copy (more when compressed); with 8 MiB a probe measured raw 29 % faster as
/// 0-9 % and kept zstd in two of eight full copies measured on 2026-12-06 (the test
/// `a_full_pipeline_does_not_blur_the_modes` models it).
pub const WARMUP: u64 = 32 << 20;
/// The modes of one probe's windows, in order.
pub const PROBE_ORDER: [Mode; 4] = [Mode::Zstd, Mode::Raw, Mode::Raw, Mode::Zstd];
/// Input bytes sent in the chosen mode before the next probe (conditions change: another
/// transfer starts, the disk cache runs out).
pub const REPROBE: u64 = 1 << 30;
/// The longest interval between probes once they keep agreeing.
pub const REPROBE_MAX: u64 = 8 << 30;
/// A probe whose faster mode moved this many times the input bytes per second of the slower
/// is decisive (loopback full copy: raw 1.23-1.25 x zstd; a slow link: zstd about 1.5-2 x
/// raw).
pub const DECISIVE: f64 = 1.2;
/// The interval after a decisive probe is this many times what it would be.
pub const DECISIVE_STRETCH: u64 = 4;
/// Raw must be this much faster (in input bytes per second) to be chosen: on a tie the
/// smaller stream wins, it is kinder to a shared link.
pub const RAW_MARGIN: f64 = 1.05;

/// One probe's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Input bytes sent before the probe started.
    pub at: u64,
    /// Input bytes per second measured in the compressed windows (0: nothing measured).
    pub zstd_bps: f64,
    /// Input bytes per second measured in the raw windows (0: nothing measured).
    pub raw_bps: f64,
    /// The mode kept after it.
    pub chose: Mode,
}

/// How a run's data was encoded, and why (in `--json` output and the summary line).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompressionReport {
    /// The policy asked for.
    pub policy: Compress,
    /// Bytes of file data the plan held.
    pub planned: u64,
    /// The probes made (only under `auto` with a large plan), in order.
    pub probes: Vec<Probe>,
    /// The mode in force at the end, for the data of the next step (`None`: no data was
    /// sent).
    pub last: Option<Mode>,
}

impl std::fmt::Display for CompressionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(last) = self.last else {
            return write!(f, "{} (no data sent)", self.policy);
        };
        match self.policy {
            Compress::Always | Compress::Never => write!(f, "{last} ({})", self.policy),
            Compress::Auto if self.probes.is_empty() && self.planned < AUTO_MIN => write!(
                f,
                "{last} (auto: {:.1} MiB planned, below {} MiB)",
                mib(self.planned),
                AUTO_MIN >> 20
            ),
            Compress::Auto if self.probes.is_empty() => {
                write!(f, "{last} (auto: the run ended before a probe finished)")
            }
            Compress::Auto => {
                write!(f, "{last} (probe")?;
                for (i, p) in self.probes.iter().enumerate() {
                    let sep = if i == 0 { ": " } else { "; " };
                    write!(
                        f,
                        "{sep}at {:.0} MiB raw {:.0} MB/s vs zstd {:.0} MB/s -> {}",
                        mib(p.at),
                        p.raw_bps / 1e6,
                        p.zstd_bps / 1e6,
                        p.chose
                    )?;
                }
                f.write_str(")")
            }
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

/// Bytes and time measured in one mode during a probe.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    bytes: u64,
    time: Duration,
}

impl Tally {
    fn rate(self) -> f64 {
        let s = self.time.as_secs_f64();
        if s > 0.0 { self.bytes as f64 / s } else { 0.0 }
    }
}

#[derive(Debug, Clone)]
enum State {
    /// One mode for the rest of the run.
    Fixed(Mode),
    /// Probing: in window `window` of [`PROBE_ORDER`], `in_window` bytes of its mode sent.
    Probing {
        at: u64,
        window: usize,
        in_window: u64,
        zstd: Tally,
        raw: Tally,
    },
    /// The mode chosen by the last probe, until `until` input bytes have been sent.
    Chosen { mode: Mode, until: u64 },
}

/// The per-run decision (see the module doc), sans-IO: fed the end time and input bytes of
/// each step the master sent, in order, with the mode its data was prepared in.
#[derive(Debug, Clone)]
pub struct Chooser {
    state: State,
    /// Input bytes sent so far.
    sent: u64,
    /// When the previous step was sent (`None` before the first).
    last: Option<Instant>,
    /// Input bytes between the last probe and the next.
    reprobe: u64,
    report: CompressionReport,
}

impl Chooser {
    /// A chooser for a run under `policy` whose plan holds `planned` bytes of file data.
    pub fn new(policy: Compress, planned: u64) -> Chooser {
        let state = match policy {
            Compress::Always => State::Fixed(Mode::Zstd),
            Compress::Never => State::Fixed(Mode::Raw),
            Compress::Auto if planned < AUTO_MIN => State::Fixed(Mode::Zstd),
            Compress::Auto => probing(0),
        };
        Chooser {
            state,
            sent: 0,
            last: None,
            reprobe: REPROBE,
            report: CompressionReport {
                policy,
                planned,
                probes: Vec::new(),
                last: None,
            },
        }
    }

    /// The mode for the data of the steps prepared from now on.
    pub fn mode(&self) -> Mode {
        match &self.state {
            State::Fixed(m) | State::Chosen { mode: m, .. } => *m,
            State::Probing { window, .. } => PROBE_ORDER[*window],
        }
    }

    /// The master has sent a step at `now` carrying `bytes` of file data prepared in
    /// `mode`. Its time is the time since the previous step was sent: waiting for its
    /// preparation and for room in the stream both count.
    pub fn on_sent(&mut self, now: Instant, mode: Mode, bytes: u64) {
        let dt = self
            .last
            .map_or(Duration::ZERO, |l| now.saturating_duration_since(l));
        self.last = Some(now);
        if bytes == 0 {
            return;
        }
        self.step(dt, mode, bytes);
        self.report.last = Some(self.mode());
    }

    fn step(&mut self, dt: Duration, mode: Mode, bytes: u64) {
        self.sent += bytes;
        let sent = self.sent;
        match &mut self.state {
            State::Fixed(_) => {}
            State::Chosen { until, .. } => {
                if sent >= *until {
                    self.state = probing(sent);
                }
            }
            State::Probing {
                at,
                window,
                in_window,
                zstd,
                raw,
            } => {
                let want = PROBE_ORDER[*window];
                // A step prepared before this window began (readers run ahead) is neither
                // timed nor counted.
                if mode != want {
                    return;
                }
                if *in_window >= WARMUP {
                    let t = if mode == Mode::Zstd {
                        &mut *zstd
                    } else {
                        &mut *raw
                    };
                    t.bytes += bytes;
                    t.time += dt;
                }
                *in_window += bytes;
                if *in_window < WINDOW {
                    return;
                }
                *window += 1;
                *in_window = 0;
                if *window < PROBE_ORDER.len() {
                    return;
                }
                let probe = decide(*at, *zstd, *raw);
                tracing::debug!(
                    at = probe.at,
                    zstd_bps = probe.zstd_bps,
                    raw_bps = probe.raw_bps,
                    chose = %probe.chose,
                    "compression probe"
                );
                let interval = match self.report.probes.last() {
                    Some(prev) if prev.chose == probe.chose => (self.reprobe * 2).min(REPROBE_MAX),
                    _ => REPROBE,
                };
                self.reprobe = if probe.decisive() {
                    (interval * DECISIVE_STRETCH).min(REPROBE_MAX)
                } else {
                    interval
                };
                self.state = State::Chosen {
                    mode: probe.chose,
                    until: sent + self.reprobe,
                };
                self.report.probes.push(probe);
            }
        }
    }

    /// What was decided so far.
    pub fn report(&self) -> &CompressionReport {
        &self.report
    }
}

fn probing(at: u64) -> State {
    State::Probing {
        at,
        window: 0,
        in_window: 0,
        zstd: Tally::default(),
        raw: Tally::default(),
    }
}

/// The faster mode by input bytes per second; zstd unless raw was clearly faster (also
/// when either mode could not be timed: a single step larger than a window).
impl Probe {
    /// Whether one mode was at least [`DECISIVE`] times as fast as the other.
    pub fn decisive(&self) -> bool {
        let (z, r) = (self.zstd_bps, self.raw_bps);
        z > 0.0 && r > 0.0 && (r / z).max(z / r) >= DECISIVE
    }
}

fn decide(at: u64, zstd: Tally, raw: Tally) -> Probe {
    let (z, r) = (zstd.rate(), raw.rate());
    let chose = if z > 0.0 && r > z * RAW_MARGIN {
        Mode::Raw
    } else {
        Mode::Zstd
    };
    Probe {
        at,
        zstd_bps: z,
        raw_bps: r,
        chose,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    /// Steps of one MiB in a whole probe (its four windows).
    const PROBE: usize = (PROBE_ORDER.len() as u64 * WINDOW / MIB) as usize;

    /// Feeds `n` steps of `step` bytes, each taking the time the current mode's rate
    /// (bytes per second) gives it, and returns the clock after them.
    fn feed(
        c: &mut Chooser,
        mut now: Instant,
        n: usize,
        step: u64,
        rate: impl Fn(Mode) -> f64,
    ) -> Instant {
        for _ in 0..n {
            let m = c.mode();
            now += Duration::from_secs_f64(step as f64 / rate(m));
            c.on_sent(now, m, step);
        }
        now
    }

    #[test]
    fn fixed_policies_and_small_plans_never_probe() {
        let t = Instant::now();
        for (policy, planned, want) in [
            (Compress::Always, 10 << 30, Mode::Zstd),
            (Compress::Never, 10 << 30, Mode::Raw),
            (Compress::Never, 1, Mode::Raw),
            (Compress::Auto, AUTO_MIN - 1, Mode::Zstd),
        ] {
            let mut c = Chooser::new(policy, planned);
            // Raw ten times faster: a fixed choice must not care.
            feed(
                &mut c,
                t,
                2000,
                MIB,
                |m| {
                    if m == Mode::Raw { 1e9 } else { 1e8 }
                },
            );
            assert_eq!(c.mode(), want, "{policy} {planned}");
            assert!(c.report().probes.is_empty());
            assert_eq!(c.report().last, Some(want));
        }
        let c = Chooser::new(Compress::Auto, AUTO_MIN - 1);
        assert_eq!(c.report().last, None);
        assert!(c.report().to_string().contains("no data sent"));
    }

    #[test]
    fn auto_picks_the_mode_with_more_input_bytes_per_second() {
        let t = Instant::now();
        // CPU-bound loopback: raw 310 MB/s, zstd 240 MB/s.
        let mut c = Chooser::new(Compress::Auto, 4 << 30);
        assert_eq!(c.mode(), Mode::Zstd, "the first window is compressed");
        feed(&mut c, t, PROBE, MIB, |m| {
            if m == Mode::Raw { 310e6 } else { 240e6 }
        });
        let p = &c.report().probes;
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].chose, Mode::Raw);
        assert!((p[0].raw_bps - 310e6).abs() < 1e6, "{p:?}");
        assert!((p[0].zstd_bps - 240e6).abs() < 1e6, "{p:?}");
        assert_eq!(c.mode(), Mode::Raw);
        let s = c.report().to_string();
        assert!(
            s.starts_with("raw (probe: at 0 MiB raw 310 MB/s vs zstd 240 MB/s"),
            "{s}"
        );
        // A slow link: compressed data delivers more input bytes per second.
        let mut c = Chooser::new(Compress::Auto, 4 << 30);
        feed(&mut c, t, PROBE, MIB, |m| {
            if m == Mode::Raw { 110e6 } else { 180e6 }
        });
        assert_eq!(c.report().probes[0].chose, Mode::Zstd);
        assert_eq!(c.mode(), Mode::Zstd);
    }

    #[test]
    fn a_tie_keeps_compression_and_an_untimed_probe_too() {
        let t = Instant::now();
        let mut c = Chooser::new(Compress::Auto, 4 << 30);
        feed(&mut c, t, PROBE, MIB, |m| {
            if m == Mode::Raw { 102e6 } else { 100e6 }
        });
        assert_eq!(c.mode(), Mode::Zstd, "within the margin");
        // One step larger than every window: nothing can be timed past the warm-up.
        let mut c = Chooser::new(Compress::Auto, 4 << 30);
        feed(&mut c, t, 4, 2 * WINDOW, |m| {
            if m == Mode::Raw { 1e9 } else { 1e8 }
        });
        assert_eq!(c.report().probes.len(), 1);
        assert_eq!(c.report().probes[0].raw_bps, 0.0);
        assert_eq!(c.mode(), Mode::Zstd);
    }

    #[test]
    fn a_full_pipeline_does_not_blur_the_modes() {
        // Downstream-bound (the receiver, ssh): the master sends as fast as the data sent
        // `lag` steps earlier drains, so each window's first steps go at the previous mode's
        // rate. With 24 MiB in flight (pipes, socket buffers, the receiver's read-ahead; more
        // input bytes when compressed) the warm-up must cover it, or a probe compresses the
        // real difference (raw 29 % faster measured as 9 %, within the noise of a run).
        let t = Instant::now();
        let lag = 24;
        let rate = |m: Mode| if m == Mode::Raw { 310e6 } else { 240e6 };
        let mut c = Chooser::new(Compress::Auto, 8 << 30);
        let mut sent: Vec<Mode> = Vec::new();
        let mut now = t;
        while c.report().probes.is_empty() {
            let m = c.mode();
            let draining = if sent.len() >= lag {
                sent[sent.len() - lag]
            } else {
                Mode::Zstd
            };
            now += Duration::from_secs_f64(MIB as f64 / rate(draining));
            c.on_sent(now, m, MIB);
            sent.push(m);
        }
        let p = &c.report().probes[0];
        assert!((p.raw_bps - 310e6).abs() < 3e6, "{p:?}");
        assert!((p.zstd_bps - 240e6).abs() < 3e6, "{p:?}");
        assert_eq!(p.chose, Mode::Raw);
    }

    #[test]
    fn warmup_and_steps_prepared_in_the_previous_mode_are_not_timed() {
        let t = Instant::now();
        let mut c = Chooser::new(Compress::Auto, 4 << 30);
        let mut now = t;
        // Window 1 (zstd) at 100 MB/s, except its warm-up, which is very slow.
        now = feed(&mut c, now, (WARMUP / MIB) as usize, MIB, |_| 1e6);
        now = feed(&mut c, now, ((WINDOW - WARMUP) / MIB) as usize, MIB, |_| {
            100e6
        });
        assert_eq!(c.mode(), Mode::Raw);
        // Steps the readers had prepared compressed arrive first, slowly: ignored.
        for _ in 0..20 {
            now += Duration::from_secs(1);
            c.on_sent(now, Mode::Zstd, MIB);
        }
        // Steps without data neither count nor end a window.
        c.on_sent(now, Mode::Raw, 0);
        assert_eq!(c.mode(), Mode::Raw);
        now = feed(&mut c, now, 2 * (WINDOW / MIB) as usize, MIB, |_| 300e6);
        assert!(c.report().probes.is_empty());
        feed(&mut c, now, (WINDOW / MIB) as usize, MIB, |_| 100e6);
        let p = &c.report().probes[0];
        assert!((p.zstd_bps - 100e6).abs() < 1e6, "{p:?}");
        assert!((p.raw_bps - 300e6).abs() < 1e6, "{p:?}");
        assert_eq!(p.chose, Mode::Raw);
    }

    #[test]
    fn it_probes_again_after_reprobe_bytes_and_follows_a_change() {
        let t = Instant::now();
        let mut c = Chooser::new(Compress::Auto, 8 << 30);
        // Margins below DECISIVE: the plain interval.
        let fast_raw = |m: Mode| if m == Mode::Raw { 300e6 } else { 270e6 };
        let now = feed(&mut c, t, PROBE, MIB, fast_raw);
        assert_eq!(c.mode(), Mode::Raw);
        // Still raw until REPROBE more bytes have gone.
        let now = feed(&mut c, now, (REPROBE / MIB) as usize - 1, MIB, fast_raw);
        assert_eq!(c.mode(), Mode::Raw);
        assert_eq!(c.report().probes.len(), 1);
        // Then the link slows (another transfer): the next probe goes back to zstd.
        let slow_link = |m: Mode| if m == Mode::Raw { 80e6 } else { 90e6 };
        feed(&mut c, now, 1 + PROBE, MIB, slow_link);
        let p = &c.report().probes;
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].at, PROBE as u64 * MIB + REPROBE);
        assert_eq!(p[1].chose, Mode::Zstd);
        assert_eq!(c.mode(), Mode::Zstd);
        let s = c.report().to_string();
        assert!(s.starts_with("zstd (probe: at 0 MiB raw 300 MB/s"), "{s}");
        let second = (PROBE as u64 * MIB + REPROBE) / MIB;
        assert!(
            s.contains(&format!(
                "; at {second} MiB raw 80 MB/s vs zstd 90 MB/s -> zstd)"
            )),
            "{s}"
        );
    }

    #[test]
    fn agreeing_probes_come_less_often_and_a_change_resets_the_interval() {
        let t = Instant::now();
        let mut c = Chooser::new(Compress::Auto, 64 << 30);
        let fast_raw = |m: Mode| if m == Mode::Raw { 300e6 } else { 270e6 };
        // Each probe takes PROBE MiB; the gaps after the first three agreeing probes are
        // REPROBE, 2 x REPROBE and 4 x REPROBE.
        let mut now = t;
        let mut at = 0;
        for gap in [REPROBE, 2 * REPROBE, 4 * REPROBE] {
            now = feed(&mut c, now, PROBE, MIB, fast_raw);
            at += PROBE as u64 * MIB;
            now = feed(&mut c, now, (gap / MIB) as usize - 1, MIB, fast_raw);
            at += gap - MIB;
            let n = c.report().probes.len();
            now = feed(&mut c, now, 1, MIB, fast_raw);
            at += MIB;
            assert_eq!(c.report().probes.len(), n, "no probe before {at}");
            assert_eq!(
                c.mode(),
                Mode::Zstd,
                "the probe after {gap} bytes has begun"
            );
        }
        let p = &c.report().probes;
        assert_eq!(p.len(), 3);
        assert_eq!(p[1].at, PROBE as u64 * MIB + REPROBE);
        assert_eq!(p[2].at, 2 * PROBE as u64 * MIB + 3 * REPROBE);
        // The fourth probe disagrees: the interval is REPROBE again.
        let slow_link = |m: Mode| if m == Mode::Raw { 80e6 } else { 90e6 };
        now = feed(&mut c, now, PROBE, MIB, slow_link);
        assert_eq!(c.report().probes.len(), 4);
        assert_eq!(c.mode(), Mode::Zstd);
        now = feed(&mut c, now, (REPROBE / MIB) as usize, MIB, slow_link);
        assert_eq!(c.report().probes.len(), 4);
        feed(&mut c, now, PROBE, MIB, slow_link);
        assert_eq!(c.report().probes.len(), 5, "REPROBE after the change");
        // The interval never grows past REPROBE_MAX.
        let mut c = Chooser::new(Compress::Auto, 1 << 40);
        feed(&mut c, t, (64 << 30) / MIB as usize, MIB, fast_raw);
        assert!(c.reprobe <= REPROBE_MAX);
        assert_eq!(c.reprobe, REPROBE_MAX);
    }

    #[test]
    fn a_decisive_probe_stretches_the_interval() {
        let t = Instant::now();
        // Raw 25 % faster (this loopback's full copy): the next probe 4 x REPROBE later.
        let mut c = Chooser::new(Compress::Auto, 64 << 30);
        let raw_by_25 = |m: Mode| if m == Mode::Raw { 368e6 } else { 295e6 };
        let now = feed(&mut c, t, PROBE, MIB, raw_by_25);
        assert!(c.report().probes[0].decisive());
        assert_eq!(c.mode(), Mode::Raw);
        let now = feed(
            &mut c,
            now,
            (4 * REPROBE / MIB) as usize - 1,
            MIB,
            raw_by_25,
        );
        assert_eq!(c.report().probes.len(), 1);
        assert_eq!(c.mode(), Mode::Raw, "no probe before 4 x REPROBE");
        feed(&mut c, now, 1, MIB, raw_by_25);
        assert_eq!(c.mode(), Mode::Zstd, "the second probe has begun");
        // zstd twice as fast (a slow link) is decisive the other way; 15 % is not.
        let mut c = Chooser::new(Compress::Auto, 64 << 30);
        feed(&mut c, t, PROBE, MIB, |m| {
            if m == Mode::Raw { 40e6 } else { 80e6 }
        });
        assert!(c.report().probes[0].decisive());
        assert_eq!((c.mode(), c.reprobe), (Mode::Zstd, 4 * REPROBE));
        let mut c = Chooser::new(Compress::Auto, 64 << 30);
        feed(&mut c, t, PROBE, MIB, |m| {
            if m == Mode::Raw { 345e6 } else { 300e6 }
        });
        assert!(!c.report().probes[0].decisive());
        assert_eq!((c.mode(), c.reprobe), (Mode::Raw, REPROBE));
    }

    #[test]
    fn policy_parses_and_prints() {
        for p in [Compress::Auto, Compress::Always, Compress::Never] {
            assert_eq!(p.to_string().parse::<Compress>(), Ok(p));
        }
        let e = "fast".parse::<Compress>().unwrap_err();
        assert!(e.contains("auto") && e.contains("never"), "{e}");
        assert_eq!(Compress::default(), Compress::Auto);
    }
}
