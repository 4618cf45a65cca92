//! The idempotency table: "have I processed this message already?", answered and recorded in
//! the same commit as the effect.

use redb::ReadableTable;

use crate::db::Database;
use crate::error::{Error, Result};
use crate::message::MessageId;
use crate::names;
use crate::schema::{DEDUP, DEDUP_EXPIRY};
use crate::txn::WriteTransaction;

/// The default time a dedup entry is kept: 7 days. A device may replay messages after hours or
/// days offline, so minutes would be too short.
pub const DEFAULT_DEDUP_TTL_MS: u64 = 7 * 24 * 3_600_000;

/// How many expired entries one [`Database::expire_dedup`] transaction removes at most.
const EXPIRY_BATCH: usize = 1024;

/// The answer of [`WriteTransaction::dedup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dedup {
    /// First time seen (or seen before but forgotten after its TTL): it is now recorded. Do
    /// the work in this same transaction.
    New,
    /// Already recorded and not expired: skip the work.
    Seen,
}

impl WriteTransaction<'_> {
    /// Checks whether `id` was already seen in `scope` and records it if not, for `ttl_ms`.
    ///
    /// Call it in the transaction that applies the message's effect: if the transaction
    /// commits, the effect and the mark are both stored; if it fails, neither is. An entry
    /// older than its TTL counts as not seen (and is renewed). A `Seen` answer does not extend
    /// the entry's life.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a bad scope; storage errors.
    ///
    /// # Examples
    ///
    /// ```
    /// use mqlite::{Dedup, MessageId, DEFAULT_DEDUP_TTL_MS};
    /// let db = mqlite::Database::in_memory()?;
    /// let id = MessageId::generate();
    /// let first = db.write(|txn| txn.dedup("billing", id, DEFAULT_DEDUP_TTL_MS))?;
    /// let again = db.write(|txn| txn.dedup("billing", id, DEFAULT_DEDUP_TTL_MS))?;
    /// assert_eq!((first, again), (Dedup::New, Dedup::Seen));
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn dedup(&self, scope: &str, id: MessageId, ttl_ms: u64) -> Result<Dedup> {
        names::check("scope", scope)?;
        let now = self.now_ms();
        let mut entries = self.table(DEDUP)?;
        let existing = entries.get((scope, id.0))?.map(|v| v.value());
        if existing.is_some_and(|expires| expires > now) {
            return Ok(Dedup::Seen);
        }
        let mut expiry = self.table(DEDUP_EXPIRY)?;
        if let Some(old) = existing {
            expiry.remove((old, scope, id.0))?;
        }
        let expires = now.saturating_add(ttl_ms.max(1));
        entries.insert((scope, id.0), expires)?;
        expiry.insert((expires, scope, id.0), ())?;
        Ok(Dedup::New)
    }
}

impl Database {
    /// Removes expired dedup entries, in transactions of at most 1024 removals; returns how
    /// many it removed. Call it periodically; lookups already ignore expired entries.
    ///
    /// # Errors
    ///
    /// Storage errors; batches committed before the error stay committed.
    pub fn expire_dedup(&self) -> Result<u64> {
        let mut total = 0;
        loop {
            let removed = self.write(|txn| {
                let now = txn.now_ms();
                let mut expiry = txn.table(DEDUP_EXPIRY)?;
                let due: Vec<(u64, String, u128)> = expiry
                    .range((0, "", 0)..(now.saturating_add(1), "", 0))?
                    .take(EXPIRY_BATCH)
                    .map(|e| {
                        e.map(|(k, _)| {
                            let (at, scope, id) = k.value();
                            (at, scope.to_owned(), id)
                        })
                    })
                    .collect::<Result<_, _>>()?;
                let mut entries = txn.table(DEDUP)?;
                for (at, scope, id) in &due {
                    expiry.remove((*at, scope.as_str(), *id))?;
                    entries.remove((scope.as_str(), *id))?;
                }
                Ok::<_, Error>(due.len())
            })?;
            total += removed as u64;
            if removed < EXPIRY_BATCH {
                return Ok(total);
            }
        }
    }

    /// How many dedup entries are stored (expired ones included until removed).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn dedup_len(&self) -> Result<u64> {
        use redb::ReadableTableMetadata;
        let r = self.begin_read()?;
        Ok(r.table(DEDUP)?.len()?)
    }
}
