//! Presence bursts: how many membership changes each room was told member by member lately.
//!
//! A `joined` or `left` goes to every member of the room, so a room that fills up all at once
//! costs members² frames: when 10,000 clients reconnect after a restart into rooms of 100, about
//! half a million. Past `--presence-burst` changes in one window (a presence tick), the
//! dispatcher tells a room the rest as one `presence` frame with the whole list at its next tick
//! instead. This module only counts; it never sends anything and knows nothing of members.

use std::collections::HashMap;
use std::time::Instant;

use super::PRESENCE_TICK;

/// Each room that had changes: when its window started, and how many changes it was told since.
#[derive(Default)]
pub struct Bursts {
    rooms: HashMap<String, Window>,
}

struct Window {
    started: Instant,
    told: u32,
}

impl Bursts {
    /// Counts a change in `room` at `now`: whether it is still among the first `burst` of the
    /// room's current window (one [`PRESENCE_TICK`] long).
    pub fn allow(&mut self, room: &str, now: Instant, burst: u32) -> bool {
        let fresh = Window {
            started: now,
            told: 1,
        };
        let Some(window) = self.rooms.get_mut(room) else {
            self.rooms.insert(room.to_owned(), fresh);
            return 1 <= burst;
        };
        if now.saturating_duration_since(window.started) >= PRESENCE_TICK {
            *window = fresh;
        } else {
            window.told = window.told.saturating_add(1);
        }
        window.told <= burst
    }

    /// Forgets a room that has no members here any more.
    pub fn forget(&mut self, room: &str) {
        self.rooms.remove(room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BURST: u32 = 16;

    #[test]
    fn a_room_is_told_one_by_one_up_to_the_burst_then_again_in_the_next_window() {
        let mut bursts = Bursts::default();
        let start = Instant::now();
        let told = (0..40)
            .filter(|_| bursts.allow("lobby", start, BURST))
            .count();
        assert_eq!(told, BURST as usize);
        assert!(bursts.allow("other", start, BURST), "rooms count apart");
        assert!(bursts.allow("lobby", start + PRESENCE_TICK, BURST));
        bursts.forget("lobby");
        assert!(!bursts.rooms.contains_key("lobby"));
    }
}
