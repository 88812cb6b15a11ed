//! When to try setting up a session again after a failure: a pure function of how many setups
//! have failed in a row and a random draw, so the policy is tested without a clock or a cluster.
//!
//! Exponential from [`BASE`] to [`MAX`], with "equal jitter" (half the delay fixed, half
//! random): many forwards that lost the same runtime do not come back in lockstep, and a
//! runtime that is back gets tried again within seconds. One success resets the count.

use std::time::Duration;

/// Delay after the first failure (before jitter).
pub const BASE: Duration = Duration::from_millis(100);
/// Longest delay between two setup attempts (before jitter).
pub const MAX: Duration = Duration::from_secs(5);

/// How long to wait before the next setup attempt after `failures` failures in a row;
/// `draw` is uniform in `[0, 1)`. Zero when nothing has failed.
pub fn delay(failures: u32, draw: f64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exp = BASE.saturating_mul(1u32 << (failures - 1).min(16));
    let full = exp.min(MAX);
    full / 2 + full.mul_f64(draw.clamp(0.0, 1.0) / 2.0)
}

/// A uniform draw in `[0, 1)` from the OS.
pub fn draw() -> f64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("OS randomness");
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_failed_no_wait() {
        assert_eq!(delay(0, 0.9), Duration::ZERO);
    }

    #[test]
    fn doubles_up_to_the_cap_with_half_of_it_jittered() {
        assert_eq!(delay(1, 0.0), BASE / 2);
        assert_eq!(delay(1, 1.0), BASE);
        assert_eq!(delay(2, 0.0), BASE);
        assert_eq!(delay(3, 0.5), BASE * 4 * 3 / 4);
        assert_eq!(delay(7, 0.0), MAX / 2);
        assert_eq!(delay(1000, 1.0), MAX);
        for f in 1..40 {
            let (lo, hi) = (delay(f, 0.0), delay(f, 0.999_999));
            assert!(
                lo <= hi && hi <= MAX && lo >= BASE / 2,
                "{f}: {lo:?}..{hi:?}"
            );
        }
    }

    #[test]
    fn draws_are_in_range() {
        for _ in 0..1000 {
            let d = draw();
            assert!((0.0..1.0).contains(&d));
        }
    }
}
