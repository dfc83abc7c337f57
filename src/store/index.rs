//! The message index: where each direct message is found by sender, by recipient and by
//! conversation. It lives in a second SQLite file beside the database (`<db>-index`) and is kept
//! up to date by its own thread, "hubbub-index".
//!
//! Why a second file and a second thread: a direct message is one row appended to `messages`, but
//! every read index is keyed by user, so with many people talking each new row lands on another
//! page of each index. Kept inside the commit that acknowledges the message, three such indexes
//! made each message write about five scattered pages to the WAL instead of two, and that was
//! most of the send→deliver latency under load. Here the same entries are added later, many
//! messages at a time and sorted by key, so one page takes many entries; and on a file of their
//! own, so the store thread's commits never wait for this thread's.
//!
//! Why the store thread hands the entries over instead of the indexer reading them back from
//! `messages`: a reader of the message database holds a snapshot of its WAL while it reads, and
//! SQLite can only start the WAL over from its beginning when no reader holds one. An indexer that
//! was nearly always reading (at nice 19 its transactions are preempted for long) kept the WAL
//! growing for as long as the load lasted (132 MB after 8 s of dm-throughput, where the
//! checkpoint interval allows 32 MB). So while serving the indexer never touches the message
//! database; it reads `messages` only to catch up at startup, and after the hand-over was given
//! up (too many entries held, or a failed index transaction).
//!
//! What it owns: the index file's schema; the mark `indexed_up_to` (every message with an id at
//! or below it is indexed, none above it is, and both change in one transaction); the startup
//! check that throws away an index that does not belong to its database; the catch-up that indexes
//! whatever a crash, a deleted file or an older hubbub left unindexed; the indexer thread, the
//! entries handed to it, and its pacing ([`IndexSettings`]).
//!
//! What it must not do: hold the only copy of anything. Everything here is derived from
//! `messages` and may be deleted while the server is stopped; the next start rebuilds it. It never
//! writes the message database. Readers never wait for it either: the store reads the index up to
//! the mark and the few rows above the mark straight from `messages` (the newest rowids, one short
//! range; see `indexed_up_to!` in the store). How far the index may fall behind is bounded by
//! [`IndexSettings::max_lag`], so that range stays short.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{beside, from_db, to_db, StoreError, BUSY_TIMEOUT, PAGE_CACHE_KIB};

/// The name the store's connection attaches the index file under.
pub(super) const SCHEMA: &str = "idx";

/// The index file's layout version (`PRAGMA user_version`). An index of another version is
/// rebuilt, never migrated: it is derived data, and rebuilding is the one path that is always right.
const INDEX_VERSION: i32 = 1;

/// One table per way of reading, each clustered on its key (WITHOUT ROWID), so a read is one range.
const INDEX_SCHEMA: &str = "
    -- instance: the database this index was derived from (its `instance` row).
    CREATE TABLE state (
        instance      BLOB    NOT NULL,
        indexed_up_to INTEGER NOT NULL
    );
    -- A user's feed and newest id: what they sent and what they received (sender kept to leave
    -- out notes to oneself, which `sent` already has, and for delivery receipts).
    CREATE TABLE sent (
        sender_id INTEGER NOT NULL,
        id        INTEGER NOT NULL,
        PRIMARY KEY (sender_id, id)
    ) WITHOUT ROWID;
    CREATE TABLE received (
        recipient_id INTEGER NOT NULL,
        id           INTEGER NOT NULL,
        sender_id    INTEGER NOT NULL,
        PRIMARY KEY (recipient_id, id)
    ) WITHOUT ROWID;
    -- History: one direction of a conversation, walked backwards from a cursor.
    CREATE TABLE pairs (
        sender_id    INTEGER NOT NULL,
        recipient_id INTEGER NOT NULL,
        id           INTEGER NOT NULL,
        PRIMARY KEY (sender_id, recipient_id, id)
    ) WITHOUT ROWID;
";

/// Most rows one catch-up transaction indexes at startup, so the log shows progress on a large
/// database and a transaction's memory stays bounded.
const CATCH_UP_ROWS: usize = 65_536;

/// How long the store thread waits for the indexer to come back under `max_lag` before it goes on
/// anyway: reads then scan a longer range until the indexer catches up, but a failing index (a
/// full disk) never stops messages from being stored.
const LAG_WAIT: Duration = Duration::from_secs(1);

/// Pause after a failed indexing transaction before trying again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// How the indexer paces itself (`--index-batch`, `--index-delay`, `--index-max-lag`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexSettings {
    /// Most messages indexed in one transaction; a full batch is indexed without waiting.
    pub batch: usize,
    /// How long fewer than `batch` new messages wait for more before they are indexed anyway.
    pub delay: Duration,
    /// Most stored messages the index may lack before the store thread waits for it. Also bounds
    /// the entries held in memory for the indexer: at most `max_lag` plus one commit's worth.
    pub max_lag: u64,
}

/// One direct message as the index files it, handed from the store thread to the indexer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub id: u64,
    pub sender_id: u64,
    pub recipient_id: u64,
}

impl Default for IndexSettings {
    fn default() -> Self {
        IndexSettings {
            batch: 16_384,
            delay: Duration::from_millis(100),
            max_lag: 65_536,
        }
    }
}

/// `<db>-index`, beside SQLite's own `<db>-wal` and `<db>-shm`.
pub fn index_path(db_path: &Path) -> PathBuf {
    beside(db_path, "-index")
}

/// A path as SQL text, for ATTACH.
fn sql_path(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("{} is not valid UTF-8", path.display()))
}

/// Why the index of the database at `db_path` could not be opened, as the store reports it.
fn open_error(db_path: &Path, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Open(format!("message index for {}: {reason}", db_path.display()))
}

// ---------------------------------------------------------------------------------------------
// Opening: check, rebuild if needed, catch up

/// Makes the index file ready for `db` (the store's connection, migrated): keeps it if it belongs
/// to this database, rebuilds it otherwise, indexes every message it lacks, and attaches it to
/// `db` as [`SCHEMA`]. Runs at startup, before anyone is served.
///
/// An index that is sound but cannot catch up (a full disk) is no reason to refuse to start:
/// reads are right at any mark, only slower, and the indexer thread tries again.
pub(super) fn prepare(db: &Connection, db_path: &Path) -> Result<(), StoreError> {
    let mut writer = match IndexWriter::open_checked(db, db_path) {
        Ok(writer) => writer,
        Err(why) => {
            log::warn!(
                "message index {}: {why}; rebuilding it",
                index_path(db_path).display()
            );
            remove_index_files(db_path).map_err(|e| open_error(db_path, e))?;
            IndexWriter::open_checked(db, db_path).map_err(|e| open_error(db_path, e))?
        }
    };
    if let Err(e) = writer.catch_up() {
        log::warn!("message index: cannot catch up now ({e}); the index thread will try again");
    }
    let path = index_path(db_path);
    db.execute(
        &format!("ATTACH DATABASE ?1 AS {SCHEMA}"),
        [sql_path(&path).map_err(|e| open_error(db_path, e))?],
    )
    .map_err(|e| open_error(db_path, e))?;
    Ok(())
}

/// Deletes the index and SQLite's files beside it; missing ones are fine.
fn remove_index_files(db_path: &Path) -> Result<(), String> {
    let path = index_path(db_path);
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", Path::new(&name).display())),
        }
    }
    Ok(())
}

/// The database's identity and newest message id, which an index must agree with.
fn database_identity(db: &Connection) -> rusqlite::Result<(Vec<u8>, i64)> {
    let instance = db.query_row("SELECT id FROM instance", [], |row| row.get(0))?;
    let newest = db.query_row("SELECT coalesce(max(id), 0) FROM messages", [], |row| {
        row.get(0)
    })?;
    Ok((instance, newest))
}

/// A connection to the index file with the message database attached as `log`, read only by
/// this code. The indexer thread owns one; benchmarks may use one directly.
#[derive(Debug)]
pub struct IndexWriter {
    conn: Connection,
}

impl IndexWriter {
    /// Opens the index of the database at `db_path` for writing. The store checks and catches it up at
    /// startup; this only opens it.
    pub fn open(db_path: &Path) -> Result<IndexWriter, String> {
        let path = index_path(db_path);
        let conn = Connection::open(&path).map_err(|e| e.to_string())?;
        let writer = IndexWriter { conn };
        writer
            .configure(sql_path(db_path)?)
            .map_err(|e| e.to_string())?;
        Ok(writer)
    }

    /// Opens the index, creating it if it is new, and says why it cannot be trusted if it cannot.
    fn open_checked(db: &Connection, db_path: &Path) -> Result<IndexWriter, String> {
        let writer = IndexWriter::open(db_path)?;
        let (instance, newest) = database_identity(db).map_err(|e| e.to_string())?;
        let version: i32 = writer
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|e| e.to_string())?;
        if version == 0 {
            writer.create(&instance).map_err(|e| e.to_string())?;
            return Ok(writer);
        }
        if version != INDEX_VERSION {
            return Err(format!(
                "made by another hubbub (layout {version}, this one uses {INDEX_VERSION})"
            ));
        }
        let (owner, mark): (Vec<u8>, i64) = writer
            .conn
            .query_row("SELECT instance, indexed_up_to FROM state", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .map_err(|e| e.to_string())?;
        if owner != instance {
            return Err("it was made for another database".into());
        }
        if mark > newest {
            return Err(format!(
                "it covers messages up to {mark} but the database ends at {newest} (restored from a backup?)"
            ));
        }
        Ok(writer)
    }

    /// Pragmas, and the message database at `db_path` attached as `log`.
    fn configure(&self, db_path: &str) -> rusqlite::Result<()> {
        let conn = &self.conn;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL, not FULL: in WAL mode a power cut may lose the newest index transactions but never
        // corrupts the file, and what is lost is re-indexed from `messages` at the next start.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // Not for this connection's sake. SQLite as libsqlite3-sys builds it
        // (SQLITE_ENABLE_MEMORY_MANAGEMENT) keeps every connection's pages in one shared pool, and a
        // connection that needs a page beyond its own cache_size takes the least recently used page
        // of the whole pool: with SQLite's default 2 MiB this thread's batches took the store
        // connection's pages, which then re-read them from the file, and the store thread spent
        // 10-11 µs per message instead of 6-7 (issue 7). A cache as large as the store's holds what
        // the batches touch, so the pool sheds only pages neither side uses.
        conn.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)?;
        conn.execute("ATTACH DATABASE ?1 AS log", [db_path])?;
        Ok(())
    }

    fn create(&self, instance: &[u8]) -> rusqlite::Result<()> {
        self.conn.execute_batch(&format!(
            "BEGIN; {INDEX_SCHEMA} PRAGMA user_version = {INDEX_VERSION};"
        ))?;
        self.conn.execute(
            "INSERT INTO state (instance, indexed_up_to) VALUES (?1, 0)",
            [instance],
        )?;
        self.conn.execute_batch("COMMIT")
    }

    /// The newest message id in the database (0 when there is none).
    fn newest_message(&self) -> rusqlite::Result<u64> {
        let newest: i64 =
            self.conn
                .query_row("SELECT coalesce(max(id), 0) FROM log.messages", [], |row| {
                    row.get(0)
                })?;
        Ok(u64::try_from(newest).unwrap_or(0))
    }

    /// The mark: every message with an id at or below it is indexed.
    pub fn indexed_up_to(&self) -> rusqlite::Result<u64> {
        let mark: i64 = self
            .conn
            .query_row("SELECT indexed_up_to FROM state", [], |row| row.get(0))?;
        Ok(u64::try_from(mark).unwrap_or(0))
    }

    /// Indexes every message not indexed yet, a transaction per [`CATCH_UP_ROWS`]; returns the mark.
    fn catch_up(&mut self) -> Result<u64, String> {
        let started = Instant::now();
        let before = self.indexed_up_to().map_err(|e| e.to_string())?;
        let mut mark = before;
        loop {
            let next = self.index_next(CATCH_UP_ROWS).map_err(|e| e.to_string())?;
            if next == mark {
                break;
            }
            mark = next;
            log::info!("message index: caught up to message {mark}");
        }
        if mark > before {
            log::info!(
                "message index: indexed messages {}..={mark} in {:.1} s",
                before + 1,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(mark)
    }

    /// Indexes up to `max_rows` messages above the mark, read back from the message database, in
    /// one transaction and returns the new mark (unchanged when there was nothing to index).
    pub fn index_next(&mut self, max_rows: usize) -> rusqlite::Result<u64> {
        self.index_from_log(max_rows, u64::MAX)
    }

    /// [`index_next`](Self::index_next) for messages up to `ceiling` only: the indexer's messages
    /// above it are handed over in memory, and must not be indexed twice.
    ///
    /// Only committed messages are seen (this is another connection), and ids grow with each
    /// commit of the one writer, so nothing below the new mark can still appear later. Each table's
    /// entries go in sorted by its key, so neighbouring entries share pages.
    fn index_from_log(&mut self, max_rows: usize, ceiling: u64) -> rusqlite::Result<u64> {
        let ceiling = to_db(ceiling);
        // Deferred, never IMMEDIATE: BEGIN IMMEDIATE takes the write lock of every attached database,
        // the message database included, and the store's commits would wait for this one.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        let mark: i64 = tx.query_row("SELECT indexed_up_to FROM state", [], |row| row.get(0))?;
        let limit = i64::try_from(max_rows.max(1)).unwrap_or(i64::MAX);
        let found: Option<i64> = tx
            .query_row(
                "SELECT max(id) FROM
                   (SELECT id FROM log.messages WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3)",
                params![mark, ceiling, limit],
                |row| row.get(0),
            )
            .optional()?
            .flatten();
        let upto = match found {
            Some(id) => id,
            // No message at all up to a ceiling the store named: the mark may pass over the gap.
            None if ceiling != i64::MAX && ceiling > mark => ceiling,
            None => return Ok(from_db(mark)),
        };
        for insert in [
            "INSERT INTO sent (sender_id, id)
             SELECT sender_id, id FROM log.messages
             WHERE id > ?1 AND id <= ?2 AND room_id IS NULL ORDER BY sender_id, id",
            "INSERT INTO received (recipient_id, id, sender_id)
             SELECT recipient_id, id, sender_id FROM log.messages
             WHERE id > ?1 AND id <= ?2 AND recipient_id IS NOT NULL ORDER BY recipient_id, id",
            "INSERT INTO pairs (sender_id, recipient_id, id)
             SELECT sender_id, recipient_id, id FROM log.messages
             WHERE id > ?1 AND id <= ?2 AND recipient_id IS NOT NULL
             ORDER BY sender_id, recipient_id, id",
        ] {
            tx.prepare_cached(insert)?.execute(params![mark, upto])?;
        }
        set_mark(&tx, upto)?;
        tx.commit()?;
        Ok(from_db(upto))
    }

    /// Indexes `entries`, which must be every direct message above the mark up to `upto` (room
    /// messages have none), in one transaction, moves the mark to `upto` and returns it. Entries at
    /// or below the mark are already indexed and skipped. Never reads the message database.
    ///
    /// `entries` is sorted in place, once by each table's key, so neighbouring entries share pages.
    pub fn index_entries(
        &mut self,
        entries: &mut [IndexEntry],
        upto: u64,
    ) -> rusqlite::Result<u64> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        let mark: i64 = tx.query_row("SELECT indexed_up_to FROM state", [], |row| row.get(0))?;
        let mark = from_db(mark);
        if upto <= mark {
            return Ok(mark);
        }
        insert_sorted(
            &tx,
            entries,
            mark,
            "INSERT INTO sent (sender_id, id) VALUES (?1, ?2)",
            |e| (e.sender_id, e.id),
            |e| [e.sender_id, e.id],
        )?;
        insert_sorted(
            &tx,
            entries,
            mark,
            "INSERT INTO received (recipient_id, id, sender_id) VALUES (?1, ?2, ?3)",
            |e| (e.recipient_id, e.id),
            |e| [e.recipient_id, e.id, e.sender_id],
        )?;
        insert_sorted(
            &tx,
            entries,
            mark,
            "INSERT INTO pairs (sender_id, recipient_id, id) VALUES (?1, ?2, ?3)",
            |e| (e.sender_id, e.recipient_id, e.id),
            |e| [e.sender_id, e.recipient_id, e.id],
        )?;
        set_mark(&tx, to_db(upto))?;
        tx.commit()?;
        Ok(upto)
    }
}

/// Sorts `entries` by one table's `key`, then inserts the `row` of each entry above `mark` with
/// `sql`: in key order, neighbouring entries land on the same pages.
fn insert_sorted<K: Ord, const N: usize>(
    tx: &rusqlite::Transaction<'_>,
    entries: &mut [IndexEntry],
    mark: u64,
    sql: &str,
    key: impl FnMut(&IndexEntry) -> K,
    row: impl Fn(&IndexEntry) -> [u64; N],
) -> rusqlite::Result<()> {
    entries.sort_unstable_by_key(key);
    let mut insert = tx.prepare_cached(sql)?;
    for entry in entries.iter().filter(|entry| entry.id > mark) {
        insert.execute(rusqlite::params_from_iter(row(entry).map(to_db)))?;
    }
    Ok(())
}

fn set_mark(tx: &rusqlite::Transaction<'_>, upto: i64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE state SET indexed_up_to = ?1")?
        .execute([upto])
        .map(drop)
}

// ---------------------------------------------------------------------------------------------
// The indexer thread and its pacing

/// What the store thread and the indexer tell each other, under one mutex: the store thread
/// touches it once per commit that stored messages, and once per batch while the index lags.
#[derive(Debug, Default)]
struct Pace {
    /// The newest message id the store committed.
    committed: u64,
    /// The indexer's mark.
    indexed: u64,
    /// Messages above `indexed` up to here are read back from the message database: those a
    /// crash or a stop left unindexed when startup could not catch up, and those whose entries
    /// were given up (too many held, or their transaction failed).
    from_log_until: u64,
    /// The direct messages above both `indexed` and `from_log_until`, handed over by the store
    /// thread as it commits them.
    entries: Vec<IndexEntry>,
    /// Most `entries` held; past it they are given up and read back from the database later.
    capacity: usize,
    /// The store thread is waiting: index now, without the delay.
    hurry: bool,
    /// The last indexing transaction failed; the store thread does not wait for a failing index.
    failing: bool,
    stop: bool,
}

/// One turn of the indexer: which messages it indexes next, and from where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// Read back from the message database, up to this id.
    FromLog { until: u64 },
    /// The entries taken from [`Pace::entries`]; the mark moves to `upto`.
    Entries { upto: u64 },
}

impl Pace {
    /// The store thread's commit of messages up to `newest`, with the direct messages among them.
    fn hand_over(&mut self, newest: u64, entries: impl IntoIterator<Item = IndexEntry>) {
        self.committed = self.committed.max(newest);
        self.entries.extend(entries);
        if self.entries.len() > self.capacity {
            log::warn!(
                "message index: {} messages behind; the index thread will read them back from the database",
                self.committed.saturating_sub(self.indexed)
            );
            self.give_up_entries_until(self.committed);
            // Let the memory go: this happens only while the index is stuck.
            self.entries = Vec::new();
        }
    }

    /// Messages up to `upto` are to be read back from the database instead of from entries.
    fn give_up_entries_until(&mut self, upto: u64) {
        self.from_log_until = self.from_log_until.max(upto);
        self.entries.retain(|entry| entry.id > upto);
    }

    /// What the indexer does next: the messages to read back first, then up to `batch` entries,
    /// moved into `taken` (empty; it and `entries` swap buffers, so neither side allocates).
    fn take_work(&mut self, batch: usize, taken: &mut Vec<IndexEntry>) -> Work {
        if self.indexed < self.from_log_until {
            return Work::FromLog {
                until: self.from_log_until,
            };
        }
        if self.entries.len() <= batch {
            std::mem::swap(&mut self.entries, taken);
            return Work::Entries {
                upto: self.committed,
            };
        }
        taken.extend(self.entries.drain(..batch));
        let upto = taken.last().map_or(self.indexed, |entry| entry.id);
        Work::Entries { upto }
    }

    /// The indexer's turn ended with the mark at `mark` (or failed, with None).
    fn finish(&mut self, work: Work, mark: Option<u64>) {
        match mark {
            Some(mark) => {
                self.indexed = self.indexed.max(mark);
                self.failing = false;
                if self.indexed >= self.committed {
                    self.hurry = false;
                }
            }
            None => {
                // The taken entries are gone with the transaction; the database still has them.
                if let Work::Entries { upto } = work {
                    self.give_up_entries_until(upto);
                }
                self.failing = true;
            }
        }
    }
}

struct Shared {
    pace: Mutex<Pace>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pace> {
        // A panic elsewhere cannot leave Pace half-changed in a way that matters: every field is a
        // plain value both sides re-read.
        self.pace.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running indexer, owned by the store thread. Dropping it stops the thread and waits for it
/// (at most the one transaction it is in).
pub(super) struct Indexer {
    shared: Arc<Shared>,
    settings: IndexSettings,
    thread: Option<JoinHandle<()>>,
}

impl Indexer {
    /// Starts "hubbub-index" with its own connection, after [`prepare`].
    ///
    /// `max_commit` is the most messages one store commit hands over: with `max_lag`, it bounds
    /// the entries held.
    pub(super) fn start(
        db_path: &Path,
        settings: IndexSettings,
        max_commit: usize,
    ) -> Result<Indexer, StoreError> {
        let writer = IndexWriter::open(db_path).map_err(|e| open_error(db_path, e))?;
        let mark = writer.indexed_up_to().map_err(|e| open_error(db_path, e))?;
        // Above the mark if the catch-up at startup could not finish: then there is work at once.
        let newest = writer
            .newest_message()
            .map_err(|e| open_error(db_path, e))?;
        let shared = Arc::new(Shared {
            pace: Mutex::new(Pace {
                committed: newest.max(mark),
                indexed: mark,
                from_log_until: newest.max(mark),
                capacity: usize::try_from(settings.max_lag)
                    .unwrap_or(usize::MAX)
                    .saturating_add(max_commit),
                ..Pace::default()
            }),
            changed: Condvar::new(),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("hubbub-index".into())
                .spawn(move || {
                    // The lowest priority: it takes only what the loop and the store leave, and
                    // the store waits for it (max_lag) if that is not enough.
                    crate::lower_thread_priority(19);
                    run(writer, &shared, settings)
                })
                .map_err(|e| StoreError::Spawn(e.to_string()))?
        };
        Ok(Indexer {
            shared,
            settings,
            thread: Some(thread),
        })
    }

    /// Called by the store thread after a commit that stored messages up to `newest`, with the
    /// direct messages among them. Wakes the indexer only when there is newly something to do: the
    /// first message after a quiet spell, or a full batch.
    pub(super) fn committed(&self, newest: u64, entries: impl IntoIterator<Item = IndexEntry>) {
        let mut pace = self.shared.lock();
        let was_pending = pace.committed.saturating_sub(pace.indexed);
        pace.hand_over(newest, entries);
        let pending = pace.committed.saturating_sub(pace.indexed);
        let batch = self.settings.batch as u64;
        if was_pending == 0 || (was_pending < batch && pending >= batch) {
            self.shared.changed.notify_all();
        }
    }

    /// Called by the store thread before each batch: while the index lacks more than `max_lag`
    /// messages, hurries the indexer and waits for it, at most [`LAG_WAIT`]; not at all while
    /// indexing fails.
    pub(super) fn wait_while_behind(&self) {
        let mut pace = self.shared.lock();
        let started = Instant::now();
        while pace.committed.saturating_sub(pace.indexed) > self.settings.max_lag && !pace.failing {
            let Some(left) = LAG_WAIT.checked_sub(started.elapsed()) else {
                log::warn!(
                    "message index is {} messages behind and not catching up; storing on",
                    pace.committed.saturating_sub(pace.indexed)
                );
                return;
            };
            pace.hurry = true;
            self.shared.changed.notify_all();
            pace = self
                .shared
                .changed
                .wait_timeout(pace, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Indexer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("index thread panicked");
            }
        }
    }
}

/// The indexer thread: waits for a turn, indexes one batch, reports the mark; until stopped.
fn run(mut writer: IndexWriter, shared: &Shared, settings: IndexSettings) {
    let mut taken = Vec::new();
    while let Some(work) = next_turn(shared, settings, &mut taken) {
        let result = match work {
            Work::FromLog { until } => writer.index_from_log(settings.batch, until),
            Work::Entries { upto } => writer.index_entries(&mut taken, upto),
        };
        taken.clear();
        let mark = match result {
            Ok(mark) => Some(mark),
            Err(e) => {
                log::warn!("message index: indexing failed, trying again shortly: {e}");
                None
            }
        };
        shared.lock().finish(work, mark);
        shared.changed.notify_all();
        if mark.is_none() {
            thread::sleep(RETRY_AFTER);
        }
    }
    log::debug!("index thread stopped");
}

/// Blocks until there is a batch worth indexing: a full one, one the store is waiting for, or
/// one that has waited `delay` for company; then takes it. None when the store stops.
fn next_turn(
    shared: &Shared,
    settings: IndexSettings,
    taken: &mut Vec<IndexEntry>,
) -> Option<Work> {
    let mut pace = shared.lock();
    let mut deadline: Option<Instant> = None;
    loop {
        if pace.stop {
            return None;
        }
        let pending = pace.committed.saturating_sub(pace.indexed);
        if pending > 0 && (pace.hurry || pending >= settings.batch as u64) {
            return Some(pace.take_work(settings.batch, taken));
        }
        let wait = match (pending, deadline) {
            (0, _) => None,
            (_, None) => {
                deadline = Some(Instant::now() + settings.delay);
                Some(settings.delay)
            }
            (_, Some(at)) => match at.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Some(pace.take_work(settings.batch, taken)),
            },
        };
        pace = match wait {
            None => shared
                .changed
                .wait(pace)
                .unwrap_or_else(PoisonError::into_inner),
            Some(left) => {
                shared
                    .changed
                    .wait_timeout(pace, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> IndexEntry {
        IndexEntry {
            id,
            sender_id: 1,
            recipient_id: 2,
        }
    }

    fn ids(entries: &[IndexEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.id).collect()
    }

    /// A started indexer whose index has everything up to `mark`, holding at most `capacity`.
    fn pace(mark: u64, capacity: usize) -> Pace {
        Pace {
            committed: mark,
            indexed: mark,
            from_log_until: mark,
            capacity,
            ..Pace::default()
        }
    }

    #[test]
    fn handed_over_entries_are_indexed_up_to_the_newest_commit() {
        let mut pace = pace(10, 100);
        // Message 13 went to a room: it has no entry, and the mark still passes it.
        pace.hand_over(12, [entry(11), entry(12)]);
        pace.hand_over(14, [entry(14)]);
        let mut taken = Vec::new();
        assert_eq!(pace.take_work(100, &mut taken), Work::Entries { upto: 14 });
        assert_eq!(ids(&taken), [11, 12, 14]);
        assert!(pace.entries.is_empty());
        pace.finish(Work::Entries { upto: 14 }, Some(14));
        assert_eq!((pace.indexed, pace.failing), (14, false));
    }

    #[test]
    fn more_entries_than_a_batch_are_taken_a_batch_at_a_time() {
        let mut pace = pace(0, 100);
        pace.hand_over(5, (1..=5).map(entry));
        let mut taken = Vec::new();
        assert_eq!(pace.take_work(2, &mut taken), Work::Entries { upto: 2 });
        assert_eq!(ids(&taken), [1, 2]);
        assert_eq!(ids(&pace.entries), [3, 4, 5]);
    }

    /// Past its capacity the hand-over is given up: those messages are read back from the
    /// database, and entries handed over after that are taken once the database caught up.
    #[test]
    fn entries_past_the_capacity_are_read_back_from_the_database_instead() {
        let mut pace = pace(0, 3);
        pace.hand_over(3, (1..=3).map(entry));
        assert_eq!(pace.entries.len(), 3, "at the capacity, kept");
        pace.hand_over(4, [entry(4)]);
        assert!(pace.entries.is_empty(), "past it, given up");
        assert_eq!(pace.from_log_until, 4);
        pace.hand_over(6, [entry(5), entry(6)]);

        let mut taken = Vec::new();
        let work = pace.take_work(100, &mut taken);
        assert_eq!(work, Work::FromLog { until: 4 });
        assert!(taken.is_empty());
        pace.finish(work, Some(4));
        assert_eq!(pace.take_work(100, &mut taken), Work::Entries { upto: 6 });
        assert_eq!(ids(&taken), [5, 6]);
    }

    /// A failed transaction loses the entries it took; the messages are still in the database.
    #[test]
    fn entries_of_a_failed_transaction_are_read_back_from_the_database() {
        let mut pace = pace(0, 100);
        pace.hand_over(3, (1..=3).map(entry));
        let mut taken = Vec::new();
        let work = pace.take_work(2, &mut taken);
        assert_eq!(work, Work::Entries { upto: 2 });
        pace.finish(work, None);
        assert!(pace.failing);
        assert_eq!(pace.indexed, 0);
        taken.clear();
        assert_eq!(pace.take_work(2, &mut taken), Work::FromLog { until: 2 });
        pace.finish(Work::FromLog { until: 2 }, Some(2));
        assert!(!pace.failing);
        assert_eq!(pace.take_work(2, &mut taken), Work::Entries { upto: 3 });
        assert_eq!(ids(&taken), [3]);
    }
}
