//! A fixed-size log-linear latency histogram (HdrHistogram's bucketing, 32 sub-buckets per power
//! of two: values within ~3 % of their true value), cheap enough to record every request of a
//! benchmark: one array increment, no allocation.

/// log2 of the sub-buckets per power of two.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any u64 value.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// Latencies in nanoseconds.
#[derive(Clone)]
pub struct LatencyHistogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.total)
            .field("p50_ns", &self.percentile(50.0))
            .field("p99_ns", &self.percentile(99.0))
            .field("max_ns", &self.max_ns)
            .finish()
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: Box::new([0; BUCKETS]),
            total: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }
}

/// Bucket of `v`: values below 2 * SUB exactly, above that SUB buckets per power of two.
fn bucket(v: u64) -> usize {
    let shift = (63 - (v | 1).leading_zeros()).saturating_sub(SUB_BITS);
    (u64::from(shift) * SUB + (v >> shift)) as usize
}

/// Largest value that falls into bucket `i`.
fn bucket_high(i: usize) -> u64 {
    let i = i as u64;
    if i < 2 * SUB {
        return i;
    }
    let shift = i / SUB - 1;
    let mantissa = i - shift * SUB;
    let high = (u128::from(mantissa + 1) << shift) - 1;
    u64::try_from(high).unwrap_or(u64::MAX)
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket(ns)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(ns);
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Forgets everything recorded (the end of a warm-up).
    pub fn reset(&mut self) {
        self.counts.fill(0);
        self.total = 0;
        self.sum_ns = 0;
        self.min_ns = u64::MAX;
        self.max_ns = 0;
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Smallest recorded latency (None when empty).
    pub fn min(&self) -> Option<u64> {
        (self.total > 0).then_some(self.min_ns)
    }

    /// Largest recorded latency (None when empty).
    pub fn max(&self) -> Option<u64> {
        (self.total > 0).then_some(self.max_ns)
    }

    /// Mean latency (None when empty).
    pub fn mean(&self) -> Option<f64> {
        (self.total > 0).then(|| self.sum_ns as f64 / self.total as f64)
    }

    /// The `p`-th percentile (0 < p <= 100): the highest value of the bucket holding it, so never
    /// below the true value and at most ~3 % above it (clamped to the recorded maximum).
    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((p / 100.0 * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_high(i).min(self.max_ns));
            }
        }
        Some(self.max_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_their_values() {
        let mut prev_high = None;
        for i in 0..BUCKETS {
            let high = bucket_high(i);
            if let Some(p) = prev_high {
                assert!(high > p, "bucket {i}");
                assert_eq!(bucket(p + 1), i, "value {} lands in bucket {i}", p + 1);
            }
            assert_eq!(bucket(high), i);
            prev_high = Some(high);
            if high == u64::MAX {
                break;
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_are_within_bucket_precision() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.percentile(50.0), None);
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile(50.0).unwrap();
        let p99 = h.percentile(99.0).unwrap();
        assert!(
            (5_000_000..=5_000_000 + 5_000_000 / 32).contains(&p50),
            "{p50}"
        );
        assert!(
            (9_900_000..=9_900_000 + 9_900_000 / 32).contains(&p99),
            "{p99}"
        );
        assert_eq!(h.percentile(100.0), Some(10_000_000));
        assert_eq!(h.min(), Some(1000));
        assert_eq!(h.count(), 10_000);
        h.reset();
        assert_eq!(h.count(), 0);
        assert_eq!(h.percentile(99.0), None);
    }
}
