//! Authentication rules and the work behind them.
//!
//! This module owns:
//! - the account-name and password rules ([`canonical_username`], [`check_password`]);
//! - the argon2id hashing pool ([`HashPool`]): a few threads that hash and verify passwords for the
//!   reactor loop, fed through a bounded queue and answering over a channel plus a wake callback;
//! - login throttling state ([`Throttle`]): plain data the loop owns and consults before each attempt.
//!
//! What it must not do:
//! - never hash on the caller's thread once the pool is running (the loop must stay responsive; the
//!   only hash computed by a caller is the one-time dummy hash inside [`HashPool::start`], at boot);
//! - never block the caller: [`HashPool::try_submit`] refuses instead of waiting, and [`Throttle`] is
//!   O(1) per call except for its occasional prune;
//! - never log a password, nor put one in a `Debug` rendering; passwords are overwritten once used.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{
    self, PasswordHash, PasswordHasher, PasswordVerifier, Salt, SaltString,
};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::session::Ticket;

// ---------------------------------------------------------------------------------------------
// Name and password rules
// ---------------------------------------------------------------------------------------------

/// Why a name or password was refused; the loop maps these to protocol error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleError {
    InvalidUsername,
    InvalidPassword,
}

/// Shortest accepted account name, in characters (all accepted characters are one byte).
pub const USERNAME_MIN: usize = 3;
/// Longest accepted account name, in characters.
pub const USERNAME_MAX: usize = 32;
/// Shortest accepted password, in bytes of UTF-8.
pub const PASSWORD_MIN: usize = 8;
/// Longest accepted password, in bytes of UTF-8; bounds the work a client can ask a hash thread for.
pub const PASSWORD_MAX: usize = 1024;

/// 3–32 characters of a-z 0-9 _ . - ; uppercase A-Z is accepted and folded to lowercase (names compare
/// case-insensitively). Anything else (spaces, unicode, control chars, empty) is InvalidUsername.
/// Returns the canonical form.
pub fn canonical_username(name: &str) -> Result<String, RuleError> {
    // Every accepted character is ASCII, so the byte length is the character count; checking it
    // first also avoids scanning a huge hostile input.
    if !(USERNAME_MIN..=USERNAME_MAX).contains(&name.len()) {
        return Err(RuleError::InvalidUsername);
    }
    if !name.bytes().all(is_username_byte) {
        return Err(RuleError::InvalidUsername);
    }
    Ok(name.to_ascii_lowercase())
}

/// Whether `b` may appear in an account name (before case folding).
fn is_username_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// 8–1024 bytes (UTF-8 length), else InvalidPassword.
pub fn check_password(password: &str) -> Result<(), RuleError> {
    if (PASSWORD_MIN..=PASSWORD_MAX).contains(&password.len()) {
        Ok(())
    } else {
        Err(RuleError::InvalidPassword)
    }
}

/// Overwrites a secret's whole allocation with zeros and leaves `secret` empty.
///
/// Safe code only: the buffer is taken out of the `String` as a `Vec<u8>` (same allocation), then
/// zeros are written over its full capacity, including any spare capacity that may still hold an
/// older, longer value. `black_box` discourages the compiler from dropping the writes as dead.
/// Copies made elsewhere (network buffers, argon2's internal state) are out of reach.
pub fn wipe_string(secret: &mut String) {
    let mut bytes = std::mem::take(secret).into_bytes();
    let capacity = bytes.capacity();
    bytes.clear();
    bytes.resize(capacity, 0);
    std::hint::black_box(&bytes);
}

// ---------------------------------------------------------------------------------------------
// Hash parameters
// ---------------------------------------------------------------------------------------------

/// argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl HashParams {
    /// m=19456 KiB, t=2, p=1: OWASP's minimum recommendation for argon2id.
    pub const PRODUCTION: HashParams = HashParams {
        memory_kib: 19456,
        iterations: 2,
        parallelism: 1,
    };

    /// m=8 KiB, t=1, p=1: the cheapest argon2 allows; for tests only.
    pub const TEST: HashParams = HashParams {
        memory_kib: 8,
        iterations: 1,
        parallelism: 1,
    };

    /// Checks the parameters against argon2's limits (e.g. memory at least 8 KiB per lane).
    pub fn validate(&self) -> Result<(), String> {
        self.argon2_params().map(|_| ())
    }

    fn argon2_params(&self) -> Result<Params, String> {
        Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| format!("invalid argon2 parameters {self:?}: {e}"))
    }

    fn argon2(&self) -> Result<Argon2<'static>, String> {
        Ok(Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            self.argon2_params()?,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Jobs and completions
// ---------------------------------------------------------------------------------------------

/// What a hash thread is asked to do. `Debug` never shows the password.
pub enum HashOp {
    /// Produce an argon2id PHC string with a fresh random salt.
    Hash { password: String },
    /// Verify `password` against `phc`. `phc: None` means "no such user": the thread verifies against
    /// a dummy hash made at pool start with the same params, so the answer takes as long as a real
    /// one, and answers false. A malformed `phc` answers false and logs a warning (no password).
    Verify {
        phc: Option<String>,
        password: String,
    },
}

impl HashOp {
    /// Overwrites the password held by this op (see [`wipe_string`]). The pool does this after each
    /// job; the loop should do it for a job handed back by [`HashPool::try_submit`].
    pub fn wipe(&mut self) {
        match self {
            HashOp::Hash { password } | HashOp::Verify { password, .. } => wipe_string(password),
        }
    }
}

impl fmt::Debug for HashOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hand-written so that `{:?}` on a job can never leak a password into a log.
        const REDACTED: &str = "<redacted>";
        match self {
            HashOp::Hash { .. } => f.debug_struct("Hash").field("password", &REDACTED).finish(),
            HashOp::Verify { phc, .. } => f
                .debug_struct("Verify")
                .field("has_phc", &phc.is_some())
                .field("password", &REDACTED)
                .finish(),
        }
    }
}

/// One request for the pool, tagged with the ticket its answer is routed by.
#[derive(Debug)]
pub struct HashJob {
    pub ticket: Ticket,
    pub op: HashOp,
}

/// The result of a [`HashOp`].
#[derive(Debug)]
pub enum HashOutcome {
    /// The PHC string, or why hashing failed (never contains the password).
    Hashed(Result<String, String>),
    /// Whether the password matched.
    Verified(bool),
}

/// A completed job, sent back to the loop.
#[derive(Debug)]
pub struct HashDone {
    pub ticket: Ticket,
    pub outcome: HashOutcome,
}

// ---------------------------------------------------------------------------------------------
// The hashing work itself (runs on pool threads)
// ---------------------------------------------------------------------------------------------

/// Known to nobody's account: only hashed to make the dummy PHC, and a dummy verify always answers
/// false whatever it computes, so its value does not matter.
const DUMMY_PASSWORD: &str = "hubbub-dummy-password-for-absent-users";

/// argon2id with the pool's params, plus the dummy hash used for absent users.
struct Hasher {
    argon2: Argon2<'static>,
    dummy_phc: String,
}

impl Hasher {
    fn new(params: HashParams) -> Result<Hasher, String> {
        let argon2 = params.argon2()?;
        let dummy_phc = hash_with(&argon2, DUMMY_PASSWORD)?;
        Ok(Hasher { argon2, dummy_phc })
    }

    fn perform(&self, op: &HashOp) -> HashOutcome {
        match op {
            HashOp::Hash { password } => HashOutcome::Hashed(hash_with(&self.argon2, password)),
            HashOp::Verify { phc, password } => {
                HashOutcome::Verified(self.verify(phc.as_deref(), password))
            }
        }
    }

    fn verify(&self, phc: Option<&str>, password: &str) -> bool {
        match phc {
            Some(phc) => self.matches(phc, password),
            None => {
                // Spend the same time as a real verify so absent users are not revealed by timing.
                let _ = self.matches(&self.dummy_phc, password);
                false
            }
        }
    }

    /// Constant-time comparison is done by the argon2 crate's `verify_password`. Any hash that cannot
    /// be used counts as a mismatch: failing closed is the only safe answer.
    fn matches(&self, phc: &str, password: &str) -> bool {
        let parsed = match PasswordHash::new(phc) {
            Ok(parsed) => parsed,
            Err(e) => {
                // The stored hash is not logged either: it is offline-crackable material.
                log::warn!("stored password hash is malformed ({e}); treating as a mismatch");
                return false;
            }
        };
        match self.argon2.verify_password(password.as_bytes(), &parsed) {
            Ok(()) => true,
            Err(password_hash::Error::Password) => false,
            Err(e) => {
                log::warn!("stored password hash is unusable ({e}); treating as a mismatch");
                false
            }
        }
    }
}

/// Hashes with a fresh 16-byte salt from the OS. The salt is drawn with `try_fill_bytes` rather than
/// `SaltString::generate`, which panics if the OS RNG fails; here that becomes an error instead.
fn hash_with(argon2: &Argon2<'_>, password: &str) -> Result<String, String> {
    let mut raw = [0u8; Salt::RECOMMENDED_LENGTH];
    OsRng
        .try_fill_bytes(&mut raw)
        .map_err(|e| format!("OS random source failed: {e}"))?;
    let salt = SaltString::encode_b64(&raw).map_err(|e| format!("salt encoding failed: {e}"))?;
    argon2
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| format!("argon2 hashing failed: {e}"))
}

/// What each pool thread shares with the others and with the [`HashPool`] handle.
struct Worker {
    jobs: Arc<Mutex<Receiver<HashJob>>>,
    done: Sender<HashDone>,
    wake: Arc<dyn Fn() + Send + Sync>,
    hasher: Arc<Hasher>,
    depth: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
}

impl Worker {
    fn run(self) {
        while let Some(job) = self.next_job() {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            let HashJob { ticket, mut op } = job;
            if self.stopping.load(Ordering::Acquire) {
                // Shutting down: the loop is going away, so a queued job is dropped unanswered
                // rather than making shutdown wait for it.
                op.wipe();
                continue;
            }
            let outcome = self.perform_guarded(&op);
            op.wipe();
            if self.done.send(HashDone { ticket, outcome }).is_err() {
                return; // The loop dropped its receiver: nobody is left to answer.
            }
            (self.wake)();
        }
    }

    /// Blocks this pool thread (never the loop) until a job arrives; None once the pool is shut down.
    fn next_job(&self) -> Option<HashJob> {
        // Only `recv` runs under the lock, and it cannot panic, so poisoning carries no broken
        // state; recover from it rather than stranding the remaining threads.
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.recv().ok()
    }

    /// A panic must not leave a ticket unanswered (its client would wait forever) nor kill the thread.
    fn perform_guarded(&self, op: &HashOp) -> HashOutcome {
        panic::catch_unwind(AssertUnwindSafe(|| self.hasher.perform(op))).unwrap_or_else(|_| {
            log::error!("password hashing panicked; answering with a failure");
            match op {
                HashOp::Hash { .. } => HashOutcome::Hashed(Err("hashing panicked".to_string())),
                HashOp::Verify { .. } => HashOutcome::Verified(false),
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The pool
// ---------------------------------------------------------------------------------------------

/// A fixed set of threads doing argon2id work for the loop.
///
/// Threads share one bounded job channel (its receiver behind a mutex) and one completion channel.
/// The completion channel is unbounded, but it holds at most `queue_capacity + threads` answers
/// beyond what the loop has drained, since each answer comes from an accepted job.
pub struct HashPool {
    jobs: SyncSender<HashJob>,
    depth: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Hashing yields to everything else: where the hash threads share a core with the loop (a small box, or a
/// server pinned to one core) a login storm must not delay the loop's answers. At nice 19 a hash thread gets
/// the CPU whenever the loop is idle — which is most of the time — and is preempted the moment it is not.
/// On Linux nice is per thread, so this touches only the calling (hash) thread. Best effort: if the kernel
/// says no, hashing simply runs at normal priority.
fn lower_priority() {
    crate::lower_thread_priority(19);
}

impl HashPool {
    /// Starts `threads` threads named "hubbub-hash-N" (N from 0). Jobs queue in a bounded channel of
    /// `queue_capacity`. `wake` is called after each completion is sent (the loop passes a closure
    /// calling mio::Waker::wake).
    ///
    /// Computes the dummy hash for absent users on the calling thread (once, at boot), which also
    /// proves the params work before any client depends on them.
    pub fn start(
        threads: usize,
        queue_capacity: usize,
        params: HashParams,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<(HashPool, Receiver<HashDone>), String> {
        if threads == 0 {
            return Err("hash pool needs at least one thread".to_string());
        }
        if queue_capacity == 0 {
            return Err("hash pool queue capacity must be at least 1".to_string());
        }
        let hasher = Arc::new(Hasher::new(params)?);
        let (job_tx, job_rx) = mpsc::sync_channel(queue_capacity);
        let (done_tx, done_rx) = mpsc::channel();
        let mut pool = HashPool {
            jobs: job_tx,
            depth: Arc::new(AtomicUsize::new(0)),
            stopping: Arc::new(AtomicBool::new(false)),
            threads: Vec::with_capacity(threads),
        };
        let job_rx = Arc::new(Mutex::new(job_rx));
        for n in 0..threads {
            let worker = Worker {
                jobs: Arc::clone(&job_rx),
                done: done_tx.clone(),
                wake: Arc::clone(&wake),
                hasher: Arc::clone(&hasher),
                depth: Arc::clone(&pool.depth),
                stopping: Arc::clone(&pool.stopping),
            };
            let spawned = thread::Builder::new()
                .name(format!("hubbub-hash-{n}"))
                .spawn(move || {
                    lower_priority();
                    worker.run()
                });
            match spawned {
                Ok(handle) => pool.threads.push(handle),
                Err(e) => {
                    pool.shutdown();
                    return Err(format!("cannot spawn hash thread {n}: {e}"));
                }
            }
        }
        Ok((pool, done_rx))
    }

    /// Never blocks. Err(job) when the queue is full (the loop answers "server busy, try again") or
    /// the pool is gone.
    pub fn try_submit(&self, job: HashJob) -> Result<(), HashJob> {
        // Count before sending so a thread's decrement after `recv` can never run first and wrap.
        self.depth.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                Err(job)
            }
        }
    }

    /// Jobs waiting (not yet picked by a thread), for stats.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Drops the job sender and joins the threads. Each finishes (and answers) its current job; jobs
    /// still queued are dropped unanswered, their passwords wiped. Blocks until the threads exit, so
    /// call it at teardown, not from a running loop.
    pub fn shutdown(self) {
        let HashPool {
            jobs,
            stopping,
            threads,
            ..
        } = self;
        stopping.store(true, Ordering::Release);
        drop(jobs);
        for handle in threads {
            if handle.join().is_err() {
                log::error!("a hash thread panicked before shutdown");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Login throttling
// ---------------------------------------------------------------------------------------------

/// Per-key throttling state.
#[derive(Clone, Debug)]
struct Entry {
    /// Failures counted since `window_start`.
    failures: u32,
    /// Time of the first failure in the current counting window.
    window_start: Instant,
    /// End of the latest lockout; `Some` once the key has been locked out at least once.
    locked_until: Option<Instant>,
    /// Lockouts imposed so far; the n-th lasts base_delay × 2^(n-1), capped.
    lockouts: u32,
    /// Insertion stamp, matching this entry with its place in `Throttle::order`.
    seq: u64,
}

impl Entry {
    /// When the key may be forgotten. Before any lockout: when its counting window ends. After one:
    /// a full `window` after the lockout ends, so a failure soon after a lockout escalates it
    /// instead of granting a fresh set of attempts.
    fn expires_at(&self, window: Duration) -> Instant {
        let from = self.locked_until.unwrap_or(self.window_start);
        later(from, window)
    }

    fn is_expired(&self, now: Instant, window: Duration) -> bool {
        now >= self.expires_at(window)
    }
}

/// `at + d`, saturating instead of panicking on overflow (durations are clamped in
/// [`Throttle::new`], so this never saturates in practice).
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d).unwrap_or(at)
}

/// Longest window or delay a [`Throttle`] accepts; larger values are clamped to it so that adding
/// them to an `Instant` can never overflow.
pub const THROTTLE_MAX_SPAN: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Login throttling, owned by the loop (plain data, no threads, no clock of its own: callers pass
/// `now`).
///
/// After `max_failures` failed attempts for a key inside `window`, further attempts are refused
/// until a lockout ends; each further failure while locked or after doubles the lockout
/// (base_delay, 2×, 4×… capped at max_delay). A locked key is remembered for `window` after its
/// lockout ends. A success clears the key. The map holds at most `max_keys` entries: when full,
/// expired entries are pruned, and if still full the oldest entry is evicted — memory stays bounded
/// under a flood of distinct names.
#[derive(Debug)]
pub struct Throttle<K: Hash + Eq + Clone> {
    max_failures: u32,
    window: Duration,
    base_delay: Duration,
    max_delay: Duration,
    max_keys: usize,
    entries: HashMap<K, Entry>,
    /// Keys in insertion order (oldest first), for O(1) eviction. Items whose stamp no longer
    /// matches the live entry are stale and skipped; the queue is compacted when they pile up.
    order: VecDeque<(K, u64)>,
    next_seq: u64,
    /// No entry expires before this, so a prune before it would find nothing and is skipped.
    /// Valid because a live entry's expiry only ever moves later.
    earliest_expiry: Option<Instant>,
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    /// `max_failures` and `max_keys` below 1 are treated as 1; durations above
    /// [`THROTTLE_MAX_SPAN`] are clamped. If `max_delay` is below `base_delay`, the cap wins.
    pub fn new(
        max_failures: u32,
        window: Duration,
        base_delay: Duration,
        max_delay: Duration,
        max_keys: usize,
    ) -> Self {
        Throttle {
            max_failures: max_failures.max(1),
            window: window.min(THROTTLE_MAX_SPAN),
            base_delay: base_delay.min(THROTTLE_MAX_SPAN),
            max_delay: max_delay.min(THROTTLE_MAX_SPAN),
            max_keys: max_keys.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            earliest_expiry: None,
        }
    }

    /// Ok(()) if an attempt may proceed; Err(retry_after) if the key is locked out.
    pub fn check(&mut self, key: &K, now: Instant) -> Result<(), Duration> {
        let Some(entry) = self.entries.get(key) else {
            return Ok(());
        };
        if entry.is_expired(now, self.window) {
            self.entries.remove(key);
            return Ok(());
        }
        match entry.locked_until {
            Some(until) if now < until => Err(until.saturating_duration_since(now)),
            _ => Ok(()),
        }
    }

    /// Counts a failed attempt; locks the key out at the `max_failures`-th failure in the window,
    /// and doubles the lockout on every failure after that until the key is forgotten.
    pub fn record_failure(&mut self, key: K, now: Instant) {
        let window = self.window;
        let live = self
            .entries
            .get(&key)
            .is_some_and(|entry| !entry.is_expired(now, window));
        if !live {
            self.insert_fresh(key.clone(), now);
        }
        let Some(entry) = self.entries.get_mut(&key) else {
            return; // Unreachable: the key was just inserted if it was missing.
        };
        entry.failures = entry.failures.saturating_add(1);
        if entry.lockouts > 0 || entry.failures >= self.max_failures {
            entry.lockouts = entry.lockouts.saturating_add(1);
            let lockout = lockout_for(self.base_delay, self.max_delay, entry.lockouts);
            entry.locked_until = Some(later(now, lockout));
        }
        let expiry = entry.expires_at(window);
        self.note_expiry(expiry);
    }

    /// A successful login forgets everything about the key.
    pub fn record_success(&mut self, key: &K) {
        // Its stamp in `order` becomes stale and is skipped later.
        self.entries.remove(key);
    }

    /// Forget entries whose window and lockout have both passed. O(len), but skipped outright while
    /// no entry can have expired yet.
    pub fn prune(&mut self, now: Instant) {
        match self.earliest_expiry {
            Some(earliest) if now >= earliest => {}
            _ => return,
        }
        let window = self.window;
        self.entries
            .retain(|_, entry| !entry.is_expired(now, window));
        self.earliest_expiry = self
            .entries
            .values()
            .map(|entry| entry.expires_at(window))
            .min();
    }

    /// Number of keys currently tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Starts a new entry for `key` (replacing an expired one), making room first if the map is full.
    fn insert_fresh(&mut self, key: K, now: Instant) {
        if !self.entries.contains_key(&key) {
            self.make_room(now);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let entry = Entry {
            failures: 0,
            window_start: now,
            locked_until: None,
            lockouts: 0,
            seq,
        };
        self.entries.insert(key.clone(), entry);
        self.order.push_back((key, seq));
        self.compact_order_if_stale();
    }

    /// Ensures there is space for one more key: prune expired entries, then evict the oldest.
    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < self.max_keys {
            return;
        }
        self.prune(now);
        while self.entries.len() >= self.max_keys {
            if !self.evict_oldest() {
                break; // `order` ran dry; cannot happen while every entry has an order item.
            }
        }
    }

    /// Removes the oldest live entry; false if there was none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((key, seq)) = self.order.pop_front() {
            if self.entries.get(&key).is_some_and(|entry| entry.seq == seq) {
                self.entries.remove(&key);
                return true;
            }
        }
        false
    }

    /// Drops stale order items once they outnumber live ones, keeping `order` O(len) in size.
    /// Each compaction removes at least as many items as it keeps, so its cost is amortised O(1).
    fn compact_order_if_stale(&mut self) {
        if self.order.len() <= 2 * self.entries.len() + 16 {
            return;
        }
        let entries = &self.entries;
        self.order
            .retain(|(key, seq)| entries.get(key).is_some_and(|entry| entry.seq == *seq));
    }

    fn note_expiry(&mut self, expiry: Instant) {
        self.earliest_expiry = Some(match self.earliest_expiry {
            Some(earliest) => earliest.min(expiry),
            None => expiry,
        });
    }
}

/// Length of the `lockouts`-th lockout: base × 2^(lockouts−1), capped at `max`.
fn lockout_for(base: Duration, max: Duration, lockouts: u32) -> Duration {
    let doublings = lockouts.saturating_sub(1).min(31);
    base.checked_mul(1u32 << doublings)
        .map_or(max, |delay| delay.min(max))
}

impl std::fmt::Debug for HashPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashPool")
            .field("queue_depth", &self.queue_depth())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::mpsc::TryRecvError;

    const PASSWORD: &str = "correct horse battery";
    const TIMEOUT: Duration = Duration::from_secs(30);

    fn ticket(request_id: u32) -> Ticket {
        Ticket {
            session: 1,
            slot: 0,
            request_id,
        }
    }

    fn hash_job(request_id: u32, password: &str) -> HashJob {
        HashJob {
            ticket: ticket(request_id),
            op: HashOp::Hash {
                password: password.to_string(),
            },
        }
    }

    fn verify_job(request_id: u32, phc: Option<&str>, password: &str) -> HashJob {
        HashJob {
            ticket: ticket(request_id),
            op: HashOp::Verify {
                phc: phc.map(str::to_string),
                password: password.to_string(),
            },
        }
    }

    fn no_wake() -> Arc<dyn Fn() + Send + Sync> {
        Arc::new(|| {})
    }

    fn test_pool(threads: usize) -> (HashPool, Receiver<HashDone>) {
        HashPool::start(threads, 16, HashParams::TEST, no_wake()).unwrap()
    }

    /// Submits one job and waits for its completion.
    fn run(pool: &HashPool, done: &Receiver<HashDone>, job: HashJob) -> HashDone {
        let expected = job.ticket;
        pool.try_submit(job).unwrap();
        let answer = done.recv_timeout(TIMEOUT).unwrap();
        assert_eq!(answer.ticket, expected);
        answer
    }

    fn hash(pool: &HashPool, done: &Receiver<HashDone>, password: &str) -> String {
        match run(pool, done, hash_job(1, password)).outcome {
            HashOutcome::Hashed(Ok(phc)) => phc,
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    fn verify(pool: &HashPool, done: &Receiver<HashDone>, phc: Option<&str>, pw: &str) -> bool {
        match run(pool, done, verify_job(2, phc, pw)).outcome {
            HashOutcome::Verified(ok) => ok,
            other => panic!("unexpected outcome {other:?}"),
        }
    }

    // --- username rules ---

    #[test]
    fn username_length_edges() {
        assert_eq!(canonical_username("ab"), Err(RuleError::InvalidUsername));
        assert_eq!(canonical_username("abc").as_deref(), Ok("abc"));
        let max = "a".repeat(USERNAME_MAX);
        assert_eq!(canonical_username(&max), Ok(max.clone()));
        let over = "a".repeat(USERNAME_MAX + 1);
        assert_eq!(canonical_username(&over), Err(RuleError::InvalidUsername));
        assert_eq!(canonical_username(""), Err(RuleError::InvalidUsername));
    }

    #[test]
    fn username_accepts_each_allowed_char() {
        for c in "abcdefghijklmnopqrstuvwxyz0123456789_.-".chars() {
            let name = format!("ab{c}");
            assert_eq!(canonical_username(&name), Ok(name.clone()), "char {c:?}");
        }
    }

    #[test]
    fn username_folds_uppercase() {
        for c in 'A'..='Z' {
            let name = format!("x{c}y");
            let folded = format!("x{}y", c.to_ascii_lowercase());
            assert_eq!(canonical_username(&name), Ok(folded));
        }
        assert_eq!(
            canonical_username("Alice.B-2_").as_deref(),
            Ok("alice.b-2_")
        );
    }

    #[test]
    fn username_refuses_other_chars() {
        for bad in [
            "ab c",
            "abc ",
            "ab/c",
            "ab\0c",
            "ab\nc",
            "ab\tc",
            "añb",
            "ab€",
            "ｆoo",
            "ab@c",
            "ab:c",
            "ab\u{7f}c",
            "ab+c",
        ] {
            assert_eq!(
                canonical_username(bad),
                Err(RuleError::InvalidUsername),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn username_multibyte_within_length_is_refused() {
        // Three characters but six bytes: must fail on the character set, not sneak through.
        assert_eq!(canonical_username("ééé"), Err(RuleError::InvalidUsername));
    }

    // --- password rules ---

    #[test]
    fn password_length_edges() {
        let len = |n| "p".repeat(n);
        assert_eq!(check_password(&len(7)), Err(RuleError::InvalidPassword));
        assert_eq!(check_password(&len(8)), Ok(()));
        assert_eq!(check_password(&len(1024)), Ok(()));
        assert_eq!(check_password(&len(1025)), Err(RuleError::InvalidPassword));
        assert_eq!(check_password(""), Err(RuleError::InvalidPassword));
    }

    #[test]
    fn password_length_counts_utf8_bytes() {
        assert_eq!(check_password("ééé"), Err(RuleError::InvalidPassword)); // 6 bytes
        assert_eq!(check_password("éééé"), Ok(())); // 4 chars, 8 bytes
        assert_eq!(
            check_password(&"é".repeat(513)), // 513 chars, 1026 bytes
            Err(RuleError::InvalidPassword)
        );
    }

    #[test]
    fn wipe_string_empties_the_secret() {
        let mut secret = String::with_capacity(64);
        secret.push_str("hunter2hunter2");
        wipe_string(&mut secret);
        assert!(secret.is_empty());
        let mut op = HashOp::Verify {
            phc: None,
            password: "hunter2hunter2".to_string(),
        };
        op.wipe();
        assert!(matches!(op, HashOp::Verify { password, .. } if password.is_empty()));
    }

    #[test]
    fn debug_never_shows_passwords() {
        let rendered = format!(
            "{:?} {:?}",
            hash_job(1, "sup3r-secret"),
            verify_job(2, Some("$argon2id$x"), "sup3r-secret")
        );
        assert!(!rendered.contains("sup3r-secret"), "{rendered}");
        assert!(rendered.contains("<redacted>"));
    }

    // --- params ---

    #[test]
    fn params_validate() {
        assert_eq!(HashParams::PRODUCTION.validate(), Ok(()));
        assert_eq!(HashParams::TEST.validate(), Ok(()));
        let too_little_memory = HashParams {
            memory_kib: 1,
            ..HashParams::TEST
        };
        assert!(too_little_memory.validate().is_err());
        let no_iterations = HashParams {
            iterations: 0,
            ..HashParams::TEST
        };
        assert!(no_iterations.validate().is_err());
    }

    #[test]
    fn start_refuses_bad_configuration() {
        let bad = HashParams {
            memory_kib: 1,
            ..HashParams::TEST
        };
        assert!(HashPool::start(1, 4, bad, no_wake()).is_err());
        assert!(HashPool::start(0, 4, HashParams::TEST, no_wake()).is_err());
        assert!(HashPool::start(1, 0, HashParams::TEST, no_wake()).is_err());
    }

    // --- the pool ---

    #[test]
    fn hash_then_verify() {
        let (pool, done) = test_pool(2);
        let phc = hash(&pool, &done, PASSWORD);
        assert!(phc.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{phc}");
        assert!(verify(&pool, &done, Some(&phc), PASSWORD));
        assert!(!verify(&pool, &done, Some(&phc), "correct horse battery!"));
        assert!(!verify(&pool, &done, Some(&phc), ""));
        pool.shutdown();
    }

    #[test]
    fn hashes_of_same_password_differ() {
        let (pool, done) = test_pool(1);
        let first = hash(&pool, &done, PASSWORD);
        let second = hash(&pool, &done, PASSWORD);
        assert_ne!(first, second);
        assert!(verify(&pool, &done, Some(&first), PASSWORD));
        assert!(verify(&pool, &done, Some(&second), PASSWORD));
        pool.shutdown();
    }

    #[test]
    fn verify_absent_user_is_false() {
        let (pool, done) = test_pool(1);
        assert!(!verify(&pool, &done, None, PASSWORD));
        // Even the dummy's own password cannot log in as an absent user.
        assert!(!verify(&pool, &done, None, DUMMY_PASSWORD));
        pool.shutdown();
    }

    #[test]
    fn verify_malformed_phc_is_false() {
        let (pool, done) = test_pool(1);
        for phc in [
            "",
            "not a phc string",
            "$argon2id$v=19$m=8,t=1,p=1$",
            "$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$!!!",
            "$pbkdf2-sha256$i=1000$c29tZXNhbHQ$aGFzaGhhc2hoYXNo",
        ] {
            assert!(!verify(&pool, &done, Some(phc), PASSWORD), "{phc:?}");
        }
        pool.shutdown();
    }

    #[test]
    fn verify_accepts_hash_made_with_other_params() {
        // Stored hashes carry their own params, so raising the cost later keeps old accounts working.
        let (old_pool, old_done) = test_pool(1);
        let phc = hash(&old_pool, &old_done, PASSWORD);
        old_pool.shutdown();
        let heavier = HashParams {
            memory_kib: 16,
            iterations: 2,
            parallelism: 1,
        };
        let (pool, done) = HashPool::start(1, 4, heavier, no_wake()).unwrap();
        assert!(verify(&pool, &done, Some(&phc), PASSWORD));
        pool.shutdown();
    }

    /// A wake callback that reports each call (with the calling thread's name) and then blocks until
    /// released, which parks the (single) pool thread at a known point.
    struct Gate {
        wake: Arc<dyn Fn() + Send + Sync>,
        entered: Receiver<Option<String>>,
        release: SyncSender<()>,
    }

    fn gated_wake() -> Gate {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::sync_channel::<()>(16);
        let entered_tx = Mutex::new(entered_tx);
        let release_rx = Mutex::new(release_rx);
        let wake = move || {
            let name = thread::current().name().map(str::to_string);
            let _ = entered_tx.lock().unwrap().send(name);
            let _ = release_rx.lock().unwrap().recv_timeout(TIMEOUT);
        };
        Gate {
            wake: Arc::new(wake),
            entered,
            release,
        }
    }

    #[test]
    fn full_queue_hands_the_job_back() {
        let Gate {
            wake,
            entered,
            release,
        } = gated_wake();
        let (pool, done) = HashPool::start(1, 1, HashParams::TEST, wake).unwrap();

        // Job 1 is picked up and the thread parks in `wake`, after sending its answer.
        pool.try_submit(hash_job(1, PASSWORD)).unwrap();
        let thread_name = entered.recv_timeout(TIMEOUT).unwrap();
        assert_eq!(thread_name.as_deref(), Some("hubbub-hash-0"));
        assert_eq!(pool.queue_depth(), 0);

        // Job 2 fills the one queue slot; job 3 is refused and returned intact.
        pool.try_submit(hash_job(2, PASSWORD)).unwrap();
        assert_eq!(pool.queue_depth(), 1);
        let refused = pool
            .try_submit(verify_job(3, None, "given back"))
            .unwrap_err();
        assert_eq!(refused.ticket, ticket(3));
        assert!(
            matches!(refused.op, HashOp::Verify { ref password, .. } if password == "given back")
        );
        assert_eq!(pool.queue_depth(), 1);

        // Once released, the queued job completes and there is room again.
        release.send(()).unwrap();
        entered.recv_timeout(TIMEOUT).unwrap();
        assert_eq!(pool.queue_depth(), 0);
        let answered: Vec<u32> = (0..2)
            .map(|_| done.recv_timeout(TIMEOUT).unwrap().ticket.request_id)
            .collect();
        assert_eq!(answered, vec![1, 2]);
        release.send(()).unwrap();
        pool.try_submit(refused).unwrap();
        release.send(()).unwrap();
        let last = done.recv_timeout(TIMEOUT).unwrap();
        assert!(matches!(last.outcome, HashOutcome::Verified(false)));
        pool.shutdown();
    }

    #[test]
    fn wake_follows_each_completion() {
        let Gate {
            wake,
            entered,
            release,
        } = gated_wake();
        let (pool, done) = HashPool::start(1, 4, HashParams::TEST, wake).unwrap();
        pool.try_submit(hash_job(7, PASSWORD)).unwrap();
        entered.recv_timeout(TIMEOUT).unwrap();
        // The answer is already in the channel when the loop is woken.
        assert_eq!(done.try_recv().unwrap().ticket, ticket(7));
        release.send(()).unwrap();
        pool.shutdown();
    }

    #[test]
    fn shutdown_joins_threads() {
        let Gate {
            wake,
            entered,
            release,
        } = gated_wake();
        let (pool, done) = HashPool::start(1, 4, HashParams::TEST, wake).unwrap();
        pool.try_submit(hash_job(1, PASSWORD)).unwrap();
        entered.recv_timeout(TIMEOUT).unwrap();
        let releaser = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            release.send(()).unwrap();
        });
        // The thread is parked in `wake`; shutdown must wait for it, after which every completion
        // sender is gone and the channel reports Disconnected rather than Empty.
        pool.shutdown();
        assert_eq!(done.try_recv().unwrap().ticket, ticket(1));
        assert_eq!(done.try_recv().unwrap_err(), TryRecvError::Disconnected);
        releaser.join().unwrap();
    }

    #[test]
    fn shutdown_with_idle_threads_returns() {
        let (pool, done) = test_pool(3);
        pool.shutdown();
        assert_eq!(done.try_recv().unwrap_err(), TryRecvError::Disconnected);
    }

    #[test]
    fn pool_threads_exit_when_loop_drops_receiver() {
        let (pool, done) = test_pool(1);
        drop(done);
        // The job is accepted, its answer cannot be delivered, and the thread exits; later
        // submissions are handed back instead of queueing forever.
        pool.try_submit(hash_job(1, PASSWORD)).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match pool.try_submit(hash_job(2, PASSWORD)) {
                Err(_) => break,
                Ok(()) => assert!(Instant::now() < deadline, "pool never went away"),
            }
            thread::sleep(Duration::from_millis(5));
        }
        pool.shutdown();
    }

    // --- throttle ---

    const SEC: Duration = Duration::from_secs(1);

    fn throttle(max_keys: usize) -> Throttle<String> {
        // 5 failures per 60 s; lockouts of 1 s, 2 s, 4 s… capped at 8 s.
        Throttle::new(5, 60 * SEC, SEC, 8 * SEC, max_keys)
    }

    fn fail(t: &mut Throttle<String>, key: &str, now: Instant, times: u32) {
        for _ in 0..times {
            t.record_failure(key.to_string(), now);
        }
    }

    #[test]
    fn throttle_locks_after_max_failures() {
        let mut t = throttle(100);
        let t0 = Instant::now();
        let key = "alice".to_string();
        fail(&mut t, "alice", t0, 4);
        assert_eq!(t.check(&key, t0), Ok(()));
        fail(&mut t, "alice", t0, 1);
        assert_eq!(t.check(&key, t0), Err(SEC));
        assert_eq!(t.check(&key, t0 + SEC / 4), Err(SEC * 3 / 4));
        assert_eq!(t.check(&key, t0 + SEC), Ok(()));
        // Other keys are unaffected.
        assert_eq!(t.check(&"bob".to_string(), t0), Ok(()));
    }

    #[test]
    fn throttle_lockout_doubles_and_caps() {
        let mut t = throttle(100);
        let t0 = Instant::now();
        let key = "alice".to_string();
        fail(&mut t, "alice", t0, 5);
        let mut seen = vec![t.check(&key, t0).unwrap_err()];
        for _ in 0..4 {
            fail(&mut t, "alice", t0, 1);
            seen.push(t.check(&key, t0).unwrap_err());
        }
        assert_eq!(seen, vec![SEC, 2 * SEC, 4 * SEC, 8 * SEC, 8 * SEC]);
    }

    #[test]
    fn throttle_failure_after_lockout_escalates() {
        let mut t = throttle(100);
        let t0 = Instant::now();
        let key = "alice".to_string();
        fail(&mut t, "alice", t0, 5);
        let after = t0 + 2 * SEC; // lockout over, but still remembered
        assert_eq!(t.check(&key, after), Ok(()));
        fail(&mut t, "alice", after, 1);
        assert_eq!(t.check(&key, after), Err(2 * SEC));
    }

    #[test]
    fn throttle_success_clears() {
        let mut t = throttle(100);
        let t0 = Instant::now();
        let key = "alice".to_string();
        fail(&mut t, "alice", t0, 6);
        assert!(t.check(&key, t0).is_err());
        t.record_success(&key);
        assert!(t.is_empty());
        assert_eq!(t.check(&key, t0), Ok(()));
        // A fresh count: four more failures do not lock.
        fail(&mut t, "alice", t0, 4);
        assert_eq!(t.check(&key, t0), Ok(()));
    }

    #[test]
    fn throttle_window_expiry_resets_count() {
        let mut t = throttle(100);
        let t0 = Instant::now();
        let key = "alice".to_string();
        fail(&mut t, "alice", t0, 4);
        let t1 = t0 + 60 * SEC;
        fail(&mut t, "alice", t1, 4);
        assert_eq!(t.check(&key, t1), Ok(()), "old failures must not count");
        fail(&mut t, "alice", t1, 1);
        assert_eq!(t.check(&key, t1), Err(SEC));
    }

    #[test]
    fn throttle_forgets_lockout_after_window() {
        let mut t = throttle(100);
        let t0 = Instant::now();
        let key = "alice".to_string();
        fail(&mut t, "alice", t0, 5);
        // Lockout ends at t0+1s; remembered until a window after that.
        t.prune(t0 + 60 * SEC);
        assert_eq!(t.len(), 1);
        let t1 = t0 + 61 * SEC;
        t.prune(t1);
        assert!(t.is_empty());
        fail(&mut t, "alice", t1, 1);
        assert_eq!(
            t.check(&key, t1),
            Ok(()),
            "no escalation after being forgotten"
        );
    }

    #[test]
    fn throttle_prune_keeps_live_entries() {
        let mut t = throttle(100);
        let t0 = Instant::now();
        fail(&mut t, "early", t0, 1);
        fail(&mut t, "late", t0 + 30 * SEC, 1);
        t.prune(t0 + 59 * SEC);
        assert_eq!(t.len(), 2);
        t.prune(t0 + 60 * SEC);
        assert_eq!(t.len(), 1);
        t.prune(t0 + 90 * SEC);
        assert!(t.is_empty());
    }

    #[test]
    fn throttle_prunes_expired_before_evicting_live() {
        let mut t = throttle(2);
        let t0 = Instant::now();
        fail(&mut t, "oldest", t0, 5); // locked: remembered until t0+61s
        fail(&mut t, "expiring", t0 + SEC / 2, 1); // forgotten at t0+60.5s
        let t1 = t0 + 61 * SEC - SEC / 4;
        fail(&mut t, "newcomer", t1, 1);
        assert_eq!(t.len(), 2);
        // "oldest" survived (only the expired entry made room), so a failure escalates it.
        fail(&mut t, "oldest", t1, 1);
        assert_eq!(t.check(&"oldest".to_string(), t1), Err(2 * SEC));
    }

    #[test]
    fn throttle_evicts_oldest_when_full_of_live_entries() {
        let mut t = throttle(2);
        let t0 = Instant::now();
        fail(&mut t, "a", t0, 5);
        fail(&mut t, "b", t0, 5);
        fail(&mut t, "c", t0, 5);
        assert_eq!(t.len(), 2);
        assert_eq!(t.check(&"a".to_string(), t0), Ok(()), "oldest was evicted");
        assert!(t.check(&"b".to_string(), t0).is_err());
        assert!(t.check(&"c".to_string(), t0).is_err());
    }

    #[test]
    fn throttle_bounded_under_flood_of_distinct_keys() {
        let mut t = throttle(100);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            t.record_failure(format!("user{i}"), now);
            assert!(t.len() <= 100);
        }
        assert_eq!(t.len(), 100);
        // The eviction queue stays bounded too, not just the map.
        assert!(t.order.len() <= 2 * 100 + 16 + 1);
    }

    #[test]
    fn throttle_order_queue_bounded_under_churn() {
        let mut t = throttle(10);
        let now = Instant::now();
        for i in 0..10_000u32 {
            let key = format!("user{}", i % 3);
            t.record_failure(key.clone(), now);
            t.record_success(&key);
        }
        assert!(t.is_empty());
        assert!(t.order.len() <= 2 * 10 + 16 + 1);
    }

    #[test]
    fn throttle_clamps_degenerate_settings() {
        let mut t: Throttle<u32> = Throttle::new(0, Duration::MAX, Duration::MAX, Duration::MAX, 0);
        let now = Instant::now();
        t.record_failure(1, now);
        assert_eq!(t.check(&1, now), Err(THROTTLE_MAX_SPAN));
        t.record_failure(1, now); // escalation must not overflow
        assert_eq!(t.check(&1, now), Err(THROTTLE_MAX_SPAN));
        t.record_failure(2, now);
        assert_eq!(t.len(), 1);
    }

    proptest! {
        #[test]
        fn prop_canonical_username_is_valid_and_idempotent(name in "\\PC{0,40}") {
            if let Ok(canon) = canonical_username(&name) {
                prop_assert!((USERNAME_MIN..=USERNAME_MAX).contains(&canon.len()));
                prop_assert!(canon.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-')));
                prop_assert_eq!(canonical_username(&canon), Ok(canon.clone()));
                prop_assert!(canon.eq_ignore_ascii_case(&name));
            }
        }

        #[test]
        fn prop_throttle_never_exceeds_max_keys(
            ops in proptest::collection::vec((0u8..3, 0u16..64, 0u64..2_000), 0..400),
            max_keys in 1usize..16,
        ) {
            let mut t: Throttle<u16> = Throttle::new(3, 10 * SEC, SEC, 8 * SEC, max_keys);
            let t0 = Instant::now();
            let mut now = t0;
            for (op, key, step_ms) in ops {
                now += Duration::from_millis(step_ms);
                match op {
                    0 => t.record_failure(key, now),
                    1 => t.record_success(&key),
                    _ => { let _ = t.check(&key, now); }
                }
                prop_assert!(t.len() <= max_keys);
                if let Err(wait) = t.check(&key, now) {
                    prop_assert!(wait > Duration::ZERO && wait <= 8 * SEC);
                }
            }
        }
    }
}
