//! Token buckets and the flood detector, used by each session on what its client sends.
//! Pure arithmetic on `Instant`s: no threads, no timers.

use std::collections::VecDeque;
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
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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
    fn flood_needs_fifty_rejections_within_the_window() {
        let t0 = Instant::now();
        let mut slow = FloodDetector::default();
        assert!(!(0..100).any(|i| slow.reject(t0 + Duration::from_millis(300 * i))));
        let mut fast = FloodDetector::default();
        assert!(!(0..49).any(|i| fast.reject(t0 + Duration::from_millis(i))));
        assert!(fast.reject(t0 + Duration::from_millis(50)));
    }
}
