//! Per-thread statistics that are merged once at the end: a log-linear latency histogram,
//! per-sender sequence tracking (lost / duplicated / out of order), and error tallies.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Sub-bucket bits of the log-linear histogram: 2^6 = 64 buckets per power of two, so a
/// recorded value is known to within 1/64 (1.6 %) of itself.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Values are nanoseconds, clamped below 2^40 ns (18 minutes).
const MAX_BITS: u32 = 40;
const BUCKETS: usize = ((MAX_BITS - SUB_BITS + 1) as usize) << SUB_BITS;

fn bucket_of(v: u64) -> usize {
    let v = v.min((1 << MAX_BITS) - 1);
    if v < SUB {
        v as usize
    } else {
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        let sub = ((v >> shift) & (SUB - 1)) as usize;
        ((shift as usize + 1) << SUB_BITS) + sub
    }
}

/// Lowest value that falls in bucket `b`, and the bucket's width.
fn bucket_range(b: usize) -> (u64, u64) {
    if (b as u64) < SUB {
        (b as u64, 1)
    } else {
        let shift = (b >> SUB_BITS) as u32 - 1;
        let sub = (b as u64) & (SUB - 1);
        ((SUB + sub) << shift, 1 << shift)
    }
}

/// HDR-like latency histogram in nanoseconds. Allocates its buckets on the first sample, so idle
/// connections cost nothing.
#[derive(Clone, Default)]
pub struct Hist {
    counts: Vec<u64>,
    n: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Hist {
    pub fn record(&mut self, ns: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
            self.min = u64::MAX;
        }
        self.counts[bucket_of(ns)] += 1;
        self.n += 1;
        self.sum += ns as u128;
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    pub fn merge(&mut self, other: &Hist) {
        if other.n == 0 {
            return;
        }
        if self.counts.is_empty() {
            *self = other.clone();
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.n
    }

    /// Value at quantile `q` (0..=1): the middle of the bucket holding it, kept within [min, max].
    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, width) = bucket_range(b);
                return (lo + width / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }

    pub fn mean(&self) -> u64 {
        if self.n == 0 {
            0
        } else {
            (self.sum / self.n as u128) as u64
        }
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// JSON summary in microseconds (floats with 0.1 µs resolution); `null` fields when empty.
    pub fn json_us(&self) -> Value {
        let us = |ns: u64| -> Value {
            if self.n == 0 {
                Value::Null
            } else {
                json!((ns as f64 / 100.0).round() / 10.0)
            }
        };
        json!({
            "count": self.n,
            "p50": us(self.quantile(0.50)),
            "p90": us(self.quantile(0.90)),
            "p99": us(self.quantile(0.99)),
            "p999": us(self.quantile(0.999)),
            "max": us(self.max),
            "mean": us(self.mean()),
            "min": us(if self.n == 0 { 0 } else { self.min }),
        })
    }

    /// One-line human summary, e.g. `p50 412µs  p90 1.20ms  p99 3.51ms  max 9.80ms  (n=120000)`.
    pub fn human(&self) -> String {
        if self.n == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
            fmt_ns(self.quantile(0.50)),
            fmt_ns(self.quantile(0.90)),
            fmt_ns(self.quantile(0.99)),
            fmt_ns(self.quantile(0.999)),
            fmt_ns(self.max),
            group(self.n)
        )
    }
}

pub fn fmt_ns(ns: u64) -> String {
    let ns = ns as f64;
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.0}µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

/// 1234567 -> "1,234,567".
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Counts by a short kind string ("connect: refused", "http 503", "1008 too slow", ...).
#[derive(Clone, Default, Debug)]
pub struct Tally(pub BTreeMap<String, u64>);

impl Tally {
    pub fn add(&mut self, kind: impl Into<String>) {
        *self.0.entry(kind.into()).or_insert(0) += 1;
    }
    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_insert(0) += v;
        }
    }
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
    pub fn json(&self) -> Value {
        Value::Object(self.0.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
    }
    pub fn human(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What one receiver saw of one sender's sequence numbers.
#[derive(Clone, Default)]
pub struct SeqTrack {
    /// One past the highest sequence number seen.
    next: u64,
    /// Half-open ranges below `next` that have not been seen (normally empty).
    missing: Vec<(u64, u64)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// The next expected number, or a number beyond it (a gap opens and may fill later).
    New,
    /// A number from an earlier gap: new, but out of order.
    Late,
    /// Seen before.
    Duplicate,
}

impl SeqTrack {
    pub fn see(&mut self, seq: u64) -> Seen {
        if seq == self.next {
            self.next += 1;
            Seen::New
        } else if seq > self.next {
            self.missing.push((self.next, seq));
            self.next = seq + 1;
            Seen::New
        } else if let Some(i) = self.missing.iter().position(|&(a, b)| a <= seq && seq < b) {
            let (a, b) = self.missing.swap_remove(i);
            if a < seq {
                self.missing.push((a, seq));
            }
            if seq + 1 < b {
                self.missing.push((seq + 1, b));
            }
            Seen::Late
        } else {
            Seen::Duplicate
        }
    }

    /// Messages of this sender never seen, given that it sent `sent` (numbered 0..sent).
    pub fn lost(&self, sent: u64) -> u64 {
        let gaps: u64 = self
            .missing
            .iter()
            .map(|&(a, b)| b.min(sent).saturating_sub(a))
            .sum();
        gaps + sent.saturating_sub(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip() {
        for v in [
            0u64,
            1,
            63,
            64,
            65,
            127,
            128,
            129,
            1000,
            123_456,
            9_999_999_999,
        ] {
            let b = bucket_of(v);
            let (lo, w) = bucket_range(b);
            assert!(
                lo <= v && v < lo + w,
                "{v} -> bucket {b} = [{lo}, {})",
                lo + w
            );
            assert!(w == 1 || (w as f64) / (lo as f64) <= 1.0 / 64.0 + 1e-9);
        }
        assert!(bucket_of(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles() {
        let mut h = Hist::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.02, "{p50}");
        assert_eq!(h.quantile(1.0), 1_000_000);
        assert_eq!(h.max(), 1_000_000);
    }

    #[test]
    fn seq_tracking() {
        let mut t = SeqTrack::default();
        assert_eq!(t.see(0), Seen::New);
        assert_eq!(t.see(1), Seen::New);
        assert_eq!(t.see(4), Seen::New); // 2, 3 missing
        assert_eq!(t.lost(5), 2);
        assert_eq!(t.see(3), Seen::Late);
        assert_eq!(t.see(3), Seen::Duplicate);
        assert_eq!(t.see(1), Seen::Duplicate);
        assert_eq!(t.lost(7), 1 + 2);
        assert_eq!(t.see(2), Seen::Late);
        assert_eq!(t.lost(5), 0);
    }
}
