//! xorshift64*: the small seeded generator of the fault suites (kill instants, message sizes, soak traffic). It
//! needs variety, not quality; what it must keep is the sequence of a seed, since a failing run is replayed from
//! its printed seed. (tests/faults_hostile.rs has its own generator, plain xorshift64 with a warm-up: a different
//! sequence for the same seed, so it stays there.)

use std::time::Duration;

pub struct Rng(u64);

impl Rng {
    /// Mixes `seed` (times the golden-ratio constant, made odd), so nearby seeds give unrelated sequences.
    pub fn new(seed: u64) -> Rng {
        Rng::from_state(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Starts from `state` exactly. xorshift never leaves 0, so it must not be 0.
    pub fn from_state(state: u64) -> Rng {
        Rng(state)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// A duration of `from..to` milliseconds.
    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}
