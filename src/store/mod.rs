//! The store: hubbub's only door to SQLite.
//!
//! This module owns the SQLite connection, the schema and its migrations, and group commit. All
//! database work happens on one dedicated thread ("hubbub-store"): jobs arrive over a bounded
//! queue (`queue.rs`), queued jobs are run together in one transaction (a job that writes more than once
//! inside its own savepoint), and completions are sent back only after that transaction committed, followed by one call to
//! the `wake` callback so the reactor notices them.
//!
//! What it must not do: the reactor thread never calls into this module except through
//! [`StoreHandle::try_submit`] (plus the cheap stats getters), and that call never blocks — a full
//! queue hands the job back so the caller can apply backpressure. The store knows nothing of
//! sockets, sessions or mio; a [`Ticket`] is an opaque routing label it merely carries back.
//!
//! A failing database (I/O error, full disk, read-only file, lock held by another process...)
//! never ends the thread: the affected jobs answer [`Outcome::Failed`] and later jobs are tried
//! afresh, so the server recovers on its own once the disk is writable or has space again. Reads
//! that failed only because their batch did are run again on their own (reads need no space).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::session::Ticket;

mod index;
mod owner;
mod queue;
mod resend;

use index::Indexer;
pub use index::{index_path, IndexEntry, IndexSettings, IndexWriter};
pub use owner::lock_path;
use owner::Ownership;
use queue::JobQueue;
use resend::RecentIds;
pub use resend::{file as file_client_ids, ClientId, FILE_AT as CLIENT_IDS_FILE_AT};

/// A user's row id; stable for the life of the database.
pub type UserId = u64;

/// How hard SQLite works to make a commit durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// `PRAGMA synchronous = FULL`: a committed batch survives a power cut.
    Full,
    /// `PRAGMA synchronous = NORMAL`: with WAL, a power cut may lose the last commits but never
    /// corrupts the database.
    Normal,
}

/// Everything [`StoreHandle::start`] needs.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The database file; created if missing.
    pub path: PathBuf,
    /// Durability of each commit.
    pub sync: SyncMode,
    /// Bound of the job channel; at least 1 is used.
    pub queue_capacity: usize,
    /// Most jobs in one transaction (group commit); at least 1 is used.
    pub max_batch: usize,
    /// How the message index keeps up (see [`IndexSettings`]).
    pub index: IndexSettings,
}

/// One unit of work for the store thread, answered by exactly one [`Done`] carrying the same
/// ticket (unless the thread ends first, see [`Op::Shutdown`]).
#[derive(Debug)]
pub struct Job {
    /// Handed back unchanged in the [`Done`].
    pub ticket: Ticket,
    /// What to do.
    pub op: Op,
}

/// The operations the store performs.
#[derive(Clone, Debug)]
pub enum Op {
    /// username is already validated and lower-cased by the caller.
    CreateUser { username: String, phc: String },
    /// Fetch an account and its stored password hash for a login attempt.
    LookupUser { username: String },
    /// A new session token (UUID v4, 16 random bytes, generated in the store) valid for ttl_ms milliseconds.
    IssueToken {
        user_id: UserId,
        device: String,
        ttl_ms: u64,
    },
    /// Log in again with a token: unknown, revoked or expired gives Resumed(None). Updates last_used_at and device.
    ResumeToken { token: [u8; 16], device: String },
    /// Revoke one token of this user by its token_id (a token of another user is not found => Revoked(false)).
    RevokeToken { user_id: UserId, token_id: u64 },
    /// The user's tokens that are neither revoked nor expired, oldest first.
    ListTokens { user_id: UserId },
    /// Store a direct message. (sender, client_msg_id) is unique: a resend returns the original with duplicate = true
    /// and stores nothing. Unknown recipient username (already lower-cased) => UnknownRecipient.
    StoreMessage {
        sender: UserId,
        recipient: String,
        client_msg_id: u64,
        text: String,
    },
    /// The user's feed, ascending id, at most `limit`, only ids > after_id: the direct messages the user sent or
    /// received, and the messages of every room the user has a membership row in that fall inside the
    /// membership's window (see [`Op::JoinRoom`]). Each message appears once. `more` says whether further
    /// messages exist past this page.
    FetchFeed {
        user_id: UserId,
        after_id: u64,
        limit: u32,
    },
    /// Raise the user's delivered cursor to up_to (never lowers it). Answers with, for each sender of direct messages
    /// to this user with id in (old_cursor, new_cursor], the highest such id — so the loop can send delivery
    /// receipts. The cursor covers the whole feed, room messages included, but room messages get no receipts.
    ///
    /// The cursor never passes the user's newest message (`Account::max_message_id`): nothing beyond it can
    /// have been delivered, and a cursor parked in the future would silently swallow later messages.
    MarkDelivered { user_id: UserId, up_to: u64 },
    /// The conversation between user and peer (peer username, lower-cased), messages with id < before_id
    /// (before_id = 0 means "from the newest"), newest first, at most limit. Unknown peer => UnknownRecipient.
    History {
        user_id: UserId,
        peer: String,
        before_id: u64,
        limit: u32,
    },
    /// Create a room (name canonical, validated by the caller) hosted by user_id, who becomes its first member.
    /// Refused with TooManyRooms when the user already is a current member of max_rooms_per_user rooms (current =
    /// active membership of an open room), or RoomNameTaken. Answers RoomCreated.
    CreateRoom {
        user_id: UserId,
        name: String,
        topic: String,
        max_rooms_per_user: u32,
    },
    /// Join an open room: Joined, or NoSuchRoom, RoomIsClosed, RoomFull (max_members current members), TooManyRooms.
    /// An active member joining again gets Joined { already_member: true } and nothing changes.
    ///
    /// A membership is a window of message ids: the member sees the room's messages with
    /// joined_after < id <= left_after (no upper bound while still a member). Joining again after leaving (or being
    /// kicked) reuses the one row and starts a fresh window at the newest id: the messages posted while away stay
    /// invisible, and so do those of the earlier membership — one window per member keeps the feed one index range
    /// per room.
    JoinRoom {
        user_id: UserId,
        name: String,
        max_members: u32,
        max_rooms_per_user: u32,
    },
    /// Leave a room: Left, or NoSuchRoom, NotMember (not an active member; a closed room has no current members, so
    /// leaving it is NotMember too). The host may leave: the room stays open with the same host, who keeps the right
    /// to kick and close, and may rejoin like anyone.
    LeaveRoom { user_id: UserId, name: String },
    /// The host removes an active member: Kicked, or NoSuchRoom, NotHost, NoSuchUser (no user named target),
    /// CannotKickHost (the host named themselves; they leave instead), NotMember (target not a current member, which
    /// includes everyone in a closed room). Not a ban: the target may join again.
    Kick {
        host_id: UserId,
        name: String,
        target: String,
    },
    /// The host closes the room for good: RoomClosedOk with the members at close, or NoSuchRoom, NotHost,
    /// RoomIsClosed. The members keep their rows (active stays 1, windows end at the newest id), so they can still
    /// read its history; the room takes no more messages or members.
    CloseRoom { host_id: UserId, name: String },
    /// One page of all rooms, open and closed, ordered by name, names > after_name ("" = from the start).
    ListRooms { after_name: String, limit: u32 },
    /// The room and its active members ordered by name, or NoSuchRoom. Any logged-in user may ask.
    RoomMembers { name: String },
    /// Store a message to a room. Answers like StoreMessage (Stored, a resend of (sender, client_msg_id) returns
    /// the original — direct or room message, they share one client id space — with duplicate = true, checked
    /// before anything else), or NoSuchRoom, RoomIsClosed, NotMember (not a current member).
    StoreRoomMessage {
        sender: UserId,
        room: String,
        client_msg_id: u64,
        text: String,
    },
    /// The room's messages this user may see (their membership window), ids < before_id (0 = from the newest),
    /// newest first, at most limit: Page, or NoSuchRoom, NotMember (the user never was a member). A member who left
    /// still reads what was posted while they were in.
    RoomHistory {
        user_id: UserId,
        name: String,
        before_id: u64,
        limit: u32,
    },
    /// Every open room with its active members (ascending user id), by room id: Rooms. For the loop's startup;
    /// afterwards the loop keeps its map current from the RoomCreated, Joined, Left, Kicked and RoomClosedOk
    /// completions, which arrive in job order, the order in which the changes took effect.
    LoadRooms,
    /// Record when the user was last seen (the loop sends it when the user's last session ends): LastSeenSet.
    SetLastSeen { user_id: UserId, at_ms: u64 },
    /// Resolve usernames (already lower-cased) for presence: Users, in the order asked, None for unknown names.
    LookupUsers { names: Vec<String> },
    /// Commit everything queued before it, answer Stopped, and end the thread.
    /// Jobs queued after it are dropped unanswered.
    Shutdown,
}

/// A user as the rest of the server sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Row id of the user.
    pub user_id: UserId,
    /// Lower-cased login name.
    pub username: String,
    /// Highest message id the user's clients confirmed as delivered.
    pub delivered_cursor: u64,
    /// Highest id in the user's feed (see [`Op::FetchFeed`]): direct messages sent or received and room messages
    /// inside the user's membership windows (0 if none).
    pub max_message_id: u64,
}

/// A live session token, as listed to its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// Row id, used to revoke the token.
    pub token_id: u64,
    /// Device name given at issue or at the last resume.
    pub device: String,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    /// Unix milliseconds of the issue or the last resume.
    pub last_used_at_ms: u64,
    /// Unix milliseconds after which the token no longer resumes.
    pub expires_at_ms: u64,
}

/// A direct or room message with names resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Strictly increasing, never reused.
    pub id: u64,
    pub sender_id: UserId,
    /// The sender's username.
    pub sender: String,
    /// The recipient's user id; 0 for a room message.
    pub recipient_id: UserId,
    /// The recipient's username, or the room's name for a room message.
    pub recipient: String,
    /// Unix milliseconds when the storing transaction ran.
    pub timestamp_ms: u64,
    pub text: String,
    /// (room_id, room name) for a room message, None for a direct message.
    pub room: Option<(u64, String)>,
}

/// A room as listed to users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomInfo {
    pub room_id: u64,
    pub name: String,
    pub topic: String,
    /// The host's username.
    pub host: String,
    /// Active members: current members of an open room, the members at close of a closed one.
    pub member_count: u32,
    pub closed: bool,
}

/// The answer to one [`Op`].
#[derive(Debug)]
pub enum Outcome {
    /// CreateUser succeeded.
    UserCreated { user_id: UserId },
    /// CreateUser: the name already belongs to someone; nothing was stored.
    UsernameTaken,
    /// None when no such user. phc is the argon2 PHC string stored at registration.
    Credentials(Option<(Account, String)>),
    /// IssueToken: the secret to hand to the client, and the row id to revoke it by.
    TokenIssued {
        token: [u8; 16],
        token_id: u64,
        account: Account,
    },
    /// ResumeToken: None for an unknown, revoked or expired token.
    Resumed(Option<(Account, u64 /* token_id */)>),
    /// RevokeToken: whether a live token of this user was revoked.
    Revoked(bool),
    /// ListTokens: live tokens, oldest first.
    Tokens(Vec<TokenInfo>),
    /// StoreMessage: the stored message, or the original one when this was a resend.
    Stored {
        message: StoredMessage,
        duplicate: bool,
    },
    /// StoreMessage or History named a user that does not exist.
    UnknownRecipient,
    /// FetchFeed (ascending ids) or History (descending ids).
    Page {
        messages: Vec<StoredMessage>,
        more: bool,
    },
    /// MarkDelivered: the cursor now in force, and one receipt per sender whose messages it passed.
    Delivered {
        /// The user whose cursor moved (the name the receipts carry).
        reader: String,
        cursor: u64,
        receipts: Vec<(
            UserId,
            String, /* sender name */
            u64,    /* highest id */
        )>,
    },
    /// CreateRoom succeeded; the creator is host and only member.
    RoomCreated(RoomInfo),
    /// CreateRoom: a room (open or closed) already has this name; nothing was stored.
    RoomNameTaken,
    /// CreateRoom or JoinRoom: the user is already a current member of max_rooms_per_user rooms.
    TooManyRooms,
    /// JoinRoom: the room as it is after the join.
    Joined {
        room: RoomInfo,
        already_member: bool,
    },
    /// A room op named a room that does not exist.
    NoSuchRoom,
    /// JoinRoom, StoreRoomMessage or CloseRoom on a closed room.
    RoomIsClosed,
    /// JoinRoom: the room already has max_members members.
    RoomFull,
    /// LeaveRoom succeeded.
    Left { room_id: u64 },
    /// LeaveRoom, Kick, StoreRoomMessage: not a current member. RoomHistory: never a member.
    NotMember,
    /// Kick succeeded.
    Kicked { room_id: u64, target_id: UserId },
    /// Kick or CloseRoom by someone who is not the room's host.
    NotHost,
    /// Kick: no user has the target name.
    NoSuchUser,
    /// Kick: the host named themselves.
    CannotKickHost,
    /// CloseRoom succeeded; members are the active members at close, ascending id.
    RoomClosedOk { room_id: u64, members: Vec<UserId> },
    /// ListRooms: rooms ordered by name; `more` says whether further rooms exist past this page.
    RoomList { rooms: Vec<RoomInfo>, more: bool },
    /// RoomMembers: active members ordered by name.
    Members {
        room: RoomInfo,
        members: Vec<(UserId, String)>,
    },
    /// LoadRooms: open rooms and their active members.
    Rooms(Vec<(RoomInfo, Vec<UserId>)>),
    /// SetLastSeen succeeded.
    LastSeenSet,
    /// LookupUsers: (name, Some((user_id, last_seen_ms)) or None), in the order asked.
    Users(Vec<(String, Option<(UserId, u64)>)>),
    /// Shutdown: everything before it is committed and the thread has ended.
    Stopped,
    /// The database failed (I/O error, disk full, read-only, corrupt...). Nothing of this job was committed.
    Failed(String),
}

/// A completed job, sent back over the channel returned by [`StoreHandle::start`].
#[derive(Debug)]
pub struct Done {
    /// The ticket of the [`Job`] this answers.
    pub ticket: Ticket,
    /// The result; committed unless it is `Failed`.
    pub outcome: Outcome,
}

/// Why the store could not start.
#[derive(Debug)]
pub enum StoreError {
    /// The file could not be opened or configured (missing directory, not a database, locked...).
    Open(String),
    /// The file was written by a newer hubbub; running old code on it could corrupt it.
    NewerSchema {
        path: PathBuf,
        found: i32,
        supported: i32,
    },
    /// A schema migration step failed; the database stays at the step before it.
    Migration {
        path: PathBuf,
        step: i32,
        reason: String,
    },
    /// The store thread could not be created.
    Spawn(String),
    /// Another server holds the database's lock file; `holder` is the pid it wrote there.
    InUse { path: PathBuf, holder: Option<u32> },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Open(reason) => f.write_str(reason),
            StoreError::NewerSchema {
                path,
                found,
                supported,
            } => write!(
                f,
                "database {} was written by a newer hubbub (schema {found}, this build knows up to \
                 {supported}); refusing to start",
                path.display()
            ),
            StoreError::Migration { path, step, reason } => write!(
                f,
                "database {}: schema migration to step {step} failed: {reason}",
                path.display()
            ),
            StoreError::Spawn(reason) => write!(f, "cannot start the store thread: {reason}"),
            StoreError::InUse { path, holder } => {
                write!(f, "database {} is in use by another hubbub", path.display())?;
                if let Some(pid) = holder {
                    write!(f, " (pid {pid})")?;
                }
                write!(
                    f,
                    "; stop that server first, or give this one its own --db (lock file {})",
                    lock_path(path).display()
                )
            }
        }
    }
}

impl std::error::Error for StoreError {}

/// The schema version this build creates and understands (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// One step of the schema's history. Steps are never edited once released: a change to the
/// schema is a new step appended to [`MIGRATIONS`], so every existing database can catch up.
struct Migration {
    version: i32,
    sql: &'static str,
}

/// The schema's history, oldest first; versions are consecutive from 1.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: "
            CREATE TABLE users (
                id               INTEGER PRIMARY KEY,
                username         TEXT    NOT NULL UNIQUE,
                phc              TEXT    NOT NULL,
                created_at_ms    INTEGER NOT NULL,
                delivered_cursor INTEGER NOT NULL DEFAULT 0
            );
            CREATE TABLE tokens (
                id              INTEGER PRIMARY KEY,
                token           BLOB    NOT NULL UNIQUE,
                user_id         INTEGER NOT NULL REFERENCES users(id),
                device          TEXT    NOT NULL,
                created_at_ms   INTEGER NOT NULL,
                last_used_at_ms INTEGER NOT NULL,
                expires_at_ms   INTEGER NOT NULL,
                revoked         INTEGER NOT NULL DEFAULT 0
            );
            -- ListTokens and the foreign key check on users both look tokens up by owner.
            CREATE INDEX tokens_by_user ON tokens(user_id, id);
        ",
    },
    Migration {
        version: 2,
        sql: "
            -- Created before messages, whose room messages reference it. Rooms are never deleted,
            -- only closed, so their ids are never reused either.
            CREATE TABLE rooms (
                id            INTEGER PRIMARY KEY,
                name          TEXT    NOT NULL UNIQUE,
                topic         TEXT    NOT NULL,
                host_id       INTEGER NOT NULL REFERENCES users(id),
                created_at_ms INTEGER NOT NULL,
                closed_at_ms  INTEGER NULL
            );
            -- AUTOINCREMENT: ids are never reused, so client cursors stay meaningful forever.
            -- A message goes to one user or to one room, never both. The client ids of both kinds
            -- share one space per sender, so a resend is recognised without knowing its kind.
            CREATE TABLE messages (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                sender_id     INTEGER NOT NULL REFERENCES users(id),
                recipient_id  INTEGER NULL REFERENCES users(id),
                room_id       INTEGER NULL REFERENCES rooms(id),
                client_msg_id INTEGER NOT NULL,
                timestamp_ms  INTEGER NOT NULL,
                text          TEXT    NOT NULL,
                UNIQUE (sender_id, client_msg_id),
                CHECK ((recipient_id IS NULL) <> (room_id IS NULL))
            );
            -- The feed is three range scans, one per index; each also answers max(id) per user.
            -- Each index is partial, holding only the kind of message it is read for, so storing
            -- a message updates only the indexes that kind is read through: a direct message
            -- skips messages_by_room, a room message the three direct-message indexes. A query
            -- uses a partial index only when its WHERE implies the index's: `recipient_id = ?`
            -- and `room_id = ?` imply IS NOT NULL on their own; the sender branch says
            -- `room_id IS NULL` (its room messages come from the room branch).
            CREATE INDEX messages_by_sender ON messages(sender_id, id) WHERE room_id IS NULL;
            CREATE INDEX messages_by_recipient ON messages(recipient_id, id)
                WHERE recipient_id IS NOT NULL;
            -- A room's messages in order: the feed's room branch and room history.
            CREATE INDEX messages_by_room ON messages(room_id, id) WHERE room_id IS NOT NULL;
            -- History walks one direction of a conversation backwards from a cursor.
            CREATE INDEX messages_by_pair ON messages(sender_id, recipient_id, id)
                WHERE recipient_id IS NOT NULL;
        ",
    },
    Migration {
        version: 3,
        sql: "
            -- One row per (room, user) who ever joined. The member sees the room's messages with
            -- joined_after < id <= left_after (left_after NULL: no upper bound yet). Leaving or a
            -- kick sets active = 0 and left_after; closing sets left_after but keeps active, so
            -- the members at close stay listed. A rejoin overwrites the row with a fresh window.
            CREATE TABLE room_members (
                room_id      INTEGER NOT NULL REFERENCES rooms(id),
                user_id      INTEGER NOT NULL REFERENCES users(id),
                joined_after INTEGER NOT NULL,
                left_after   INTEGER NULL,
                active       INTEGER NOT NULL,
                PRIMARY KEY (room_id, user_id)
            );
            -- The feed and the room limit look memberships up by user.
            CREATE INDEX room_members_by_user ON room_members(user_id, room_id);
            -- Presence: when the user's last session ended (0: never seen since this step).
            ALTER TABLE users ADD COLUMN last_seen_ms INTEGER NOT NULL DEFAULT 0;
        ",
    },
    Migration {
        version: 4,
        sql: "
            -- The direct-message read indexes move to the message index, a file of its own kept up
            -- to date by its own thread (store/index.rs): maintained inside each commit they cost
            -- most of a message's send-to-deliver latency under load. The next start builds the
            -- index from these rows.
            DROP INDEX messages_by_sender;
            DROP INDEX messages_by_recipient;
            DROP INDEX messages_by_pair;
            -- Which database this is, so that an index file made for another one is never trusted.
            CREATE TABLE instance (id BLOB NOT NULL);
            INSERT INTO instance (id) VALUES (randomblob(16));
        ",
    },
    Migration {
        version: 5,
        sql: "
            -- The resend check leaves the commit path (store/resend.rs): UNIQUE (sender_id,
            -- client_msg_id) dirtied a page per sender in every commit. SQLite cannot drop a
            -- table's constraint, so the table is rebuilt with the same columns and ids.

            -- Which message each (sender, client id) names. Filed in sorted runs; the messages
            -- above filed_up_to are in the store thread's memory instead.
            CREATE TABLE client_ids (
                sender_id     INTEGER NOT NULL,
                client_msg_id INTEGER NOT NULL,
                id            INTEGER NOT NULL,
                PRIMARY KEY (sender_id, client_msg_id)
            ) WITHOUT ROWID;
            -- Read through the UNIQUE index while it exists: in its order, with no sort.
            INSERT INTO client_ids (sender_id, client_msg_id, id)
                SELECT sender_id, client_msg_id, id FROM messages ORDER BY sender_id, client_msg_id;
            CREATE TABLE client_ids_state (filed_up_to INTEGER NOT NULL);
            INSERT INTO client_ids_state (filed_up_to)
                SELECT coalesce(max(id), 0) FROM messages;
            CREATE TABLE messages_v5 (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                sender_id     INTEGER NOT NULL REFERENCES users(id),
                recipient_id  INTEGER NULL REFERENCES users(id),
                room_id       INTEGER NULL REFERENCES rooms(id),
                client_msg_id INTEGER NOT NULL,
                timestamp_ms  INTEGER NOT NULL,
                text          TEXT    NOT NULL,
                CHECK ((recipient_id IS NULL) <> (room_id IS NULL))
            );
            INSERT INTO messages_v5 (id, sender_id, recipient_id, room_id, client_msg_id,
                                     timestamp_ms, text)
                SELECT id, sender_id, recipient_id, room_id, client_msg_id, timestamp_ms, text
                FROM messages ORDER BY id;
            -- AUTOINCREMENT's counter may be past the newest id (a resend used to advance it):
            -- carried over, so no id is ever handed out twice.
            INSERT INTO sqlite_sequence (name, seq)
                SELECT 'messages_v5', 0 WHERE NOT EXISTS
                    (SELECT 1 FROM sqlite_sequence WHERE name = 'messages_v5');
            UPDATE sqlite_sequence
                SET seq = max(seq, coalesce((SELECT seq FROM sqlite_sequence
                                             WHERE name = 'messages'), 0))
                WHERE name = 'messages_v5';
            DROP TABLE messages;
            ALTER TABLE messages_v5 RENAME TO messages;
            CREATE INDEX messages_by_room ON messages(room_id, id) WHERE room_id IS NOT NULL;
        ",
    },
];

/// How long a statement waits for a lock held by another process (a backup, the sqlite3 shell)
/// before the job fails. Tests shorten it so lock failures show quickly.
const BUSY_TIMEOUT: Duration = Duration::from_millis(if cfg!(test) { 100 } else { 5000 });

/// WAL pages between automatic checkpoints (SQLite's default is 1000).
const WAL_CHECKPOINT_PAGES: i64 = 8000;
/// Most memory SQLite's page cache may use, in KiB.
const PAGE_CACHE_KIB: i64 = 16 * 1024;

/// Room for every distinct statement below, so none is ever re-prepared.
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// A running store thread and the way to feed it.
///
/// Dropping the handle without [`StoreHandle::join`] closes the queue; the thread then finishes
/// what it holds and ends on its own.
pub struct StoreHandle {
    jobs: Arc<JobQueue>,
    /// Taken by [`StoreHandle::join`].
    worker: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

impl Drop for StoreHandle {
    fn drop(&mut self) {
        self.jobs.close();
    }
}

/// The store thread runs at a lower priority than the loop (nice 5). Where they share a core — a small box,
/// or a server pinned to one core — a batch of inserts would otherwise hold the core for milliseconds while
/// the loop has sockets to read; at nice 5 the loop preempts it as soon as it has work, and the store still
/// gets every cycle the loop does not use. Best effort: if the kernel says no, it runs at normal priority.
fn yield_to_the_loop() {
    crate::lower_thread_priority(5);
}

impl StoreHandle {
    /// Opens (creating if needed) and migrates the database on the caller's thread — so startup errors are reported
    /// before the server serves anyone — then moves the connection to a new thread named "hubbub-store".
    /// `wake` is called once after each batch's completions have been sent (the loop passes a closure that calls
    /// mio::Waker::wake).
    pub fn start(
        config: StoreConfig,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<(StoreHandle, Receiver<Done>), StoreError> {
        // Before anything reads or migrates the file: it may belong to a server that is running.
        let ownership = owner::claim(&config.path)?;
        let db = open_database(&config)?;
        let index = Indexer::start(&config.path, config.index, config.max_batch)?;
        let jobs = Arc::new(JobQueue::new(config.queue_capacity));
        let (done_tx, done_rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let worker = Worker {
            db,
            jobs: Arc::clone(&jobs),
            done: done_tx,
            wake,
            stats: Arc::clone(&stats),
            max_batch: config.max_batch.max(1),
            index,
            _ownership: ownership,
        };
        let worker = thread::Builder::new()
            .name("hubbub-store".into())
            .spawn(move || {
                yield_to_the_loop();
                worker.run()
            })
            .map_err(|e| StoreError::Spawn(e.to_string()))?;
        let handle = StoreHandle {
            jobs,
            worker: Some(worker),
            stats,
        };
        Ok((handle, done_rx))
    }

    /// Never blocks: Err(job) gives the job back when the queue is full (the caller applies backpressure) or the thread is gone.
    pub fn try_submit(&self, job: Job) -> Result<(), Job> {
        // Counted before sending so the worker's decrement can never run first and wrap around.
        self.stats.depth.fetch_add(1, Ordering::Relaxed);
        self.jobs.try_push(job).inspect_err(|_| {
            self.stats.depth.fetch_sub(1, Ordering::Relaxed);
        })
    }

    /// Jobs queued but not yet taken by the worker (an AtomicUsize kept by submit/take), for stats.
    pub fn queue_depth(&self) -> usize {
        self.stats.depth.load(Ordering::Relaxed)
    }

    /// Stats of the last commit: (jobs in the batch, commit latency in microseconds), kept in atomics.
    ///
    /// The latency is that of the COMMIT statement alone, i.e. the durable write that group
    /// commit shares among the batch. (0, 0) before the first commit.
    pub fn last_commit(&self) -> (usize, u64) {
        unpack_commit(self.stats.last_commit.load(Ordering::Relaxed))
    }

    /// Blocks until the thread ended (call after Shutdown was answered, or when the receiver is dropped).
    pub fn join(mut self) {
        // Closing the queue wakes a worker idle in take_batch(), which then ends.
        self.jobs.close();
        if let Some(worker) = self.worker.take() {
            if worker.join().is_err() {
                log::error!("store thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle")
            .field("queue_depth", &self.queue_depth())
            .finish_non_exhaustive()
    }
}

/// Counters shared between the handle (reader) and the worker (writer).
#[derive(Default)]
struct Stats {
    depth: AtomicUsize,
    /// Batch size and commit latency packed into one word so a reader never pairs the size of one
    /// commit with the latency of another.
    last_commit: AtomicU64,
}

fn pack_commit(jobs: usize, micros: u64) -> u64 {
    let jobs = u32::try_from(jobs).unwrap_or(u32::MAX);
    let micros = u32::try_from(micros).unwrap_or(u32::MAX);
    (u64::from(jobs) << 32) | u64::from(micros)
}

fn unpack_commit(packed: u64) -> (usize, u64) {
    let jobs = usize::try_from(packed >> 32).unwrap_or(usize::MAX);
    (jobs, packed & u64::from(u32::MAX))
}

// ---------------------------------------------------------------------------------------------
// Opening and migrating

/// Opens, configures and migrates the database. Runs on the caller's thread at startup.
fn open_database(config: &StoreConfig) -> Result<Db, StoreError> {
    let path = config.path.as_path();
    let open_error = |e: rusqlite::Error| {
        StoreError::Open(format!("cannot open database {}: {e}", path.display()))
    };
    let mut conn = Connection::open(path).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    // Checked before anything writes to the file: a newer hubbub's database is left untouched.
    let found = schema_version(&conn).map_err(open_error)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    configure_connection(&conn, config.sync).map_err(open_error)?;
    migrate(&mut conn, found, path)?;
    let recent = RecentIds::above_the_mark(&conn).map_err(open_error)?;
    index::prepare(&conn, path)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(Db {
        conn,
        users: UserCache::default(),
        recent,
    })
}

/// A file beside the database, named after it: `<db><suffix>`, like SQLite's own `<db>-wal`.
fn beside(db_path: &Path, suffix: &str) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn schema_version(conn: &Connection) -> rusqlite::Result<i32> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// The pragmas of the store's connection. Public so that the load generator's store-ceiling
/// writes with exactly the server's settings.
pub fn configure_connection(conn: &Connection, sync: SyncMode) -> rusqlite::Result<()> {
    // WAL lets commits append instead of rewriting pages, and readers never wait on the writer.
    let journal: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !journal.eq_ignore_ascii_case("wal") {
        log::warn!("database refused WAL mode and uses journal_mode={journal}");
    }
    let synchronous = match sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    // Savepoints (jobs with several writes, see Op::needs_savepoint) and SQLite's own statement
    // journals keep undo pages in a temporary file unless told otherwise; that file cost a fifth of
    // the store thread's time under load. Undo data for an uncommitted transaction needs no
    // durability: after a crash the WAL simply lacks the transaction.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // SQLite's default page cache (2 MiB) is smaller than what one large batch dirties across the
    // message indexes, so it spilled pages to the WAL mid-transaction and re-read evicted ones
    // from the file, some 15% of the thread's time under load. The cache only grows as pages are
    // used, so a small database keeps a small cache.
    conn.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)?;
    // Checkpoints copy the WAL back into the database in one burst of work on this thread; doing it every
    // 8000 pages (32 MiB of WAL) instead of SQLite's 1000 copies a page rewritten by many commits once instead
    // of many times. Under 15k paced messages/s on one shared core it cut the median latency from 10-15 ms
    // to 1-8 ms in our runs. The WAL stays bounded by about this size between checkpoints.
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    // Off by default in SQLite, per connection, and a no-op inside a transaction: set it here.
    conn.pragma_update(None, "foreign_keys", true)
}

/// Applies every step newer than `found`, each in its own transaction together with its version
/// bump, so a crash mid-way leaves the database at a clean earlier step.
fn migrate(conn: &mut Connection, found: i32, path: &Path) -> Result<(), StoreError> {
    for step in MIGRATIONS.iter().filter(|m| m.version > found) {
        apply_migration(conn, step).map_err(|e| StoreError::Migration {
            path: path.to_path_buf(),
            step: step.version,
            reason: e.to_string(),
        })?;
        log::info!(
            "database {} migrated to schema {}",
            path.display(),
            step.version
        );
    }
    Ok(())
}

fn apply_migration(conn: &mut Connection, step: &Migration) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute_batch(step.sql)?;
    tx.pragma_update(None, "user_version", step.version)?;
    tx.commit()
}

// ---------------------------------------------------------------------------------------------
// The connection and what the store thread keeps beside it

/// The store thread's connection, its cache of user names and the client ids not filed yet; jobs
/// get all three (`&mut`, no locks: only the store thread ever touches them).
struct Db {
    conn: Connection,
    users: UserCache,
    recent: RecentIds,
}

/// Most users [`UserCache`] holds before it starts over.
const USER_CACHE_CAPACITY: usize = 100_000;

/// Username <-> id of users the store thread has met, so that storing a message need not look
/// its sender and recipient up in the users table every time.
///
/// Entries never go stale: usernames never change and users are never deleted. The one way a
/// cached pair can be wrong is a user row that is rolled back after being created or read inside
/// the same transaction — its id may then be handed to someone else — so [`Db::rolled_back`]
/// empties the cache whenever a transaction ends without its commit. Only names that exist are
/// cached: a name unknown now may be registered by the next job.
///
/// Bounded by emptying it when full rather than by evicting the least recently used: the
/// active users of a server are normally far fewer than the bound, so this hardly ever happens,
/// and when it does the cost is one indexed read per user as the cache fills again. An entry
/// takes some 120 bytes (names have at most 32), so the cache stays under 12 MB or so.
#[derive(Default)]
struct UserCache {
    ids: HashMap<Arc<str>, UserId>,
    names: HashMap<UserId, Arc<str>>,
}

impl UserCache {
    fn remember(&mut self, user_id: UserId, username: &str) {
        if self.ids.len() >= USER_CACHE_CAPACITY || self.names.len() >= USER_CACHE_CAPACITY {
            self.clear();
        }
        let username: Arc<str> = Arc::from(username);
        self.ids.insert(Arc::clone(&username), user_id);
        self.names.insert(user_id, username);
    }

    fn clear(&mut self) {
        self.ids.clear();
        self.names.clear();
    }

    /// The id of the user with this (lower-cased) name, None if nobody has it.
    fn id_by_name(
        &mut self,
        conn: &Connection,
        username: &str,
    ) -> rusqlite::Result<Option<UserId>> {
        if let Some(&user_id) = self.ids.get(username) {
            return Ok(Some(user_id));
        }
        let found = conn
            .prepare_cached("SELECT id FROM users WHERE username = ?1")?
            .query_row([username], |row| get_u64(row, 0))
            .optional()?;
        if let Some(user_id) = found {
            self.remember(user_id, username);
        }
        Ok(found)
    }

    /// The username of this user, None if there is no such user.
    fn name_by_id(
        &mut self,
        conn: &Connection,
        user_id: UserId,
    ) -> rusqlite::Result<Option<String>> {
        if let Some(username) = self.names.get(&user_id) {
            return Ok(Some(username.to_string()));
        }
        let found: Option<String> = conn
            .prepare_cached("SELECT username FROM users WHERE id = ?1")?
            .query_row([to_db(user_id)], |row| row.get(0))
            .optional()?;
        if let Some(username) = &found {
            self.remember(user_id, username);
        }
        Ok(found)
    }
}

impl Db {
    /// Call whenever a transaction ended without committing: the users and messages it created
    /// are gone.
    fn rolled_back(&mut self) {
        self.users.clear();
        self.recent.rolled_back();
    }
}

// ---------------------------------------------------------------------------------------------
// The worker thread and group commit

struct Worker {
    db: Db,
    jobs: Arc<JobQueue>,
    done: Sender<Done>,
    wake: Arc<dyn Fn() + Send + Sync>,
    stats: Arc<Stats>,
    max_batch: usize,
    /// Dropped with the worker, which stops the indexer thread.
    index: Indexer,
    /// Declared last so it is dropped last: the database is released only once both of this
    /// store's threads are done with it.
    _ownership: Ownership,
}

/// Jobs taken from the queue in one go, and the Shutdown that ended the taking, if any.
struct Batch {
    jobs: Vec<Job>,
    stop: Option<Ticket>,
}

impl Worker {
    fn run(mut self) {
        while let Some(batch) = self.next_batch() {
            let size = batch.jobs.len();
            self.index.wait_while_behind();
            let report = run_batch(&mut self.db, batch.jobs);
            if let Some(micros) = report.commit_micros {
                self.stats
                    .last_commit
                    .store(pack_commit(size, micros), Ordering::Relaxed);
            }
            if let Some(newest) = newest_stored(&report.dones) {
                self.index
                    .committed(newest, direct_messages_stored(&report.dones));
            }
            if !self.send_all(report.dones) {
                return;
            }
            if let Some(ticket) = batch.stop {
                let _ = self.done.send(Done {
                    ticket,
                    outcome: Outcome::Stopped,
                });
                (self.wake)();
                log::debug!("store thread stopped on request");
                return;
            }
            (self.wake)();
        }
        log::debug!("store thread stopped: job queue closed");
    }

    /// Blocks for the first job, then takes whatever else is already queued, up to `max_batch`.
    /// None when the queue is closed.
    fn next_batch(&self) -> Option<Batch> {
        let taken = self.jobs.take_batch(self.max_batch)?;
        self.stats.depth.fetch_sub(taken.len(), Ordering::Relaxed);
        let mut batch = Batch {
            jobs: Vec::with_capacity(taken.len()),
            stop: None,
        };
        for job in taken {
            if let Op::Shutdown = job.op {
                // Nothing queued behind a Shutdown runs: the thread ends with this batch.
                batch.stop = Some(job.ticket);
                break;
            }
            batch.jobs.push(job);
        }
        Some(batch)
    }

    /// False when the reactor dropped its receiver: nobody is listening, so the thread ends.
    fn send_all(&self, dones: Vec<Done>) -> bool {
        for done in dones {
            if self.done.send(done).is_err() {
                log::debug!("store thread stopped: completion receiver dropped");
                return false;
            }
        }
        true
    }
}

/// The messages a batch stored (resends, answered with their original, are not among them).
fn newly_stored(dones: &[Done]) -> impl Iterator<Item = &StoredMessage> + '_ {
    dones.iter().filter_map(|done| match &done.outcome {
        Outcome::Stored {
            message,
            duplicate: false,
        } => Some(message),
        _ => None,
    })
}

/// The newest message id a batch stored, for the indexer; None if it stored none.
fn newest_stored(dones: &[Done]) -> Option<u64> {
    newly_stored(dones).map(|message| message.id).max()
}

/// The direct messages a batch stored, as the indexer files them.
fn direct_messages_stored(dones: &[Done]) -> impl Iterator<Item = IndexEntry> + '_ {
    newly_stored(dones)
        .filter(|message| message.room.is_none())
        .map(|message| IndexEntry {
            id: message.id,
            sender_id: message.sender_id,
            recipient_id: message.recipient_id,
        })
}

/// The completions of one batch, in job order, and the COMMIT latency if a commit succeeded.
struct BatchReport {
    dones: Vec<Done>,
    commit_micros: Option<u64>,
}

/// Runs the jobs in one transaction (each that needs one inside its own savepoint, see
/// [`Op::needs_savepoint`]) and commits once.
///
/// A completion never claims work that was not committed: when the COMMIT fails, or SQLite
/// abandons the whole transaction after an error (it does so for some I/O and disk-full errors),
/// every job of that transaction answers `Failed`.
fn run_batch(db: &mut Db, jobs: Vec<Job>) -> BatchReport {
    let mut dones: Vec<Done> = Vec::with_capacity(jobs.len());
    // Index in `dones` of the first job of the open transaction.
    let mut open_since: Option<usize> = None;
    // The batch's reads, kept to run again should the batch fail (no allocation in a batch without any).
    let mut reads: Vec<(usize, Op)> = Vec::new();
    let mut failed_with_batch = false;
    for job in jobs {
        if open_since.is_none() {
            match db.conn.execute_batch("BEGIN") {
                Ok(()) => open_since = Some(dones.len()),
                Err(e) => {
                    dones.push(failed(
                        job.ticket,
                        format!("cannot start a transaction: {e}"),
                    ));
                    continue;
                }
            }
        }
        if job.op.writes() == Writes::Nothing {
            reads.push((dones.len(), job.op.clone()));
        }
        let mut outcome = run_job(db, job.op);
        if matches!(outcome, Outcome::Failed(_))
            && reads.last().is_some_and(|(at, _)| *at == dones.len())
        {
            // It failed by itself (a lock held too long, say): trying again would only wait again.
            reads.pop();
        }
        if db.conn.is_autocommit() {
            failed_with_batch = true;
            db.rolled_back();
            let reason = match &outcome {
                Outcome::Failed(reason) => reason.clone(),
                _ => "the database abandoned the transaction".to_owned(),
            };
            let since = open_since.take().unwrap_or(dones.len());
            fail_all(
                &mut dones[since..],
                &format!("rolled back with its batch: {reason}"),
            );
            outcome = Outcome::Failed(reason);
        }
        dones.push(Done {
            ticket: job.ticket,
            outcome,
        });
    }
    let commit_micros = open_since.and_then(|since| {
        let committed = commit(db, &mut dones[since..]);
        if committed.is_none() {
            failed_with_batch = true;
            db.rolled_back();
        }
        committed
    });
    if failed_with_batch {
        redo_failed_reads(db, &mut dones, reads);
    }
    BatchReport {
        dones,
        commit_micros,
    }
}

/// Runs again, each in a transaction of its own, the reads that failed with their batch (a commit
/// that failed, a transaction the database abandoned). Reads need no disk space: on a full disk,
/// where every batch with a write fails, a user's catch-up must not fail with other users' writes.
/// Their first answers cannot be kept: inside the failed transaction they may have seen writes that
/// were then rolled back. A read run again may see writes of jobs queued after it (when the batch
/// went on in a new transaction after an abandoned one) and its answer still goes out in its place,
/// before theirs: harmless, since the loop sends no message twice (a session's cursor).
fn redo_failed_reads(db: &mut Db, dones: &mut [Done], reads: Vec<(usize, Op)>) {
    for (at, op) in reads {
        if !matches!(dones[at].outcome, Outcome::Failed(_)) {
            continue;
        }
        dones[at].outcome = match db.conn.execute_batch("BEGIN") {
            Ok(()) => {
                let outcome = run_job(db, op);
                // Ends a transaction that wrote nothing: ROLLBACK needs no disk space, just like COMMIT.
                roll_back_transaction(&db.conn);
                outcome
            }
            Err(e) => Outcome::Failed(format!("cannot start a transaction: {e}")),
        };
    }
}

/// Files the client ids waiting in memory if it is time, then commits the open transaction; on
/// failure rolls it back and fails its jobs.
fn commit(db: &mut Db, dones: &mut [Done]) -> Option<u64> {
    let conn = &db.conn;
    let started = Instant::now();
    let committed = db
        .recent
        .file_if_due(conn)
        .and_then(|()| conn.execute_batch("COMMIT"));
    match committed {
        Ok(()) => {
            db.recent.committed();
            Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX))
        }
        Err(e) => {
            log::warn!("commit of {} jobs failed: {e}", dones.len());
            // A failed COMMIT may leave the transaction open (e.g. SQLITE_BUSY); close it so the
            // next batch starts clean.
            roll_back_transaction(conn);
            fail_all(
                dones,
                &format!("commit failed, nothing of this batch was saved: {e}"),
            );
            None
        }
    }
}

fn roll_back_transaction(conn: &Connection) {
    if !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            log::error!("rollback failed: {e}");
        }
    }
}

fn fail_all(dones: &mut [Done], reason: &str) {
    for done in dones {
        if !matches!(done.outcome, Outcome::Failed(_)) {
            done.outcome = Outcome::Failed(reason.to_owned());
        }
    }
}

fn failed(ticket: Ticket, reason: String) -> Done {
    Done {
        ticket,
        outcome: Outcome::Failed(reason),
    }
}

/// Runs one job so that its error undoes only its own changes: inside a savepoint when it needs
/// one, otherwise relying on SQLite undoing the one failed statement.
fn run_job(db: &mut Db, op: Op) -> Outcome {
    let label = op.label();
    let savepoint = op.needs_savepoint();
    if savepoint {
        // Prepared once and cached: execute_batch would parse the SQL again for every job.
        let begun = db
            .conn
            .prepare_cached("SAVEPOINT job")
            .and_then(|mut s| s.execute([]));
        if let Err(e) = begun {
            return Outcome::Failed(format!("{label}: {e}"));
        }
    }
    let result = execute_op(db, op, now_ms()).and_then(|outcome| {
        if savepoint {
            db.conn.prepare_cached("RELEASE job")?.execute([])?;
        }
        Ok(outcome)
    });
    match result {
        Ok(outcome) => outcome,
        Err(e) => {
            log::warn!("{label} failed: {e}");
            if savepoint {
                undo_savepoint(&db.conn);
            }
            Outcome::Failed(format!("{label} failed: {e}"))
        }
    }
}

fn undo_savepoint(conn: &Connection) {
    if conn.is_autocommit() {
        // SQLite already rolled the whole transaction back; there is nothing left to undo.
        return;
    }
    if let Err(e) = conn.execute_batch("ROLLBACK TO job; RELEASE job") {
        // The job's changes might otherwise be committed with the batch; dropping the whole
        // transaction is the safe choice, and run_batch fails the batch's earlier jobs.
        log::error!("cannot undo a failed job ({e}); rolling back its batch");
        roll_back_transaction(conn);
    }
}

/// Why one job failed: the database, or a request that cannot be carried out (a caller bug).
#[derive(Debug)]
enum JobError {
    Db(rusqlite::Error),
    Invalid(String),
}

impl From<rusqlite::Error> for JobError {
    fn from(e: rusqlite::Error) -> Self {
        JobError::Db(e)
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Db(e) => write!(f, "{e}"),
            JobError::Invalid(reason) => f.write_str(reason),
        }
    }
}

type JobResult<T> = Result<T, JobError>;

fn no_such_user(user_id: UserId) -> JobError {
    JobError::Invalid(format!("no user with id {user_id}"))
}

impl Op {
    /// Names the operation in failure messages and logs.
    fn label(&self) -> &'static str {
        match self {
            Op::CreateUser { .. } => "create user",
            Op::LookupUser { .. } => "look up user",
            Op::IssueToken { .. } => "issue token",
            Op::ResumeToken { .. } => "resume token",
            Op::RevokeToken { .. } => "revoke token",
            Op::ListTokens { .. } => "list tokens",
            Op::StoreMessage { .. } => "store message",
            Op::FetchFeed { .. } => "fetch feed",
            Op::MarkDelivered { .. } => "mark delivered",
            Op::History { .. } => "history",
            Op::CreateRoom { .. } => "create room",
            Op::JoinRoom { .. } => "join room",
            Op::LeaveRoom { .. } => "leave room",
            Op::Kick { .. } => "kick",
            Op::CloseRoom { .. } => "close room",
            Op::ListRooms { .. } => "list rooms",
            Op::RoomMembers { .. } => "room members",
            Op::StoreRoomMessage { .. } => "store room message",
            Op::RoomHistory { .. } => "room history",
            Op::LoadRooms => "load rooms",
            Op::SetLastSeen { .. } => "set last seen",
            Op::LookupUsers { .. } => "look up users",
            Op::Shutdown => "shutdown",
        }
    }

    /// How the job writes, which decides how a failure of it is contained ([`Op::needs_savepoint`])
    /// and whether it may run again after its batch failed ([`redo_failed_reads`]).
    fn writes(&self) -> Writes {
        match self {
            // The room and the host's membership; the room's close and its members' windows.
            Op::CreateRoom { .. } | Op::CloseRoom { .. } => Writes::Several,
            Op::StoreMessage { .. } | Op::StoreRoomMessage { .. } => Writes::InsertThenCheck,
            Op::CreateUser { .. }
            | Op::IssueToken { .. }
            | Op::ResumeToken { .. }
            | Op::RevokeToken { .. }
            | Op::MarkDelivered { .. }
            | Op::JoinRoom { .. }
            | Op::LeaveRoom { .. }
            | Op::Kick { .. }
            | Op::SetLastSeen { .. } => Writes::OnceLast,
            Op::LookupUser { .. }
            | Op::ListTokens { .. }
            | Op::FetchFeed { .. }
            | Op::History { .. }
            | Op::ListRooms { .. }
            | Op::RoomMembers { .. }
            | Op::RoomHistory { .. }
            | Op::LoadRooms
            | Op::LookupUsers { .. }
            | Op::Shutdown => Writes::Nothing,
        }
    }

    /// Whether the job must run inside its own savepoint, so that failing undoes its own changes
    /// and nothing else of the batch.
    ///
    /// Only a job that writes more than once needs one. A savepoint is not free: while it is
    /// open, SQLite copies every page the job changes into the statement sub-journal first, some
    /// 15% of the store thread's time when every message had one. A job that writes with
    /// one statement, and has nothing left that can fail once that statement ran, gets the same
    /// guarantee for free: SQLite undoes a failed statement by itself and keeps the transaction
    /// (or, after some I/O and disk-full errors, drops the whole transaction, which run_batch
    /// notices and answers by failing the batch). Its reads change nothing. Jobs with a single
    /// write keep it last (see resume_token and mark_delivered); one that gains a second write,
    /// or fallible work after its write, must be classed [`Writes::Several`]. The one exception is
    /// storing a message, too frequent to pay for a savepoint: its insert is followed by the resend
    /// check and, for a resend, a DELETE, and any failure after the insert rolls the whole
    /// transaction back instead (insert_message), which fails the batch.
    fn needs_savepoint(&self) -> bool {
        matches!(self.writes(), Writes::Several)
    }
}

/// How a job writes: see [`Op::writes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Writes {
    /// Reads only.
    Nothing,
    /// One write statement, last: a failure of it changed nothing.
    OnceLast,
    /// Storing a message: an insert, then fallible work that rolls the transaction back on failure.
    InsertThenCheck,
    /// More than one write: run inside a savepoint.
    Several,
}

/// Takes the op by value so that a stored message can keep its text and names without copying.
fn execute_op(db: &mut Db, op: Op, now: u64) -> JobResult<Outcome> {
    let conn = &db.conn;
    match op {
        Op::CreateUser { username, phc } => create_user(db, &username, &phc, now),
        Op::LookupUser { username } => Ok(Outcome::Credentials(account_by_name(conn, &username)?)),
        Op::IssueToken {
            user_id,
            device,
            ttl_ms,
        } => issue_token(conn, user_id, &device, ttl_ms, now),
        Op::ResumeToken { token, device } => resume_token(conn, &token, &device, now),
        Op::RevokeToken { user_id, token_id } => revoke_token(conn, user_id, token_id),
        Op::ListTokens { user_id } => list_tokens(conn, user_id, now),
        Op::StoreMessage {
            sender,
            recipient,
            client_msg_id,
            text,
        } => store_message(db, sender, recipient, client_msg_id, text, now),
        Op::FetchFeed {
            user_id,
            after_id,
            limit,
        } => fetch_feed(conn, user_id, after_id, limit),
        Op::MarkDelivered { user_id, up_to } => mark_delivered(conn, user_id, up_to),
        Op::History {
            user_id,
            peer,
            before_id,
            limit,
        } => history(db, user_id, &peer, before_id, limit),
        Op::CreateRoom {
            user_id,
            name,
            topic,
            max_rooms_per_user,
        } => create_room(db, user_id, name, topic, max_rooms_per_user, now),
        Op::JoinRoom {
            user_id,
            name,
            max_members,
            max_rooms_per_user,
        } => join_room(conn, user_id, &name, max_members, max_rooms_per_user),
        Op::LeaveRoom { user_id, name } => leave_room(conn, user_id, &name),
        Op::Kick {
            host_id,
            name,
            target,
        } => kick(db, host_id, &name, &target),
        Op::CloseRoom { host_id, name } => close_room(conn, host_id, &name, now),
        Op::ListRooms { after_name, limit } => list_rooms(conn, &after_name, limit),
        // Any logged-in user may list a room's members, so who asks does not matter here.
        Op::RoomMembers { name } => room_members(conn, &name),
        Op::StoreRoomMessage {
            sender,
            room,
            client_msg_id,
            text,
        } => store_room_message(db, sender, room, client_msg_id, text, now),
        Op::RoomHistory {
            user_id,
            name,
            before_id,
            limit,
        } => room_history(conn, user_id, &name, before_id, limit),
        Op::LoadRooms => load_rooms(conn),
        Op::SetLastSeen { user_id, at_ms } => set_last_seen(conn, user_id, at_ms),
        Op::LookupUsers { names } => lookup_users(conn, names),
        // run_batch answers Shutdown itself; reaching here would still be harmless.
        Op::Shutdown => Ok(Outcome::Stopped),
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions: SQLite integers are i64, the protocol's are u64.

/// Ids, times and cursors beyond i64::MAX cannot exist in the database; saturating keeps range
/// comparisons right (`id > MAX` matches nothing, `id < MAX` matches everything).
fn to_db(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Values this module wrote are never negative; a negative one from a tampered file reads as 0.
fn from_db(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Client message ids use the full u64 range and are only compared for equality, so they are
/// stored bit-for-bit rather than saturated (which would merge distinct ids).
fn client_msg_key(id: u64) -> i64 {
    i64::from_ne_bytes(id.to_ne_bytes())
}

fn get_u64(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    row.get::<_, i64>(index).map(from_db)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// SQL LIMIT for a page of `limit` plus one look-ahead row that tells whether more exist.
fn limit_with_lookahead(limit: u32) -> i64 {
    i64::from(limit) + 1
}

/// Splits off the look-ahead row fetched by [`limit_with_lookahead`]: (page, more exist).
fn split_lookahead<T>(mut rows: Vec<T>, limit: u32) -> (Vec<T>, bool) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    (rows, more)
}

fn into_page(messages: Vec<StoredMessage>, limit: u32) -> Outcome {
    let (messages, more) = split_lookahead(messages, limit);
    Outcome::Page { messages, more }
}

/// Upper bound of a range that has none: message ids never reach it.
const NO_UPPER_BOUND: i64 = i64::MAX;

// ---------------------------------------------------------------------------------------------
// Users

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

fn create_user(db: &mut Db, username: &str, phc: &str, now: u64) -> JobResult<Outcome> {
    let mut insert = db
        .conn
        .prepare_cached("INSERT INTO users (username, phc, created_at_ms) VALUES (?1, ?2, ?3)")?;
    // Letting the UNIQUE constraint decide avoids a look-up on the common path.
    match insert.execute(params![username, phc, to_db(now)]) {
        Ok(_) => {
            let user_id = from_db(db.conn.last_insert_rowid());
            // A new user is usually about to log in and talk.
            db.users.remember(user_id, username);
            Ok(Outcome::UserCreated { user_id })
        }
        Err(e) if is_unique_violation(&e) => Ok(Outcome::UsernameTaken),
        Err(e) => Err(e.into()),
    }
}

/// The mark of the message index: messages with a higher id are not indexed yet.
macro_rules! indexed_up_to {
    () => {
        "(SELECT indexed_up_to FROM idx.state)"
    };
}

/// An account row, max_message_id being the newest id of the user's feed (see [`FEED`]): the
/// same branches, each answered by index seeks — one per direction in the message index, the
/// unindexed newest rows, then one per membership for the newest message inside its window.
/// COALESCE because max() over no rows is NULL.
macro_rules! account_select {
    ($filter:literal) => {
        concat!(
            "SELECT u.id, u.username, u.delivered_cursor,
                    max(coalesce((SELECT max(id) FROM idx.sent WHERE sender_id = u.id), 0),
                        coalesce((SELECT max(id) FROM idx.received WHERE recipient_id = u.id), 0),
                        coalesce((SELECT max(id) FROM messages
                                   WHERE id > ",
            indexed_up_to!(),
            " AND room_id IS NULL AND (+sender_id = u.id OR +recipient_id = u.id)), 0),
                        coalesce((SELECT max((SELECT max(m.id) FROM messages m
                                              WHERE m.room_id = rm.room_id
                                                AND m.id > rm.joined_after
                                                AND m.id <= coalesce(rm.left_after,
                                                                     9223372036854775807)))
                                  FROM room_members rm WHERE rm.user_id = u.id), 0)),
                    u.phc
             FROM users u WHERE ",
            $filter
        )
    };
}

const ACCOUNT_BY_NAME: &str = account_select!("u.username = ?1");

const ACCOUNT_BY_ID: &str = account_select!("u.id = ?1");

fn account_with_phc(row: &Row<'_>) -> rusqlite::Result<(Account, String)> {
    let account = Account {
        user_id: get_u64(row, 0)?,
        username: row.get(1)?,
        delivered_cursor: get_u64(row, 2)?,
        max_message_id: get_u64(row, 3)?,
    };
    Ok((account, row.get(4)?))
}

fn account_by_name(
    conn: &Connection,
    username: &str,
) -> rusqlite::Result<Option<(Account, String)>> {
    conn.prepare_cached(ACCOUNT_BY_NAME)?
        .query_row([username], account_with_phc)
        .optional()
}

fn account_by_id(conn: &Connection, user_id: UserId) -> rusqlite::Result<Option<Account>> {
    let found = conn
        .prepare_cached(ACCOUNT_BY_ID)?
        .query_row([to_db(user_id)], account_with_phc)
        .optional()?;
    Ok(found.map(|(account, _phc)| account))
}

// ---------------------------------------------------------------------------------------------
// Tokens

fn issue_token(
    conn: &Connection,
    user_id: UserId,
    device: &str,
    ttl_ms: u64,
    now: u64,
) -> JobResult<Outcome> {
    let account = account_by_id(conn, user_id)?.ok_or_else(|| no_such_user(user_id))?;
    let token = uuid::Uuid::new_v4().into_bytes();
    let expires = now.saturating_add(ttl_ms);
    conn.prepare_cached(
        "INSERT INTO tokens (token, user_id, device, created_at_ms, last_used_at_ms, expires_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
    )?
    .execute(params![
        &token[..],
        to_db(user_id),
        device,
        to_db(now),
        to_db(expires)
    ])?;
    Ok(Outcome::TokenIssued {
        token,
        token_id: from_db(conn.last_insert_rowid()),
        account,
    })
}

/// A token row as far as resuming cares.
struct TokenState {
    token_id: u64,
    user_id: UserId,
    expires_at_ms: u64,
    revoked: bool,
}

impl TokenState {
    fn is_usable(&self, now: u64) -> bool {
        !self.revoked && now < self.expires_at_ms
    }
}

fn resume_token(conn: &Connection, token: &[u8; 16], device: &str, now: u64) -> JobResult<Outcome> {
    let state = conn
        .prepare_cached("SELECT id, user_id, expires_at_ms, revoked FROM tokens WHERE token = ?1")?
        .query_row([&token[..]], |row| {
            Ok(TokenState {
                token_id: get_u64(row, 0)?,
                user_id: get_u64(row, 1)?,
                expires_at_ms: get_u64(row, 2)?,
                revoked: row.get::<_, i64>(3)? != 0,
            })
        })
        .optional()?;
    let Some(state) = state.filter(|s| s.is_usable(now)) else {
        return Ok(Outcome::Resumed(None));
    };
    // Read before the write, which must come last: this job runs without a savepoint (see
    // Op::needs_savepoint). The token's row is no part of the account.
    let account = account_by_id(conn, state.user_id)?;
    conn.prepare_cached("UPDATE tokens SET last_used_at_ms = ?2, device = ?3 WHERE id = ?1")?
        .execute(params![to_db(state.token_id), to_db(now), device])?;
    Ok(Outcome::Resumed(
        account.map(|account| (account, state.token_id)),
    ))
}

fn revoke_token(conn: &Connection, user_id: UserId, token_id: u64) -> JobResult<Outcome> {
    // Matching on the owner too is what keeps one user from revoking another's sessions.
    let changed = conn
        .prepare_cached(
            "UPDATE tokens SET revoked = 1 WHERE id = ?1 AND user_id = ?2 AND revoked = 0",
        )?
        .execute(params![to_db(token_id), to_db(user_id)])?;
    Ok(Outcome::Revoked(changed > 0))
}

fn list_tokens(conn: &Connection, user_id: UserId, now: u64) -> JobResult<Outcome> {
    let mut select = conn.prepare_cached(
        "SELECT id, device, created_at_ms, last_used_at_ms, expires_at_ms FROM tokens
         WHERE user_id = ?1 AND revoked = 0 AND expires_at_ms > ?2 ORDER BY id",
    )?;
    let tokens = select
        .query_map(params![to_db(user_id), to_db(now)], |row| {
            Ok(TokenInfo {
                token_id: get_u64(row, 0)?,
                device: row.get(1)?,
                created_at_ms: get_u64(row, 2)?,
                last_used_at_ms: get_u64(row, 3)?,
                expires_at_ms: get_u64(row, 4)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Outcome::Tokens(tokens))
}

// ---------------------------------------------------------------------------------------------
// Messages
//
// Direct messages are read through the message index (store/index.rs) up to its mark, and above
// the mark straight from `messages`: the rows the indexer has not reached yet are the newest,
// so they are one short range of rowids (bounded by IndexSettings::max_lag). Every read of
// direct messages has these two parts; the index's mark and its entries are read in one
// snapshot, so together they hold each message exactly once. In the unindexed part the user
// columns are compared with a unary `+`, which keeps SQLite on the rowid range should an index
// on them ever be added.

/// Maps rows shaped (id, sender_id, sender, recipient_id, recipient, timestamp_ms, text, room_id)
/// where, for a room message, recipient_id is 0, recipient the room's name and room_id set.
fn stored_message(row: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    let recipient: String = row.get(4)?;
    let room = row
        .get::<_, Option<i64>>(7)?
        .map(|room_id| (from_db(room_id), recipient.clone()));
    Ok(StoredMessage {
        id: get_u64(row, 0)?,
        sender_id: get_u64(row, 1)?,
        sender: row.get(2)?,
        recipient_id: get_u64(row, 3)?,
        recipient,
        timestamp_ms: get_u64(row, 5)?,
        text: row.get(6)?,
        room,
    })
}

/// The columns [`stored_message`] maps, for a row `m` of messages joined with its sender `s`
/// and, by LEFT JOIN, its recipient `r` (direct messages) and its room `g` (room messages).
macro_rules! message_columns {
    () => {
        "m.id, m.sender_id, s.username, coalesce(m.recipient_id, 0), coalesce(r.username, g.name),
         m.timestamp_ms, m.text, m.room_id"
    };
}

/// The message a client id named: it must exist, since messages are never deleted once committed.
fn original_message(conn: &Connection, id: u64) -> JobResult<StoredMessage> {
    message_by_id(conn, id)?
        .ok_or_else(|| JobError::Invalid(format!("client id names message {id}, which is gone")))
}

fn message_by_id(conn: &Connection, id: u64) -> rusqlite::Result<Option<StoredMessage>> {
    conn.prepare_cached(concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages m
         JOIN users s ON s.id = m.sender_id
         LEFT JOIN users r ON r.id = m.recipient_id
         LEFT JOIN rooms g ON g.id = m.room_id
         WHERE m.id = ?1"
    ))?
    .query_row([to_db(id)], stored_message)
    .optional()
}

/// The message `sender` stored under `client_msg_id`, if any ([HB-5.2]).
fn message_by_client_id(
    db: &mut Db,
    sender: UserId,
    client_msg_id: u64,
) -> JobResult<Option<StoredMessage>> {
    let Some(id) = db
        .recent
        .find(&db.conn, sender, client_msg_key(client_msg_id))?
    else {
        return Ok(None);
    };
    original_message(&db.conn, id).map(Some)
}

/// Answers a resend (the client never saw our answer) with its original, whatever its kind —
/// both kinds share the sender's client id space — and anything else with `refusal`. For the
/// paths that refuse before they reach the insert: a resend still gets its original there, e.g.
/// after the sender left the room.
fn original_or(
    db: &mut Db,
    sender: UserId,
    client_msg_id: u64,
    refusal: Outcome,
) -> JobResult<Outcome> {
    Ok(match message_by_client_id(db, sender, client_msg_id)? {
        Some(original) => Outcome::Stored {
            message: original,
            duplicate: true,
        },
        None => refusal,
    })
}

/// Inserts a message unless (sender, client id) is taken, in which case the original answers
/// with duplicate = true. The insert comes first so that a batch's first access to the database is
/// a write: SQLite waits for a lock another process holds only when a transaction starts, not when
/// one that has read tries to write. The resend check (store/resend.rs) follows, and a resend's row
/// is deleted again; resends are rare, and like any deleted id its id is never handed out again.
fn insert_message(
    db: &mut Db,
    sender: UserId,
    client_msg_id: u64,
    target: MessageTarget,
    text: String,
    now: u64,
    message: impl FnOnce(u64, String) -> StoredMessage,
) -> JobResult<Outcome> {
    let (recipient_id, room_id) = match target {
        MessageTarget::User(user_id) => (Some(to_db(user_id)), None),
        MessageTarget::Room(room_id) => (None, Some(to_db(room_id))),
    };
    let key = client_msg_key(client_msg_id);
    db.conn
        .prepare_cached(
            "INSERT INTO messages (sender_id, recipient_id, room_id, client_msg_id, timestamp_ms,
                                   text)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            to_db(sender),
            recipient_id,
            room_id,
            key,
            to_db(now),
            &text
        ])?;
    let id = from_db(db.conn.last_insert_rowid());
    match take_back_if_resent(db, sender, key, id) {
        Ok(None) => {
            db.recent.record(sender, key, id);
            Ok(Outcome::Stored {
                message: message(id, text),
                duplicate: false,
            })
        }
        Ok(Some(original_id)) => Ok(Outcome::Stored {
            message: original_message(&db.conn, original_id)?,
            duplicate: true,
        }),
        Err(e) => {
            // The job has no savepoint and its row must not be committed: the whole transaction
            // goes, and run_batch fails the batch's other jobs.
            roll_back_transaction(&db.conn);
            Err(e.into())
        }
    }
}

/// The original's id if `key` was taken before the row `id` just inserted, which is then deleted.
fn take_back_if_resent(
    db: &mut Db,
    sender: UserId,
    key: i64,
    id: u64,
) -> rusqlite::Result<Option<u64>> {
    let original = db.recent.find(&db.conn, sender, key)?;
    if original.is_some() {
        db.conn
            .prepare_cached("DELETE FROM messages WHERE id = ?1")?
            .execute([to_db(id)])?;
    }
    Ok(original)
}

/// Where a message goes: one user or one room.
enum MessageTarget {
    User(UserId),
    Room(u64),
}

fn store_message(
    db: &mut Db,
    sender: UserId,
    recipient: String,
    client_msg_id: u64,
    text: String,
    now: u64,
) -> JobResult<Outcome> {
    let Some(recipient_id) = db.users.id_by_name(&db.conn, &recipient)? else {
        // A resend must get the original back even if the recipient is unknown now.
        return original_or(db, sender, client_msg_id, Outcome::UnknownRecipient);
    };
    // Before the insert, which must be the job's last fallible step (see Op::needs_savepoint).
    let sender_name = db
        .users
        .name_by_id(&db.conn, sender)?
        .ok_or_else(|| no_such_user(sender))?;
    let target = MessageTarget::User(recipient_id);
    insert_message(db, sender, client_msg_id, target, text, now, |id, text| {
        StoredMessage {
            id,
            sender_id: sender,
            sender: sender_name,
            recipient_id,
            recipient,
            timestamp_ms: now,
            text,
            room: None,
        }
    })
}

/// Range scans merged by id, disjoint so each message comes once: direct messages sent, from the
/// message index; direct messages received, from the index, leaving out those to oneself, which
/// the first already returned; the direct messages above the index's mark, either way; and, per
/// membership row, the room's messages inside its window. CROSS JOIN keeps the index (and
/// room_members) the outer loop: each index entry is one rowid look-up, each membership one
/// range of messages_by_room.
const FEED: &str = concat!(
    "WITH m AS (
        SELECT x.id AS id, msg.sender_id, msg.recipient_id, msg.room_id, msg.timestamp_ms,
               msg.text
        FROM idx.sent x CROSS JOIN messages msg
        WHERE x.sender_id = ?1 AND x.id > ?2 AND msg.id = x.id
        UNION ALL
        SELECT x.id, msg.sender_id, msg.recipient_id, msg.room_id, msg.timestamp_ms, msg.text
        FROM idx.received x CROSS JOIN messages msg
        WHERE x.recipient_id = ?1 AND x.id > ?2 AND x.sender_id <> ?1 AND msg.id = x.id
        UNION ALL
        SELECT id, sender_id, recipient_id, room_id, timestamp_ms, text FROM messages
        WHERE id > max(?2, ",
    indexed_up_to!(),
    ") AND room_id IS NULL AND (+sender_id = ?1 OR +recipient_id = ?1)
        UNION ALL
        SELECT msg.id, msg.sender_id, msg.recipient_id, msg.room_id, msg.timestamp_ms, msg.text
        FROM room_members rm CROSS JOIN messages msg
        WHERE rm.user_id = ?1 AND msg.room_id = rm.room_id
          AND msg.id > max(rm.joined_after, ?2)
          AND msg.id <= coalesce(rm.left_after, 9223372036854775807)
        ORDER BY id LIMIT ?3
    )
    SELECT ",
    message_columns!(),
    " FROM m
    JOIN users s ON s.id = m.sender_id
    LEFT JOIN users r ON r.id = m.recipient_id
    LEFT JOIN rooms g ON g.id = m.room_id
    ORDER BY m.id"
);

fn fetch_feed(conn: &Connection, user_id: UserId, after_id: u64, limit: u32) -> JobResult<Outcome> {
    let messages = conn
        .prepare_cached(FEED)?
        .query_map(
            params![to_db(user_id), to_db(after_id), limit_with_lookahead(limit)],
            stored_message,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(into_page(messages, limit))
}

/// Both directions of one conversation, newest first, from the message index, then the
/// conversation's messages above the index's mark; the second direction is skipped for a
/// conversation with oneself, where it would repeat the first.
const HISTORY: &str = concat!(
    "WITH page AS (
        SELECT x.id AS id, m.sender_id, m.recipient_id, m.timestamp_ms, m.text
        FROM idx.pairs x CROSS JOIN messages m
        WHERE x.sender_id = ?1 AND x.recipient_id = ?2 AND x.id < ?3 AND m.id = x.id
        UNION ALL
        SELECT x.id, m.sender_id, m.recipient_id, m.timestamp_ms, m.text
        FROM idx.pairs x CROSS JOIN messages m
        WHERE x.sender_id = ?2 AND x.recipient_id = ?1 AND x.id < ?3 AND ?1 <> ?2
          AND m.id = x.id
        UNION ALL
        SELECT id, sender_id, recipient_id, timestamp_ms, text FROM messages
        WHERE id > ",
    indexed_up_to!(),
    " AND id < ?3 AND room_id IS NULL
          AND ((+sender_id = ?1 AND +recipient_id = ?2) OR (+sender_id = ?2 AND +recipient_id = ?1))
        ORDER BY id DESC LIMIT ?4
    )
    SELECT p.id, p.sender_id, s.username, p.recipient_id, r.username, p.timestamp_ms, p.text,
           NULL
    FROM page p
    JOIN users s ON s.id = p.sender_id
    JOIN users r ON r.id = p.recipient_id
    ORDER BY p.id DESC"
);

fn history(
    db: &mut Db,
    user_id: UserId,
    peer: &str,
    before_id: u64,
    limit: u32,
) -> JobResult<Outcome> {
    let Some(peer_id) = db.users.id_by_name(&db.conn, peer)? else {
        return Ok(Outcome::UnknownRecipient);
    };
    let conn = &db.conn;
    let before = if before_id == 0 {
        NO_UPPER_BOUND
    } else {
        to_db(before_id)
    };
    let messages = conn
        .prepare_cached(HISTORY)?
        .query_map(
            params![
                to_db(user_id),
                to_db(peer_id),
                before,
                limit_with_lookahead(limit)
            ],
            stored_message,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(into_page(messages, limit))
}

/// Per sender, the newest direct message to ?1 with id in (?2, ?3]: one range of the index's
/// `received`, and the unindexed rows above its mark.
const RECEIPTS: &str = concat!(
    "WITH r AS (
        SELECT sender_id, id FROM idx.received WHERE recipient_id = ?1 AND id > ?2 AND id <= ?3
        UNION ALL
        SELECT sender_id, id FROM messages
        WHERE id > max(?2, ",
    indexed_up_to!(),
    ") AND id <= ?3 AND +recipient_id = ?1
    )
    SELECT r.sender_id, s.username, max(r.id) FROM r
    JOIN users s ON s.id = r.sender_id
    GROUP BY r.sender_id ORDER BY r.sender_id"
);

fn mark_delivered(conn: &Connection, user_id: UserId, up_to: u64) -> JobResult<Outcome> {
    let account = account_by_id(conn, user_id)?.ok_or_else(|| no_such_user(user_id))?;
    let old = account.delivered_cursor;
    let new = up_to.min(account.max_message_id).max(old);
    if new == old {
        return Ok(Outcome::Delivered {
            reader: account.username,
            cursor: old,
            receipts: Vec::new(),
        });
    }
    // The receipts are read before the write, which must come last: this job runs without a
    // savepoint (see Op::needs_savepoint). They do not depend on the stored cursor.
    let receipts = conn
        .prepare_cached(RECEIPTS)?
        .query_map(params![to_db(user_id), to_db(old), to_db(new)], |row| {
            Ok((get_u64(row, 0)?, row.get(1)?, get_u64(row, 2)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    conn.prepare_cached("UPDATE users SET delivered_cursor = ?2 WHERE id = ?1")?
        .execute(params![to_db(user_id), to_db(new)])?;
    Ok(Outcome::Delivered {
        reader: account.username,
        cursor: new,
        receipts,
    })
}

// ---------------------------------------------------------------------------------------------
// Rooms
//
// A membership is one row per (room, user) holding a window of message ids: the member sees the
// room's messages with joined_after < id <= left_after (no upper bound while left_after is NULL).
// Ids only grow, so "the newest id at the time" is all a window edge needs, and every message
// stored after a join, in job order, falls inside the new member's window.
//
// A current member is an active row of an open room: only those post, count against the
// limits, and are listed. Closing keeps `active` (the members at close stay listed) but ends
// every window, which is what makes a closed room read-only.

/// The newest message id of the whole database as the edge of a membership window, inline so
/// each write below stays one statement.
macro_rules! newest_message_id {
    () => {
        "(SELECT coalesce(max(id), 0) FROM messages)"
    };
}

/// What most room ops need to know about a room before acting.
struct RoomRef {
    room_id: u64,
    host_id: UserId,
    closed: bool,
}

fn room_by_name(conn: &Connection, name: &str) -> rusqlite::Result<Option<RoomRef>> {
    conn.prepare_cached("SELECT id, host_id, closed_at_ms IS NOT NULL FROM rooms WHERE name = ?1")?
        .query_row([name], |row| {
            Ok(RoomRef {
                room_id: get_u64(row, 0)?,
                host_id: get_u64(row, 1)?,
                closed: row.get(2)?,
            })
        })
        .optional()
}

/// Rooms as listed to users; the member count is a range of the room_members primary key.
macro_rules! room_info_select {
    ($rest:literal) => {
        concat!(
            "SELECT r.id, r.name, r.topic, h.username,
                    (SELECT count(*) FROM room_members WHERE room_id = r.id AND active = 1),
                    r.closed_at_ms IS NOT NULL
             FROM rooms r JOIN users h ON h.id = r.host_id ",
            $rest
        )
    };
}

fn room_info(row: &Row<'_>) -> rusqlite::Result<RoomInfo> {
    Ok(RoomInfo {
        room_id: get_u64(row, 0)?,
        name: row.get(1)?,
        topic: row.get(2)?,
        host: row.get(3)?,
        member_count: u32::try_from(row.get::<_, i64>(4)?).unwrap_or(u32::MAX),
        closed: row.get(5)?,
    })
}

fn room_info_by_name(conn: &Connection, name: &str) -> rusqlite::Result<Option<RoomInfo>> {
    conn.prepare_cached(room_info_select!("WHERE r.name = ?1"))?
        .query_row([name], room_info)
        .optional()
}

/// A user's row in a room, if they ever joined it.
struct Membership {
    joined_after: u64,
    left_after: Option<u64>,
    active: bool,
}

fn membership(
    conn: &Connection,
    room_id: u64,
    user_id: UserId,
) -> rusqlite::Result<Option<Membership>> {
    conn.prepare_cached(
        "SELECT joined_after, left_after, active FROM room_members
         WHERE room_id = ?1 AND user_id = ?2",
    )?
    .query_row(params![to_db(room_id), to_db(user_id)], |row| {
        Ok(Membership {
            joined_after: get_u64(row, 0)?,
            left_after: row.get::<_, Option<i64>>(1)?.map(from_db),
            active: row.get::<_, i64>(2)? != 0,
        })
    })
    .optional()
}

fn is_current_member(conn: &Connection, room: &RoomRef, user_id: UserId) -> rusqlite::Result<bool> {
    Ok(!room.closed && membership(conn, room.room_id, user_id)?.is_some_and(|m| m.active))
}

/// How many rooms the user currently is a member of, for max_rooms_per_user. Closed rooms do not
/// count: they would otherwise hold their members' quota forever.
fn current_room_count(conn: &Connection, user_id: UserId) -> rusqlite::Result<u64> {
    conn.prepare_cached(
        "SELECT count(*) FROM room_members rm JOIN rooms r ON r.id = rm.room_id
         WHERE rm.user_id = ?1 AND rm.active = 1 AND r.closed_at_ms IS NULL",
    )?
    .query_row([to_db(user_id)], |row| get_u64(row, 0))
}

/// Makes the user an active member with a window starting now; a rejoin overwrites the old
/// window, so what was posted while away (and before) stays out of reach.
fn start_membership(conn: &Connection, room_id: u64, user_id: UserId) -> rusqlite::Result<()> {
    conn.prepare_cached(concat!(
        "INSERT INTO room_members (room_id, user_id, joined_after, left_after, active)
         VALUES (?1, ?2, ",
        newest_message_id!(),
        ", NULL, 1)
         ON CONFLICT (room_id, user_id) DO UPDATE
         SET joined_after = excluded.joined_after, left_after = NULL, active = 1"
    ))?
    .execute(params![to_db(room_id), to_db(user_id)])?;
    Ok(())
}

/// Leave or kick: the window ends at the newest id, and the row stays for the history.
fn end_membership(conn: &Connection, room_id: u64, user_id: UserId) -> rusqlite::Result<()> {
    conn.prepare_cached(concat!(
        "UPDATE room_members SET active = 0, left_after = ",
        newest_message_id!(),
        " WHERE room_id = ?1 AND user_id = ?2"
    ))?
    .execute(params![to_db(room_id), to_db(user_id)])?;
    Ok(())
}

/// Active members by ascending id.
fn active_member_ids(conn: &Connection, room_id: u64) -> rusqlite::Result<Vec<UserId>> {
    conn.prepare_cached(
        "SELECT user_id FROM room_members WHERE room_id = ?1 AND active = 1 ORDER BY user_id",
    )?
    .query_map([to_db(room_id)], |row| get_u64(row, 0))?
    .collect()
}

fn create_room(
    db: &mut Db,
    user_id: UserId,
    name: String,
    topic: String,
    max_rooms_per_user: u32,
    now: u64,
) -> JobResult<Outcome> {
    let host = db
        .users
        .name_by_id(&db.conn, user_id)?
        .ok_or_else(|| no_such_user(user_id))?;
    let conn = &db.conn;
    // Checked before writing anything, so a refusal leaves no trace to undo.
    if current_room_count(conn, user_id)? >= u64::from(max_rooms_per_user) {
        return Ok(Outcome::TooManyRooms);
    }
    let inserted = conn
        .prepare_cached(
            "INSERT INTO rooms (name, topic, host_id, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![name, topic, to_db(user_id), to_db(now)]);
    // As for users, the UNIQUE constraint decides; closed rooms keep their names.
    match inserted {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => return Ok(Outcome::RoomNameTaken),
        Err(e) => return Err(e.into()),
    }
    let room_id = from_db(conn.last_insert_rowid());
    start_membership(conn, room_id, user_id)?;
    Ok(Outcome::RoomCreated(RoomInfo {
        room_id,
        name,
        topic,
        host,
        member_count: 1,
        closed: false,
    }))
}

fn join_room(
    conn: &Connection,
    user_id: UserId,
    name: &str,
    max_members: u32,
    max_rooms_per_user: u32,
) -> JobResult<Outcome> {
    let Some(info) = room_info_by_name(conn, name)? else {
        return Ok(Outcome::NoSuchRoom);
    };
    if info.closed {
        return Ok(Outcome::RoomIsClosed);
    }
    // Before the limits: an existing member is not refused because the room or they are full.
    if membership(conn, info.room_id, user_id)?.is_some_and(|m| m.active) {
        return Ok(Outcome::Joined {
            room: info,
            already_member: true,
        });
    }
    if info.member_count >= max_members {
        return Ok(Outcome::RoomFull);
    }
    if current_room_count(conn, user_id)? >= u64::from(max_rooms_per_user) {
        return Ok(Outcome::TooManyRooms);
    }
    start_membership(conn, info.room_id, user_id)?;
    Ok(Outcome::Joined {
        room: RoomInfo {
            member_count: info.member_count.saturating_add(1),
            ..info
        },
        already_member: false,
    })
}

fn leave_room(conn: &Connection, user_id: UserId, name: &str) -> JobResult<Outcome> {
    let Some(room) = room_by_name(conn, name)? else {
        return Ok(Outcome::NoSuchRoom);
    };
    // A closed room has no current members: its close already ended every window, and its
    // members at close stay listed as such. host_id never changes, even when the host leaves.
    if !is_current_member(conn, &room, user_id)? {
        return Ok(Outcome::NotMember);
    }
    end_membership(conn, room.room_id, user_id)?;
    Ok(Outcome::Left {
        room_id: room.room_id,
    })
}

fn kick(db: &mut Db, host_id: UserId, name: &str, target: &str) -> JobResult<Outcome> {
    let Some(room) = room_by_name(&db.conn, name)? else {
        return Ok(Outcome::NoSuchRoom);
    };
    if room.host_id != host_id {
        return Ok(Outcome::NotHost);
    }
    let Some(target_id) = db.users.id_by_name(&db.conn, target)? else {
        return Ok(Outcome::NoSuchUser);
    };
    let conn = &db.conn;
    // The host's own membership ends with LeaveRoom; refusing here keeps a slip of the target
    // name from quietly removing the one person who can manage the room.
    if target_id == host_id {
        return Ok(Outcome::CannotKickHost);
    }
    if !is_current_member(conn, &room, target_id)? {
        return Ok(Outcome::NotMember);
    }
    end_membership(conn, room.room_id, target_id)?;
    Ok(Outcome::Kicked {
        room_id: room.room_id,
        target_id,
    })
}

fn close_room(conn: &Connection, host_id: UserId, name: &str, now: u64) -> JobResult<Outcome> {
    let Some(room) = room_by_name(conn, name)? else {
        return Ok(Outcome::NoSuchRoom);
    };
    if room.host_id != host_id {
        return Ok(Outcome::NotHost);
    }
    if room.closed {
        return Ok(Outcome::RoomIsClosed);
    }
    let members = active_member_ids(conn, room.room_id)?;
    conn.prepare_cached("UPDATE rooms SET closed_at_ms = ?2 WHERE id = ?1")?
        .execute(params![to_db(room.room_id), to_db(now)])?;
    // active stays 1: the members at close keep reading the history and stay listed.
    conn.prepare_cached(concat!(
        "UPDATE room_members SET left_after = ",
        newest_message_id!(),
        " WHERE room_id = ?1 AND active = 1"
    ))?
    .execute([to_db(room.room_id)])?;
    Ok(Outcome::RoomClosedOk {
        room_id: room.room_id,
        members,
    })
}

fn list_rooms(conn: &Connection, after_name: &str, limit: u32) -> JobResult<Outcome> {
    let rooms = conn
        .prepare_cached(room_info_select!(
            "WHERE r.name > ?1 ORDER BY r.name LIMIT ?2"
        ))?
        .query_map(params![after_name, limit_with_lookahead(limit)], room_info)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let (rooms, more) = split_lookahead(rooms, limit);
    Ok(Outcome::RoomList { rooms, more })
}

fn room_members(conn: &Connection, name: &str) -> JobResult<Outcome> {
    let Some(room) = room_info_by_name(conn, name)? else {
        return Ok(Outcome::NoSuchRoom);
    };
    let members = conn
        .prepare_cached(
            "SELECT rm.user_id, u.username FROM room_members rm JOIN users u ON u.id = rm.user_id
             WHERE rm.room_id = ?1 AND rm.active = 1 ORDER BY u.username",
        )?
        .query_map([to_db(room.room_id)], |row| {
            Ok((get_u64(row, 0)?, row.get(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Outcome::Members { room, members })
}

fn store_room_message(
    db: &mut Db,
    sender: UserId,
    room_name: String,
    client_msg_id: u64,
    text: String,
    now: u64,
) -> JobResult<Outcome> {
    // As for direct messages: a resend gets its original back even if the sender has since left
    // or the room closed, so every refusal first looks for one.
    let Some(room) = room_by_name(&db.conn, &room_name)? else {
        return original_or(db, sender, client_msg_id, Outcome::NoSuchRoom);
    };
    if room.closed {
        return original_or(db, sender, client_msg_id, Outcome::RoomIsClosed);
    }
    if !is_current_member(&db.conn, &room, sender)? {
        return original_or(db, sender, client_msg_id, Outcome::NotMember);
    }
    // Before the insert, which must be the job's last fallible step (see Op::needs_savepoint).
    let sender_name = db
        .users
        .name_by_id(&db.conn, sender)?
        .ok_or_else(|| no_such_user(sender))?;
    let target = MessageTarget::Room(room.room_id);
    insert_message(db, sender, client_msg_id, target, text, now, |id, text| {
        StoredMessage {
            id,
            sender_id: sender,
            sender: sender_name,
            recipient_id: 0,
            recipient: room_name.clone(),
            timestamp_ms: now,
            text,
            room: Some((room.room_id, room_name)),
        }
    })
}

/// One room's messages inside (?2, ?3], newest first: one range of messages_by_room.
const ROOM_HISTORY: &str = concat!(
    "SELECT ",
    message_columns!(),
    " FROM messages m
     JOIN users s ON s.id = m.sender_id
     JOIN rooms g ON g.id = m.room_id
     LEFT JOIN users r ON r.id = m.recipient_id
     WHERE m.room_id = ?1 AND m.id > ?2 AND m.id <= ?3
     ORDER BY m.id DESC LIMIT ?4"
);

fn room_history(
    conn: &Connection,
    user_id: UserId,
    name: &str,
    before_id: u64,
    limit: u32,
) -> JobResult<Outcome> {
    let Some(room) = room_by_name(conn, name)? else {
        return Ok(Outcome::NoSuchRoom);
    };
    // Any row will do, active or not: a former member reads what was posted while they were in.
    let Some(window) = membership(conn, room.room_id, user_id)? else {
        return Ok(Outcome::NotMember);
    };
    // Both upper bounds folded into one, so the scan is a single index range.
    let before = if before_id == 0 {
        NO_UPPER_BOUND
    } else {
        to_db(before_id).saturating_sub(1)
    };
    let upto = window.left_after.map_or(NO_UPPER_BOUND, to_db).min(before);
    let messages = conn
        .prepare_cached(ROOM_HISTORY)?
        .query_map(
            params![
                to_db(room.room_id),
                to_db(window.joined_after),
                upto,
                limit_with_lookahead(limit)
            ],
            stored_message,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(into_page(messages, limit))
}

fn load_rooms(conn: &Connection) -> JobResult<Outcome> {
    let rooms = conn
        .prepare_cached(room_info_select!(
            "WHERE r.closed_at_ms IS NULL ORDER BY r.id"
        ))?
        .query_map([], room_info)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut loaded = Vec::with_capacity(rooms.len());
    for room in rooms {
        let members = active_member_ids(conn, room.room_id)?;
        loaded.push((room, members));
    }
    Ok(Outcome::Rooms(loaded))
}

// ---------------------------------------------------------------------------------------------
// Presence

fn set_last_seen(conn: &Connection, user_id: UserId, at_ms: u64) -> JobResult<Outcome> {
    let changed = conn
        .prepare_cached("UPDATE users SET last_seen_ms = ?2 WHERE id = ?1")?
        .execute(params![to_db(user_id), to_db(at_ms)])?;
    if changed == 0 {
        return Err(no_such_user(user_id));
    }
    Ok(Outcome::LastSeenSet)
}

fn lookup_users(conn: &Connection, names: Vec<String>) -> JobResult<Outcome> {
    let mut select =
        conn.prepare_cached("SELECT id, last_seen_ms FROM users WHERE username = ?1")?;
    let mut users = Vec::with_capacity(names.len());
    for name in names {
        let found = select
            .query_row([&name], |row| Ok((get_u64(row, 0)?, get_u64(row, 1)?)))
            .optional()?;
        users.push((name, found));
    }
    Ok(Outcome::Users(users))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tempfile::TempDir;

    const LONG_WAIT: Duration = Duration::from_secs(10);

    fn ticket(request_id: u32) -> Ticket {
        Ticket {
            session: 1,
            slot: 0,
            request_id,
        }
    }

    fn config(dir: &TempDir) -> StoreConfig {
        StoreConfig {
            path: dir.path().join("hubbub.db"),
            sync: SyncMode::Normal,
            queue_capacity: 1024,
            max_batch: 64,
            index: IndexSettings::default(),
        }
    }

    fn no_wake() -> Arc<dyn Fn() + Send + Sync> {
        Arc::new(|| {})
    }

    /// A running store that answers one job at a time.
    struct TestStore {
        handle: StoreHandle,
        done: Receiver<Done>,
        next_request: u32,
        dir: TempDir,
    }

    impl TestStore {
        fn new() -> TestStore {
            TestStore::open(tempfile::tempdir().unwrap())
        }

        fn open(dir: TempDir) -> TestStore {
            TestStore::with_index(dir, IndexSettings::default())
        }

        fn with_index(dir: TempDir, index: IndexSettings) -> TestStore {
            let config = StoreConfig {
                index,
                ..config(&dir)
            };
            let (handle, done) = StoreHandle::start(config, no_wake()).unwrap();
            TestStore {
                handle,
                done,
                next_request: 0,
                dir,
            }
        }

        fn call(&mut self, op: Op) -> Outcome {
            self.next_request += 1;
            let ticket = ticket(self.next_request);
            self.handle.try_submit(Job { ticket, op }).unwrap();
            let done = self.done.recv_timeout(LONG_WAIT).unwrap();
            assert_eq!(done.ticket, ticket);
            done.outcome
        }

        fn user(&mut self, name: &str) -> UserId {
            match self.call(Op::CreateUser {
                username: name.into(),
                phc: format!("$argon2id$stub${name}"),
            }) {
                Outcome::UserCreated { user_id } => user_id,
                other => panic!("unexpected {other:?}"),
            }
        }

        fn send(
            &mut self,
            sender: UserId,
            to: &str,
            client_msg_id: u64,
            text: &str,
        ) -> StoredMessage {
            match self.call(Op::StoreMessage {
                sender,
                recipient: to.into(),
                client_msg_id,
                text: text.into(),
            }) {
                Outcome::Stored {
                    message,
                    duplicate: false,
                } => message,
                other => panic!("unexpected {other:?}"),
            }
        }

        fn feed(
            &mut self,
            user_id: UserId,
            after_id: u64,
            limit: u32,
        ) -> (Vec<StoredMessage>, bool) {
            page(self.call(Op::FetchFeed {
                user_id,
                after_id,
                limit,
            }))
        }

        fn account(&mut self, name: &str) -> Account {
            match self.call(Op::LookupUser {
                username: name.into(),
            }) {
                Outcome::Credentials(Some((account, _))) => account,
                other => panic!("unexpected {other:?}"),
            }
        }

        fn issue(&mut self, user_id: UserId, device: &str, ttl_secs: u64) -> ([u8; 16], u64) {
            match self.call(Op::IssueToken {
                user_id,
                device: device.into(),
                ttl_ms: ttl_secs * 1000,
            }) {
                Outcome::TokenIssued {
                    token, token_id, ..
                } => (token, token_id),
                other => panic!("unexpected {other:?}"),
            }
        }

        /// Shuts the store down cleanly and hands back its directory for a reopen.
        fn stop(self) -> TempDir {
            self.handle
                .try_submit(Job {
                    ticket: ticket(u32::MAX),
                    op: Op::Shutdown,
                })
                .unwrap();
            let done = self.done.recv_timeout(LONG_WAIT).unwrap();
            assert!(matches!(done.outcome, Outcome::Stopped));
            self.handle.join();
            self.dir
        }
    }

    fn page(outcome: Outcome) -> (Vec<StoredMessage>, bool) {
        match outcome {
            Outcome::Page { messages, more } => (messages, more),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn ids(messages: &[StoredMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.id).collect()
    }

    fn failure(outcome: &Outcome) -> &str {
        match outcome {
            Outcome::Failed(reason) => reason,
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    /// The ops as jobs, each with a ticket of its own.
    fn jobs(ops: Vec<Op>) -> Vec<Job> {
        ops.into_iter()
            .enumerate()
            .map(|(i, op)| Job {
                ticket: ticket(u32::try_from(i).unwrap()),
                op,
            })
            .collect()
    }

    /// Runs ops as one batch on a connection, bypassing the thread, so tests can tamper with the
    /// connection between batches.
    fn run_ops(db: &mut Db, ops: Vec<Op>) -> Vec<Outcome> {
        run_batch(db, jobs(ops))
            .dones
            .into_iter()
            .map(|d| d.outcome)
            .collect()
    }

    fn create(name: &str) -> Op {
        Op::CreateUser {
            username: name.into(),
            phc: "phc".into(),
        }
    }

    fn user_count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM users", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn create_then_lookup_returns_account_and_phc() {
        let mut store = TestStore::new();
        let id = store.user("alice");
        match store.call(Op::LookupUser {
            username: "alice".into(),
        }) {
            Outcome::Credentials(Some((account, phc))) => {
                assert_eq!(
                    account,
                    Account {
                        user_id: id,
                        username: "alice".into(),
                        delivered_cursor: 0,
                        max_message_id: 0
                    }
                );
                assert_eq!(phc, "$argon2id$stub$alice");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            store.call(Op::LookupUser {
                username: "nobody".into()
            }),
            Outcome::Credentials(None)
        ));
        store.stop();
    }

    #[test]
    fn duplicate_username_is_taken_and_changes_nothing() {
        let mut store = TestStore::new();
        store.user("bob");
        assert!(matches!(store.call(create("bob")), Outcome::UsernameTaken));
        match store.call(Op::LookupUser {
            username: "bob".into(),
        }) {
            Outcome::Credentials(Some((_, phc))) => assert_eq!(phc, "$argon2id$stub$bob"),
            other => panic!("unexpected {other:?}"),
        }
        // The rejected job must not poison the next one.
        store.user("carol");
        store.stop();
    }

    #[test]
    fn token_issue_resume_list_revoke() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let (token, token_id) = store.issue(alice, "laptop", 3600);
        let (_, phone_id) = store.issue(alice, "phone", 3600);

        match store.call(Op::ResumeToken {
            token,
            device: "laptop-2".into(),
        }) {
            Outcome::Resumed(Some((account, id))) => {
                assert_eq!(id, token_id);
                assert_eq!(account.user_id, alice);
                assert_eq!(account.username, "alice");
            }
            other => panic!("unexpected {other:?}"),
        }
        match store.call(Op::ListTokens { user_id: alice }) {
            Outcome::Tokens(tokens) => {
                assert_eq!(
                    tokens.iter().map(|t| t.token_id).collect::<Vec<_>>(),
                    vec![token_id, phone_id]
                );
                let laptop = &tokens[0];
                assert_eq!(laptop.device, "laptop-2", "resume updates the device");
                assert!(laptop.last_used_at_ms >= laptop.created_at_ms);
                assert_eq!(laptop.expires_at_ms, laptop.created_at_ms + 3_600_000);
            }
            other => panic!("unexpected {other:?}"),
        }

        assert!(matches!(
            store.call(Op::RevokeToken {
                user_id: alice,
                token_id
            }),
            Outcome::Revoked(true)
        ));
        assert!(matches!(
            store.call(Op::RevokeToken {
                user_id: alice,
                token_id
            }),
            Outcome::Revoked(false)
        ));
        assert!(matches!(
            store.call(Op::ResumeToken {
                token,
                device: "x".into()
            }),
            Outcome::Resumed(None)
        ));
        match store.call(Op::ListTokens { user_id: alice }) {
            Outcome::Tokens(tokens) => assert_eq!(tokens.len(), 1),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            store.call(Op::ResumeToken {
                token: [7; 16],
                device: "x".into()
            }),
            Outcome::Resumed(None)
        ));
        store.stop();
    }

    #[test]
    fn tokens_are_random_and_distinct() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let (a, _) = store.issue(alice, "one", 60);
        let (b, _) = store.issue(alice, "two", 60);
        assert_ne!(a, b);
        assert_eq!(a[6] >> 4, 4, "UUID version 4");
        store.stop();
    }

    #[test]
    fn expired_token_does_not_resume_and_is_not_listed() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let (token, _) = store.issue(alice, "laptop", 0);
        assert!(matches!(
            store.call(Op::ResumeToken {
                token,
                device: "laptop".into()
            }),
            Outcome::Resumed(None)
        ));
        match store.call(Op::ListTokens { user_id: alice }) {
            Outcome::Tokens(tokens) => assert!(tokens.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
        store.stop();
    }

    #[test]
    fn token_of_another_user_is_not_revocable() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let mallory = store.user("mallory");
        let (token, token_id) = store.issue(alice, "laptop", 3600);
        assert!(matches!(
            store.call(Op::RevokeToken {
                user_id: mallory,
                token_id
            }),
            Outcome::Revoked(false)
        ));
        assert!(matches!(
            store.call(Op::ResumeToken {
                token,
                device: "laptop".into()
            }),
            Outcome::Resumed(Some(_))
        ));
        store.stop();
    }

    #[test]
    fn issuing_for_unknown_user_fails_clearly() {
        let mut store = TestStore::new();
        let outcome = store.call(Op::IssueToken {
            user_id: 42,
            device: "x".into(),
            ttl_ms: 60_000,
        });
        assert!(failure(&outcome).contains("no user with id 42"));
        store.stop();
    }

    #[test]
    fn resend_returns_original_as_duplicate() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        store.user("bob");
        let original = store.send(alice, "bob", u64::MAX, "hello");
        match store.call(Op::StoreMessage {
            sender: alice,
            recipient: "bob".into(),
            client_msg_id: u64::MAX,
            text: "hello again?".into(),
        }) {
            Outcome::Stored { message, duplicate } => {
                assert!(duplicate);
                assert_eq!(message, original);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Same client id from another sender, and a neighbouring id, are distinct messages.
        let bob = store.account("bob").user_id;
        let other = store.send(bob, "alice", u64::MAX, "hi");
        let next = store.send(alice, "bob", u64::MAX - 1, "again");
        assert!(original.id < other.id && other.id < next.id);
        let (feed, _) = store.feed(bob, 0, 10);
        assert_eq!(feed.len(), 3, "the resend stored nothing");
        store.stop();
    }

    #[test]
    fn message_to_unknown_recipient() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        assert!(matches!(
            store.call(Op::StoreMessage {
                sender: alice,
                recipient: "ghost".into(),
                client_msg_id: 1,
                text: "boo".into()
            }),
            Outcome::UnknownRecipient
        ));
        assert!(store.feed(alice, 0, 10).0.is_empty());
        store.stop();
    }

    #[test]
    fn feed_pages_cover_everything_without_gap_or_overlap() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        store.user("carol");
        let mut expected = Vec::new();
        for i in 0..120u64 {
            let message = match i % 3 {
                0 => store.send(alice, "bob", i, "a->b"),
                1 => store.send(bob, "alice", i, "b->a"),
                _ => store.send(bob, "carol", i, "not alice's"),
            };
            if i % 3 != 2 {
                expected.push(message.id);
            }
        }
        let mut seen = Vec::new();
        let mut after = 0;
        let mut pages = 0;
        loop {
            let (messages, more) = store.feed(alice, after, 50);
            pages += 1;
            assert!(messages.len() <= 50);
            seen.extend(ids(&messages));
            match messages.last() {
                Some(last) if more => after = last.id,
                _ => {
                    assert!(!more);
                    break;
                }
            }
        }
        assert_eq!(seen, expected);
        assert_eq!(pages, 2, "80 messages in pages of 50");
        assert_eq!(
            store.account("alice").max_message_id,
            *expected.last().unwrap()
        );
        store.stop();
    }

    #[test]
    fn feed_has_sent_received_and_self_messages_once() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        let sent = store.send(alice, "bob", 1, "to bob");
        let received = store.send(bob, "alice", 1, "to alice");
        let note = store.send(alice, "alice", 2, "note to self");
        let (messages, more) = store.feed(alice, 0, 10);
        assert!(!more);
        assert_eq!(messages, vec![sent.clone(), received.clone(), note]);
        assert_eq!(messages[1].sender, "bob");
        assert_eq!(messages[1].recipient, "alice");
        let (bobs, _) = store.feed(bob, 0, 10);
        assert_eq!(bobs, vec![sent, received]);
        store.stop();
    }

    #[test]
    fn feed_with_exact_limit_says_no_more() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        store.user("bob");
        for i in 0..3 {
            store.send(alice, "bob", i, "x");
        }
        let (messages, more) = store.feed(alice, 0, 3);
        assert_eq!(messages.len(), 3);
        assert!(!more);
        let (messages, more) = store.feed(alice, 0, 2);
        assert_eq!(messages.len(), 2);
        assert!(more);
        assert!(store.feed(alice, u64::MAX, 10).0.is_empty());
        store.stop();
    }

    #[test]
    fn mark_delivered_gives_receipts_per_sender_and_never_lowers() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        let carol = store.user("carol");
        let b1 = store.send(bob, "alice", 1, "b1");
        let c1 = store.send(carol, "alice", 1, "c1");
        let b2 = store.send(bob, "alice", 2, "b2");
        let mine = store.send(alice, "bob", 1, "not a receipt for alice");
        let c2 = store.send(carol, "alice", 2, "c2");

        let deliver = |store: &mut TestStore, up_to| match store.call(Op::MarkDelivered {
            user_id: alice,
            up_to,
        }) {
            Outcome::Delivered {
                cursor, receipts, ..
            } => (cursor, receipts),
            other => panic!("unexpected {other:?}"),
        };

        let (cursor, receipts) = deliver(&mut store, b2.id);
        assert_eq!(cursor, b2.id);
        assert_eq!(
            receipts,
            vec![
                (bob, "bob".to_owned(), b2.id),
                (carol, "carol".to_owned(), c1.id)
            ]
        );
        assert!(b1.id < c1.id);

        let (cursor, receipts) = deliver(&mut store, b1.id);
        assert_eq!(cursor, b2.id, "never lowered");
        assert!(receipts.is_empty());

        let (cursor, receipts) = deliver(&mut store, u64::MAX);
        assert_eq!(cursor, c2.id, "never past the newest message");
        assert_eq!(receipts, vec![(carol, "carol".to_owned(), c2.id)]);
        assert!(mine.id < c2.id);
        assert_eq!(store.account("alice").delivered_cursor, c2.id);
        store.stop();
    }

    #[test]
    fn history_pages_newest_first_without_gap_or_overlap() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        store.user("carol");
        let mut expected = Vec::new();
        for i in 0..45u64 {
            match i % 3 {
                0 => expected.push(store.send(alice, "bob", i, "a").id),
                1 => expected.push(store.send(bob, "alice", i, "b").id),
                _ => {
                    store.send(alice, "carol", i, "elsewhere");
                }
            }
        }
        expected.reverse();
        let mut seen = Vec::new();
        let mut before = 0;
        loop {
            let (messages, more) = page(store.call(Op::History {
                user_id: alice,
                peer: "bob".into(),
                before_id: before,
                limit: 7,
            }));
            seen.extend(ids(&messages));
            match messages.last() {
                Some(last) if more => before = last.id,
                _ => break,
            }
        }
        assert_eq!(seen, expected);
        store.stop();
    }

    #[test]
    fn history_with_oneself_lists_each_note_once() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let a = store.send(alice, "alice", 1, "one");
        let b = store.send(alice, "alice", 2, "two");
        let (messages, more) = page(store.call(Op::History {
            user_id: alice,
            peer: "alice".into(),
            before_id: 0,
            limit: 10,
        }));
        assert_eq!(ids(&messages), vec![b.id, a.id]);
        assert!(!more);
        store.stop();
    }

    #[test]
    fn history_with_unknown_peer() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        assert!(matches!(
            store.call(Op::History {
                user_id: alice,
                peer: "ghost".into(),
                before_id: 0,
                limit: 10
            }),
            Outcome::UnknownRecipient
        ));
        store.stop();
    }

    #[test]
    fn text_and_names_round_trip_byte_exact() {
        let mut store = TestStore::new();
        let odd_name = "o'neil\"; drop table users;--\0x";
        let alice = store.user("alice");
        store.user(odd_name);
        let text = format!(
            "nul:\0 quote:' dquote:\" semi:; pct:% emoji:🦀👩‍👩‍👧 rtl:שלום {}",
            "ünïcødé ".repeat(10_000)
        );
        let stored = store.send(alice, odd_name, 1, &text);
        assert_eq!(stored.text, text);
        let (feed, _) = store.feed(alice, 0, 1);
        assert_eq!(feed[0].text, text);
        assert_eq!(feed[0].recipient, odd_name);
        assert_eq!(store.account(odd_name).username, odd_name);
        assert!(matches!(
            store.call(Op::LookupUser {
                username: "o'neil\"; drop table users;--".into()
            }),
            Outcome::Credentials(None)
        ));
        store.stop();
    }

    #[test]
    fn newer_schema_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        let conn = Connection::open(&config.path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);

        let err = StoreHandle::start(config.clone(), no_wake()).err().unwrap();
        assert!(matches!(
            err,
            StoreError::NewerSchema {
                found: 99,
                supported: SCHEMA_VERSION,
                ..
            }
        ));
        let message = err.to_string();
        assert!(message.contains("newer hubbub"), "{message}");
        assert!(message.contains("schema 99"), "{message}");
        assert!(
            message.contains(&format!("knows up to {SCHEMA_VERSION}")),
            "{message}"
        );
        assert!(message.contains("hubbub.db"), "{message}");

        let conn = Connection::open(&config.path).unwrap();
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0, "nothing created in a database we refused");
    }

    #[test]
    fn a_second_store_on_a_served_database_is_refused_until_the_first_stops() {
        let mut first = TestStore::new();
        let ann = first.user("ann");
        let config = config(&first.dir);

        let err = StoreHandle::start(config.clone(), no_wake()).err().unwrap();
        let pid = std::process::id();
        assert!(
            matches!(&err, StoreError::InUse { path, holder: Some(holder) }
                if *path == config.path && *holder == pid),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("hubbub.db is in use by another hubbub"),
            "{message}"
        );
        assert!(message.contains(&format!("(pid {pid})")), "{message}");
        assert!(message.contains("hubbub.db-lock"), "{message}");
        // The refused start left the running store alone.
        assert_eq!(first.user("bob"), ann + 1);

        let mut again = TestStore::open(first.stop());
        assert_eq!(
            again.user("cy"),
            ann + 2,
            "the same database, both users kept"
        );
        again.stop();
    }

    #[test]
    fn a_second_store_through_a_symbolic_link_to_a_served_database_is_refused() {
        let first = TestStore::new();
        let link = first.dir.path().join("link.db");
        std::os::unix::fs::symlink(config(&first.dir).path, &link).unwrap();
        let through_link = StoreConfig {
            path: link,
            ..config(&first.dir)
        };
        let err = StoreHandle::start(through_link, no_wake()).err().unwrap();
        assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
        first.stop();
    }

    #[test]
    fn a_lock_file_left_behind_does_not_hold_the_database_but_a_lock_on_it_does() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        let lock = lock_path(&config.path);
        // What a killed server leaves: the file, with a pid, but no lock (the kernel dropped it).
        std::fs::write(&lock, "4242\n").unwrap();
        let store = TestStore::open(dir);
        let dir = store.stop();

        // Someone else's lock on a file without a readable pid: refused, and said without one.
        let other = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&lock)
            .unwrap();
        other.try_lock().unwrap();
        std::fs::write(&lock, "not a pid").unwrap();
        let err = StoreHandle::start(config.clone(), no_wake()).err().unwrap();
        assert!(
            matches!(err, StoreError::InUse { holder: None, .. }),
            "{err:?}"
        );
        assert!(!err.to_string().contains("(pid"), "{err}");
        drop(other);
        TestStore::open(dir).stop();
    }

    #[test]
    fn garbage_file_is_refused_with_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        std::fs::write(&config.path, vec![0x5a; 8192]).unwrap();
        let err = StoreHandle::start(config, no_wake()).err().unwrap();
        assert!(matches!(err, StoreError::Open(_)));
        assert!(err.to_string().contains("hubbub.db"), "{err}");
    }

    #[test]
    fn missing_directory_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(&dir);
        config.path = dir.path().join("no/such/dir/hubbub.db");
        let err = StoreHandle::start(config, no_wake()).err().unwrap();
        assert!(matches!(err, StoreError::Open(_)), "{err}");
    }

    #[test]
    fn migrations_are_consecutive_and_reach_schema_version() {
        for (i, step) in MIGRATIONS.iter().enumerate() {
            assert_eq!(step.version, i32::try_from(i + 1).unwrap());
        }
        assert_eq!(SCHEMA_VERSION, 5);
    }

    #[test]
    fn older_schema_is_migrated_and_data_kept() {
        for known in 1..MIGRATIONS.len() {
            let dir = tempfile::tempdir().unwrap();
            let config = config(&dir);
            {
                // A database as a build that only knew the first `known` steps left it.
                let mut conn = Connection::open(&config.path).unwrap();
                for step in &MIGRATIONS[..known] {
                    apply_migration(&mut conn, step).unwrap();
                }
                conn.execute(
                    "INSERT INTO users (username, phc, created_at_ms) VALUES ('old', 'phc', 1)",
                    [],
                )
                .unwrap();
            }
            let mut store = TestStore::open(dir);
            let old = store.account("old");
            let new = store.user("new");
            store.send(new, "old", 1, "welcome to the newest step");
            assert_eq!(store.account("old").max_message_id, 1, "from step {known}");
            assert_eq!(old.username, "old");
            store.room(old.user_id, "lounge");
            let _dir = store.stop();

            let conn = Connection::open(&config.path).unwrap();
            assert_eq!(schema_version(&conn).unwrap(), SCHEMA_VERSION);
            let mode: String = conn
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
    }

    #[test]
    fn shutdown_commits_queued_jobs_then_stops() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        let (handle, done) = StoreHandle::start(config.clone(), no_wake()).unwrap();
        handle
            .try_submit(Job {
                ticket: ticket(1),
                op: create("alice"),
            })
            .unwrap();
        handle
            .try_submit(Job {
                ticket: ticket(2),
                op: Op::Shutdown,
            })
            .unwrap();
        let first = done.recv_timeout(LONG_WAIT).unwrap();
        assert_eq!(first.ticket, ticket(1));
        assert!(matches!(first.outcome, Outcome::UserCreated { .. }));
        let second = done.recv_timeout(LONG_WAIT).unwrap();
        assert_eq!(second.ticket, ticket(2));
        assert!(matches!(second.outcome, Outcome::Stopped));
        handle.join();
        assert!(done.recv().is_err(), "the thread ended");

        let mut store = TestStore::open(dir);
        assert_eq!(store.account("alice").username, "alice");
        store.stop();
    }

    #[test]
    fn dropped_receiver_ends_the_thread_quietly() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, done) = StoreHandle::start(config(&dir), no_wake()).unwrap();
        drop(done);
        handle
            .try_submit(Job {
                ticket: ticket(1),
                op: create("alice"),
            })
            .unwrap();
        // Returns only if the thread noticed and ended.
        handle.join();
    }

    /// A wake callback that holds the worker inside the first wake until released, so jobs
    /// submitted meanwhile are all queued when it next looks: batch sizes become deterministic.
    struct Gate {
        release: Mutex<Option<mpsc::Receiver<()>>>,
        wakes: AtomicUsize,
    }

    fn gated_store(
        dir: &TempDir,
        queue_capacity: usize,
        max_batch: usize,
    ) -> (StoreHandle, Receiver<Done>, Arc<Gate>, mpsc::Sender<()>) {
        let (release_tx, release_rx) = mpsc::channel();
        let gate = Arc::new(Gate {
            release: Mutex::new(Some(release_rx)),
            wakes: AtomicUsize::new(0),
        });
        let in_wake = Arc::clone(&gate);
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            in_wake.wakes.fetch_add(1, Ordering::SeqCst);
            if let Some(release) = in_wake.release.lock().unwrap().take() {
                release.recv().unwrap();
            }
        });
        let mut config = config(dir);
        config.queue_capacity = queue_capacity;
        config.max_batch = max_batch;
        let (handle, done) = StoreHandle::start(config, wake).unwrap();
        // The first batch: one user, after which the worker parks in the gate.
        handle
            .try_submit(Job {
                ticket: ticket(0),
                op: create("alice"),
            })
            .unwrap();
        assert!(matches!(
            done.recv_timeout(LONG_WAIT).unwrap().outcome,
            Outcome::UserCreated { .. }
        ));
        (handle, done, gate, release_tx)
    }

    fn message_to_self(i: u64) -> Op {
        Op::StoreMessage {
            sender: 1,
            recipient: "alice".into(),
            client_msg_id: i,
            text: format!("message {i}"),
        }
    }

    #[test]
    fn group_commit_puts_queued_jobs_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, done, gate, release) = gated_store(&dir, 1024, 1000);
        assert_eq!(handle.last_commit().0, 1);
        for i in 0..100u32 {
            handle
                .try_submit(Job {
                    ticket: ticket(i + 1),
                    op: message_to_self(u64::from(i)),
                })
                .unwrap();
        }
        // A read queued behind the writes must see all of them.
        handle
            .try_submit(Job {
                ticket: ticket(1000),
                op: Op::FetchFeed {
                    user_id: 1,
                    after_id: 0,
                    limit: 500,
                },
            })
            .unwrap();
        assert_eq!(handle.queue_depth(), 101);
        release.send(()).unwrap();

        for i in 0..100u32 {
            let d = done.recv_timeout(LONG_WAIT).unwrap();
            assert_eq!(d.ticket, ticket(i + 1), "completions keep submission order");
            assert!(matches!(d.outcome, Outcome::Stored { .. }));
        }
        let feed = done.recv_timeout(LONG_WAIT).unwrap();
        assert_eq!(page(feed.outcome).0.len(), 100);
        assert_eq!(
            handle.last_commit().0,
            101,
            "one commit for the whole queue"
        );
        assert_eq!(handle.queue_depth(), 0);
        drop(done);
        handle.join();
        assert_eq!(gate.wakes.load(Ordering::SeqCst), 2, "one wake per batch");
    }

    #[test]
    fn max_batch_bounds_each_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, done, gate, release) = gated_store(&dir, 1024, 30);
        for i in 0..100u32 {
            handle
                .try_submit(Job {
                    ticket: ticket(i + 1),
                    op: message_to_self(u64::from(i)),
                })
                .unwrap();
        }
        release.send(()).unwrap();
        for _ in 0..100 {
            done.recv_timeout(LONG_WAIT).unwrap();
        }
        assert_eq!(handle.last_commit().0, 10, "30 + 30 + 30 + 10");
        drop(done);
        handle.join();
        assert_eq!(gate.wakes.load(Ordering::SeqCst), 1 + 4);
    }

    #[test]
    fn full_queue_hands_the_job_back() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, done, _gate, release) = gated_store(&dir, 4, 64);
        for i in 0..4 {
            handle
                .try_submit(Job {
                    ticket: ticket(i + 1),
                    op: message_to_self(u64::from(i)),
                })
                .unwrap();
        }
        let rejected = handle
            .try_submit(Job {
                ticket: ticket(99),
                op: message_to_self(99),
            })
            .unwrap_err();
        assert_eq!(rejected.ticket, ticket(99));
        assert_eq!(handle.queue_depth(), 4, "the rejected job is not counted");
        release.send(()).unwrap();
        for _ in 0..4 {
            done.recv_timeout(LONG_WAIT).unwrap();
        }
        handle.try_submit(rejected).unwrap();
        assert!(matches!(
            done.recv_timeout(LONG_WAIT).unwrap().outcome,
            Outcome::Stored { .. }
        ));
        drop(done);
        handle.join();
    }

    #[test]
    fn locked_database_fails_the_job_and_the_thread_recovers() {
        let mut store = TestStore::new();
        store.user("alice");
        let path = store.dir.path().join("hubbub.db");
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();

        let outcome = store.call(create("bob"));
        let reason = failure(&outcome);
        assert!(reason.contains("create user"), "{reason}");
        assert!(reason.contains("locked"), "{reason}");
        // Reads still work while another process holds the write lock (WAL).
        assert_eq!(store.account("alice").username, "alice");

        other.execute_batch("ROLLBACK").unwrap();
        store.user("bob");
        store.stop();
    }

    #[test]
    fn read_only_database_fails_writes_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        let outcomes = run_ops(&mut db, vec![create("alice")]);
        assert!(matches!(outcomes[0], Outcome::UserCreated { .. }));

        // Stands in for chmod 0444, which root ignores.
        db.conn.pragma_update(None, "query_only", true).unwrap();
        let outcomes = run_ops(
            &mut db,
            vec![
                create("bob"),
                Op::LookupUser {
                    username: "alice".into(),
                },
            ],
        );
        assert!(failure(&outcomes[0]).contains("readonly"), "{outcomes:?}");
        assert!(matches!(outcomes[1], Outcome::Credentials(Some(_))));

        db.conn.pragma_update(None, "query_only", false).unwrap();
        let outcomes = run_ops(&mut db, vec![create("bob")]);
        assert!(matches!(outcomes[0], Outcome::UserCreated { .. }));
        assert_eq!(user_count(&db.conn), 2);
    }

    #[test]
    fn read_only_open_fails_writes_but_answers_reads() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        drop(open_database(&config).unwrap());
        let conn =
            Connection::open_with_flags(&config.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        // Reads of the account go through the message index, as on the store's own connection.
        let index = index_path(&config.path);
        conn.execute("ATTACH DATABASE ?1 AS idx", [index.to_str().unwrap()])
            .unwrap();
        let mut db = Db {
            conn,
            users: UserCache::default(),
            recent: RecentIds::default(),
        };
        let outcomes = run_ops(
            &mut db,
            vec![
                create("alice"),
                Op::LookupUser {
                    username: "alice".into(),
                },
            ],
        );
        assert!(failure(&outcomes[0]).contains("readonly"), "{outcomes:?}");
        assert!(matches!(outcomes[1], Outcome::Credentials(None)));
    }

    #[test]
    fn full_disk_fails_the_job_and_never_claims_lost_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        run_ops(&mut db, vec![create("alice")]);
        let pages: i64 = db
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        // The database may not grow: any new page is a full disk.
        db.conn
            .pragma_update(None, "max_page_count", pages)
            .unwrap();
        let big_message = Op::StoreMessage {
            sender: 1,
            recipient: "alice".into(),
            client_msg_id: 1,
            text: "x".repeat(256 * 1024),
        };
        let outcomes = run_ops(
            &mut db,
            vec![
                create("bob"),
                big_message,
                Op::LookupUser {
                    username: "alice".into(),
                },
            ],
        );
        assert!(failure(&outcomes[1]).contains("full"), "{outcomes:?}");
        // Whatever answered success must really be in the database.
        let bob_claimed = matches!(outcomes[0], Outcome::UserCreated { .. });
        let bob_present = matches!(
            run_ops(
                &mut db,
                vec![Op::LookupUser {
                    username: "bob".into()
                }]
            )[0],
            Outcome::Credentials(Some(_))
        );
        assert_eq!(bob_claimed, bob_present);

        db.conn
            .pragma_update(None, "max_page_count", 1_000_000)
            .unwrap();
        let outcomes = run_ops(&mut db, vec![message_to_self(1)]);
        assert!(
            matches!(outcomes[0], Outcome::Stored { .. }),
            "{outcomes:?}"
        );
    }

    #[test]
    fn failed_commit_fails_every_write_of_the_batch_and_runs_its_reads_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        // Every new user leaves a deferred foreign-key violation behind, which only COMMIT checks.
        db.conn
            .execute_batch(
                "CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TEMP TABLE child (parent_id INTEGER REFERENCES parent(id)
                                      DEFERRABLE INITIALLY DEFERRED);
             CREATE TEMP TRIGGER poison AFTER INSERT ON main.users
             BEGIN INSERT INTO child VALUES (42); END;",
            )
            .unwrap();
        let outcomes = run_ops(
            &mut db,
            vec![
                create("alice"),
                Op::LookupUser {
                    username: "alice".into(),
                },
                create("bob"),
            ],
        );
        assert!(
            failure(&outcomes[0]).contains("commit failed"),
            "{outcomes:?}"
        );
        assert!(
            failure(&outcomes[2]).contains("commit failed"),
            "{outcomes:?}"
        );
        // The look-up saw alice inside the batch; run again, it sees what was committed: no alice.
        assert!(
            matches!(outcomes[1], Outcome::Credentials(None)),
            "{outcomes:?}"
        );
        assert!(db.conn.is_autocommit(), "no transaction left open");
        assert_eq!(user_count(&db.conn), 0);

        db.conn.execute_batch("DROP TRIGGER poison").unwrap();
        let outcomes = run_ops(&mut db, vec![create("alice")]);
        assert!(matches!(outcomes[0], Outcome::UserCreated { .. }));
        assert_eq!(user_count(&db.conn), 1);
    }

    /// On a full disk every batch with a write fails; a catch-up batched with those writes must
    /// still get its pages, and only what was committed.
    #[test]
    fn a_read_in_a_batch_the_database_abandons_answers_from_what_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        run_ops(&mut db, vec![create("alice"), create("bob")]);
        let committed = run_ops(&mut db, vec![dm_op(1, 1)]);
        let Outcome::Stored { message, .. } = &committed[0] else {
            panic!("{committed:?}");
        };
        let committed_id = message.id;
        db.conn
            .execute_batch(
                "CREATE TEMP TRIGGER abandon BEFORE INSERT ON main.messages
                 WHEN new.text = 'abandon' BEGIN SELECT RAISE(ROLLBACK, 'abandoned'); END;",
            )
            .unwrap();
        let feed = || Op::FetchFeed {
            user_id: 2,
            after_id: 0,
            limit: 10,
        };
        let outcomes = run_ops(
            &mut db,
            vec![
                dm_op(1, 2),
                feed(),
                Op::StoreMessage {
                    sender: 1,
                    recipient: "bob".into(),
                    client_msg_id: 3,
                    text: "abandon".into(),
                },
                feed(),
            ],
        );
        assert!(failure(&outcomes[0]).contains("abandoned"), "{outcomes:?}");
        assert!(failure(&outcomes[2]).contains("abandoned"), "{outcomes:?}");
        // Inside the batch the first read saw message 2; run again, it sees only what was committed.
        for at in [1, 3] {
            let Outcome::Page { messages, more } = &outcomes[at] else {
                panic!("read {at}: {outcomes:?}");
            };
            assert_eq!((ids(messages), *more), (vec![committed_id], false));
        }
        assert!(db.conn.is_autocommit(), "no transaction left open");
    }

    #[test]
    fn one_failing_job_leaves_the_rest_of_its_batch_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        let outcomes = run_ops(
            &mut db,
            vec![
                create("alice"),
                Op::IssueToken {
                    user_id: 999,
                    device: "x".into(),
                    ttl_ms: 1000,
                },
                create("alice"),
                create("bob"),
            ],
        );
        assert!(matches!(outcomes[0], Outcome::UserCreated { .. }));
        assert!(failure(&outcomes[1]).contains("issue token"));
        assert!(matches!(outcomes[2], Outcome::UsernameTaken));
        assert!(matches!(outcomes[3], Outcome::UserCreated { .. }));
        assert_eq!(user_count(&db.conn), 2);
    }

    #[test]
    fn a_failing_multi_write_job_undoes_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        // CreateRoom's first write (the room) succeeds, its second (the membership) fails.
        db.conn
            .execute_batch(
                "CREATE TEMP TRIGGER no_members BEFORE INSERT ON main.room_members
                 BEGIN SELECT RAISE(ABORT, 'no members today'); END;",
            )
            .unwrap();
        let outcomes = run_ops(
            &mut db,
            vec![
                create("alice"),
                create_room_op(1, "lounge", ROOMS_PER_USER),
                message_to_self(1),
            ],
        );
        assert!(matches!(outcomes[0], Outcome::UserCreated { .. }));
        assert!(
            failure(&outcomes[1]).contains("no members today"),
            "{outcomes:?}"
        );
        assert!(
            matches!(
                outcomes[2],
                Outcome::Stored {
                    duplicate: false,
                    ..
                }
            ),
            "{outcomes:?}"
        );
        let rooms: i64 = db
            .conn
            .query_row("SELECT count(*) FROM rooms", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rooms, 0, "the room went with its failed job");
        assert_eq!(
            user_count(&db.conn),
            1,
            "the rest of the batch was committed"
        );

        db.conn.execute_batch("DROP TRIGGER no_members").unwrap();
        let outcomes = run_ops(&mut db, vec![create_room_op(1, "lounge", ROOMS_PER_USER)]);
        assert!(
            matches!(outcomes[0], Outcome::RoomCreated(_)),
            "{outcomes:?}"
        );
    }

    #[test]
    fn a_failing_single_write_job_without_savepoint_leaves_its_batch_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        db.conn
            .execute_batch(
                "CREATE TEMP TRIGGER no_spam BEFORE INSERT ON main.messages
                 WHEN new.text = 'spam' BEGIN SELECT RAISE(ABORT, 'no spam'); END;",
            )
            .unwrap();
        let dm = |client_msg_id, text: &str| Op::StoreMessage {
            sender: 1,
            recipient: "alice".into(),
            client_msg_id,
            text: text.into(),
        };
        assert!(!dm(1, "x").needs_savepoint());
        let outcomes = run_ops(
            &mut db,
            vec![
                create("alice"),
                dm(1, "hello"),
                dm(2, "spam"),
                dm(3, "bye"),
                Op::MarkDelivered {
                    user_id: 1,
                    up_to: u64::MAX,
                },
            ],
        );
        assert!(failure(&outcomes[2]).contains("no spam"), "{outcomes:?}");
        let stored: Vec<u64> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Stored {
                    message,
                    duplicate: false,
                } => Some(message.id),
                _ => None,
            })
            .collect();
        assert_eq!(stored.len(), 2, "{outcomes:?}");
        assert!(
            matches!(outcomes[4], Outcome::Delivered { cursor, .. } if cursor == stored[1]),
            "{outcomes:?}"
        );
        let feed = run_ops(
            &mut db,
            vec![Op::FetchFeed {
                user_id: 1,
                after_id: 0,
                limit: 10,
            }],
        );
        assert_eq!(ids(&page(feed.into_iter().next().unwrap()).0), stored);
        // Nothing of the failed message stayed behind: its client id is still free.
        let outcomes = run_ops(&mut db, vec![dm(2, "not spam")]);
        assert!(
            matches!(
                outcomes[0],
                Outcome::Stored {
                    duplicate: false,
                    ..
                }
            ),
            "{outcomes:?}"
        );
    }

    /// A user row created (and cached) in a transaction that is then rolled back is gone, and its
    /// id goes to the next user created: the cache must not keep the old name for it.
    #[test]
    fn user_cache_forgets_users_of_a_rolled_back_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        let dm = |sender, to: &str, client_msg_id| Op::StoreMessage {
            sender,
            recipient: to.into(),
            client_msg_id,
            text: "hi".into(),
        };
        let check = |db: &mut Db, ghost: &str, name: &str| {
            let outcomes = run_ops(db, vec![create(name), dm(1, ghost, 1), dm(1, name, 2)]);
            assert!(
                matches!(outcomes[0], Outcome::UserCreated { user_id: 1 }),
                "{outcomes:?}"
            );
            assert!(
                matches!(outcomes[1], Outcome::UnknownRecipient),
                "{outcomes:?}"
            );
            match &outcomes[2] {
                Outcome::Stored { message, .. } => {
                    assert_eq!(
                        (message.sender.as_str(), message.recipient.as_str()),
                        (name, name)
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        };

        // The commit fails (a deferred foreign key violation, as in failed_commit_...).
        db.conn
            .execute_batch(
                "CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY);
                 CREATE TEMP TABLE child (parent_id INTEGER REFERENCES parent(id)
                                          DEFERRABLE INITIALLY DEFERRED);
                 CREATE TEMP TRIGGER poison AFTER INSERT ON main.users
                 BEGIN INSERT INTO child VALUES (42); END;",
            )
            .unwrap();
        let outcomes = run_ops(&mut db, vec![create("alice"), dm(1, "alice", 1)]);
        assert!(
            failure(&outcomes[1]).contains("commit failed"),
            "{outcomes:?}"
        );
        db.conn.execute_batch("DROP TRIGGER poison").unwrap();
        check(&mut db, "alice", "bob");

        // SQLite abandons the transaction (as after some I/O errors) in the middle of a batch.
        db.conn
            .execute_batch(
                "CREATE TEMP TRIGGER abandon BEFORE INSERT ON main.messages
                 WHEN new.text = 'abandon' BEGIN SELECT RAISE(ROLLBACK, 'abandoned'); END;",
            )
            .unwrap();
        let abandon = Op::StoreMessage {
            sender: 2,
            recipient: "bob".into(),
            client_msg_id: 1,
            text: "abandon".into(),
        };
        let outcomes = run_ops(&mut db, vec![create("carol"), dm(2, "carol", 1), abandon]);
        assert!(failure(&outcomes[0]).contains("abandoned"), "{outcomes:?}");
        let outcomes = run_ops(&mut db, vec![create("dave")]);
        assert!(
            matches!(outcomes[0], Outcome::UserCreated { user_id: 2 }),
            "{outcomes:?}"
        );
        let outcomes = run_ops(&mut db, vec![dm(2, "carol", 1), dm(2, "bob", 2)]);
        assert!(
            matches!(outcomes[0], Outcome::UnknownRecipient),
            "{outcomes:?}"
        );
        match &outcomes[1] {
            Outcome::Stored { message, .. } => assert_eq!(message.sender, "dave"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn user_cache_stays_bounded() {
        let mut cache = UserCache::default();
        let past_capacity = u64::try_from(USER_CACHE_CAPACITY).unwrap() + 10;
        for user_id in 0..past_capacity {
            cache.remember(user_id, &format!("user{user_id}"));
        }
        assert!(cache.ids.len() <= USER_CACHE_CAPACITY);
        assert!(cache.names.len() <= USER_CACHE_CAPACITY);
        let last = past_capacity - 1;
        assert_eq!(cache.ids.get(format!("user{last}").as_str()), Some(&last));
        assert_eq!(
            cache.names.get(&last).map(|n| &**n),
            Some(format!("user{last}").as_str())
        );
    }

    #[test]
    fn resends_find_their_original_whichever_path_they_take() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        store.user("bob");
        store.room(alice, "den");
        let dm = store.send(alice, "bob", 1, "dm");
        let post = store.post(alice, "den", 2);
        let resend_dm = |recipient: &str, client_msg_id| Op::StoreMessage {
            sender: alice,
            recipient: recipient.into(),
            client_msg_id,
            text: "again".into(),
        };
        for (op, original) in [
            // The check finds the client id taken.
            (resend_dm("bob", 1), &dm),
            (post_op(alice, "den", 2, "again"), &post),
            // Both kinds share one client id space.
            (post_op(alice, "den", 1, "again"), &dm),
            (resend_dm("bob", 2), &post),
            // Refused before any insert, and still the original.
            (resend_dm("nobody", 1), &dm),
            (post_op(alice, "no-such-room", 2, "again"), &post),
        ] {
            match store.call(op) {
                Outcome::Stored { message, duplicate } => {
                    assert!(duplicate);
                    assert_eq!(&message, original);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            store.feed_ids(alice),
            vec![dm.id, post.id],
            "no resend stored"
        );
        let next = store.send(alice, "bob", 3, "new");
        assert!(next.id > post.id);
        store.stop();
    }

    /// A direct message from `sender` (user 1 or 2 below) to "bob" with this client id.
    fn dm_op(sender: UserId, client_msg_id: u64) -> Op {
        Op::StoreMessage {
            sender,
            recipient: "bob".into(),
            client_msg_id,
            text: format!("{client_msg_id}"),
        }
    }

    /// The message id of a stored outcome, and whether it was a resend.
    fn stored(outcome: &Outcome) -> (u64, bool) {
        match outcome {
            Outcome::Stored { message, duplicate } => (message.id, *duplicate),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Rows of `client_ids`, and its mark.
    fn filed(conn: &Connection) -> (i64, i64) {
        let rows = conn
            .query_row("SELECT count(*) FROM client_ids", [], |r| r.get(0))
            .unwrap();
        let mark = conn
            .query_row("SELECT filed_up_to FROM client_ids_state", [], |r| r.get(0))
            .unwrap();
        (rows, mark)
    }

    /// Client ids that take every path of the check: counters, lower ids in a block already
    /// used, the ends of the u64 range (negative as stored) and several 2^32 blocks.
    const AWKWARD_CLIENT_IDS: [u64; 7] = [5, 3, u64::MAX, 0, (1 << 32) - 1, 1 << 32, 4];

    #[test]
    fn resends_are_found_before_and_after_their_ids_are_filed_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        let mut db = open_database(&config).unwrap();
        run_ops(&mut db, vec![create("alice"), create("bob")]);
        let mut ids = Vec::new();
        for client_msg_id in AWKWARD_CLIENT_IDS {
            let (id, duplicate) = stored(&run_ops(&mut db, vec![dm_op(1, client_msg_id)])[0]);
            assert!(!duplicate, "{client_msg_id}");
            ids.push(id);
        }
        assert_eq!(filed(&db.conn), (0, 0), "below FILE_AT nothing is filed");
        let check = |db: &mut Db, ids: &[u64]| {
            for (client_msg_id, id) in AWKWARD_CLIENT_IDS.iter().zip(ids) {
                let outcome = &run_ops(db, vec![dm_op(1, *client_msg_id)])[0];
                assert_eq!(stored(outcome), (*id, true), "{client_msg_id}");
            }
        };
        check(&mut db, &ids);

        // The eighth message files all eight, with the mark at the newest. The same client id
        // from another sender is another message.
        let (bobs, duplicate) = stored(&run_ops(&mut db, vec![dm_op(2, 5)])[0]);
        assert!(!duplicate);
        assert_eq!(resend::FILE_AT, 8);
        assert_eq!(filed(&db.conn), (8, i64::try_from(bobs).unwrap()));
        check(&mut db, &ids);
        assert_eq!(
            stored(&run_ops(&mut db, vec![dm_op(2, 5)])[0]),
            (bobs, true)
        );

        // Memory is lost when the server stops; the next start reads the unfiled ones back.
        let (ninth, _) = stored(&run_ops(&mut db, vec![dm_op(1, 2)])[0]);
        drop(db);
        let mut db = open_database(&config).unwrap();
        assert_eq!(filed(&db.conn), (8, i64::try_from(bobs).unwrap()));
        check(&mut db, &ids);
        assert_eq!(
            stored(&run_ops(&mut db, vec![dm_op(1, 2)])[0]),
            (ninth, true)
        );
        let (tenth, duplicate) = stored(&run_ops(&mut db, vec![dm_op(1, 1)])[0]);
        assert!(!duplicate && tenth > ninth);
    }

    #[test]
    fn a_rolled_back_message_frees_its_client_id_and_a_rolled_back_filing_files_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        run_ops(&mut db, vec![create("alice"), create("bob")]);
        let kept: Vec<u64> = run_ops(&mut db, (1..=6).map(|n| dm_op(1, n)).collect())
            .iter()
            .map(|outcome| stored(outcome).0)
            .collect();
        // The commit fails (a deferred foreign key violation, as in failed_commit_...) after
        // the batch's messages reached FILE_AT and were filed.
        db.conn
            .execute_batch(
                "CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY);
                 CREATE TEMP TABLE child (parent_id INTEGER REFERENCES parent(id)
                                          DEFERRABLE INITIALLY DEFERRED);
                 CREATE TEMP TRIGGER poison AFTER INSERT ON main.messages
                 WHEN new.text = 'poison' BEGIN INSERT INTO child VALUES (42); END;",
            )
            .unwrap();
        let poison = Op::StoreMessage {
            sender: 1,
            recipient: "bob".into(),
            client_msg_id: 8,
            text: "poison".into(),
        };
        let outcomes = run_ops(&mut db, vec![dm_op(1, 7), poison]);
        assert!(
            failure(&outcomes[1]).contains("commit failed"),
            "{outcomes:?}"
        );
        assert_eq!(filed(&db.conn), (0, 0));
        db.conn.execute_batch("DROP TRIGGER poison").unwrap();

        for (client_msg_id, id) in (1..=6).zip(&kept) {
            assert_eq!(
                stored(&run_ops(&mut db, vec![dm_op(1, client_msg_id)])[0]),
                (*id, true)
            );
        }
        for client_msg_id in [7, 8] {
            let (id, duplicate) = stored(&run_ops(&mut db, vec![dm_op(1, client_msg_id)])[0]);
            assert!(!duplicate && id > kept[5], "{client_msg_id}");
        }
        assert_eq!(filed(&db.conn).0, 8, "the next commit filed them");
    }

    #[test]
    fn a_filed_run_lands_whole_in_full_statements_and_single_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_database(&config(&dir)).unwrap();
        // Two statements of 64 rows and 5 single rows, handed over unsorted.
        let mut run: Vec<ClientId> = (0..133i64)
            .rev()
            .map(|n| ClientId {
                sender_id: n % 3,
                client_msg_id: n - 60,
                id: n + 1,
            })
            .collect();
        file_client_ids(&db.conn, &mut run).unwrap();
        let rows: Vec<(i64, i64, i64)> = db
            .conn
            .prepare("SELECT sender_id, client_msg_id, id FROM client_ids ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<(i64, i64, i64)> = (0..133).map(|n| (n % 3, n - 60, n + 1)).collect();
        assert_eq!(rows, expected);
        assert_eq!(filed(&db.conn), (133, 133));
    }

    #[test]
    fn a_resend_check_that_fails_after_the_insert_rolls_the_batch_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        run_ops(&mut db, vec![create("alice"), create("bob")]);
        // Sender 2's block was never read, so the check must query client_ids, which is gone.
        db.conn.execute_batch("DROP TABLE client_ids").unwrap();
        let outcomes = run_ops(&mut db, vec![create("carol"), dm_op(2, 1)]);
        assert!(
            failure(&outcomes[0]).contains("rolled back with its batch"),
            "{outcomes:?}"
        );
        assert!(failure(&outcomes[1]).contains("client_ids"), "{outcomes:?}");
        let messages: i64 = db
            .conn
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!((messages, user_count(&db.conn)), (0, 2));
    }

    #[test]
    fn refused_and_rolled_back_messages_keep_the_blocks_in_memory_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        run_ops(&mut db, vec![create("alice"), create("bob")]);
        // Refusals read a block each (the resend check) and never file anything.
        let refusals: Vec<Op> = (0..50u64)
            .map(|block| Op::StoreMessage {
                sender: 1,
                recipient: "nobody".into(),
                client_msg_id: block << 32,
                text: "x".into(),
            })
            .collect();
        assert!(run_ops(&mut db, refusals)
            .iter()
            .all(|outcome| matches!(outcome, Outcome::UnknownRecipient)));
        assert!(
            db.recent.blocks_held().1 <= resend::FILE_AT,
            "{:?}",
            db.recent.blocks_held()
        );
        // Batches that roll back leave no blocks of their ids behind.
        db.conn
            .execute_batch(
                "CREATE TEMP TRIGGER abandon BEFORE INSERT ON main.messages
                 WHEN new.text = 'abandon' BEGIN SELECT RAISE(ROLLBACK, 'abandoned'); END;",
            )
            .unwrap();
        for block in 0..50u64 {
            let stored_then_abandoned = vec![
                dm_op(1, (block << 32) | 1),
                Op::StoreMessage {
                    sender: 2,
                    recipient: "bob".into(),
                    client_msg_id: 1,
                    text: "abandon".into(),
                },
            ];
            assert!(matches!(
                run_ops(&mut db, stored_then_abandoned)[0],
                Outcome::Failed(_)
            ));
        }
        assert!(
            db.recent.blocks_held().0 <= resend::FILE_AT,
            "{:?}",
            db.recent.blocks_held()
        );
    }

    #[test]
    fn a_filing_that_fails_leaves_its_batch_committed_and_is_tried_again_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        run_ops(&mut db, vec![create("alice"), create("bob")]);
        db.conn
            .execute_batch(
                "CREATE TEMP TRIGGER no_room BEFORE INSERT ON main.client_ids
                 BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
            )
            .unwrap();
        let mut ids = Vec::new();
        for client_msg_id in 1..=9 {
            let (id, duplicate) = stored(&run_ops(&mut db, vec![dm_op(1, client_msg_id)])[0]);
            assert!(!duplicate, "{client_msg_id}");
            ids.push(id);
        }
        assert_eq!(filed(&db.conn), (0, 0), "the eighth commit's filing failed");
        for (client_msg_id, id) in (1..=9).zip(&ids) {
            assert_eq!(
                stored(&run_ops(&mut db, vec![dm_op(1, client_msg_id)])[0]),
                (*id, true)
            );
        }
        db.conn.execute_batch("DROP TRIGGER no_room").unwrap();
        // The next try waits for FILE_AT / 4 = 2 more ids than there were at the failure.
        let (tenth, _) = stored(&run_ops(&mut db, vec![dm_op(1, 10)])[0]);
        assert_eq!(filed(&db.conn), (10, i64::try_from(tenth).unwrap()));
    }

    #[test]
    fn version_4_messages_keep_their_ids_counter_and_resends() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        {
            let mut conn = Connection::open(&config.path).unwrap();
            for step in &MIGRATIONS[..4] {
                apply_migration(&mut conn, step).unwrap();
            }
            conn.execute_batch(
                "INSERT INTO users (username, phc, created_at_ms) VALUES ('alice', 'p', 1);
                 INSERT INTO users (username, phc, created_at_ms) VALUES ('bob', 'p', 1);
                 INSERT INTO messages (sender_id, recipient_id, client_msg_id, timestamp_ms, text)
                     VALUES (1, 2, 7, 1, 'a'), (2, 1, 7, 2, 'b'), (1, 2, -1, 3, 'c');
                 -- A resend used to advance the counter past the newest id.
                 UPDATE sqlite_sequence SET seq = 10 WHERE name = 'messages';",
            )
            .unwrap();
        }
        let mut db = open_database(&config).unwrap();
        assert_eq!(filed(&db.conn), (3, 3));
        assert_eq!(stored(&run_ops(&mut db, vec![dm_op(1, 7)])[0]), (1, true));
        assert_eq!(
            stored(&run_ops(&mut db, vec![dm_op(1, u64::MAX)])[0]),
            (3, true)
        );
        // Past the carried counter (each resend above also took an id, as resends always did).
        let (id, duplicate) = stored(&run_ops(&mut db, vec![dm_op(1, 8)])[0]);
        assert!(id > 10 && !duplicate, "{id}");
        let texts: Vec<String> = db
            .conn
            .prepare("SELECT text FROM messages ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(texts, ["a", "b", "c", "8"]);
    }

    // -----------------------------------------------------------------------------------------
    // Rooms and presence

    /// Limits generous enough to stay out of the way of tests about something else.
    const ROOMS_PER_USER: u32 = 10;
    const MEMBERS_PER_ROOM: u32 = 100;

    fn create_room_op(user_id: UserId, name: &str, max_rooms_per_user: u32) -> Op {
        Op::CreateRoom {
            user_id,
            name: name.into(),
            topic: format!("all about {name}"),
            max_rooms_per_user,
        }
    }

    fn join_op(user_id: UserId, name: &str, max_members: u32, max_rooms_per_user: u32) -> Op {
        Op::JoinRoom {
            user_id,
            name: name.into(),
            max_members,
            max_rooms_per_user,
        }
    }

    fn post_op(sender: UserId, room: &str, client_msg_id: u64, text: &str) -> Op {
        Op::StoreRoomMessage {
            sender,
            room: room.into(),
            client_msg_id,
            text: text.into(),
        }
    }

    fn room_history_op(user_id: UserId, name: &str) -> Op {
        Op::RoomHistory {
            user_id,
            name: name.into(),
            before_id: 0,
            limit: 100,
        }
    }

    fn joined(outcome: Outcome) -> (RoomInfo, bool) {
        match outcome {
            Outcome::Joined {
                room,
                already_member,
            } => (room, already_member),
            other => panic!("unexpected {other:?}"),
        }
    }

    impl TestStore {
        fn room(&mut self, host: UserId, name: &str) -> RoomInfo {
            match self.call(create_room_op(host, name, ROOMS_PER_USER)) {
                Outcome::RoomCreated(room) => room,
                other => panic!("unexpected {other:?}"),
            }
        }

        fn join(&mut self, user_id: UserId, name: &str) -> RoomInfo {
            let (room, already_member) =
                joined(self.call(join_op(user_id, name, MEMBERS_PER_ROOM, ROOMS_PER_USER)));
            assert!(!already_member);
            room
        }

        fn leave(&mut self, user_id: UserId, name: &str) {
            match self.call(Op::LeaveRoom {
                user_id,
                name: name.into(),
            }) {
                Outcome::Left { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }

        fn post(&mut self, sender: UserId, room: &str, client_msg_id: u64) -> StoredMessage {
            match self.call(post_op(sender, room, client_msg_id, "hello room")) {
                Outcome::Stored {
                    message,
                    duplicate: false,
                } => message,
                other => panic!("unexpected {other:?}"),
            }
        }

        fn room_history(&mut self, user_id: UserId, name: &str) -> Vec<u64> {
            let (messages, more) = page(self.call(room_history_op(user_id, name)));
            assert!(!more);
            ids(&messages)
        }

        fn members(&mut self, name: &str) -> (RoomInfo, Vec<String>) {
            match self.call(Op::RoomMembers { name: name.into() }) {
                Outcome::Members { room, members } => {
                    (room, members.into_iter().map(|(_, name)| name).collect())
                }
                other => panic!("unexpected {other:?}"),
            }
        }

        fn feed_ids(&mut self, user_id: UserId) -> Vec<u64> {
            let (messages, more) = self.feed(user_id, 0, 1000);
            assert!(!more);
            ids(&messages)
        }
    }

    #[test]
    fn create_join_list_members_and_leave() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        let carol = store.user("carol");
        let dave = store.user("dave");
        let lobby = store.room(alice, "lobby");
        assert_eq!(
            lobby,
            RoomInfo {
                room_id: lobby.room_id,
                name: "lobby".into(),
                topic: "all about lobby".into(),
                host: "alice".into(),
                member_count: 1,
                closed: false,
            }
        );
        assert!(matches!(
            store.call(create_room_op(bob, "lobby", ROOMS_PER_USER)),
            Outcome::RoomNameTaken
        ));

        assert_eq!(store.join(carol, "lobby").member_count, 2);
        let after_bob = store.join(bob, "lobby");
        assert_eq!(after_bob.member_count, 3);
        let (again, already_member) =
            joined(store.call(join_op(bob, "lobby", MEMBERS_PER_ROOM, ROOMS_PER_USER)));
        assert!(already_member);
        assert_eq!(again, after_bob, "a second join changes nothing");

        let (room, members) = store.members("lobby");
        assert_eq!(room, after_bob);
        assert_eq!(members, vec!["alice", "bob", "carol"], "ordered by name");

        match store.call(Op::LeaveRoom {
            user_id: bob,
            name: "lobby".into(),
        }) {
            Outcome::Left { room_id } => assert_eq!(room_id, lobby.room_id),
            other => panic!("unexpected {other:?}"),
        }
        for user_id in [bob, dave] {
            assert!(matches!(
                store.call(Op::LeaveRoom {
                    user_id,
                    name: "lobby".into()
                }),
                Outcome::NotMember
            ));
        }
        assert_eq!(store.members("lobby").1, vec!["alice", "carol"]);

        // The host may leave: the room stays open, still hosted by them, and they keep host rights.
        store.leave(alice, "lobby");
        let (room, members) = store.members("lobby");
        assert_eq!((room.host.as_str(), room.member_count), ("alice", 1));
        assert!(!room.closed);
        assert_eq!(members, vec!["carol"]);
        assert!(matches!(
            store.call(Op::Kick {
                host_id: alice,
                name: "lobby".into(),
                target: "carol".into()
            }),
            Outcome::Kicked { .. }
        ));
        assert_eq!(store.join(alice, "lobby").member_count, 1);
        store.stop();
    }

    #[test]
    fn unknown_room_is_no_such_room_everywhere() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        store.user("bob");
        let ops = vec![
            join_op(alice, "nowhere", MEMBERS_PER_ROOM, ROOMS_PER_USER),
            Op::LeaveRoom {
                user_id: alice,
                name: "nowhere".into(),
            },
            Op::Kick {
                host_id: alice,
                name: "nowhere".into(),
                target: "bob".into(),
            },
            Op::CloseRoom {
                host_id: alice,
                name: "nowhere".into(),
            },
            Op::RoomMembers {
                name: "nowhere".into(),
            },
            post_op(alice, "nowhere", 1, "hello?"),
            room_history_op(alice, "nowhere"),
        ];
        for op in ops {
            let label = op.label();
            let outcome = store.call(op);
            assert!(
                matches!(outcome, Outcome::NoSuchRoom),
                "{label}: {outcome:?}"
            );
        }
        store.stop();
    }

    #[test]
    fn kick_refusals_and_effect() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        let carol = store.user("carol");
        store.user("dave");
        let room = store.room(alice, "den");
        store.join(bob, "den");
        store.join(carol, "den");
        let kick = |store: &mut TestStore, host_id, target: &str| {
            store.call(Op::Kick {
                host_id,
                name: "den".into(),
                target: target.into(),
            })
        };
        assert!(matches!(kick(&mut store, bob, "carol"), Outcome::NotHost));
        assert!(matches!(
            kick(&mut store, alice, "ghost"),
            Outcome::NoSuchUser
        ));
        assert!(matches!(
            kick(&mut store, alice, "dave"),
            Outcome::NotMember
        ));
        assert!(matches!(
            kick(&mut store, alice, "alice"),
            Outcome::CannotKickHost
        ));
        assert_eq!(store.members("den").1, vec!["alice", "bob", "carol"]);

        match kick(&mut store, alice, "bob") {
            Outcome::Kicked { room_id, target_id } => {
                assert_eq!((room_id, target_id), (room.room_id, bob));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(kick(&mut store, alice, "bob"), Outcome::NotMember));
        assert_eq!(store.members("den").1, vec!["alice", "carol"]);
        assert!(matches!(
            store.call(post_op(bob, "den", 1, "let me in")),
            Outcome::NotMember
        ));
        // A kick is not a ban.
        store.join(bob, "den");
        store.post(bob, "den", 2);
        store.stop();
    }

    #[test]
    fn closing_freezes_the_room_but_keeps_its_history() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        let carol = store.user("carol");
        let dave = store.user("dave");
        let room = store.room(alice, "stage");
        store.join(bob, "stage");
        store.join(carol, "stage");
        let first = store.post(bob, "stage", 1);
        store.leave(carol, "stage");
        let second = store.post(alice, "stage", 1);

        let close = |store: &mut TestStore, host_id| {
            store.call(Op::CloseRoom {
                host_id,
                name: "stage".into(),
            })
        };
        assert!(matches!(close(&mut store, bob), Outcome::NotHost));
        match close(&mut store, alice) {
            Outcome::RoomClosedOk { room_id, members } => {
                assert_eq!(room_id, room.room_id);
                assert_eq!(members, vec![alice, bob], "the active members at close");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(close(&mut store, alice), Outcome::RoomIsClosed));
        assert!(matches!(close(&mut store, bob), Outcome::NotHost));

        assert!(matches!(
            store.call(post_op(bob, "stage", 2, "anyone?")),
            Outcome::RoomIsClosed
        ));
        assert!(matches!(
            store.call(join_op(dave, "stage", MEMBERS_PER_ROOM, ROOMS_PER_USER)),
            Outcome::RoomIsClosed
        ));
        assert!(matches!(
            store.call(Op::LeaveRoom {
                user_id: bob,
                name: "stage".into()
            }),
            Outcome::NotMember
        ));
        assert!(matches!(
            store.call(Op::Kick {
                host_id: alice,
                name: "stage".into(),
                target: "bob".into()
            }),
            Outcome::NotMember
        ));

        // History stays readable, each within their own window.
        assert_eq!(store.room_history(bob, "stage"), vec![second.id, first.id]);
        assert_eq!(store.room_history(carol, "stage"), vec![first.id]);
        assert!(matches!(
            store.call(room_history_op(dave, "stage")),
            Outcome::NotMember
        ));
        let (info, members) = store.members("stage");
        assert!(info.closed);
        assert_eq!(members, vec!["alice", "bob"]);
        // Closing ends every window at the newest id but keeps the members active.
        let db = Connection::open(store.dir.path().join("hubbub.db")).unwrap();
        let rows: Vec<(u64, Option<i64>, i64)> = db
            .prepare(
                "SELECT user_id, left_after, active FROM room_members
                 WHERE room_id = ?1 ORDER BY user_id",
            )
            .unwrap()
            .query_map([to_db(room.room_id)], |r| {
                Ok((get_u64(r, 0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let at_close = Some(to_db(second.id));
        let left_at = Some(to_db(first.id));
        assert_eq!(
            rows,
            vec![
                (alice, at_close, 1),
                (bob, at_close, 1),
                (carol, left_at, 0)
            ]
        );
        // A message stored after the close elsewhere does not leak into the closed room's windows.
        store.user("erin");
        store.send(bob, "erin", 3, "dm");
        assert_eq!(store.room_history(bob, "stage"), vec![second.id, first.id]);
        store.stop();
    }

    #[test]
    fn max_members_is_enforced_at_its_edge() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        let carol = store.user("carol");
        store.room(alice, "duo");
        let join =
            |store: &mut TestStore, user_id| store.call(join_op(user_id, "duo", 2, ROOMS_PER_USER));
        let (room, _) = joined(join(&mut store, bob));
        assert_eq!(room.member_count, 2, "the last free seat");
        assert!(matches!(join(&mut store, carol), Outcome::RoomFull));
        // A member joining again is not refused for the room being full.
        assert!(joined(join(&mut store, bob)).1);
        store.leave(bob, "duo");
        let (room, _) = joined(join(&mut store, carol));
        assert_eq!(room.member_count, 2);
        assert!(matches!(
            store.call(join_op(bob, "duo", 0, ROOMS_PER_USER)),
            Outcome::RoomFull
        ));
        store.stop();
    }

    #[test]
    fn max_rooms_per_user_is_enforced_at_its_edge() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        for name in ["one", "two"] {
            assert!(matches!(
                store.call(create_room_op(alice, name, 2)),
                Outcome::RoomCreated(_)
            ));
        }
        assert!(matches!(
            store.call(create_room_op(alice, "three", 2)),
            Outcome::TooManyRooms
        ));
        assert!(matches!(
            store.call(create_room_op(bob, "three", 0)),
            Outcome::TooManyRooms
        ));
        store.room(bob, "three");
        store.room(bob, "four");
        assert!(matches!(
            store.call(join_op(alice, "three", MEMBERS_PER_ROOM, 2)),
            Outcome::TooManyRooms
        ));
        // Already in two rooms; a third is fine under a limit of three.
        assert!(!joined(store.call(join_op(alice, "three", MEMBERS_PER_ROOM, 3))).1);
        assert!(matches!(
            store.call(join_op(alice, "four", MEMBERS_PER_ROOM, 3)),
            Outcome::TooManyRooms
        ));
        store.leave(alice, "one");
        assert!(!joined(store.call(join_op(alice, "four", MEMBERS_PER_ROOM, 3))).1);
        // A closed room no longer counts against its members.
        assert!(matches!(
            store.call(Op::CloseRoom {
                host_id: alice,
                name: "two".into()
            }),
            Outcome::RoomClosedOk { .. }
        ));
        assert!(matches!(
            store.call(create_room_op(alice, "five", 3)),
            Outcome::RoomCreated(_)
        ));
        store.stop();
    }

    #[test]
    fn feed_has_room_messages_only_inside_the_membership_window() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        let hall = store.room(alice, "hall");
        let before_join = store.post(alice, "hall", 1);
        store.join(bob, "hall");
        let while_in = store.post(alice, "hall", 2);
        store.leave(bob, "hall");
        let while_away = store.post(alice, "hall", 3);
        store.join(bob, "hall");
        let after_rejoin = store.post(alice, "hall", 4);

        assert_eq!(
            store.feed_ids(alice),
            vec![before_join.id, while_in.id, while_away.id, after_rejoin.id]
        );
        // A rejoin starts a fresh window: neither the time away nor the earlier membership.
        assert_eq!(store.feed_ids(bob), vec![after_rejoin.id]);
        assert_eq!(store.room_history(bob, "hall"), vec![after_rejoin.id]);

        let (messages, _) = store.feed(bob, 0, 10);
        let message = &messages[0];
        assert_eq!(message.room, Some((hall.room_id, "hall".into())));
        assert_eq!(
            (message.recipient_id, message.recipient.as_str()),
            (0, "hall")
        );
        assert_eq!(message, &after_rejoin);
        store.stop();
    }

    #[test]
    fn non_members_cannot_post_or_read_but_former_members_read_their_window() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        let carol = store.user("carol");
        store.room(alice, "club");
        let before = store.post(alice, "club", 1);
        store.join(bob, "club");
        let during = [store.post(alice, "club", 2), store.post(bob, "club", 1)];
        store.leave(bob, "club");
        let after = store.post(alice, "club", 3);

        for user_id in [bob, carol] {
            assert!(matches!(
                store.call(post_op(user_id, "club", 9, "let me in")),
                Outcome::NotMember
            ));
        }
        assert!(matches!(
            store.call(room_history_op(carol, "club")),
            Outcome::NotMember
        ));
        assert_eq!(
            store.room_history(bob, "club"),
            vec![during[1].id, during[0].id]
        );
        assert_eq!(
            store.room_history(alice, "club"),
            vec![after.id, during[1].id, during[0].id, before.id]
        );
        assert_eq!(store.feed_ids(bob), vec![during[0].id, during[1].id]);
        assert!(store.feed_ids(carol).is_empty());
        store.stop();
    }

    #[test]
    fn room_history_pages_newest_first_within_the_window() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        store.room(alice, "long");
        store.post(alice, "long", 0);
        store.join(bob, "long");
        let mut expected: Vec<u64> = (1..=23).map(|i| store.post(alice, "long", i).id).collect();
        store.leave(bob, "long");
        store.post(alice, "long", 99);
        expected.reverse();
        let mut seen = Vec::new();
        let mut before = 0;
        loop {
            let (messages, more) = page(store.call(Op::RoomHistory {
                user_id: bob,
                name: "long".into(),
                before_id: before,
                limit: 5,
            }));
            assert!(messages.len() <= 5);
            seen.extend(ids(&messages));
            match messages.last() {
                Some(last) if more => before = last.id,
                _ => break,
            }
        }
        assert_eq!(seen, expected);
        let (messages, more) = page(store.call(Op::RoomHistory {
            user_id: bob,
            name: "long".into(),
            before_id: 1,
            limit: 5,
        }));
        assert!(messages.is_empty() && !more);
        store.stop();
    }

    #[test]
    fn room_resend_is_a_duplicate_with_the_same_id() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        store.user("bob");
        store.room(alice, "echo");
        let original = store.post(alice, "echo", 7);
        // Checked before membership: the original comes back even after leaving.
        store.leave(alice, "echo");
        for op in [
            post_op(alice, "echo", 7, "again"),
            // One client id space per sender, whatever the kind.
            Op::StoreMessage {
                sender: alice,
                recipient: "bob".into(),
                client_msg_id: 7,
                text: "dm".into(),
            },
        ] {
            match store.call(op) {
                Outcome::Stored { message, duplicate } => {
                    assert!(duplicate);
                    assert_eq!(message, original);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(store.feed_ids(alice), vec![original.id]);
        store.stop();
    }

    #[test]
    fn feed_merges_direct_and_room_messages_once_in_id_order() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        let carol = store.user("carol");
        store.room(alice, "one");
        store.room(bob, "two");
        store.join(bob, "one");
        store.join(alice, "two");
        store.room(carol, "elsewhere");
        let mut expected = Vec::new();
        for i in 0..30u64 {
            let message = match i % 6 {
                0 => store.post(alice, "one", i),
                1 => store.send(bob, "alice", i, "dm in"),
                2 => store.post(bob, "two", i),
                3 => store.send(alice, "bob", i, "dm out"),
                4 => store.send(alice, "alice", i, "note"),
                _ => {
                    store.post(carol, "elsewhere", i);
                    continue;
                }
            };
            expected.push(message);
        }
        let (all, more) = store.feed(alice, 0, 1000);
        assert!(!more);
        assert_eq!(
            all, expected,
            "each once, ascending, own room messages included"
        );
        assert_eq!(
            all.iter().filter(|m| m.room.is_some()).count(),
            10,
            "room messages of both rooms"
        );

        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let (messages, more) = store.feed(alice, after, 4);
            seen.extend(messages.iter().cloned());
            match messages.last() {
                Some(last) if more => after = last.id,
                _ => break,
            }
        }
        assert_eq!(seen, expected, "paging neither skips nor repeats");
        store.stop();
    }

    #[test]
    fn max_message_id_counts_room_messages_inside_the_window() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        store.room(alice, "pub");
        let dm = store.send(alice, "bob", 1, "dm");
        assert_eq!(store.account("bob").max_message_id, dm.id);
        store.join(bob, "pub");
        let in_room = store.post(alice, "pub", 2);
        assert_eq!(store.account("bob").max_message_id, in_room.id);
        store.leave(bob, "pub");
        store.post(alice, "pub", 3);
        assert_eq!(
            store.account("bob").max_message_id,
            in_room.id,
            "messages past the window do not count"
        );

        let (token, _) = store.issue(bob, "phone", 3600);
        match store.call(Op::IssueToken {
            user_id: bob,
            device: "laptop".into(),
            ttl_ms: 3_600_000,
        }) {
            Outcome::TokenIssued { account, .. } => {
                assert_eq!(account.max_message_id, in_room.id);
            }
            other => panic!("unexpected {other:?}"),
        }
        match store.call(Op::ResumeToken {
            token,
            device: "phone".into(),
        }) {
            Outcome::Resumed(Some((account, _))) => {
                assert_eq!(account.max_message_id, in_room.id);
            }
            other => panic!("unexpected {other:?}"),
        }

        // The delivered cursor covers room messages; receipts stay for direct messages.
        match store.call(Op::MarkDelivered {
            user_id: bob,
            up_to: u64::MAX,
        }) {
            Outcome::Delivered {
                cursor, receipts, ..
            } => {
                assert_eq!(cursor, in_room.id);
                assert_eq!(receipts, vec![(alice, "alice".to_owned(), dm.id)]);
            }
            other => panic!("unexpected {other:?}"),
        }
        store.stop();
    }

    #[test]
    fn list_rooms_pages_by_name_open_and_closed() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        for name in ["delta", "alpha", "echo", "charlie", "bravo"] {
            store.room(alice, name);
        }
        store.join(bob, "charlie");
        assert!(matches!(
            store.call(Op::CloseRoom {
                host_id: alice,
                name: "bravo".into()
            }),
            Outcome::RoomClosedOk { .. }
        ));
        let list = |store: &mut TestStore, after: &str| match store.call(Op::ListRooms {
            after_name: after.into(),
            limit: 2,
        }) {
            Outcome::RoomList { rooms, more } => (rooms, more),
            other => panic!("unexpected {other:?}"),
        };
        let (rooms, more) = list(&mut store, "");
        assert!(more);
        assert_eq!(
            rooms
                .iter()
                .map(|r| (r.name.as_str(), r.closed))
                .collect::<Vec<_>>(),
            vec![("alpha", false), ("bravo", true)]
        );
        let (rooms, more) = list(&mut store, "bravo");
        assert!(more);
        assert_eq!(
            rooms
                .iter()
                .map(|r| (r.name.as_str(), r.member_count))
                .collect::<Vec<_>>(),
            vec![("charlie", 2), ("delta", 1)]
        );
        let (rooms, more) = list(&mut store, "delta");
        assert_eq!(rooms.len(), 1);
        assert_eq!(rooms[0].name, "echo");
        assert!(!more);
        assert!(list(&mut store, "echo").0.is_empty());
        store.stop();
    }

    #[test]
    fn load_rooms_returns_open_rooms_with_active_members() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        let carol = store.user("carol");
        let first = store.room(alice, "first");
        store.join(carol, "first");
        store.join(bob, "first");
        store.leave(carol, "first");
        let second = store.room(bob, "second");
        store.leave(bob, "second");
        store.room(carol, "shut");
        assert!(matches!(
            store.call(Op::CloseRoom {
                host_id: carol,
                name: "shut".into()
            }),
            Outcome::RoomClosedOk { .. }
        ));
        let Outcome::Rooms(rooms) = store.call(Op::LoadRooms) else {
            panic!("unexpected outcome");
        };
        assert_eq!(
            rooms,
            vec![
                (
                    RoomInfo {
                        member_count: 2,
                        ..first
                    },
                    vec![alice, bob]
                ),
                (
                    RoomInfo {
                        member_count: 0,
                        ..second
                    },
                    vec![]
                ),
            ]
        );
        store.stop();
    }

    #[test]
    fn last_seen_round_trips_through_lookup_users() {
        let mut store = TestStore::new();
        let alice = store.user("alice");
        let bob = store.user("bob");
        assert!(matches!(
            store.call(Op::SetLastSeen {
                user_id: bob,
                at_ms: 1_700_000_000_123
            }),
            Outcome::LastSeenSet
        ));
        match store.call(Op::LookupUsers {
            names: vec!["bob".into(), "ghost".into(), "alice".into(), "bob".into()],
        }) {
            Outcome::Users(users) => assert_eq!(
                users,
                vec![
                    ("bob".to_owned(), Some((bob, 1_700_000_000_123))),
                    ("ghost".to_owned(), None),
                    ("alice".to_owned(), Some((alice, 0))),
                    ("bob".to_owned(), Some((bob, 1_700_000_000_123))),
                ]
            ),
            other => panic!("unexpected {other:?}"),
        }
        let outcome = store.call(Op::SetLastSeen {
            user_id: 42,
            at_ms: 1,
        });
        assert!(failure(&outcome).contains("no user with id 42"));
        store.stop();
    }

    #[test]
    fn version_1_database_migrates_to_current_and_keeps_users() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        {
            // Written out rather than taken from MIGRATIONS: this is what released builds left
            // on disk, whatever later edits do to the list.
            let conn = Connection::open(&config.path).unwrap();
            conn.execute_batch(
                "CREATE TABLE users (
                    id               INTEGER PRIMARY KEY,
                    username         TEXT    NOT NULL UNIQUE,
                    phc              TEXT    NOT NULL,
                    created_at_ms    INTEGER NOT NULL,
                    delivered_cursor INTEGER NOT NULL DEFAULT 0
                );
                CREATE TABLE tokens (
                    id              INTEGER PRIMARY KEY,
                    token           BLOB    NOT NULL UNIQUE,
                    user_id         INTEGER NOT NULL REFERENCES users(id),
                    device          TEXT    NOT NULL,
                    created_at_ms   INTEGER NOT NULL,
                    last_used_at_ms INTEGER NOT NULL,
                    expires_at_ms   INTEGER NOT NULL,
                    revoked         INTEGER NOT NULL DEFAULT 0
                );
                CREATE INDEX tokens_by_user ON tokens(user_id, id);
                INSERT INTO users (username, phc, created_at_ms) VALUES ('ann', 'phc-ann', 5);
                INSERT INTO users (username, phc, created_at_ms) VALUES ('ben', 'phc-ben', 6);
                INSERT INTO tokens (token, user_id, device, created_at_ms, last_used_at_ms,
                                    expires_at_ms)
                VALUES (x'0102030405060708090a0b0c0d0e0f10', 1, 'old phone', 5, 5,
                        9223372036854775807);
                PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let mut store = TestStore::open(dir);
        match store.call(Op::LookupUser {
            username: "ann".into(),
        }) {
            Outcome::Credentials(Some((account, phc))) => {
                assert_eq!((account.user_id, phc.as_str()), (1, "phc-ann"));
                assert_eq!(account.max_message_id, 0);
            }
            other => panic!("unexpected {other:?}"),
        }
        match store.call(Op::ResumeToken {
            token: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
            device: "old phone".into(),
        }) {
            Outcome::Resumed(Some((account, _))) => assert_eq!(account.username, "ann"),
            other => panic!("unexpected {other:?}"),
        }
        match store.call(Op::LookupUsers {
            names: vec!["ann".into(), "ben".into()],
        }) {
            Outcome::Users(users) => assert_eq!(
                users,
                vec![
                    ("ann".to_owned(), Some((1, 0))),
                    ("ben".to_owned(), Some((2, 0)))
                ]
            ),
            other => panic!("unexpected {other:?}"),
        }
        store.room(1, "reunion");
        store.join(2, "reunion");
        let said = store.post(2, "reunion", 1);
        let dm = store.send(1, "ben", 1, "hi");
        assert_eq!(store.feed_ids(1), vec![said.id, dm.id]);
        let _dir = store.stop();

        let conn = Connection::open(&config.path).unwrap();
        assert_eq!(schema_version(&conn).unwrap(), SCHEMA_VERSION);
        assert_eq!(user_count(&conn), 2);
    }

    #[test]
    fn messages_are_either_direct_or_to_a_room() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = open_database(&config(&dir)).unwrap();
        run_ops(&mut db, vec![create("alice"), create_room_op(1, "r", 1)]);
        for (recipient, room) in [(None, None), (Some(1), Some(1))] {
            let result = db.conn.execute(
                "INSERT INTO messages (sender_id, recipient_id, room_id, client_msg_id,
                                       timestamp_ms, text) VALUES (1, ?1, ?2, 1, 0, 'x')",
                params![recipient, room],
            );
            assert!(result.is_err(), "{recipient:?} {room:?}");
        }
    }

    /// The query plan's lines for `query`, its placeholders all bound to 1.
    fn query_plan(conn: &Connection, query: &str, args: usize) -> String {
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {query}"))
            .unwrap()
            .query_map(rusqlite::params_from_iter(vec![1i64; args]), |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        plan.join("\n")
    }

    /// Every read of direct messages is index ranges in the message index plus one rowid range of
    /// `messages` above the index's mark — never a scan of a table, and never the UNIQUE index,
    /// which would walk all of a sender's messages.
    #[test]
    fn direct_message_reads_are_index_ranges_and_one_rowid_range() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_database(&config(&dir)).unwrap();
        for (name, query, args, ranges) in [
            (
                "feed",
                FEED,
                3,
                &[
                    "SEARCH x USING PRIMARY KEY (sender_id=? AND id>?)",
                    "SEARCH x USING PRIMARY KEY (recipient_id=? AND id>?)",
                    "SEARCH messages USING INTEGER PRIMARY KEY (rowid>?)",
                    "SEARCH rm USING INDEX room_members_by_user (user_id=?)",
                    "SEARCH msg USING INDEX messages_by_room (room_id=? AND id>? AND id<?)",
                ][..],
            ),
            (
                "history",
                HISTORY,
                4,
                &[
                    "SEARCH x USING PRIMARY KEY (sender_id=? AND recipient_id=? AND id<?)",
                    "SEARCH messages USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)",
                ][..],
            ),
            (
                "receipts",
                RECEIPTS,
                3,
                &[
                    "SEARCH idx.received USING PRIMARY KEY (recipient_id=? AND id>? AND id<?)",
                    "SEARCH messages USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)",
                ][..],
            ),
            (
                "account",
                ACCOUNT_BY_ID,
                1,
                &[
                    "SEARCH idx.sent USING PRIMARY KEY (sender_id=?)",
                    "SEARCH idx.received USING PRIMARY KEY (recipient_id=?)",
                    "SEARCH messages USING INTEGER PRIMARY KEY (rowid>?)",
                    "messages_by_room (room_id=? AND id>? AND id<?)",
                ][..],
            ),
            (
                "room history",
                ROOM_HISTORY,
                4,
                &["messages_by_room (room_id=? AND id>? AND id<?)"][..],
            ),
        ] {
            let plan = query_plan(&db.conn, query, args);
            for range in ranges {
                assert!(
                    plan.contains(range),
                    "{name}: {range} missing from:\n{plan}"
                );
            }
            for line in plan.lines().filter(|l| l.starts_with("SCAN")) {
                // The CTE's own rows and the one-row state table are all that is scanned.
                assert!(
                    ["SCAN m", "SCAN p", "SCAN r", "SCAN idx.state"].contains(&line),
                    "{name}: {line} in:\n{plan}"
                );
            }
            assert!(
                !plan.contains("sqlite_autoindex_messages"),
                "{name}:\n{plan}"
            );
        }
    }

    /// The one index left on `messages` is partial: a direct message enters no index of the table
    /// at all (the resend check keeps its ids apart, store/resend.rs).
    #[test]
    fn messages_keep_only_the_partial_room_index() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_database(&config(&dir)).unwrap();
        let indexes: Vec<(String, bool)> = db
            .conn
            .prepare("PRAGMA index_list(messages)")
            .unwrap()
            .query_map([], |r| Ok((r.get(1)?, r.get(4)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut names: Vec<&str> = indexes.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["messages_by_room"], "{indexes:?}");
        assert!(indexes.contains(&("messages_by_room".to_owned(), true)));
    }

    #[test]
    fn commit_stats_pack_without_mixing() {
        assert_eq!(unpack_commit(pack_commit(101, 2_500)), (101, 2_500));
        assert_eq!(unpack_commit(0), (0, 0));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Any page size walks any mix of messages exactly once, in id order.
        #[test]
        fn feed_paging_is_exact(
            senders in proptest::collection::vec(0u8..3, 0..40),
            limit in 1u32..12,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut db = open_database(&config(&dir)).unwrap();
            run_ops(&mut db, vec![create("a"), create("b"), create("c")]);
            let names = ["a", "b", "c"];
            let mut expected = Vec::new();
            for (i, from) in senders.iter().enumerate() {
                let to = names[(usize::from(*from) + 1) % 3];
                let op = Op::StoreMessage {
                    sender: u64::from(*from) + 1,
                    recipient: to.into(),
                    client_msg_id: i as u64,
                    text: i.to_string(),
                };
                let outcome = run_ops(&mut db, vec![op]).remove(0);
                let Outcome::Stored { message, .. } = outcome else { panic!("{outcome:?}") };
                if message.sender_id == 1 || message.recipient_id == 1 {
                    expected.push(message.id);
                }
            }
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                let op = Op::FetchFeed { user_id: 1, after_id: after, limit };
                let (messages, more) = page(run_ops(&mut db, vec![op]).remove(0));
                seen.extend(ids(&messages));
                match messages.last() {
                    Some(last) if more => after = last.id,
                    _ => break,
                }
            }
            proptest::prop_assert_eq!(seen, expected);
        }

        /// User 1 ("a") joins and leaves a room others keep talking in, amid direct messages:
        /// the feed and max_message_id match a model of the membership window, and any page
        /// size walks the feed exactly once.
        #[test]
        fn room_feed_follows_the_membership_window(
            events in proptest::collection::vec(0u8..7, 0..40),
            limit in 1u32..9,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut db = open_database(&config(&dir)).unwrap();
            run_ops(&mut db, vec![create("a"), create("b"), create("c")]);
            run_ops(&mut db, vec![create_room_op(2, "r", 1), join_op(3, "r", 9, 9)]);
            let (a, b, c) = (1, 2, 3);
            let mut stored: Vec<StoredMessage> = Vec::new();
            // The model: a's window (joined_after, left_after) once a first joined.
            let mut window: Option<(u64, Option<u64>)> = None;
            for (i, event) in events.iter().enumerate() {
                let newest = stored.last().map_or(0, |m| m.id);
                let member = matches!(window, Some((_, None)));
                let client_msg_id = i as u64;
                let op = match event {
                    0 => post_op(b, "r", client_msg_id, "b"),
                    1 => join_op(a, "r", 9, 9),
                    2 => Op::LeaveRoom { user_id: a, name: "r".into() },
                    3 => Op::StoreMessage {
                        sender: c, recipient: "a".into(), client_msg_id, text: "c->a".into(),
                    },
                    4 => post_op(a, "r", client_msg_id, "a"),
                    5 => Op::StoreMessage {
                        sender: a, recipient: "b".into(), client_msg_id, text: "a->b".into(),
                    },
                    _ => post_op(c, "r", client_msg_id, "c"),
                };
                match run_ops(&mut db, vec![op]).remove(0) {
                    Outcome::Stored { message, duplicate: false } => stored.push(message),
                    Outcome::Joined { already_member, .. } => {
                        proptest::prop_assert_eq!(already_member, member);
                        if !member {
                            window = Some((newest, None));
                        }
                    }
                    Outcome::Left { .. } => {
                        proptest::prop_assert!(member);
                        window = window.map(|(joined, _)| (joined, Some(newest)));
                    }
                    Outcome::NotMember => proptest::prop_assert!(!member),
                    other => panic!("{other:?}"),
                }
            }
            let visible = |m: &StoredMessage| match (&m.room, window) {
                (None, _) => m.sender_id == a || m.recipient_id == a,
                (Some(_), Some((joined, left))) => m.id > joined && left.is_none_or(|l| m.id <= l),
                (Some(_), None) => false,
            };
            let expected: Vec<u64> = stored.iter().filter(|m| visible(m)).map(|m| m.id).collect();
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                let op = Op::FetchFeed { user_id: a, after_id: after, limit };
                let (messages, more) = page(run_ops(&mut db, vec![op]).remove(0));
                seen.extend(ids(&messages));
                match messages.last() {
                    Some(last) if more => after = last.id,
                    _ => break,
                }
            }
            proptest::prop_assert_eq!(&seen, &expected);
            let lookup = Op::LookupUser { username: "a".into() };
            let Outcome::Credentials(Some((account, _))) = run_ops(&mut db, vec![lookup]).remove(0)
            else { panic!("a vanished") };
            let newest = expected.last().copied().unwrap_or(0);
            proptest::prop_assert_eq!(account.max_message_id, newest);
        }
    }

    // -----------------------------------------------------------------------------------------
    // The message index (store/index.rs)

    /// Settings under which the indexer thread does nothing on its own within a test's lifetime.
    fn idle_indexer() -> IndexSettings {
        IndexSettings {
            batch: 1_000_000,
            delay: Duration::from_secs(3600),
            max_lag: 1_000_000,
        }
    }

    fn message_op(sender: UserId, to: &str, client_msg_id: u64) -> Op {
        Op::StoreMessage {
            sender,
            recipient: to.into(),
            client_msg_id,
            text: format!("{sender}->{to} #{client_msg_id}"),
        }
    }

    /// Everything a user can read about direct messages, each read as the store answers it.
    #[derive(Debug, PartialEq)]
    struct Reads {
        feeds: Vec<Vec<u64>>,
        histories: Vec<Vec<u64>>,
        receipts: Vec<Vec<(u64, String, u64)>>,
        max_ids: Vec<u64>,
    }

    fn all_reads(db: &mut Db, users: &[(UserId, &str)], cut: u64) -> Reads {
        let mut reads = Reads {
            feeds: Vec::new(),
            histories: Vec::new(),
            receipts: Vec::new(),
            max_ids: Vec::new(),
        };
        for &(user_id, _) in users {
            for after in [0, cut] {
                let feed = page(fetch_feed(&db.conn, user_id, after, 1000).unwrap());
                reads.feeds.push(ids(&feed.0));
            }
            for &(_, peer) in users {
                for before in [0, cut] {
                    let page = page(history(db, user_id, peer, before, 1000).unwrap());
                    reads.histories.push(ids(&page.0));
                }
            }
            let receipts = db
                .conn
                .prepare(RECEIPTS)
                .unwrap()
                .query_map(
                    params![to_db(user_id), to_db(cut / 2), to_db(cut * 2)],
                    |row| Ok((get_u64(row, 0)?, row.get(1)?, get_u64(row, 2)?)),
                )
                .unwrap()
                .collect::<rusqlite::Result<Vec<_>>>()
                .unwrap();
            reads.receipts.push(receipts);
            let account = account_by_id(&db.conn, user_id).unwrap().unwrap();
            reads.max_ids.push(account.max_message_id);
        }
        reads
    }

    /// Reads combine the index (up to its mark) with the rows above the mark: wherever the mark
    /// stands, from nothing indexed to everything, every read gives the same answer.
    #[test]
    fn reads_are_the_same_wherever_the_index_mark_stands() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        let mut db = open_database(&config).unwrap();
        let names = ["ann", "bo", "cy"];
        let mut ops: Vec<Op> = names.iter().map(|name| create(name)).collect();
        ops.push(create_room_op(1, "den", ROOMS_PER_USER));
        ops.push(join_op(2, "den", MEMBERS_PER_ROOM, ROOMS_PER_USER));
        for n in 0..40u64 {
            let sender = n % 3 + 1;
            let to = names[usize::try_from((n * 7 + 1) % 3).unwrap()];
            ops.push(if n % 5 == 4 {
                Op::StoreRoomMessage {
                    sender: sender.min(2),
                    room: "den".into(),
                    client_msg_id: 1000 + n,
                    text: format!("room #{n}"),
                }
            } else {
                message_op(sender, to, n)
            });
        }
        for outcome in run_ops(&mut db, ops) {
            assert!(!matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        }
        let users: Vec<(UserId, &str)> = (1..=3).zip(names).collect();
        let mut writer = IndexWriter::open(&config.path).unwrap();
        assert_eq!(
            writer.indexed_up_to().unwrap(),
            0,
            "opened before any message"
        );
        let unindexed = all_reads(&mut db, &users, 20);
        assert!(unindexed.feeds.iter().all(|feed| !feed.is_empty()));
        let mut mark = 0;
        loop {
            let next = writer.index_next(7).unwrap();
            if next == mark {
                break;
            }
            mark = next;
            assert_eq!(all_reads(&mut db, &users, 20), unindexed, "mark {mark}");
        }
        assert!(mark >= 40, "everything indexed in the end: {mark}");
    }

    /// The whole message index as rows: each table in key order, then the mark.
    fn index_contents(conn: &Connection) -> Vec<Vec<i64>> {
        let mut rows = Vec::new();
        for sql in [
            "SELECT sender_id, id FROM idx.sent ORDER BY 1, 2",
            "SELECT recipient_id, id, sender_id FROM idx.received ORDER BY 1, 2",
            "SELECT sender_id, recipient_id, id FROM idx.pairs ORDER BY 1, 2, 3",
            "SELECT indexed_up_to FROM idx.state",
        ] {
            let mut stmt = conn.prepare(sql).unwrap();
            let columns = stmt.column_count();
            let table = stmt
                .query_map([], |row| (0..columns).map(|i| row.get(i)).collect())
                .unwrap();
            rows.extend(table.map(Result::unwrap));
        }
        rows
    }

    /// What the store thread hands the indexer, the entries of the direct messages each commit
    /// stored, builds the very index that reading the messages back from the database builds; and
    /// reads agree at each mark on the way. Room messages, resends and refused messages have no entry.
    #[test]
    fn handed_over_entries_build_the_index_that_reading_back_builds() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        let copy = tempfile::tempdir().unwrap();
        let copied = StoreConfig {
            path: copy.path().join("copy.db"),
            ..config.clone()
        };
        let mut db = open_database(&config).unwrap();
        let names = ["ann", "bo", "cy"];
        let mut ops: Vec<Op> = names.iter().map(|name| create(name)).collect();
        ops.push(create_room_op(1, "den", ROOMS_PER_USER));
        ops.push(join_op(2, "den", MEMBERS_PER_ROOM, ROOMS_PER_USER));
        run_ops(&mut db, ops);
        let mut commits = Vec::new();
        for round in 0..5u64 {
            let op = |n: u64| {
                let sender = n % 3 + 1;
                let to = names[usize::try_from((n * 7 + 1) % 3).unwrap()];
                match n % 8 {
                    3 => Op::StoreRoomMessage {
                        sender: sender.min(2),
                        room: "den".into(),
                        client_msg_id: 1000 + n,
                        text: format!("room #{n}"),
                    },
                    5 => message_op(1, "nobody", n),
                    _ => message_op(sender, to, n),
                }
            };
            let mut ops: Vec<Op> = (round * 8..round * 8 + 8).map(op).collect();
            // A resend of the round's first message.
            ops.push(op(round * 8));
            let report = run_batch(&mut db, jobs(ops));
            let entries: Vec<IndexEntry> = direct_messages_stored(&report.dones).collect();
            let newest = newest_stored(&report.dones).unwrap();
            commits.push((entries, newest));
        }
        assert_eq!(
            commits
                .iter()
                .map(|(entries, _)| entries.len())
                .sum::<usize>(),
            5 * 6,
            "6 of each 9 jobs stored a new direct message"
        );

        let users: Vec<(UserId, &str)> = (1..=3).zip(names).collect();
        let unindexed = all_reads(&mut db, &users, 20);
        let mut writer = IndexWriter::open(&config.path).unwrap();
        for (mut entries, newest) in commits {
            assert_eq!(writer.index_entries(&mut entries, newest).unwrap(), newest);
            assert_eq!(all_reads(&mut db, &users, 20), unindexed, "mark {newest}");
        }
        let handed_over = index_contents(&db.conn);

        db.conn
            .execute("VACUUM INTO ?1", [copied.path.to_str().unwrap()])
            .unwrap();
        let read_back = open_database(&copied).unwrap();
        assert_eq!(index_contents(&read_back.conn), handed_over);
    }

    fn indexed_up_to(config: &StoreConfig) -> u64 {
        IndexWriter::open(&config.path)
            .unwrap()
            .indexed_up_to()
            .unwrap()
    }

    /// Stores `count` direct messages from alice to bob (both created first) and stops.
    fn store_with_messages(dir: TempDir, count: u64, index: IndexSettings) -> TempDir {
        let mut store = TestStore::with_index(dir, index);
        let alice = store.user("alice");
        store.user("bob");
        for n in 0..count {
            store.send(alice, "bob", n, "hi");
        }
        store.stop()
    }

    #[test]
    fn a_deleted_index_is_rebuilt_at_the_next_start() {
        let dir = store_with_messages(tempfile::tempdir().unwrap(), 5, idle_indexer());
        let config = config(&dir);
        assert_eq!(
            indexed_up_to(&config),
            0,
            "the idle indexer indexed nothing"
        );
        std::fs::remove_file(index_path(&config.path)).unwrap();
        let mut store = TestStore::open(dir);
        assert_eq!(store.feed(2, 0, 100).0.len(), 5);
        assert_eq!(indexed_up_to(&config), 5);
        store.stop();
    }

    #[test]
    fn an_unindexed_tail_left_by_a_stop_is_indexed_at_the_next_start() {
        let dir = store_with_messages(tempfile::tempdir().unwrap(), 7, idle_indexer());
        let config = config(&dir);
        assert_eq!(indexed_up_to(&config), 0);
        drop(open_database(&config).unwrap());
        assert_eq!(indexed_up_to(&config), 7);
    }

    #[test]
    fn an_index_ahead_of_its_database_is_rebuilt() {
        let dir = store_with_messages(tempfile::tempdir().unwrap(), 3, IndexSettings::default());
        let config = config(&dir);
        let backup = dir.path().join("backup.db");
        {
            let db = open_database(&config).unwrap();
            db.conn
                .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
                .unwrap();
        }
        // Two more messages, indexed; then the database is restored from the backup.
        let mut store = TestStore::open(dir);
        store.send(1, "bob", 100, "later");
        store.send(1, "bob", 101, "later");
        let dir = store.stop();
        drop(open_database(&config).unwrap());
        assert_eq!(indexed_up_to(&config), 5, "the open caught up");
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", config.path.display()));
        }
        std::fs::rename(&backup, &config.path).unwrap();
        let mut store = TestStore::open(dir);
        assert_eq!(ids(&store.feed(2, 0, 100).0), vec![1, 2, 3]);
        let fresh = store.send(1, "bob", 200, "after the restore");
        assert_eq!(ids(&store.feed(2, 3, 100).0), vec![fresh.id]);
        store.stop();
    }

    #[test]
    fn an_index_of_another_database_or_garbage_is_rebuilt() {
        let mine = store_with_messages(tempfile::tempdir().unwrap(), 2, IndexSettings::default());
        let other = store_with_messages(tempfile::tempdir().unwrap(), 9, IndexSettings::default());
        let index = index_path(&config(&mine).path);
        std::fs::copy(index_path(&config(&other).path), &index).unwrap();
        let mut store = TestStore::open(mine);
        assert_eq!(store.feed(2, 0, 100).0.len(), 2);
        let mine = store.stop();
        assert_eq!(indexed_up_to(&config(&mine)), 2);

        std::fs::write(&index, b"not a database at all, just some bytes").unwrap();
        let mut store = TestStore::open(mine);
        assert_eq!(store.feed(2, 0, 100).0.len(), 2);
        store.stop();
    }

    /// Polls the index file until its mark is `want`, for at most LONG_WAIT.
    fn wait_for_mark(config: &StoreConfig, want: u64) -> u64 {
        let started = Instant::now();
        loop {
            let mark = indexed_up_to(config);
            if mark == want || started.elapsed() > LONG_WAIT {
                return mark;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_full_index_batch_is_indexed_at_once_and_a_partial_one_after_the_delay() {
        let dir = tempfile::tempdir().unwrap();
        let batch = IndexSettings {
            batch: 5,
            ..idle_indexer()
        };
        let dir = store_with_messages(dir, 4, batch);
        assert_eq!(indexed_up_to(&config(&dir)), 0, "4 of a batch of 5 wait");

        let mut store = TestStore::with_index(dir, batch);
        let config = config(&store.dir);
        assert_eq!(indexed_up_to(&config), 4, "the start caught up");
        for n in 10..15 {
            store.send(1, "bob", n, "five");
        }
        assert_eq!(wait_for_mark(&config, 9), 9, "a full batch of 5");
        let dir = store.stop();

        let delayed = IndexSettings {
            delay: Duration::from_millis(50),
            ..idle_indexer()
        };
        let mut store = TestStore::with_index(dir, delayed);
        store.send(1, "bob", 20, "one");
        assert_eq!(
            wait_for_mark(&config, 10),
            10,
            "one message, after the delay"
        );
        store.stop();
    }

    #[test]
    fn the_store_waits_for_an_index_more_than_max_lag_behind() {
        for (max_lag, expect_waits) in [(3, true), (1_000_000, false)] {
            let dir = tempfile::tempdir().unwrap();
            let settings = IndexSettings {
                max_lag,
                ..idle_indexer()
            };
            let dir = store_with_messages(dir, 10, settings);
            let mark = indexed_up_to(&config(&dir));
            if expect_waits {
                // Before each batch the index lacks at most max_lag; the last batch adds one.
                assert!((10 - 3 - 1..10).contains(&mark), "max_lag 3: mark {mark}");
            } else {
                assert_eq!(mark, 0, "an idle indexer without a lag limit");
            }
        }
    }
}
