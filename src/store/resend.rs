//! The resend check: has this sender already used this client message id ([HB-5.2])?
//!
//! Owns the `client_ids` table (sender, client message id → message id) and the store thread's
//! memory of the ids not filed there yet. It must not touch `messages` except to read back the
//! ids not filed yet at startup, and it never runs on the loop's thread.
//!
//! Why not a UNIQUE index on `messages`: such an index is keyed by sender, so a commit dirties one
//! of its pages for every sender in it, and each dirty page is a 4 KiB WAL frame written and
//! fsynced. At 20 k msgs/s from 100 senders nearly every message of a commit has its own sender, and
//! those frames were most of the store thread's time (issue 7). Here new ids wait in memory and are
//! filed into `client_ids` in sorted runs of [`FILE_AT`], inside an ordinary commit, so a sender's
//! page is written once per run instead of once per message.
//!
//! The check costs no I/O in the common case. Clients number their messages with counters — from
//! zero, or under a per-device prefix in the upper 32 bits as proto.md recommends — so the store keeps,
//! per sender and per 2^32-wide block of ids, the highest id it knows of: an id above it is new.
//! Anything else (a resend, random ids) is looked up in memory, then in `client_ids`.
//!
//! Every message above the mark `client_ids_state.filed_up_to` is in memory: filing moves the mark
//! in the same transaction, and at startup [`RecentIds::above_the_mark`] reads back whatever a stop
//! or crash left above it (reads only, so a full disk does not keep the server from starting).

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::{from_db, to_db, UserId};

/// Ids waiting in memory before they are filed in one run: the bound on that memory while the disk
/// takes writes (each id takes under 100 bytes).
pub const FILE_AT: usize = if cfg!(test) { 8 } else { 4096 };

/// One message's place in the resend check, as stored: the client id is the u64 read as i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId {
    pub sender_id: i64,
    pub client_msg_id: i64,
    pub id: i64,
}

/// (sender, the client id's upper 32 bits): the block a highest id is kept for.
type Block = (UserId, i64);

fn block_of(sender: UserId, key: i64) -> Block {
    (sender, key >> 32)
}

/// What the store thread knows beyond `client_ids`.
#[derive(Default)]
pub struct RecentIds {
    /// Messages above the mark: committed, or in the open transaction.
    unfiled: HashMap<(UserId, i64), u64>,
    /// Of `unfiled`, those added in the open transaction, to forget if it rolls back.
    opened: Vec<(UserId, i64)>,
    /// Highest client id of each block in `unfiled`. A rollback leaves its blocks behind (too high
    /// only sends ids to the slow path) until [`FILE_AT`] of them have piled up; then it is rebuilt
    /// from `unfiled`, so the rebuild's cost is spread over that many rolled-back ids.
    unfiled_highest: HashMap<Block, i64>,
    /// Highest client id of each block in `client_ids` (None: the block is empty there), read once
    /// per block. A cache: forgotten when a run is filed, which changes the table, and when it
    /// holds [`FILE_AT`] blocks, since refused messages (unknown recipient...) read blocks without
    /// ever filing.
    filed_highest: HashMap<Block, Option<i64>>,
    /// Whether the open transaction files the unfiled ids.
    filing: bool,
    /// After a filing failed (a full disk), how many unfiled ids the next try waits for.
    retry_at: Option<usize>,
}

impl RecentIds {
    /// At startup: the messages above the mark, which only memory knew of.
    pub fn above_the_mark(conn: &Connection) -> rusqlite::Result<RecentIds> {
        let mut recent = RecentIds::default();
        let mut select = conn.prepare(
            "SELECT sender_id, client_msg_id, id FROM messages
             WHERE id > (SELECT filed_up_to FROM client_ids_state)",
        )?;
        let rows = select.query_map([], |row| {
            Ok((row.get::<_, i64>(0)?, row.get(1)?, row.get::<_, i64>(2)?))
        })?;
        for row in rows {
            let (sender, key, id) = row?;
            recent.remember(from_db(sender), key, from_db(id));
        }
        Ok(recent)
    }

    /// The message id `sender` stored under client id `key`, if any.
    pub fn find(
        &mut self,
        conn: &Connection,
        sender: UserId,
        key: i64,
    ) -> rusqlite::Result<Option<u64>> {
        if self.is_above_all_known(conn, sender, key)? {
            return Ok(None);
        }
        if let Some(&id) = self.unfiled.get(&(sender, key)) {
            return Ok(Some(id));
        }
        let filed: Option<i64> = conn
            .prepare_cached(
                "SELECT id FROM client_ids WHERE sender_id = ?1 AND client_msg_id = ?2",
            )?
            .query_row(params![to_db(sender), key], |row| row.get(0))
            .optional()?;
        Ok(filed.and_then(|id| u64::try_from(id).ok()))
    }

    /// True when `key` is above every client id of its block, filed or not: certainly new.
    fn is_above_all_known(
        &mut self,
        conn: &Connection,
        sender: UserId,
        key: i64,
    ) -> rusqlite::Result<bool> {
        let block = block_of(sender, key);
        let filed = match self.filed_highest.get(&block) {
            Some(&highest) => highest,
            None => {
                let highest = highest_filed(conn, block)?;
                if self.filed_highest.len() >= FILE_AT {
                    self.filed_highest.clear();
                }
                self.filed_highest.insert(block, highest);
                highest
            }
        };
        let unfiled = self.unfiled_highest.get(&block).copied();
        Ok(filed.max(unfiled).is_none_or(|highest| key > highest))
    }

    /// Remembers a message just inserted in the open transaction.
    pub fn record(&mut self, sender: UserId, key: i64, id: u64) {
        self.remember(sender, key, id);
        self.opened.push((sender, key));
    }

    fn remember(&mut self, sender: UserId, key: i64, id: u64) {
        self.unfiled.insert((sender, key), id);
        raise_highest(&mut self.unfiled_highest, sender, key);
    }

    /// Inside the open transaction, before its COMMIT: files the unfiled ids once there are
    /// [`FILE_AT`] of them. A filing that fails (a full disk) is undone on its own and the batch
    /// commits without it: its messages and reads must not fail for ids that can wait in memory.
    /// The next try waits for [`FILE_AT`] / 4 more ids, so a full disk does not cost a failed run
    /// per commit. An error here means the transaction itself is lost.
    pub fn file_if_due(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let due = self.retry_at.unwrap_or(FILE_AT);
        if self.unfiled.len() < due {
            return Ok(());
        }
        let mut run = self.unfiled_run();
        conn.execute_batch("SAVEPOINT filing")?;
        let filed = file(conn, &mut run).and_then(|()| conn.execute_batch("RELEASE filing"));
        match filed {
            Ok(()) => {
                if self.retry_at.take().is_some() {
                    log::info!("client ids are filed again ({} of them)", run.len());
                }
                self.filing = true;
            }
            Err(e) => {
                conn.execute_batch("ROLLBACK TO filing; RELEASE filing")?;
                if self.retry_at.is_none() {
                    log::warn!("cannot file client ids, keeping them in memory: {e}");
                }
                self.retry_at = Some(self.unfiled.len() + FILE_AT / 4);
            }
        }
        Ok(())
    }

    fn unfiled_run(&self) -> Vec<ClientId> {
        self.unfiled
            .iter()
            .map(|(&(sender, key), &id)| ClientId {
                sender_id: to_db(sender),
                client_msg_id: key,
                id: to_db(id),
            })
            .collect()
    }

    /// The open transaction committed.
    pub fn committed(&mut self) {
        self.opened.clear();
        if std::mem::take(&mut self.filing) {
            self.unfiled.clear();
            self.unfiled_highest.clear();
            self.filed_highest.clear();
        }
    }

    /// The open transaction ended without its commit: its messages, and any run it filed, are gone.
    pub fn rolled_back(&mut self) {
        for key in self.opened.drain(..) {
            self.unfiled.remove(&key);
        }
        self.filing = false;
        if self.unfiled_highest.len() > self.unfiled.len() + FILE_AT {
            self.unfiled_highest.clear();
            for &(sender, key) in self.unfiled.keys() {
                raise_highest(&mut self.unfiled_highest, sender, key);
            }
        }
    }

    /// Blocks held in memory: of unfiled ids, and of filed ones (for tests of the bounds).
    #[cfg(test)]
    pub fn blocks_held(&self) -> (usize, usize) {
        (self.unfiled_highest.len(), self.filed_highest.len())
    }
}

fn raise_highest(highest: &mut HashMap<Block, i64>, sender: UserId, key: i64) {
    let held = highest.entry(block_of(sender, key)).or_insert(key);
    *held = (*held).max(key);
}

/// Highest client id of `block` in `client_ids`.
fn highest_filed(conn: &Connection, (sender, upper): Block) -> rusqlite::Result<Option<i64>> {
    let low = upper << 32;
    conn.prepare_cached(
        "SELECT max(client_msg_id) FROM client_ids
         WHERE sender_id = ?1 AND client_msg_id BETWEEN ?2 AND ?3",
    )?
    .query_row(params![to_db(sender), low, low | 0xFFFF_FFFF], |row| {
        row.get(0)
    })
}

/// Rows one INSERT of [`file`] carries (3 parameters each, far below SQLite's limit of 32,766).
const ROWS_PER_INSERT: usize = 64;

/// `INSERT INTO client_ids ... VALUES (?, ?, ?), ...` for `rows` rows.
fn insert_rows_sql(rows: usize) -> String {
    let mut sql = String::from("INSERT INTO client_ids (sender_id, client_msg_id, id) VALUES ");
    for row in 0..rows {
        sql.push_str(if row == 0 { "(?, ?, ?)" } else { ", (?, ?, ?)" });
    }
    sql
}

fn row_values(entry: &ClientId) -> [i64; 3] {
    [entry.sender_id, entry.client_msg_id, entry.id]
}

/// Files a run of ids, sorted so that each page of `client_ids` is visited once, and moves the mark
/// to the newest message of the run. Every message above the old mark must be in `run`. Public for
/// the load generator's store-ceiling, which files its rows the way the server does.
pub fn file(conn: &Connection, run: &mut [ClientId]) -> rusqlite::Result<()> {
    run.sort_unstable();
    // Many rows per statement: a statement's own work (a cursor opened and walked down from the
    // root) cost as much as the row it inserted.
    let mut chunks = run.chunks_exact(ROWS_PER_INSERT);
    if chunks.len() > 0 {
        let mut insert = conn.prepare_cached(&insert_rows_sql(ROWS_PER_INSERT))?;
        for chunk in chunks.by_ref() {
            insert.execute(rusqlite::params_from_iter(
                chunk.iter().flat_map(row_values),
            ))?;
        }
    }
    let mut insert = conn.prepare_cached(&insert_rows_sql(1))?;
    for entry in chunks.remainder() {
        insert.execute(rusqlite::params_from_iter(row_values(entry)))?;
    }
    let newest = run.iter().map(|entry| entry.id).max().unwrap_or(0);
    conn.prepare_cached("UPDATE client_ids_state SET filed_up_to = max(filed_up_to, ?1)")?
        .execute([newest])?;
    Ok(())
}
