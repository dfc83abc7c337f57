//! Session: one client connection as the loop sees it — its socket, where it is in the protocol's state machine,
//! the unfinished tail of its input, and its output buffer.
//!
//! Owns: per-connection state and the byte-level I/O on one socket (read into the loop's scratch buffer, write
//! from the output buffer, bounded by a per-turn budget). The state machine ([HB-7]):
//!
//! ```text
//!   accept ──► Connected ── Register / Login / Resume ──► Authenticating ── LoginOk ──► Ready
//!               ▲    ▲                                          │                       │
//!               │    └─────── Ok (Register) or Error ───────────┘                       │
//!               └──────────── Ok (Logout) ◄── Authenticating ◄──────── Logout ──────────┤
//!                                                  └────── Error (Logout failed) ───────┘
//!
//!   any state ── Error with code < 100, timeout, peer close, I/O error, shutdown ──► Closing ──► closed
//! ```
//!
//! Must not: decide what a request means (the reactor does), touch other sessions, or block: every socket call
//! here is non-blocking: `WouldBlock` is an answer, never a wait.

use crate::store::UserId;
use mio::net::TcpStream;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Names the request a worker job answers, so the loop can route its completion back.
///
/// `session` is a per-connection id that is never reused (unlike `slot`, the slab index behind the mio token,
/// which is reused after a close): the loop drops completions whose session is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub session: u64,
    pub slot: usize,
    pub request_id: u32,
}

/// Who a session is logged in as.
#[derive(Clone, Debug)]
pub struct Identity {
    pub user_id: UserId,
    pub username: String,
    /// The token this session logged in with (Logout and RevokeToken act on it).
    pub token_id: u64,
    /// The highest message id this session has been sent, or of its own messages acknowledged while live
    /// ([HB-5.3], [HB-5.10]): the one cursor behind catch-up,
    /// multi-device sync, reconnects and slow readers.
    pub cursor: u64,
    pub feed: Feed,
    /// Users this session watches for presence ([HB-11]), by id and name; dropped from the hub when it ends.
    pub watching: Vec<(UserId, String)>,
    /// Recent typing notices sent, per target (room or user), for their rate limit ([HB-12]).
    pub typing: Vec<(bool, String, Instant)>,
}

/// How a logged-in session gets its messages ([HB-5.3], [HB-5.6]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// Caught up: new messages are pushed as they are stored.
    Live,
    /// Behind (just logged in with older messages waiting, or fell behind as a slow reader): messages come from
    /// the store in pages, one page at a time, each only once the output has drained below the low-water mark.
    /// Live pushes skip the session meanwhile; the pages bring those messages too.
    Behind { page_in_flight: bool },
}

/// An authentication request waiting for a worker. While one is in flight the session reads no further frames
/// ([HB-7.3]), so at most one exists per session and replies stay in request order.
#[derive(Debug)]
pub enum PendingAuth {
    /// Waiting for the hash pool, then the store.
    Register { username: String },
    /// Waiting for the store (credentials), then the hash pool (verify), then the store (token).
    Login {
        username: String,
        password: String,
        device: String,
        last_seen: u64,
        account: Option<crate::store::Account>,
    },
    /// Waiting for the store. The token is kept to hand it back in LoginOk.
    Resume {
        token: [u8; 16],
        device: String,
        last_seen: u64,
    },
    /// Waiting for the store to revoke the session's own token. The identity is kept so that a failed revoke
    /// leaves the session logged in, as it was.
    Logout { identity: Identity },
}

/// Where a session is in the protocol ([HB-7]).
#[derive(Debug)]
pub enum State {
    /// Connected, not logged in: only Ping, Register, Login and Resume are accepted.
    Connected,
    /// A Register, Login, Resume or Logout is being worked on.
    Authenticating(PendingAuth),
    /// Logged in.
    Ready(Identity),
    /// Being closed; freed in the reap phase at the end of the loop turn.
    Closing(CloseReason),
}

/// Why a session ended. One `disconnect` path logs exactly one line with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    PeerClosed,
    Protocol,
    IdleTimeout,
    AuthTimeout,
    Replaced,
    TokenRevoked,
    SlowConsumer,
    Io(io::ErrorKind),
    Shutdown,
}

/// What one read or write turn ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum IoStatus {
    /// The socket had nothing more (it said `WouldBlock`, or a read came back short): everything available was done.
    Drained,
    /// The per-turn budget ran out first: the socket may still be ready, and edge-triggered polling will not say
    /// so again, so the loop must come back to it.
    BudgetSpent,
    /// The peer closed its side cleanly.
    Closed,
    Failed(io::ErrorKind),
}

/// Output bigger than this is given back to the allocator once it has been written, so an idle session holds
/// no large buffer.
const KEEP_OUT_CAPACITY: usize = 4 * 1024;

/// One client connection.
pub struct Session {
    /// Never reused; names this connection in worker tickets.
    pub id: u64,
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// The connection's UUID v4, sent in Hello and logged with every line about it.
    pub uuid: uuid::Uuid,
    pub state: State,
    /// The unfinished tail of the input: empty (and unallocated) for an idle session, because the loop reads into
    /// its own scratch buffer and copies here only what did not form a whole frame.
    pub input: Vec<u8>,
    /// Encoded frames waiting to be written, from `out_pos` on.
    pub output: Vec<u8>,
    out_pos: usize,
    /// Whether WRITABLE interest is registered: only while output is waiting.
    pub writable_registered: bool,
    /// Whether this session is already in the loop's list of sessions to flush this turn.
    pub flush_queued: bool,
    /// The socket may have unread bytes: edge-triggered readiness not yet drained (by `WouldBlock` or a short read).
    pub read_ready: bool,
    /// Readiness said the peer closed its side or the socket failed: only a read that returns the end (or the
    /// error) may end this session's reading, not a short one (see [`Session::read_into`]).
    pub hangup_seen: bool,
    /// In the loop's list of sessions waiting for a reason to stop before they may take frames again.
    pub parked: bool,
    /// Since when output has been waiting that the socket would not take; a session that cannot drain for the
    /// idle timeout is closed as a slow consumer ([HB-5.6]).
    pub stalled_since: Option<Instant>,
    /// When the last whole frame arrived (idle timeout).
    pub last_frame_at: Instant,
    /// The instant of this session's one live entry in the loop's timer heap.
    pub timer_due: Option<Instant>,
    /// When the connection was accepted or logged out (auth timeout).
    pub auth_started_at: Instant,
    /// Token bucket for sends: tokens left and when they were last topped up.
    pub send_tokens: f64,
    pub send_tokens_at: Instant,
}

impl Session {
    pub fn new(
        id: u64,
        stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
        send_burst: u32,
    ) -> Session {
        Session {
            id,
            stream,
            peer,
            uuid: uuid::Uuid::new_v4(),
            state: State::Connected,
            input: Vec::new(),
            output: Vec::new(),
            out_pos: 0,
            writable_registered: false,
            flush_queued: false,
            read_ready: false,
            hangup_seen: false,
            parked: false,
            stalled_since: None,
            last_frame_at: now,
            timer_due: None,
            auth_started_at: now,
            send_tokens: send_burst as f64,
            send_tokens_at: now,
        }
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing(_))
    }

    pub fn identity(&self) -> Option<&Identity> {
        match &self.state {
            State::Ready(identity) => Some(identity),
            _ => None,
        }
    }

    /// Bytes encoded but not yet written.
    pub fn pending_output(&self) -> usize {
        self.output.len() - self.out_pos
    }

    /// One read from the socket into `scratch`. `Ok(0)` never escapes: it is `Closed`.
    ///
    /// A read that fills less than `scratch` took everything the socket had, so the session counts as drained
    /// without a second read that would only say `WouldBlock`: that saves a system call per message when
    /// clients send one frame at a time. It is safe with edge-triggered readiness because bytes (or a FIN)
    /// arriving after this read raise a new edge. A FIN that arrived *before* it, already reported by the
    /// event being served (`hangup_seen`), raises none, so then reading goes on until the end is read.
    pub fn read_into(&mut self, scratch: &mut [u8]) -> Result<usize, IoStatus> {
        loop {
            match self.stream.read(scratch) {
                Ok(0) => return Err(IoStatus::Closed),
                Ok(n) => {
                    if n < scratch.len() && !self.hangup_seen {
                        self.read_ready = false;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_ready = false;
                    return Err(IoStatus::Drained);
                }
                Err(e) => return Err(IoStatus::Failed(e.kind())),
            }
        }
    }

    /// Bytes written to the socket that the client has not acknowledged yet: output the kernel still holds for
    /// it. None where the kernel cannot be asked (only Linux is).
    pub fn output_held_by_the_kernel(&self) -> Option<usize> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let mut held: libc::c_int = 0;
            // SAFETY: TIOCOUTQ (SIOCOUTQ for a TCP socket) stores one c_int through the pointer, which points at
            // `held`; the descriptor is open for as long as `self.stream` is.
            let result = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::TIOCOUTQ, &mut held) };
            (result == 0).then(|| usize::try_from(held).unwrap_or(0))
        }
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// Makes closing the socket reset the connection (SO_LINGER 0) instead of ending it with a FIN behind the
    /// output the kernel still holds. Best effort: if the option is refused, the socket closes the usual way.
    pub fn reset_when_closed(&self) {
        if let Err(e) = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO)) {
            log::debug!("cannot set SO_LINGER on {}: {e}", self.peer);
        }
    }

    /// Writes waiting output until it is all written, the socket is full, or `budget` bytes went out. Keeps a
    /// write offset instead of shifting the buffer after every partial write.
    pub fn write_out(&mut self, budget: usize) -> (IoStatus, usize) {
        let mut written = 0;
        while self.out_pos < self.output.len() {
            if written >= budget {
                return (IoStatus::BudgetSpent, written);
            }
            let end = self.output.len().min(self.out_pos + (budget - written));
            match self.stream.write(&self.output[self.out_pos..end]) {
                Ok(0) => return (IoStatus::Failed(io::ErrorKind::WriteZero), written),
                Ok(n) => {
                    self.out_pos += n;
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return (IoStatus::Drained, written)
                }
                Err(e) => return (IoStatus::Failed(e.kind()), written),
            }
        }
        self.reset_output();
        (IoStatus::Drained, written)
    }

    /// Forgets written output, giving a large buffer back so idle sessions stay small.
    fn reset_output(&mut self) {
        self.out_pos = 0;
        if self.output.capacity() > KEEP_OUT_CAPACITY {
            self.output = Vec::new();
        } else {
            self.output.clear();
        }
    }

    /// Refills the send token bucket and takes one token; false when the session is over its rate ([HB-5.8]).
    pub fn take_send_token(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        let elapsed = now
            .saturating_duration_since(self.send_tokens_at)
            .as_secs_f64();
        self.send_tokens = (self.send_tokens + elapsed * rate as f64).min(burst as f64);
        self.send_tokens_at = now;
        if self.send_tokens >= 1.0 {
            self.send_tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("uuid", &self.uuid)
            .field("peer", &self.peer)
            .finish()
    }
}
