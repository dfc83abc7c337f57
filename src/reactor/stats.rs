//! Stats: the server's counters, answered to a Stats request ([HB-13]) and logged once a minute.
//!
//! Owns: counting. The loop bumps plain integers on its own thread (no atomics, no locks); a snapshot is taken
//! only when someone asks, so the hot path pays an addition per event and nothing more.
//!
//! Must not: allocate on the hot path, or scan sessions except when a snapshot is asked for.

use super::Reactor;
use crate::protocol::Packet;
use log::info;
use std::time::{Duration, Instant};

/// How often the one-line summary is logged.
pub(super) const LOG_EVERY: Duration = Duration::from_secs(60);
/// Seconds in the moving window of the message rate.
const RATE_WINDOW: usize = 10;

/// Counters since the server started.
#[derive(Debug)]
pub(super) struct Stats {
    started: Instant,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Messages stored (direct and room), not counting resends.
    pub stored: u64,
    /// Deliver and RoomDeliver frames put into sessions' output, live or from the feed.
    pub delivered: u64,
    /// Resends answered with the original Ack ([HB-5.2]).
    pub duplicates: u64,
    /// Times a slow reader fell back from live pushes to the feed ([HB-5.6]).
    pub fallen_back: u64,
    /// Messages stored in each of the last RATE_WINDOW whole seconds, as a ring indexed by second.
    per_second: [u64; RATE_WINDOW],
    /// The second (since start) `per_second` was last written at.
    current_second: u64,
    pub next_log: Instant,
}

impl Stats {
    pub(super) fn new(now: Instant) -> Stats {
        Stats {
            started: now,
            bytes_in: 0,
            bytes_out: 0,
            stored: 0,
            delivered: 0,
            duplicates: 0,
            fallen_back: 0,
            per_second: [0; RATE_WINDOW],
            current_second: 0,
            next_log: now + LOG_EVERY,
        }
    }

    pub(super) fn message_stored(&mut self, now: Instant) {
        self.stored += 1;
        self.advance_to(now);
        self.per_second[(self.current_second as usize) % RATE_WINDOW] += 1;
    }

    /// Clears the ring slots of the seconds that passed with nothing stored.
    fn advance_to(&mut self, now: Instant) {
        let second = now.saturating_duration_since(self.started).as_secs();
        let gap = second
            .saturating_sub(self.current_second)
            .min(RATE_WINDOW as u64);
        for step in 1..=gap {
            self.per_second[((self.current_second + step) as usize) % RATE_WINDOW] = 0;
        }
        self.current_second = self.current_second.max(second);
    }

    /// Messages stored per second, averaged over the last RATE_WINDOW seconds.
    pub(super) fn rate(&mut self, now: Instant) -> u64 {
        self.advance_to(now);
        self.per_second.iter().sum::<u64>() / RATE_WINDOW as u64
    }

    pub(super) fn uptime(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }
}

impl Reactor {
    /// Every counter, by name, in a fixed order.
    pub(super) fn stats_snapshot(&mut self) -> Vec<(String, u64)> {
        let now = self.now;
        let (batch, latency_us) = self.store.as_ref().map_or((0, 0), |s| s.last_commit());
        let largest_output = self
            .sessions
            .iter()
            .map(|(_, s)| s.pending_output())
            .max()
            .unwrap_or(0);
        let counters: [(&str, u64); 17] = [
            ("connections", self.sessions.len() as u64),
            ("users_online", self.hub.users_online() as u64),
            ("messages_stored", self.stats.stored),
            ("messages_delivered", self.stats.delivered),
            ("messages_per_sec_10s", self.stats.rate(now)),
            (
                "store_queue_depth",
                self.store.as_ref().map_or(0, |s| s.queue_depth()) as u64,
            ),
            ("store_backlog", self.store_backlog.len() as u64),
            ("commit_batch_size", batch as u64),
            ("commit_latency_us", latency_us),
            ("duplicates_absorbed", self.stats.duplicates),
            ("feed_fallbacks", self.stats.fallen_back),
            ("largest_output_bytes", largest_output as u64),
            ("bytes_in", self.stats.bytes_in),
            ("bytes_out", self.stats.bytes_out),
            (
                "hash_queue_depth",
                self.hasher.as_ref().map_or(0, |h| h.queue_depth()) as u64,
            ),
            ("sessions_parked", self.parked.len() as u64),
            ("uptime_secs", self.stats.uptime(now).as_secs()),
        ];
        counters
            .iter()
            .map(|(name, value)| ((*name).to_owned(), *value))
            .collect()
    }

    pub(super) fn send_stats(&mut self, slot: usize, rid: u32) {
        let counters = self.stats_snapshot();
        self.send(slot, rid, &Packet::StatsReply(counters));
    }

    /// Once a minute, one info line with the counters that say how the server is doing.
    pub(super) fn log_stats_if_due(&mut self) {
        if self.now < self.stats.next_log {
            return;
        }
        self.stats.next_log = self.now + LOG_EVERY;
        let line: Vec<String> = self
            .stats_snapshot()
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        info!("stats: {}", line.join(" "));
    }
}
