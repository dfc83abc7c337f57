//! The reactor: one thread, one `mio::Poll`, every client session. Read this file top to bottom.
//!
//! Owns: the loop and its phases, the listener, the slab of sessions, the timers, the hub, and the ends of the
//! channels to the workers (the store thread and the hashing pool). Every turn of the loop runs the same phases:
//!
//! ```text
//!   poll ─► dispatch events ─► drain worker completions ─► finish unfinished reads ─► fire timers
//!        ─► flush output ─► reap closed sessions ─► (poll again, with the timeout of the next timer)
//! ```
//!
//! Must not: block. No SQLite call, no password hash, no blocking socket call ever runs on this thread; they go
//! to workers as jobs, and their answers come back as completions through a channel and the `Waker`. One
//! session's error never leaves this file as an error: it closes that session through `disconnect` and the loop
//! goes on.
//!
//! What a request *means* is in `requests.rs`; what a worker's answer means is in `completions.rs`.

mod completions;
mod messages;
mod requests;
mod rooms;
mod stats;

use crate::auth::{HashDone, HashPool, Throttle};
use crate::config::Config;
use crate::framing::{split_frame, FrameError};
use crate::hub::{Hub, SessionRef};
use crate::protocol::{code, is_request_kind, Packet};
use crate::session::{CloseReason, Identity, IoStatus, PendingAuth, Session, State};
use crate::store::{self, StoreConfig, StoreHandle};
use log::{debug, info, trace, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The listening socket's token.
const LISTENER: Token = Token(0);
/// The token the workers' `Waker` fires with.
const WAKER: Token = Token(1);
/// Sessions are `Token(FIRST_SESSION + slot)`: the low tokens are reserved for the two above.
const FIRST_SESSION: usize = 2;

/// Bytes read from a socket at once, into the loop's one scratch buffer.
const READ_CHUNK: usize = 64 * 1024;
/// Reads one session may do in one turn before the loop serves the others (fairness; it comes back next turn).
const READS_PER_TURN: usize = 4;
/// Bytes one session may write in one turn (Redis uses 64 KiB per event for the same reason).
const WRITE_BUDGET_PER_TURN: usize = 256 * 1024;
/// How long the loop sleeps when nothing is scheduled: only a cap, events wake it sooner.
const MAX_POLL_WAIT: Duration = Duration::from_secs(1);
/// Input a closing session may still have in the kernel that we read and discard, so that closing the socket
/// sends FIN (and our Error frame arrives) rather than a reset that could destroy it.
const DISCARD_ON_CLOSE: usize = 256 * 1024;

fn token_of(slot: usize) -> Token {
    Token(slot + FIRST_SESSION)
}

fn slot_of(token: Token) -> Option<usize> {
    token.0.checked_sub(FIRST_SESSION)
}

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    Config(String),
    Bind(SocketAddr, io::Error),
    Store(store::StoreError),
    Hash(String),
    Io(io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "bad configuration: {e}"),
            StartError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            StartError::Store(e) => write!(f, "cannot open the database: {e}"),
            StartError::Hash(e) => write!(f, "cannot start the password hashing pool: {e}"),
            StartError::Io(e) => write!(f, "cannot start the event loop: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Binds the listening socket with our own backlog. (mio's and std's `bind` listen with 128: a burst of
/// connections — a classroom logging in at once, a reconnect after a restart — overflows that while the one
/// loop thread accepts, and the kernel drops the excess, which clients only retry after a second or more.)
fn bind_listener(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    // A restarted server can bind while connections of the old one linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Reads the open rooms and their members into a new hub, so routing a room message needs no database read
/// per member. This is the one time the loop's thread waits for the store: before it serves anyone.
fn load_rooms(store: &StoreHandle, done: &Receiver<store::Done>) -> Result<Hub, StartError> {
    let failed = |e: String| StartError::Io(io::Error::other(format!("loading rooms: {e}")));
    store
        .try_submit(store::Job {
            ticket: LOOP_TICKET,
            op: store::Op::LoadRooms,
        })
        .map_err(|_| failed("the store did not take the job".into()))?;
    let answer = done
        .recv_timeout(Duration::from_secs(60))
        .map_err(|e| failed(e.to_string()))?;
    let store::Outcome::Rooms(rooms) = answer.outcome else {
        return Err(failed(format!("unexpected answer {:?}", answer.outcome)));
    };
    let mut hub = Hub::default();
    for (room, members) in rooms {
        hub.add_room(room.room_id, &room.name, members);
    }
    Ok(hub)
}

/// Stops a running server from any thread: sets a flag and wakes the loop, which then shuts down gracefully.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    requested: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            warn!("could not wake the loop for shutdown: {e}");
        }
    }
}

/// A hubbub server, bound and ready to run. Embed it with `Server::bind(config)?.spawn()`.
pub struct Server {
    reactor: Reactor,
}

/// A server running on a thread of its own.
#[derive(Debug)]
pub struct RunningServer {
    pub addr: SocketAddr,
    pub handle: ShutdownHandle,
    thread: JoinHandle<io::Result<()>>,
}

impl RunningServer {
    /// Asks the server to stop and waits until it has.
    pub fn shutdown(self) -> io::Result<()> {
        self.handle.shutdown();
        self.thread
            .join()
            .map_err(|_| io::Error::other("the server thread panicked"))?
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.reactor.local_addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the listener, opens (and migrates) the database and starts the workers. Nothing is served until
    /// `run`, but every startup error is reported here.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        config.validate().map_err(StartError::Config)?;
        let poll = Poll::new().map_err(StartError::Io)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(StartError::Io)?);
        let mut listener = bind_listener(config.listen, config.listen_backlog)
            .map_err(|e| StartError::Bind(config.listen, e))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(StartError::Io)?;

        let wake = {
            let waker = Arc::clone(&waker);
            Arc::new(move || {
                let _ = waker.wake();
            }) as Arc<dyn Fn() + Send + Sync>
        };
        let store_config = StoreConfig {
            path: config.db.clone(),
            sync: config.sync,
            queue_capacity: config.store_queue,
            max_batch: config.commit_batch,
            index: config.index,
        };
        let (store, store_done) =
            StoreHandle::start(store_config, Arc::clone(&wake)).map_err(StartError::Store)?;
        let started = HashPool::start(
            config.hash_threads,
            config.hash_queue,
            config.hash_params,
            wake,
        )
        .map_err(StartError::Hash)
        .and_then(|hashing| Ok((hashing, load_rooms(&store, &store_done)?)));
        let ((hasher, hash_done), hub) = match started {
            Ok(started) => started,
            Err(e) => {
                // Joined, not just dropped: the database is let go of before the caller may try again.
                store.join();
                return Err(e);
            }
        };
        let now = Instant::now();
        let reactor = Reactor {
            poll,
            events: Events::with_capacity(1024),
            local_addr: listener.local_addr().map_err(StartError::Io)?,
            listener: Some(listener),
            accept_pending: false,
            sessions: Slab::new(),
            next_session_id: 1,
            per_ip: HashMap::new(),
            hub,
            timers: BinaryHeap::new(),
            store: Some(store),
            store_done,
            store_backlog: VecDeque::new(),
            hasher: Some(hasher),
            hash_done,
            name_throttle: Throttle::new(
                config.login_max_failures,
                config.login_window,
                config.login_lockout,
                config.login_lockout_max,
                config.throttle_entries,
            ),
            addr_throttle: Throttle::new(
                config.login_max_failures,
                config.login_window,
                config.login_lockout,
                config.login_lockout_max,
                config.throttle_entries,
            ),
            scratch: vec![0; READ_CHUNK],
            to_flush: Vec::new(),
            to_read: Vec::new(),
            to_reap: Vec::new(),
            parked: Vec::new(),
            awaiting: Vec::new(),
            frame_scratch: Vec::new(),
            targets_scratch: Vec::new(),
            stats: stats::Stats::new(now),
            feed_retries: Vec::new(),
            shutdown_requested: Arc::new(AtomicBool::new(false)),
            waker,
            shutdown: None,
            now,
            config,
        };
        Ok(Server { reactor })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.reactor.local_addr
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            requested: Arc::clone(&self.reactor.shutdown_requested),
            waker: Arc::clone(&self.reactor.waker),
        }
    }

    /// Runs the loop on this thread until a graceful shutdown completes.
    pub fn run(self) -> io::Result<()> {
        self.reactor.run()
    }

    /// Runs the loop on a new thread named "hubbub-loop".
    pub fn spawn(self) -> io::Result<RunningServer> {
        let addr = self.local_addr();
        let handle = self.shutdown_handle();
        let thread = std::thread::Builder::new()
            .name("hubbub-loop".into())
            .spawn(move || self.run())?;
        Ok(RunningServer {
            addr,
            handle,
            thread,
        })
    }
}

/// What a request in flight still needs to know when its store answer comes, beyond what the answer says.
/// Kept by ticket, oldest first; consumed even if the asking session has gone meanwhile.
#[derive(Debug)]
enum Awaiting {
    /// RevokeToken or Logout: whose token, so that every session using it ends once the revoke is committed —
    /// whether or not the asking session is still there to hear the answer.
    Revoke {
        user: crate::store::UserId,
        token_id: u64,
    },
    /// Kick: the room and the kicked user's name, for the RoomEvent.
    Kick { room: String, target: String },
    /// CreateRoom, JoinRoom, LeaveRoom: who acts and in which room, for the hub and the RoomEvent.
    Room {
        user: crate::store::UserId,
        username: String,
        room: String,
    },
}

/// Progress of a graceful shutdown.
struct ShuttingDown {
    /// The server exits by then whatever is still pending.
    deadline: Instant,
    /// The store has answered `Shutdown`: everything queued before it is committed and answered.
    store_stopped: bool,
    /// `Shutdown` has been handed to the store (it goes after the backlog, to keep order).
    store_told: bool,
}

/// A timer: the session `session_id` in `slot` has something due at the instant. Entries are not removed when a
/// deadline moves; a popped entry is checked against the session's current deadline and pushed again if it moved
/// (lazy deletion: activity costs an assignment, not a heap operation).
type TimerEntry = Reverse<(Instant, u64, usize)>;

/// The loop's state. Only the loop thread ever touches it, so nothing here needs a lock.
struct Reactor {
    poll: Poll,
    /// Allocated once; `poll` fills it every turn.
    events: Events,
    local_addr: SocketAddr,
    /// `None` once shutting down: no new connections.
    listener: Option<TcpListener>,
    /// The listener may still have connections queued (an accept failed other than with `WouldBlock`).
    accept_pending: bool,
    sessions: Slab<Session>,
    /// Session ids are never reused, so a completion for a closed session cannot reach its slot's next owner.
    next_session_id: u64,
    /// Open connections per client address ([HB-8] max per IP).
    per_ip: HashMap<IpAddr, usize>,
    hub: Hub,
    timers: BinaryHeap<TimerEntry>,
    /// `None` after the store thread has been joined at exit.
    store: Option<StoreHandle>,
    store_done: Receiver<store::Done>,
    /// Store jobs the bounded channel did not take yet. While it is non-empty the loop reads no new frames from
    /// clients (backpressure), so it grows by at most the frames already being processed.
    store_backlog: VecDeque<store::Job>,
    hasher: Option<HashPool>,
    hash_done: Receiver<HashDone>,
    /// Failed logins per username and per client address.
    name_throttle: Throttle<String>,
    addr_throttle: Throttle<IpAddr>,
    /// The one buffer every socket is read into; sessions keep only an unfinished tail.
    scratch: Vec<u8>,
    /// Sessions with new output this turn, written in the flush phase.
    to_flush: Vec<usize>,
    /// Sessions whose read turn was cut short or paused; they are served again without waiting for an event.
    to_read: Vec<usize>,
    /// Sessions closed this turn, freed in the reap phase.
    to_reap: Vec<usize>,
    /// Sessions that may not take frames for now (login in flight, store backpressure, output over the
    /// high-water mark). They do not make the loop spin: `unpark_ready` moves them back once the reason is gone.
    parked: Vec<usize>,
    /// Context of requests in flight that their store answer does not carry.
    awaiting: Vec<(crate::session::Ticket, Awaiting)>,
    /// Reused buffers for routing, so the hot path does not allocate per message.
    frame_scratch: Vec<u8>,
    targets_scratch: Vec<usize>,
    /// Counters for Stats and the periodic log line.
    stats: stats::Stats,
    /// Feed pages to ask for again after a failed read: (when, session id, slot). Rare (the database
    /// failing), so a plain list.
    feed_retries: Vec<(Instant, u64, usize)>,
    shutdown_requested: Arc<AtomicBool>,
    waker: Arc<Waker>,
    shutdown: Option<ShuttingDown>,
    /// The clock, read once per turn right after `poll`.
    now: Instant,
    config: Config,
}

// ---------------------------------------------------------------------------------------------------------------
// The loop
// ---------------------------------------------------------------------------------------------------------------

impl Reactor {
    fn run(mut self) -> io::Result<()> {
        info!(
            "hubbub {} listening on {}",
            env!("CARGO_PKG_VERSION"),
            self.local_addr
        );
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll_events(timeout) {
                // The store finishes what it holds and lets go of the database before we return.
                self.stop_workers();
                return Err(e);
            }
            self.now = Instant::now();
            self.dispatch_events();
            self.drain_completions();
            self.continue_reads();
            self.fire_timers();
            self.retry_feed_pages();
            self.log_stats_if_due();
            self.advance_shutdown();
            self.flush_output();
            self.unpark_ready();
            self.reap_closed();
            if self.shutdown_complete() {
                break;
            }
        }
        self.stop_workers();
        info!("hubbub stopped");
        Ok(())
    }

    /// How long `poll` may sleep: zero when work is left over from this turn, else until the next timer.
    fn next_timeout(&self) -> Duration {
        if !self.to_read.is_empty()
            || !self.to_flush.is_empty()
            || self.accept_pending
            || self.shutdown_requested.load(Ordering::Relaxed)
        {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut timeout = MAX_POLL_WAIT;
        if let Some(Reverse((at, _, _))) = self.timers.peek() {
            timeout = timeout.min(at.saturating_duration_since(now));
        }
        if let Some(s) = &self.shutdown {
            timeout = timeout.min(s.deadline.saturating_duration_since(now));
        }
        timeout = timeout.min(self.stats.next_log.saturating_duration_since(now));
        if let Some(at) = self.feed_retries.iter().map(|(at, _, _)| *at).min() {
            timeout = timeout.min(at.saturating_duration_since(now));
        }
        timeout
    }

    fn poll_events(&mut self, timeout: Duration) -> io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => Ok(()),
            // A signal arrived while we slept: not an error, just an empty turn.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                self.events.clear();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Phase 1: act on every readiness event of this turn.
    fn dispatch_events(&mut self) {
        // The event list is swapped out so handlers can borrow `self`; it goes back, allocation and all, after.
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for event in events.iter() {
            match event.token() {
                LISTENER => {
                    trace!("event: listener readable");
                    self.accept_connections();
                }
                WAKER => trace!("event: wake"),
                token => {
                    let Some(slot) = slot_of(token) else { continue };
                    // A session closed earlier in this same batch may still have events here: skip them.
                    if self.sessions.get(slot).is_none_or(|s| s.is_closing()) {
                        continue;
                    }
                    trace!(
                        "event: {:?} readable={} writable={}",
                        token,
                        event.is_readable(),
                        event.is_writable()
                    );
                    if event.is_readable() || event.is_read_closed() || event.is_error() {
                        let session = &mut self.sessions[slot];
                        session.read_ready = true;
                        session.hangup_seen |= event.is_read_closed() || event.is_error();
                        self.serve_reads(slot);
                    }
                    if event.is_writable() {
                        self.queue_flush(slot);
                    }
                }
            }
        }
        self.events = events;
    }

    /// Phase 3: sessions whose reads were cut short or paused last turn get another turn now.
    fn continue_reads(&mut self) {
        let batch = std::mem::take(&mut self.to_read);
        for &slot in &batch {
            if self.sessions.get(slot).is_some_and(|s| !s.is_closing()) {
                self.serve_reads(slot);
            }
        }
        recycle(&mut self.to_read, batch);
    }

    /// Phase 4: close the sessions whose idle, login or slow-consumer deadline has passed.
    ///
    /// Each session has exactly one live heap entry, the one whose instant equals its `timer_due`; any other
    /// entry for it is stale and dropped when popped. Activity only moves `last_frame_at`: when the entry comes
    /// due, the deadline is recomputed and, if it moved, the entry is pushed again for the new instant.
    fn fire_timers(&mut self) {
        while let Some(&Reverse((at, id, slot))) = self.timers.peek() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            let Some(session) = self.sessions.get(slot) else {
                continue;
            };
            if session.id != id || session.is_closing() || session.timer_due != Some(at) {
                continue;
            }
            let (due, reason) = self.deadline_of(session);
            if due > self.now {
                self.sessions[slot].timer_due = Some(due);
                self.timers.push(Reverse((due, id, slot)));
                continue;
            }
            trace!("timer: session {id} due ({reason:?})");
            let (code, text) = match reason {
                CloseReason::AuthTimeout => (code::AUTH_TIMEOUT, "not logged in in time"),
                CloseReason::SlowConsumer => (
                    code::SLOW_CONSUMER,
                    "output could not be delivered within the idle timeout",
                ),
                _ => (
                    code::IDLE_TIMEOUT,
                    "no frame within the idle timeout; send Ping to stay connected",
                ),
            };
            self.fail(slot, 0, code, text);
        }
    }

    /// Asks again for the feed pages whose read failed, once their delay is over.
    fn retry_feed_pages(&mut self) {
        if self.feed_retries.is_empty() {
            return;
        }
        let now = self.now;
        let due: Vec<(Instant, u64, usize)> = self
            .feed_retries
            .iter()
            .filter(|(at, _, _)| *at <= now)
            .copied()
            .collect();
        self.feed_retries.retain(|(at, _, _)| *at > now);
        for (_, id, slot) in due {
            if self
                .sessions
                .get(slot)
                .is_some_and(|s| s.id == id && !s.is_closing())
            {
                self.request_page_if_drained(slot);
            }
        }
    }

    /// A session's next deadline and what happens then: the login deadline while not logged in, else idleness.
    fn deadline_of(&self, session: &Session) -> (Instant, CloseReason) {
        // A parked session's frames wait unread because of the server (a full store queue) or its own unread
        // output (which the slow-consumer clock covers): its silence is not idleness.
        let idle = if session.parked {
            self.now + self.config.idle_timeout
        } else {
            session.last_frame_at + self.config.idle_timeout
        };
        let mut due = (idle, CloseReason::IdleTimeout);
        let logged_in = matches!(
            session.state,
            State::Ready(_) | State::Authenticating(PendingAuth::Logout { .. })
        );
        if !logged_in {
            due = earlier(
                due,
                (
                    session.auth_started_at + self.config.auth_timeout,
                    CloseReason::AuthTimeout,
                ),
            );
        }
        if let Some(since) = session.stalled_since {
            due = earlier(
                due,
                (since + self.config.idle_timeout, CloseReason::SlowConsumer),
            );
        }
        due
    }

    /// Makes sure the session's heap entry comes due no later than its current deadline. Only a deadline that
    /// moved *earlier* (a fresh login clock) needs a new entry; later deadlines are found when the entry pops.
    fn arm_timer(&mut self, slot: usize) {
        let (due, _) = self.deadline_of(&self.sessions[slot]);
        let session = &mut self.sessions[slot];
        if session.timer_due.is_none_or(|at| due < at) {
            session.timer_due = Some(due);
            self.timers.push(Reverse((due, session.id, slot)));
        }
    }

    /// Phase 6: free the sessions closed this turn. Their tokens are deregistered before the slot can be reused,
    /// and no event of this turn can reach them any more.
    fn reap_closed(&mut self) {
        let batch = std::mem::take(&mut self.to_reap);
        for &slot in &batch {
            if !self.sessions.contains(slot) {
                continue;
            }
            let mut session = self.sessions.remove(slot);
            // Last chance for the Error or Shutdown frame to go out.
            session.write_out(WRITE_BUDGET_PER_TURN);
            if self.is_left_behind(&session) {
                session.reset_when_closed();
            } else {
                // A FIN rather than a reset, so that the client reads the last frame.
                discard_input(&mut session);
                let _ = session.stream.shutdown(std::net::Shutdown::Write);
            }
            if let Err(e) = self.poll.registry().deregister(&mut session.stream) {
                debug!("deregister {}: {e}", session.uuid);
            }
            self.release_address(session.peer.ip());
        }
        recycle(&mut self.to_reap, batch);
    }
}

impl Reactor {
    /// Whether a closing client has stopped reading, so that its connection is reset instead of closed with a
    /// FIN. After a FIN the kernel keeps the socket, orphaned, until it has delivered what it holds: for a
    /// client that does not read that is up to a whole send buffer (4 MiB by default on Linux), kept for
    /// minutes while the kernel waits for a window that never opens, and one such orphan per reconnect. A
    /// reset frees it at once. Nothing is lost: every message is in the store, and the client's cursor is only
    /// where it said it had read.
    ///
    /// Only two closes say the client stopped reading: a slow consumer, and a silent client for which the
    /// kernel still holds more than the low-water mark. Every other close (shutdown, a protocol error, a
    /// replaced session) may be of a slow but reading client, which must still get its last frame.
    fn is_left_behind(&self, session: &Session) -> bool {
        match session.state {
            State::Closing(CloseReason::SlowConsumer) => true,
            State::Closing(CloseReason::IdleTimeout) => session
                .output_held_by_the_kernel()
                .is_some_and(|held| held > self.config.out_low_water),
            _ => false,
        }
    }
}

fn earlier(a: (Instant, CloseReason), b: (Instant, CloseReason)) -> (Instant, CloseReason) {
    if b.0 < a.0 {
        b
    } else {
        a
    }
}

/// Reads and drops what a closing client still sent, so that closing the socket does not reset the connection
/// (a reset can destroy the Error frame we just wrote before the client reads it).
fn discard_input(session: &mut Session) {
    let mut sink = [0u8; 4096];
    let mut discarded = 0;
    while discarded < DISCARD_ON_CLOSE {
        match session.read_into(&mut sink) {
            Ok(n) => discarded += n,
            Err(_) => break,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Accepting connections
// ---------------------------------------------------------------------------------------------------------------

impl Reactor {
    /// Accepts until `WouldBlock`: with edge-triggered readiness, connections left in the queue would wait for the
    /// next one to arrive.
    fn accept_connections(&mut self) {
        self.accept_pending = false;
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors, for one: try again next turn instead of spinning now.
                    warn!("accept failed: {e}");
                    self.accept_pending = true;
                    return;
                }
            }
        }
    }

    /// Checks the connection limits, then makes a session and greets it with Hello ([HB-7.1]).
    fn admit(&mut self, mut stream: mio::net::TcpStream, peer: SocketAddr) {
        if self.sessions.len() >= self.config.max_connections {
            info!(
                "refused {peer}: server full ({} connections)",
                self.sessions.len()
            );
            refuse(
                &mut stream,
                code::SERVER_FULL,
                "server full, try again later",
            );
            return;
        }
        let from_addr = self.per_ip.get(&peer.ip()).copied().unwrap_or(0);
        if from_addr >= self.config.max_per_ip {
            info!("refused {peer}: {from_addr} connections from this address already");
            refuse(
                &mut stream,
                code::TOO_MANY_FROM_ADDRESS,
                "too many connections from your address",
            );
            return;
        }
        let _ = stream.set_nodelay(true);
        let id = self.next_session_id;
        self.next_session_id += 1;
        let entry = self.sessions.vacant_entry();
        let slot = entry.key();
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut stream, token_of(slot), Interest::READABLE)
        {
            warn!("could not register {peer}: {e}");
            return;
        }
        let session = entry.insert(Session::new(
            id,
            stream,
            peer,
            self.now,
            self.config.send_burst,
        ));
        info!("connect {} from {peer} (session {id})", session.uuid);
        *self.per_ip.entry(peer.ip()).or_insert(0) += 1;
        let hello = Packet::Hello {
            connection_id: *session.uuid.as_bytes(),
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            max_frame: self.config.max_frame,
            idle_timeout_ms: millis_u32(self.config.idle_timeout),
            auth_timeout_ms: millis_u32(self.config.auth_timeout),
        };
        self.send(slot, 0, &hello);
        self.arm_timer(slot);
        // The client may have sent its first frames already: edge-triggered readiness was armed at register.
        self.sessions[slot].read_ready = true;
        self.to_read.push(slot);
    }

    fn release_address(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

/// Gives a drained work list's buffer back. The loop empties `to_read`, `to_flush` and `to_reap` every turn;
/// handing the emptied buffer back (unless the phase queued new work meanwhile) keeps their capacity, so a
/// busy loop does not allocate these lists again on every turn.
fn recycle(list: &mut Vec<usize>, mut drained: Vec<usize>) {
    drained.clear();
    if list.is_empty() {
        *list = drained;
    }
}

/// Tells a connection we will not serve why, then drops it. The socket is fresh and its send buffer empty, so
/// the one non-blocking write of a small frame succeeds in practice; if it does not, the close alone says no.
fn refuse(stream: &mut mio::net::TcpStream, code: u16, text: &str) {
    let mut frame = Vec::with_capacity(64);
    Packet::Error {
        code,
        text: text.to_owned(),
    }
    .encode(0, &mut frame);
    let _ = stream.write(&frame);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn millis_u32(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

// ---------------------------------------------------------------------------------------------------------------
// Reading: the pump
// ---------------------------------------------------------------------------------------------------------------

impl Reactor {
    /// Gives one session its read turn: first any whole frames already buffered (left by a pause), then reads
    /// from the socket, each read's frames dispatched at once. Stops once the socket is drained (`WouldBlock` or a
    /// short read, see `Session::read_into`), at the per-turn budget, or when the session may not take more frames
    /// right now (a login in flight, store backpressure, closing).
    fn serve_reads(&mut self, slot: usize) {
        if !self.dispatch_buffered(slot) {
            return;
        }
        for _ in 0..READS_PER_TURN {
            if !self.sessions[slot].read_ready {
                return;
            }
            let mut scratch = std::mem::take(&mut self.scratch);
            let read = self.sessions[slot].read_into(&mut scratch);
            match read {
                Ok(n) => {
                    trace!("read: session {} {n} bytes", self.sessions[slot].id);
                    self.stats.bytes_in += n as u64;
                    self.take_input(slot, &scratch[..n]);
                    self.scratch = scratch;
                    if !self.may_take_frames(slot) {
                        self.park_reads(slot);
                        return;
                    }
                }
                Err(status) => {
                    self.scratch = scratch;
                    match status {
                        IoStatus::Closed => self.disconnect(slot, CloseReason::PeerClosed),
                        IoStatus::Failed(kind) => self.disconnect(slot, CloseReason::Io(kind)),
                        IoStatus::Drained | IoStatus::BudgetSpent => {}
                    }
                    return;
                }
            }
        }
        // Budget spent with the socket possibly still readable: come back next turn, after the others.
        self.to_read.push(slot);
    }

    /// Dispatches whole frames left in the session's input by an earlier pause. False if the session still may
    /// not take frames (it stays parked).
    fn dispatch_buffered(&mut self, slot: usize) -> bool {
        if !self.may_take_frames(slot) {
            self.park_reads(slot);
            return false;
        }
        if !self.sessions[slot].input.is_empty() {
            let input = std::mem::take(&mut self.sessions[slot].input);
            self.dispatch_owned(slot, input);
        }
        if self.may_take_frames(slot) {
            true
        } else {
            self.park_reads(slot);
            false
        }
    }

    /// Runs freshly read bytes through the pump. When the session has no unfinished tail (the common case) the
    /// frames are dispatched straight from the scratch buffer; only a leftover tail is copied into the session.
    fn take_input(&mut self, slot: usize, bytes: &[u8]) {
        if self.sessions[slot].input.is_empty() {
            let used = self.dispatch_frames(slot, bytes);
            self.keep_tail(slot, &bytes[used..]);
        } else {
            let mut input = std::mem::take(&mut self.sessions[slot].input);
            input.extend_from_slice(bytes);
            self.dispatch_owned(slot, input);
        }
    }

    /// Dispatches from the session's own input buffer and keeps what is left in that same buffer (no new
    /// allocation per read while a large frame arrives in pieces); an emptied buffer is freed.
    fn dispatch_owned(&mut self, slot: usize, mut input: Vec<u8>) {
        let used = self.dispatch_frames(slot, &input);
        input.drain(..used);
        let session = &mut self.sessions[slot];
        if !session.is_closing() && !input.is_empty() {
            session.input = input;
        }
    }

    /// Keeps what did not form a whole frame (or was not dispatched because of a pause) for the next read.
    /// Called only while the session's own input is empty: the tail is the scratch buffer's.
    fn keep_tail(&mut self, slot: usize, tail: &[u8]) {
        let session = &mut self.sessions[slot];
        if !session.is_closing() && !tail.is_empty() {
            session.input = tail.to_vec();
        }
    }

    /// Splits and handles every whole frame in `buf` while the session may take them. Returns the bytes used.
    fn dispatch_frames(&mut self, slot: usize, buf: &[u8]) -> usize {
        let max_body = self.config.max_frame;
        let mut used = 0;
        while self.may_take_frames(slot) {
            match split_frame(&buf[used..], max_body, is_request_kind) {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    used += frame.len;
                    self.sessions[slot].last_frame_at = self.now;
                    let h = frame.header;
                    debug!(
                        "frame: session {} kind 0x{:02x} id {} len {}",
                        self.sessions[slot].id, h.kind, h.request_id, h.body_len
                    );
                    self.handle_frame(slot, h, frame.body);
                }
                Err(e) => {
                    let code = match e {
                        FrameError::BadMagic => code::BAD_MAGIC,
                        FrameError::BadVersion(_) => code::BAD_VERSION,
                        FrameError::UnknownKind(_) => code::UNKNOWN_KIND,
                        FrameError::TooLarge { .. } => code::FRAME_TOO_LARGE,
                    };
                    // Echo the request id only from a header whose magic and version were good.
                    let header_trusted =
                        matches!(e, FrameError::UnknownKind(_) | FrameError::TooLarge { .. });
                    let request_id = match buf[used..].get(4..8) {
                        Some(b) if header_trusted => u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                        _ => 0,
                    };
                    self.fail(slot, request_id, code, &e.to_string());
                    break;
                }
            }
        }
        used
    }

    /// False while a session must not get further frames: it is closing, the server is shutting down, a login is
    /// in flight ([HB-7.3]), the store queue is full (backpressure), or the session's own output is over the
    /// high-water mark — a client that does not read its answers cannot make the server buffer without end.
    fn may_take_frames(&self, slot: usize) -> bool {
        let session = &self.sessions[slot];
        !matches!(session.state, State::Closing(_) | State::Authenticating(_))
            && self.shutdown.is_none()
            && !self.store_backlogged()
            && session.pending_output() < self.config.out_high_water
    }

    /// Sets aside a session that may not take frames now; `unpark_ready` brings it back.
    fn park_reads(&mut self, slot: usize) {
        let session = &mut self.sessions[slot];
        if !session.is_closing() && !session.parked {
            session.parked = true;
            self.parked.push(slot);
        }
    }

    /// Moves parked sessions whose reason to wait is gone back to the read list (served next turn).
    fn unpark_ready(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let mut parked = std::mem::take(&mut self.parked);
        parked.retain(|&slot| self.still_parked(slot));
        self.parked = parked;
    }

    /// False for a parked session that is gone or may take frames again (then it is moved to the read list).
    fn still_parked(&mut self, slot: usize) -> bool {
        if !self
            .sessions
            .get(slot)
            .is_some_and(|s| s.parked && !s.is_closing())
        {
            return false;
        }
        if !self.may_take_frames(slot) {
            return true;
        }
        // Its frames waited on us, not on the client: the idle clock starts again from here.
        self.sessions[slot].parked = false;
        self.sessions[slot].last_frame_at = self.now;
        self.to_read.push(slot);
        false
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Writing: output buffers and the flush phase
// ---------------------------------------------------------------------------------------------------------------

impl Reactor {
    /// Encodes a packet straight into a session's output buffer and queues the session for the flush phase.
    fn send(&mut self, slot: usize, request_id: u32, packet: &Packet) {
        let Some(session) = self.sessions.get_mut(slot) else {
            return;
        };
        if session.is_closing() {
            return;
        }
        packet.encode(request_id, &mut session.output);
        self.queue_flush(slot);
        self.enforce_output_limit(slot);
    }

    /// Pushes one packet to every session the user has open (receipts, room notices). The slots are copied into
    /// the loop's scratch list first, because sending may close a session and so change the hub's list.
    fn push_to_user(&mut self, user: store::UserId, packet: &Packet) {
        let mut targets = std::mem::take(&mut self.targets_scratch);
        targets.clear();
        targets.extend(self.hub.sessions_of(user).iter().map(|s| s.slot));
        for &slot in &targets {
            self.send(slot, 0, packet);
        }
        self.targets_scratch = targets;
    }

    /// The hard bound on one session's output, checked where bytes are appended ([HB-5.6]). Messages never
    /// reach it (past the high-water mark they wait in the store), and replies stop when the session stops
    /// being read; what is left is pushes from other users — receipts, presence, room events, typing — to a
    /// client that does not read. Such a client is cut off rather than allowed to hold memory without end.
    fn enforce_output_limit(&mut self, slot: usize) {
        let hard_limit = self.config.out_hard_limit();
        let session = &mut self.sessions[slot];
        if session.pending_output() <= hard_limit || session.is_closing() {
            return;
        }
        let error = Packet::Error {
            code: code::SLOW_CONSUMER,
            text: "output limit exceeded: not reading".into(),
        };
        error.encode(0, &mut session.output);
        self.disconnect(slot, CloseReason::SlowConsumer);
    }

    fn queue_flush(&mut self, slot: usize) {
        let session = &mut self.sessions[slot];
        if !session.flush_queued {
            session.flush_queued = true;
            self.to_flush.push(slot);
        }
    }

    /// Phase 5: one write pass per session with output this turn — many frames, one syscall in the common case.
    /// WRITABLE interest is registered only for a session whose socket filled up, and removed once it drains.
    fn flush_output(&mut self) {
        let batch = std::mem::take(&mut self.to_flush);
        for &slot in &batch {
            let Some(session) = self.sessions.get_mut(slot) else {
                continue;
            };
            session.flush_queued = false;
            if session.is_closing() {
                continue;
            }
            let (status, written) = session.write_out(WRITE_BUDGET_PER_TURN);
            self.stats.bytes_out += written as u64;
            trace!(
                "write: session {} {written} bytes, {:?}",
                session.id,
                status
            );
            match status {
                IoStatus::Drained | IoStatus::BudgetSpent => {
                    let waiting = session.pending_output() > 0;
                    // The slow-consumer clock runs while output waits and the socket takes none of it.
                    session.stalled_since = match (waiting, written > 0, session.stalled_since) {
                        (false, _, _) => None,
                        (true, true, _) | (true, false, None) => Some(self.now),
                        (true, false, since) => since,
                    };
                    // Only a full socket needs the kernel to say when it has room again; output left by a spent
                    // budget is queued for the next turn below.
                    let want_writable = waiting && status == IoStatus::Drained;
                    if want_writable != session.writable_registered {
                        let interest = if want_writable {
                            Interest::READABLE | Interest::WRITABLE
                        } else {
                            Interest::READABLE
                        };
                        if let Err(e) = self.poll.registry().reregister(
                            &mut session.stream,
                            token_of(slot),
                            interest,
                        ) {
                            warn!("reregister {}: {e}", session.uuid);
                        }
                        session.writable_registered = want_writable;
                    }
                    if status == IoStatus::BudgetSpent {
                        // The socket still had room, so no new edge will say so: come back next turn, the
                        // way a read that spent its budget does.
                        self.queue_flush(slot);
                    }
                    self.request_page_if_drained(slot);
                }
                IoStatus::Closed => self.disconnect(slot, CloseReason::PeerClosed),
                IoStatus::Failed(kind) => self.disconnect(slot, CloseReason::Io(kind)),
            }
        }
        recycle(&mut self.to_flush, batch);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Closing: one path for every reason
// ---------------------------------------------------------------------------------------------------------------

impl Reactor {
    /// Answers a request with an Error; for the codes that end a connection ([HB-6.1]) the session is closed
    /// right after, with the frame still delivered first.
    fn fail(&mut self, slot: usize, request_id: u32, code: u16, text: &str) {
        self.send(
            slot,
            request_id,
            &Packet::Error {
                code,
                text: text.to_owned(),
            },
        );
        if code::closes_connection(code) {
            let reason = match code {
                code::IDLE_TIMEOUT => CloseReason::IdleTimeout,
                code::AUTH_TIMEOUT => CloseReason::AuthTimeout,
                code::SESSION_REPLACED => CloseReason::Replaced,
                code::TOKEN_REVOKED => CloseReason::TokenRevoked,
                code::SLOW_CONSUMER => CloseReason::SlowConsumer,
                _ => CloseReason::Protocol,
            };
            self.disconnect(slot, reason);
        }
    }

    /// The one way a session ends. Phase one, now: it leaves the hub, logs one line, and stops taking input.
    /// Phase two, in `reap_closed` at the end of this turn: its last output is written and its socket freed.
    /// Closing in two phases keeps the slot (and its token) from being reused while this turn's events may
    /// still name it.
    fn disconnect(&mut self, slot: usize, reason: CloseReason) {
        let Some(session) = self.sessions.get_mut(slot) else {
            return;
        };
        if session.is_closing() {
            return;
        }
        let previous = std::mem::replace(&mut session.state, State::Closing(reason));
        let who = match &previous {
            State::Ready(identity) => format!(" user {}", identity.username),
            _ => String::new(),
        };
        info!(
            "disconnect {} from {}{who}: {reason:?}",
            session.uuid, session.peer
        );
        let id = session.id;
        if let State::Ready(identity) | State::Authenticating(PendingAuth::Logout { identity }) =
            previous
        {
            self.leave_hub(id, &identity);
        }
        // The Error frame (if any) must still go out: reap writes it, so the flush phase need not.
        self.to_reap.push(slot);
    }

    /// A logged-in session ends (disconnect or logout): it leaves the hub.
    fn leave_hub(&mut self, session_id: u64, identity: &Identity) {
        self.drop_watches(session_id, &identity.watching);
        if self.hub.leave(identity.user_id, session_id) {
            self.went_offline(identity.user_id, &identity.username);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------------------------------------------

impl Reactor {
    /// Starts a shutdown when one was asked for, and moves it on each turn: stop accepting, tell every client,
    /// let the store commit and answer what it holds, then stop once that is done or the grace time is up.
    fn advance_shutdown(&mut self) {
        if self.shutdown.is_none() && self.shutdown_requested.load(Ordering::SeqCst) {
            self.begin_shutdown();
        }
        let backlog_empty = self.store_backlog.is_empty();
        let Some(progress) = &mut self.shutdown else {
            return;
        };
        if !progress.store_told && backlog_empty {
            let job = store::Job {
                ticket: LOOP_TICKET,
                op: store::Op::Shutdown,
            };
            if let Some(store) = &self.store {
                if store.try_submit(job).is_ok() {
                    progress.store_told = true;
                }
            }
        }
    }

    fn begin_shutdown(&mut self) {
        info!(
            "shutting down: no new connections, telling {} clients",
            self.sessions.len()
        );
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.shutdown = Some(ShuttingDown {
            deadline: self.now + self.config.shutdown_grace,
            store_stopped: false,
            store_told: false,
        });
        let notice = Packet::Shutdown {
            text: "server shutting down".into(),
        };
        let slots: Vec<usize> = self.sessions.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            self.send(slot, 0, &notice);
        }
    }

    /// Done when the store has committed and answered everything and every answer has been written, or when the
    /// grace time is over. Then every session is closed.
    fn shutdown_complete(&mut self) -> bool {
        let Some(progress) = &self.shutdown else {
            return false;
        };
        let output_left = self
            .sessions
            .iter()
            .any(|(_, s)| s.pending_output() > 0 && !s.is_closing());
        let done = progress.store_stopped && !output_left;
        if !(done || self.now >= progress.deadline) {
            return false;
        }
        if !done {
            warn!("shutdown grace time over: closing with work still pending");
        }
        let slots: Vec<usize> = self.sessions.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            self.disconnect(slot, CloseReason::Shutdown);
        }
        self.reap_closed();
        true
    }

    /// Ends the worker threads. The store was told to stop in order; if the grace time ran out first we still
    /// tell it now, so it commits what it took before the process exits.
    fn stop_workers(&mut self) {
        if let Some(store) = self.store.take() {
            let told = self.shutdown.as_ref().is_some_and(|s| s.store_told);
            if !told {
                let _ = store.try_submit(store::Job {
                    ticket: LOOP_TICKET,
                    op: store::Op::Shutdown,
                });
            }
            store.join();
        }
        if let Some(hasher) = self.hasher.take() {
            hasher.shutdown();
        }
    }
}

/// The ticket of jobs the loop makes for itself (shutdown, last-seen times): no session waits for them.
const LOOP_TICKET: crate::session::Ticket = crate::session::Ticket {
    session: 0,
    slot: usize::MAX,
    request_id: 0,
};

impl Reactor {
    /// A handle to a session for the hub.
    fn session_ref(&self, slot: usize) -> SessionRef {
        SessionRef {
            id: self.sessions[slot].id,
            slot,
        }
    }

    /// True while the store has jobs the channel did not take: then the loop reads nothing new.
    fn store_backlogged(&self) -> bool {
        !self.store_backlog.is_empty()
    }
}
