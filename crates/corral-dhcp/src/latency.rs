//! A fixed-size latency histogram: the server's timings (time to durable, time to answer)
//! without a sample vector that grows for as long as the service runs.
//!
//! Log-linear buckets over microseconds: exact below 16 µs, then eight buckets per power of
//! two, so a percentile is reported at most 12.5 % above the true value (never below it), in
//! 240 counters whatever the traffic. The counters are atomics, so the packet path and the
//! writer threads record without a lock, and [`crate::metrics`] reads them while they run
//! (Prometheus text, one log line when the service stops). Written here because that is all
//! it needs; a metrics crate would be more.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Buckets: 16 exact ones, then 8 per power of two from 2^4 to 2^31.
const BUCKETS: usize = 16 + 28 * 8;

/// Counts of microsecond latencies.
#[derive(Debug)]
pub(crate) struct Histogram {
    counts: [AtomicU64; BUCKETS],
    n: AtomicU64,
    sum_us: AtomicU64,
    max_us: AtomicU32,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

fn bucket(us: u32) -> usize {
    if us < 16 {
        return us as usize;
    }
    let msb = 31 - us.leading_zeros() as usize; // 4..=31
    let sub = ((us >> (msb - 3)) & 7) as usize;
    16 + (msb - 4) * 8 + sub
}

/// The largest value that falls into bucket `i`.
fn upper(i: usize) -> u32 {
    if i < 16 {
        return i as u32;
    }
    let msb = 4 + (i - 16) / 8;
    let sub = ((i - 16) % 8) as u64;
    let lower = (8 + sub) << (msb - 3);
    (lower + (1u64 << (msb - 3)) - 1).min(u64::from(u32::MAX)) as u32
}

/// Upper bounds (µs) of the cumulative buckets a Prometheus histogram gets: bucket edges of
/// [`Histogram`] (so each count is exact), 2^k and 1.5 × 2^k from 64 µs to about 12.6 s.
pub(crate) fn prometheus_bounds_us() -> impl Iterator<Item = u32> {
    (6..24).flat_map(|k| [1u32 << k, 3u32 << (k - 1)])
}

impl Histogram {
    /// An empty histogram (usable in a `static`).
    pub(crate) const fn new() -> Histogram {
        Histogram {
            counts: [const { AtomicU64::new(0) }; BUCKETS],
            n: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            max_us: AtomicU32::new(0),
        }
    }

    /// Records one latency.
    pub(crate) fn record(&self, d: std::time::Duration) {
        let us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.counts[bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.n.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(u64::from(us), Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// How many were recorded.
    pub(crate) fn count(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }

    /// The sum of everything recorded, in seconds.
    pub(crate) fn sum_seconds(&self) -> f64 {
        self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// How many recorded values were below `us` microseconds: exact when `us` is a bucket's
    /// lower edge, as every one of [`prometheus_bounds_us`] is (a Prometheus `le` bucket then
    /// differs only for a value of exactly `us`, a measure-zero case for a timing).
    pub(crate) fn count_below_us(&self, us: u32) -> u64 {
        self.counts
            .iter()
            .enumerate()
            .take_while(|&(i, _)| upper(i) < us)
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The `p`-th percentile (0..=100) in milliseconds, rounded up to its bucket's top
    /// (never above the largest value recorded); NaN when empty.
    pub(crate) fn percentile_ms(&self, p: u32) -> f64 {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let n: u64 = counts.iter().sum();
        let max_us = self.max_us.load(Ordering::Relaxed);
        if n == 0 {
            return f64::NAN;
        }
        let rank = (n * u64::from(p.min(100))).div_ceil(100).max(1);
        let mut seen = 0;
        for (i, &c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return f64::from(upper(i).min(max_us)) / 1000.0;
            }
        }
        f64::from(max_us) / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_are_contiguous_and_ordered() {
        let mut last = None;
        for us in (0..100_000u32).chain([u32::MAX / 2, u32::MAX - 1, u32::MAX]) {
            let b = bucket(us);
            assert!(b < BUCKETS, "{us} -> {b}");
            assert!(us <= upper(b), "{us} above its bucket's top {}", upper(b));
            if let Some(l) = last {
                assert!(b >= l, "{us}: bucket {b} below {l}");
            }
            last = Some(b);
        }
        assert_eq!(bucket(u32::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_are_never_low_and_at_most_an_eighth_high() {
        let h = Histogram::default();
        // 1..=10_000 µs, uniform: the p-th percentile is p * 100 µs.
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 10_000);
        for p in [1u32, 10, 50, 90, 99] {
            let want = f64::from(p) * 0.1;
            let got = h.percentile_ms(p);
            assert!(got >= want && got <= want * 1.125, "p{p}: {got} vs {want}");
        }
        assert_eq!(h.percentile_ms(100), 10.0);
    }

    /// The Prometheus bounds are bucket edges: counting below one is exact.
    #[test]
    fn prometheus_bounds_count_exactly() {
        let h = Histogram::default();
        let bounds: Vec<u32> = prometheus_bounds_us().collect();
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        assert_eq!((bounds[0], bounds[1], bounds[2]), (64, 96, 128));
        for &b in &bounds {
            assert_ne!(bucket(b), bucket(b - 1), "{b} is a lower edge");
        }
        for us in [63u64, 64, 65, 95, 96, 1000, 8191, 8192] {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count_below_us(64), 1);
        assert_eq!(h.count_below_us(96), 4);
        assert_eq!(h.count_below_us(128), 5);
        assert_eq!(h.count_below_us(8192), 7);
        assert_eq!(h.count_below_us(12288), 8);
        assert!(
            (h.sum_seconds() - 0.017_766).abs() < 1e-9,
            "{}",
            h.sum_seconds()
        );
    }

    #[test]
    fn small_values_are_exact_and_empty_is_nan() {
        let h = Histogram::default();
        assert!(h.percentile_ms(50).is_nan());
        for us in [3u64, 3, 3, 7] {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.percentile_ms(50), 0.003);
        assert_eq!(h.percentile_ms(99), 0.007);
        // An outlier shows as the maximum, not as its bucket's top.
        h.record(Duration::from_millis(114));
        assert_eq!(h.percentile_ms(100), 114.0);
    }
}
