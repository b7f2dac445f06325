//! Summaries of benchmark samples: nearest-rank percentiles, mean, and a guarded ratio.

/// Summary of samples (any unit; the caller says which).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Summarizes `samples` (in any order): count, min, max, mean, and the nearest-rank p50 and p99
/// (see [`percentile`]).
///
/// # Panics
/// On no samples or a NaN sample.
pub fn summarize(samples: &[f64]) -> Summary {
    assert!(!samples.is_empty(), "summarize: no samples");
    assert!(
        !samples.iter().any(|v| v.is_nan()),
        "summarize: NaN among the samples"
    );
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    Summary {
        n,
        min: sorted[0],
        p50: percentile(&sorted, 50.0),
        p99: percentile(&sorted, 99.0),
        max: sorted[n - 1],
        mean: sorted.iter().sum::<f64>() / n as f64,
    }
}

/// The `p`th percentile (`p` in (0, 100]) of ascending-sorted samples, by nearest rank: the
/// sample at 1-based rank ceil(p/100 · n). Always one of the samples, never an interpolation.
///
/// # Panics
/// On no samples or `p` outside (0, 100].
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile: no samples");
    assert!(
        p > 0.0 && p <= 100.0,
        "percentile: p = {p} is not in (0, 100]"
    );
    debug_assert!(
        sorted.is_sorted_by(|a, b| a <= b),
        "percentile: samples not sorted"
    );
    let n = sorted.len();
    // p·n first, then /100: exact for whole p and n, so p99 of 100 samples is rank 99 (not 100
    // through 0.99·100 rounding up).
    let rank = (p * n as f64 / 100.0).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// The median (p50 by nearest rank) of `samples` in any order, e.g. durations in seconds.
///
/// # Panics
/// As [`summarize`].
pub fn median(samples: &[f64]) -> f64 {
    summarize(samples).p50
}

/// `a / b`, or `f64::NAN` when `b` is 0 (a missing baseline shows as "no ratio", not ±inf).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { f64::NAN } else { a / b }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_to_hundred() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&samples);
        assert_eq!(
            s,
            Summary {
                n: 100,
                min: 1.0,
                p50: 50.0,
                p99: 99.0,
                max: 100.0,
                mean: 50.5
            }
        );
    }

    #[test]
    fn single_sample() {
        let s = summarize(&[7.25]);
        assert_eq!(
            s,
            Summary {
                n: 1,
                min: 7.25,
                p50: 7.25,
                p99: 7.25,
                max: 7.25,
                mean: 7.25
            }
        );
    }

    #[test]
    fn unsorted_input() {
        // Sorted: 1 2 3 4 5; p50 is rank ceil(2.5) = 3, p99 rank ceil(4.95) = 5.
        let s = summarize(&[5.0, 1.0, 4.0, 2.0, 3.0]);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.p50, 3.0);
        assert_eq!(s.p99, 5.0);
        assert_eq!(s.max, 5.0);
        assert_eq!(s.mean, 3.0);
        assert_eq!(median(&[5.0, 1.0, 4.0, 2.0, 3.0]), 3.0);
    }

    #[test]
    fn p99_of_ten_is_the_max() {
        // Rank ceil(0.99 · 10) = 10.
        let samples = [3.0, 9.0, 1.0, 8.0, 2.0, 10.5, 4.0, 7.0, 5.0, 6.0];
        let s = summarize(&samples);
        assert_eq!(s.p99, 10.5);
        assert_eq!(s.p99, s.max);
        // p50 is rank 5 of 1 2 3 4 5 6 7 8 9 10.5.
        assert_eq!(s.p50, 5.0);
    }

    #[test]
    fn percentile_of_four() {
        let sorted = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&sorted, 25.0), 1.0);
        assert_eq!(percentile(&sorted, 50.0), 2.0);
        assert_eq!(percentile(&sorted, 75.0), 3.0);
        assert_eq!(percentile(&sorted, 100.0), 4.0);
        // Just above a rank boundary moves to the next sample; a tiny p is the first.
        assert_eq!(percentile(&sorted, 25.1), 2.0);
        assert_eq!(percentile(&sorted, 0.001), 1.0);
    }

    #[test]
    fn ratio_guards_zero() {
        assert!(ratio(1.0, 0.0).is_nan());
        assert!(ratio(0.0, 0.0).is_nan());
        assert_eq!(ratio(3.0, 2.0), 1.5);
    }

    #[test]
    fn summary_serializes_with_field_names() {
        let v = serde_json::to_value(summarize(&[2.0, 4.0])).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"n": 2, "min": 2.0, "p50": 2.0, "p99": 4.0, "max": 4.0, "mean": 3.0})
        );
    }

    #[test]
    #[should_panic(expected = "no samples")]
    fn no_samples_panics() {
        summarize(&[]);
    }

    #[test]
    #[should_panic(expected = "NaN")]
    fn nan_panics() {
        summarize(&[1.0, f64::NAN]);
    }

    #[test]
    #[should_panic(expected = "not in (0, 100]")]
    fn p_zero_panics() {
        percentile(&[1.0], 0.0);
    }
}
