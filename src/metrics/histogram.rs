//! An in-process copy of an exported histogram: the same explicit buckets, fed the same
//! observations at the same place, readable without a scrape. `ringfwd bench` prints its
//! percentiles from these, with the interpolation Prometheus's `histogram_quantile` uses, so
//! the numbers it prints are the ones a dashboard shows for the same run.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Bucket counts (not cumulative) for the bounds of one histogram, plus the overflow bucket.
#[derive(Debug)]
pub struct LocalHistogram {
    bounds: &'static [f64],
    /// `counts[i]` counts observations `<= bounds[i]` and above the bound before; the last one
    /// counts everything above the highest bound (`+Inf`).
    counts: Box<[AtomicU64]>,
}

impl LocalHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        LocalHistogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i].fetch_add(1, Relaxed);
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// Per-bucket counts, the overflow bucket last.
    pub fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Relaxed)).collect()
    }

    pub fn count(&self) -> u64 {
        self.counts().iter().sum()
    }

    /// The `q` quantile (0..=1) as `histogram_quantile` computes it: find the bucket holding
    /// rank `q * count` and interpolate linearly inside it (the first bucket starts at 0; a
    /// rank in the overflow bucket answers the highest bound). `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(self.bounds, &self.counts(), q)
    }
}

/// [`LocalHistogram::quantile`] over a snapshot of counts.
pub fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (below + c) as f64 >= rank {
            let Some(&upper) = bounds.get(i) else {
                return bounds.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            return Some(lower + (upper - lower) * ((rank - below as f64) / c as f64));
        }
        below += c;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &[f64] = &[1.0, 2.0, 4.0];

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let h = LocalHistogram::new(B);
        assert_eq!(h.quantile(0.5), None);
        for v in [0.5, 1.5, 1.5, 3.0] {
            h.observe(v);
        }
        assert_eq!(h.counts(), [1, 2, 1, 0]);
        // rank 2 of 4 falls halfway into the (1, 2] bucket.
        assert_eq!(h.quantile(0.5), Some(1.5));
        assert_eq!(h.quantile(1.0), Some(4.0));
        // A bound itself belongs to its bucket (`le`).
        h.observe(2.0);
        assert_eq!(h.counts(), [1, 3, 1, 0]);
        h.observe(100.0);
        assert_eq!(h.quantile(1.0), Some(4.0));
    }
}
