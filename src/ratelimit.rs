//! Token buckets, per-address buckets and the flood detector: what sessions, the front door
//! and the HTTP API use to bound what one connection or one address may send. Arithmetic on
//! `Instant`s and one lock per table of addresses: no threads, no timers.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Allows `burst` events at once and `rate` per second on average.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.try_take_n(1.0, now)
    }

    /// Takes `n` tokens if there are that many (a cost above the burst never passes).
    pub fn try_take_n(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens whatever the balance, down to a debt of at most one burst: for a cost
    /// already incurred (bytes already read). See [`TokenBucket::debt_paid_at`].
    pub fn charge(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - n).max(-self.burst);
    }

    /// When a bucket in debt is back at zero; `None` when it is not in debt.
    pub fn debt_paid_at(&self) -> Option<Instant> {
        (self.tokens < 0.0).then(|| self.last + Duration::from_secs_f64(-self.tokens / self.rate))
    }

    /// Whether the bucket is full again: it then remembers nothing worth keeping.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }
}

/// A byte bucket's burst: four seconds' worth, and never less than two of the largest messages
/// (JSON escaping can double one) with room to spare.
pub fn byte_burst(rate: f64, largest_message: usize) -> f64 {
    (4.0 * rate).max((2 * largest_message + 1024) as f64)
}

/// Addresses one table of [`AddressBuckets`] tracks before it forgets the full (idle) ones.
const MAX_TRACKED_ADDRESSES: usize = 16_384;

/// One token bucket per client address (an IPv6 client is its /64: one host usually holds a
/// whole one). Memory is bounded: past `MAX_TRACKED_ADDRESSES`, buckets that have refilled
/// are forgotten, and if every one is busy the table starts over (failing open, logged).
pub struct AddressBuckets {
    rate: f64,
    burst: f64,
    table: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl AddressBuckets {
    /// `rate` of 0 or less turns the limit off.
    pub fn new(rate: f64, burst: f64) -> Self {
        AddressBuckets {
            rate,
            burst,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` tokens from `ip`'s bucket if it has them.
    pub fn try_take(&self, ip: IpAddr, n: f64, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if table.len() >= MAX_TRACKED_ADDRESSES {
            table.retain(|_, bucket| !bucket.is_full(now));
            if table.len() >= MAX_TRACKED_ADDRESSES {
                log::warn!("rate limits: {MAX_TRACKED_ADDRESSES} busy addresses; starting over");
                table.clear();
            }
        }
        table
            .entry(address_key(ip))
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now))
            .try_take_n(n, now)
    }
}

/// The unit limits count by: an IPv4 address, or the /64 network of an IPv6 one (an IPv4
/// address mapped into IPv6 counts as itself).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// Rejected messages within [`FLOOD_WINDOW`] that mark a client as flooding (it is then closed).
pub const FLOOD_REJECTIONS: usize = 50;
/// The window the rejections are counted in.
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);

/// Remembers the times of the last [`FLOOD_REJECTIONS`] rejections.
#[derive(Debug, Default)]
pub struct FloodDetector {
    rejections: VecDeque<Instant>,
}

impl FloodDetector {
    /// Records a rejection; true when the client has been rejected too often, too fast.
    pub fn reject(&mut self, now: Instant) -> bool {
        if self.rejections.len() == FLOOD_REJECTIONS {
            self.rejections.pop_front();
        }
        self.rejections.push_back(now);
        self.rejections.len() == FLOOD_REJECTIONS
            && self
                .rejections
                .front()
                .is_some_and(|&first| now.saturating_duration_since(first) <= FLOOD_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(110)));
    }

    #[test]
    fn buckets_take_amounts_and_never_more_than_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 300.0, t0);
        assert!(b.try_take_n(250.0, t0));
        assert!(!b.try_take_n(100.0, t0));
        assert!(b.try_take_n(100.0, t0 + Duration::from_millis(500)));
        assert!(!TokenBucket::new(1.0, 10.0, t0).try_take_n(11.0, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_charge_can_leave_a_debt_that_time_pays() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 1000.0, t0);
        b.charge(1500.0, t0);
        let paid = b.debt_paid_at().expect("in debt");
        assert_eq!(paid, t0 + Duration::from_millis(500));
        assert!(!b.try_take_n(1.0, t0 + Duration::from_millis(400)));
        assert!(b.try_take_n(1.0, t0 + Duration::from_millis(600)));
        b.charge(1e9, t0);
        assert!(
            b.debt_paid_at()
                .is_some_and(|t| t <= t0 + Duration::from_secs(2)),
            "capped"
        );
    }

    #[test]
    fn addresses_have_their_own_buckets_and_v6_counts_by_network() {
        let t0 = Instant::now();
        let table = AddressBuckets::new(1.0, 2.0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(table.try_take(a, 2.0, t0) && !table.try_take(a, 1.0, t0));
        assert!(table.try_take(b, 1.0, t0));
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        assert_eq!(address_key(v6a), address_key(v6b));
        assert_eq!(address_key("::ffff:192.0.2.1".parse().unwrap()), a);
        assert!(AddressBuckets::new(0.0, 0.0).try_take(a, 1e9, t0));
    }

    #[test]
    fn flood_needs_fifty_rejections_within_the_window() {
        let t0 = Instant::now();
        let mut slow = FloodDetector::default();
        assert!(!(0..100).any(|i| slow.reject(t0 + Duration::from_millis(300 * i))));
        let mut fast = FloodDetector::default();
        assert!(!(0..49).any(|i| fast.reject(t0 + Duration::from_millis(i))));
        assert!(fast.reject(t0 + Duration::from_millis(50)));
    }
}
