//! The store: hubbub's only door to SQLite.
//!
//! This module owns the SQLite connection, the schema and its migrations, and group commit. All
//! database work happens on one dedicated thread ("hubbub-store"): jobs arrive over a bounded
//! channel, queued jobs are run together in one transaction (each job inside its own savepoint),
//! and completions are sent back only after that transaction committed, followed by one call to
//! the `wake` callback so the reactor notices them.
//!
//! What it must not do: the reactor thread never calls into this module except through
//! [`StoreHandle::try_submit`] (plus the cheap stats getters), and that call never blocks — a full
//! queue hands the job back so the caller can apply backpressure. The store knows nothing of
//! sockets, sessions or mio; a [`Ticket`] is an opaque routing label it merely carries back.
//!
//! A failing database (I/O error, full disk, read-only file, lock held by another process...)
//! never ends the thread: the affected jobs answer [`Outcome::Failed`] and later jobs are tried
//! afresh, so the server recovers on its own once the disk is writable or has space again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::session::Ticket;

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
#[derive(Debug)]
pub enum Op {
    /// username is already validated and lower-cased by the caller.
    CreateUser { username: String, phc: String },
    /// Fetch an account and its stored password hash for a login attempt.
    LookupUser { username: String },
    /// A new session token (UUID v4, 16 random bytes, generated in the store) valid for ttl_secs.
    IssueToken {
        user_id: UserId,
        device: String,
        ttl_secs: u64,
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
    /// The user's feed: every message where the user is sender or recipient with id > after_id, ascending id,
    /// at most `limit`; `more` says whether further messages exist past this page.
    FetchFeed {
        user_id: UserId,
        after_id: u64,
        limit: u32,
    },
    /// Raise the user's delivered cursor to up_to (never lowers it). Answers with, for each sender of messages to
    /// this user with id in (old_cursor, new_cursor], the highest such id — so the loop can send delivery receipts.
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
    /// Highest id of any message the user sent or received (0 if none).
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

/// A direct message with both parties' names resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Strictly increasing, never reused.
    pub id: u64,
    pub sender_id: UserId,
    /// The sender's username.
    pub sender: String,
    pub recipient_id: UserId,
    /// The recipient's username.
    pub recipient: String,
    /// Unix milliseconds when the storing transaction ran.
    pub timestamp_ms: u64,
    pub text: String,
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
        cursor: u64,
        receipts: Vec<(
            UserId,
            String, /* sender name */
            u64,    /* highest id */
        )>,
    },
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
            -- AUTOINCREMENT: ids are never reused, so client cursors stay meaningful forever.
            CREATE TABLE messages (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                sender_id     INTEGER NOT NULL REFERENCES users(id),
                recipient_id  INTEGER NOT NULL REFERENCES users(id),
                client_msg_id INTEGER NOT NULL,
                timestamp_ms  INTEGER NOT NULL,
                text          TEXT    NOT NULL,
                UNIQUE (sender_id, client_msg_id)
            );
            -- The feed is two range scans, one per index; each also answers max(id) per user.
            CREATE INDEX messages_by_sender ON messages(sender_id, id);
            CREATE INDEX messages_by_recipient ON messages(recipient_id, id);
            -- History walks one direction of a conversation backwards from a cursor.
            CREATE INDEX messages_by_pair ON messages(sender_id, recipient_id, id);
        ",
    },
];

/// How long a statement waits for a lock held by another process (a backup, the sqlite3 shell)
/// before the job fails. Tests shorten it so lock failures show quickly.
const BUSY_TIMEOUT: Duration = Duration::from_millis(if cfg!(test) { 100 } else { 5000 });

/// Room for every distinct statement below, so none is ever re-prepared.
const STATEMENT_CACHE_CAPACITY: usize = 32;

/// A running store thread and the way to feed it.
///
/// Dropping the handle without [`StoreHandle::join`] closes the queue; the thread then finishes
/// what it holds and ends on its own.
pub struct StoreHandle {
    jobs: SyncSender<Job>,
    worker: JoinHandle<()>,
    stats: Arc<Stats>,
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
        let conn = open_database(&config)?;
        let (job_tx, job_rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let (done_tx, done_rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let worker = Worker {
            conn,
            jobs: job_rx,
            done: done_tx,
            wake,
            stats: Arc::clone(&stats),
            max_batch: config.max_batch.max(1),
        };
        let worker = thread::Builder::new()
            .name("hubbub-store".into())
            .spawn(move || worker.run())
            .map_err(|e| StoreError::Spawn(e.to_string()))?;
        let handle = StoreHandle {
            jobs: job_tx,
            worker,
            stats,
        };
        Ok((handle, done_rx))
    }

    /// Never blocks: Err(job) gives the job back when the queue is full (the caller applies backpressure) or the thread is gone.
    pub fn try_submit(&self, job: Job) -> Result<(), Job> {
        // Counted before sending so the worker's decrement can never run first and wrap around.
        self.stats.depth.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => {
                self.stats.depth.fetch_sub(1, Ordering::Relaxed);
                Err(job)
            }
        }
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
    pub fn join(self) {
        let StoreHandle { jobs, worker, .. } = self;
        // Closing the queue wakes a worker idle in recv(), which then ends.
        drop(jobs);
        if worker.join().is_err() {
            log::error!("store thread panicked");
        }
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
fn open_database(config: &StoreConfig) -> Result<Connection, StoreError> {
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
    configure(&conn, config.sync).map_err(open_error)?;
    migrate(&mut conn, found, path)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(conn)
}

fn schema_version(conn: &Connection) -> rusqlite::Result<i32> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

fn configure(conn: &Connection, sync: SyncMode) -> rusqlite::Result<()> {
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
// The worker thread and group commit

struct Worker {
    conn: Connection,
    jobs: Receiver<Job>,
    done: Sender<Done>,
    wake: Arc<dyn Fn() + Send + Sync>,
    stats: Arc<Stats>,
    max_batch: usize,
}

/// Jobs taken from the queue in one go, and the Shutdown that ended the taking, if any.
struct Batch {
    jobs: Vec<Job>,
    stop: Option<Ticket>,
}

impl Worker {
    fn run(self) {
        while let Some(batch) = self.next_batch() {
            let size = batch.jobs.len();
            let report = run_batch(&self.conn, batch.jobs);
            if let Some(micros) = report.commit_micros {
                self.stats
                    .last_commit
                    .store(pack_commit(size, micros), Ordering::Relaxed);
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
        let mut next = Some(self.jobs.recv().ok()?);
        let mut batch = Batch {
            jobs: Vec::new(),
            stop: None,
        };
        while let Some(job) = next {
            self.stats.depth.fetch_sub(1, Ordering::Relaxed);
            if let Op::Shutdown = job.op {
                batch.stop = Some(job.ticket);
                break;
            }
            batch.jobs.push(job);
            if batch.jobs.len() >= self.max_batch {
                break;
            }
            next = self.jobs.try_recv().ok();
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

/// The completions of one batch, in job order, and the COMMIT latency if a commit succeeded.
struct BatchReport {
    dones: Vec<Done>,
    commit_micros: Option<u64>,
}

/// Runs the jobs in one transaction, each inside its own savepoint, and commits once.
///
/// A completion never claims work that was not committed: when the COMMIT fails, or SQLite
/// abandons the whole transaction after an error (it does so for some I/O and disk-full errors),
/// every job of that transaction answers `Failed`.
fn run_batch(conn: &Connection, jobs: Vec<Job>) -> BatchReport {
    let mut dones: Vec<Done> = Vec::with_capacity(jobs.len());
    // Index in `dones` of the first job of the open transaction.
    let mut open_since: Option<usize> = None;
    for job in jobs {
        if open_since.is_none() {
            match conn.execute_batch("BEGIN") {
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
        let mut outcome = run_job(conn, &job.op);
        if conn.is_autocommit() {
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
    let commit_micros = open_since.and_then(|since| commit(conn, &mut dones[since..]));
    BatchReport {
        dones,
        commit_micros,
    }
}

/// Commits the open transaction; on failure rolls it back and fails its jobs.
fn commit(conn: &Connection, dones: &mut [Done]) -> Option<u64> {
    let started = Instant::now();
    match conn.execute_batch("COMMIT") {
        Ok(()) => Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)),
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

/// Runs one job inside a savepoint, so its error undoes only its own changes.
fn run_job(conn: &Connection, op: &Op) -> Outcome {
    if let Err(e) = conn.execute_batch("SAVEPOINT job") {
        return Outcome::Failed(format!("{}: {e}", op.label()));
    }
    let result = execute_op(conn, op, now_ms()).and_then(|outcome| {
        conn.execute_batch("RELEASE job")?;
        Ok(outcome)
    });
    match result {
        Ok(outcome) => outcome,
        Err(e) => {
            log::warn!("{} failed: {e}", op.label());
            undo_savepoint(conn);
            Outcome::Failed(format!("{} failed: {e}", op.label()))
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
            Op::Shutdown => "shutdown",
        }
    }
}

fn execute_op(conn: &Connection, op: &Op, now: u64) -> JobResult<Outcome> {
    match op {
        Op::CreateUser { username, phc } => create_user(conn, username, phc, now),
        Op::LookupUser { username } => Ok(Outcome::Credentials(account_by_name(conn, username)?)),
        Op::IssueToken {
            user_id,
            device,
            ttl_secs,
        } => issue_token(conn, *user_id, device, *ttl_secs, now),
        Op::ResumeToken { token, device } => resume_token(conn, token, device, now),
        Op::RevokeToken { user_id, token_id } => revoke_token(conn, *user_id, *token_id),
        Op::ListTokens { user_id } => list_tokens(conn, *user_id, now),
        Op::StoreMessage {
            sender,
            recipient,
            client_msg_id,
            text,
        } => store_message(conn, *sender, recipient, *client_msg_id, text, now),
        Op::FetchFeed {
            user_id,
            after_id,
            limit,
        } => fetch_feed(conn, *user_id, *after_id, *limit),
        Op::MarkDelivered { user_id, up_to } => mark_delivered(conn, *user_id, *up_to),
        Op::History {
            user_id,
            peer,
            before_id,
            limit,
        } => history(conn, *user_id, peer, *before_id, *limit),
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

/// Splits off the look-ahead row fetched by [`limit_with_lookahead`].
fn into_page(mut messages: Vec<StoredMessage>, limit: u32) -> Outcome {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = messages.len() > limit;
    messages.truncate(limit);
    Outcome::Page { messages, more }
}

// ---------------------------------------------------------------------------------------------
// Users

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

fn create_user(conn: &Connection, username: &str, phc: &str, now: u64) -> JobResult<Outcome> {
    let mut insert = conn
        .prepare_cached("INSERT INTO users (username, phc, created_at_ms) VALUES (?1, ?2, ?3)")?;
    // Letting the UNIQUE constraint decide avoids a look-up on the common path.
    match insert.execute(params![username, phc, to_db(now)]) {
        Ok(_) => Ok(Outcome::UserCreated {
            user_id: from_db(conn.last_insert_rowid()),
        }),
        Err(e) if is_unique_violation(&e) => Ok(Outcome::UsernameTaken),
        Err(e) => Err(e.into()),
    }
}

/// Both ranges below are index look-ups; COALESCE because max() over no rows is NULL.
const ACCOUNT_BY_NAME: &str = "
    SELECT u.id, u.username, u.delivered_cursor,
           max(coalesce((SELECT max(id) FROM messages WHERE sender_id = u.id), 0),
               coalesce((SELECT max(id) FROM messages WHERE recipient_id = u.id), 0)),
           u.phc
    FROM users u WHERE u.username = ?1";

const ACCOUNT_BY_ID: &str = "
    SELECT u.id, u.username, u.delivered_cursor,
           max(coalesce((SELECT max(id) FROM messages WHERE sender_id = u.id), 0),
               coalesce((SELECT max(id) FROM messages WHERE recipient_id = u.id), 0)),
           u.phc
    FROM users u WHERE u.id = ?1";

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

fn user_id_by_name(conn: &Connection, username: &str) -> rusqlite::Result<Option<UserId>> {
    conn.prepare_cached("SELECT id FROM users WHERE username = ?1")?
        .query_row([username], |row| get_u64(row, 0))
        .optional()
}

fn username_by_id(conn: &Connection, user_id: UserId) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT username FROM users WHERE id = ?1")?
        .query_row([to_db(user_id)], |row| row.get(0))
        .optional()
}

// ---------------------------------------------------------------------------------------------
// Tokens

fn issue_token(
    conn: &Connection,
    user_id: UserId,
    device: &str,
    ttl_secs: u64,
    now: u64,
) -> JobResult<Outcome> {
    let account = account_by_id(conn, user_id)?.ok_or_else(|| no_such_user(user_id))?;
    let token = uuid::Uuid::new_v4().into_bytes();
    let expires = now.saturating_add(ttl_secs.saturating_mul(1000));
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
    conn.prepare_cached("UPDATE tokens SET last_used_at_ms = ?2, device = ?3 WHERE id = ?1")?
        .execute(params![to_db(state.token_id), to_db(now), device])?;
    let account = account_by_id(conn, state.user_id)?;
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

/// Maps rows shaped (id, sender_id, sender, recipient_id, recipient, timestamp_ms, text).
fn stored_message(row: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        id: get_u64(row, 0)?,
        sender_id: get_u64(row, 1)?,
        sender: row.get(2)?,
        recipient_id: get_u64(row, 3)?,
        recipient: row.get(4)?,
        timestamp_ms: get_u64(row, 5)?,
        text: row.get(6)?,
    })
}

fn message_by_client_id(
    conn: &Connection,
    sender: UserId,
    client_msg_id: u64,
) -> rusqlite::Result<Option<StoredMessage>> {
    conn.prepare_cached(
        "SELECT m.id, m.sender_id, s.username, m.recipient_id, r.username, m.timestamp_ms, m.text
         FROM messages m
         JOIN users s ON s.id = m.sender_id
         JOIN users r ON r.id = m.recipient_id
         WHERE m.sender_id = ?1 AND m.client_msg_id = ?2",
    )?
    .query_row(
        params![to_db(sender), client_msg_key(client_msg_id)],
        stored_message,
    )
    .optional()
}

fn store_message(
    conn: &Connection,
    sender: UserId,
    recipient: &str,
    client_msg_id: u64,
    text: &str,
    now: u64,
) -> JobResult<Outcome> {
    // A resend (the client never saw our answer) must get the original back, even if the
    // recipient has since become unknown, so the duplicate check comes first.
    if let Some(original) = message_by_client_id(conn, sender, client_msg_id)? {
        return Ok(Outcome::Stored {
            message: original,
            duplicate: true,
        });
    }
    let Some(recipient_id) = user_id_by_name(conn, recipient)? else {
        return Ok(Outcome::UnknownRecipient);
    };
    let sender_name = username_by_id(conn, sender)?.ok_or_else(|| no_such_user(sender))?;
    conn.prepare_cached(
        "INSERT INTO messages (sender_id, recipient_id, client_msg_id, timestamp_ms, text)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        to_db(sender),
        to_db(recipient_id),
        client_msg_key(client_msg_id),
        to_db(now),
        text
    ])?;
    let message = StoredMessage {
        id: from_db(conn.last_insert_rowid()),
        sender_id: sender,
        sender: sender_name,
        recipient_id,
        recipient: recipient.to_owned(),
        timestamp_ms: now,
        text: text.to_owned(),
    };
    Ok(Outcome::Stored {
        message,
        duplicate: false,
    })
}

/// Two index range scans merged by id; the second leaves out messages to oneself, which the
/// first already returned.
const FEED: &str = "
    WITH page AS (
        SELECT id, sender_id, recipient_id, timestamp_ms, text FROM messages
        WHERE sender_id = ?1 AND id > ?2
        UNION ALL
        SELECT id, sender_id, recipient_id, timestamp_ms, text FROM messages
        WHERE recipient_id = ?1 AND id > ?2 AND sender_id <> ?1
        ORDER BY id LIMIT ?3
    )
    SELECT p.id, p.sender_id, s.username, p.recipient_id, r.username, p.timestamp_ms, p.text
    FROM page p
    JOIN users s ON s.id = p.sender_id
    JOIN users r ON r.id = p.recipient_id
    ORDER BY p.id";

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

/// Both directions of one conversation, newest first; the second direction is skipped for a
/// conversation with oneself, where it would repeat the first.
const HISTORY: &str = "
    WITH page AS (
        SELECT id, sender_id, recipient_id, timestamp_ms, text FROM messages
        WHERE sender_id = ?1 AND recipient_id = ?2 AND id < ?3
        UNION ALL
        SELECT id, sender_id, recipient_id, timestamp_ms, text FROM messages
        WHERE sender_id = ?2 AND recipient_id = ?1 AND id < ?3 AND ?1 <> ?2
        ORDER BY id DESC LIMIT ?4
    )
    SELECT p.id, p.sender_id, s.username, p.recipient_id, r.username, p.timestamp_ms, p.text
    FROM page p
    JOIN users s ON s.id = p.sender_id
    JOIN users r ON r.id = p.recipient_id
    ORDER BY p.id DESC";

fn history(
    conn: &Connection,
    user_id: UserId,
    peer: &str,
    before_id: u64,
    limit: u32,
) -> JobResult<Outcome> {
    let Some(peer_id) = user_id_by_name(conn, peer)? else {
        return Ok(Outcome::UnknownRecipient);
    };
    let before = if before_id == 0 {
        i64::MAX
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

fn mark_delivered(conn: &Connection, user_id: UserId, up_to: u64) -> JobResult<Outcome> {
    let account = account_by_id(conn, user_id)?.ok_or_else(|| no_such_user(user_id))?;
    let old = account.delivered_cursor;
    let new = up_to.min(account.max_message_id).max(old);
    if new == old {
        return Ok(Outcome::Delivered {
            cursor: old,
            receipts: Vec::new(),
        });
    }
    conn.prepare_cached("UPDATE users SET delivered_cursor = ?2 WHERE id = ?1")?
        .execute(params![to_db(user_id), to_db(new)])?;
    let receipts = conn
        .prepare_cached(
            "SELECT m.sender_id, s.username, max(m.id) FROM messages m
             JOIN users s ON s.id = m.sender_id
             WHERE m.recipient_id = ?1 AND m.id > ?2 AND m.id <= ?3
             GROUP BY m.sender_id ORDER BY m.sender_id",
        )?
        .query_map(params![to_db(user_id), to_db(old), to_db(new)], |row| {
            Ok((get_u64(row, 0)?, row.get(1)?, get_u64(row, 2)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Outcome::Delivered {
        cursor: new,
        receipts,
    })
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle")
            .field("queue_depth", &self.queue_depth())
            .finish_non_exhaustive()
    }
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
            let (handle, done) = StoreHandle::start(config(&dir), no_wake()).unwrap();
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
                ttl_secs,
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

    /// Runs ops as one batch on a connection, bypassing the thread, so tests can tamper with the
    /// connection between batches.
    fn run_ops(conn: &Connection, ops: Vec<Op>) -> Vec<Outcome> {
        let jobs = ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| Job {
                ticket: ticket(u32::try_from(i).unwrap()),
                op,
            })
            .collect();
        run_batch(conn, jobs)
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
            ttl_secs: 60,
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
            Outcome::Delivered { cursor, receipts } => (cursor, receipts),
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
        assert_eq!(SCHEMA_VERSION, 2);
    }

    #[test]
    fn older_schema_is_migrated_and_data_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        {
            // A database as a build that only knew step 1 left it.
            let mut conn = Connection::open(&config.path).unwrap();
            apply_migration(&mut conn, &MIGRATIONS[0]).unwrap();
            conn.execute(
                "INSERT INTO users (username, phc, created_at_ms) VALUES ('old', 'phc', 1)",
                [],
            )
            .unwrap();
        }
        let mut store = TestStore::open(dir);
        let old = store.account("old");
        let new = store.user("new");
        store.send(new, "old", 1, "welcome to step 2");
        assert_eq!(store.account("old").max_message_id, 1);
        assert_eq!(old.username, "old");
        let _dir = store.stop();

        let conn = Connection::open(&config.path).unwrap();
        assert_eq!(schema_version(&conn).unwrap(), SCHEMA_VERSION);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
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
        let conn = open_database(&config(&dir)).unwrap();
        let outcomes = run_ops(&conn, vec![create("alice")]);
        assert!(matches!(outcomes[0], Outcome::UserCreated { .. }));

        // Stands in for chmod 0444, which root ignores.
        conn.pragma_update(None, "query_only", true).unwrap();
        let outcomes = run_ops(
            &conn,
            vec![
                create("bob"),
                Op::LookupUser {
                    username: "alice".into(),
                },
            ],
        );
        assert!(failure(&outcomes[0]).contains("readonly"), "{outcomes:?}");
        assert!(matches!(outcomes[1], Outcome::Credentials(Some(_))));

        conn.pragma_update(None, "query_only", false).unwrap();
        let outcomes = run_ops(&conn, vec![create("bob")]);
        assert!(matches!(outcomes[0], Outcome::UserCreated { .. }));
        assert_eq!(user_count(&conn), 2);
    }

    #[test]
    fn read_only_open_fails_writes_but_answers_reads() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        drop(open_database(&config).unwrap());
        let conn =
            Connection::open_with_flags(&config.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let outcomes = run_ops(
            &conn,
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
        let conn = open_database(&config(&dir)).unwrap();
        run_ops(&conn, vec![create("alice")]);
        let pages: i64 = conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        // The database may not grow: any new page is a full disk.
        conn.pragma_update(None, "max_page_count", pages).unwrap();
        let big_message = Op::StoreMessage {
            sender: 1,
            recipient: "alice".into(),
            client_msg_id: 1,
            text: "x".repeat(256 * 1024),
        };
        let outcomes = run_ops(
            &conn,
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
                &conn,
                vec![Op::LookupUser {
                    username: "bob".into()
                }]
            )[0],
            Outcome::Credentials(Some(_))
        );
        assert_eq!(bob_claimed, bob_present);

        conn.pragma_update(None, "max_page_count", 1_000_000)
            .unwrap();
        let outcomes = run_ops(&conn, vec![message_to_self(1)]);
        assert!(
            matches!(outcomes[0], Outcome::Stored { .. }),
            "{outcomes:?}"
        );
    }

    #[test]
    fn failed_commit_fails_every_job_of_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_database(&config(&dir)).unwrap();
        // Every new user leaves a deferred foreign-key violation behind, which only COMMIT checks.
        conn.execute_batch(
            "CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TEMP TABLE child (parent_id INTEGER REFERENCES parent(id)
                                      DEFERRABLE INITIALLY DEFERRED);
             CREATE TEMP TRIGGER poison AFTER INSERT ON main.users
             BEGIN INSERT INTO child VALUES (42); END;",
        )
        .unwrap();
        let outcomes = run_ops(
            &conn,
            vec![
                create("alice"),
                Op::LookupUser {
                    username: "alice".into(),
                },
                create("bob"),
            ],
        );
        for outcome in &outcomes {
            assert!(failure(outcome).contains("commit failed"), "{outcome:?}");
        }
        assert!(conn.is_autocommit(), "no transaction left open");
        assert_eq!(user_count(&conn), 0);

        conn.execute_batch("DROP TRIGGER poison").unwrap();
        let outcomes = run_ops(&conn, vec![create("alice")]);
        assert!(matches!(outcomes[0], Outcome::UserCreated { .. }));
        assert_eq!(user_count(&conn), 1);
    }

    #[test]
    fn one_failing_job_leaves_the_rest_of_its_batch_alone() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_database(&config(&dir)).unwrap();
        let outcomes = run_ops(
            &conn,
            vec![
                create("alice"),
                Op::IssueToken {
                    user_id: 999,
                    device: "x".into(),
                    ttl_secs: 1,
                },
                create("alice"),
                create("bob"),
            ],
        );
        assert!(matches!(outcomes[0], Outcome::UserCreated { .. }));
        assert!(failure(&outcomes[1]).contains("issue token"));
        assert!(matches!(outcomes[2], Outcome::UsernameTaken));
        assert!(matches!(outcomes[3], Outcome::UserCreated { .. }));
        assert_eq!(user_count(&conn), 2);
    }

    #[test]
    fn feed_and_history_use_index_ranges_not_table_scans() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_database(&config(&dir)).unwrap();
        for (query, args) in [(FEED, 3), (HISTORY, 4)] {
            let placeholders: Vec<i64> = vec![1; args];
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {query}"))
                .unwrap()
                .query_map(rusqlite::params_from_iter(placeholders), |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let plan = plan.join("\n");
            assert!(!plan.contains("SCAN messages"), "{plan}");
            assert!(!plan.contains("SCAN users"), "{plan}");
            assert!(plan.contains("USING INDEX messages_by_"), "{plan}");
        }
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
            let conn = open_database(&config(&dir)).unwrap();
            run_ops(&conn, vec![create("a"), create("b"), create("c")]);
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
                let outcome = run_ops(&conn, vec![op]).remove(0);
                let Outcome::Stored { message, .. } = outcome else { panic!("{outcome:?}") };
                if message.sender_id == 1 || message.recipient_id == 1 {
                    expected.push(message.id);
                }
            }
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                let op = Op::FetchFeed { user_id: 1, after_id: after, limit };
                let (messages, more) = page(run_ops(&conn, vec![op]).remove(0));
                seen.extend(ids(&messages));
                match messages.last() {
                    Some(last) if more => after = last.id,
                    _ => break,
                }
            }
            proptest::prop_assert_eq!(seen, expected);
        }
    }
}
