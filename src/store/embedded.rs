//! The embedded store: fjall (an LSM tree) on local disk, for one machine.
//!
//! - Atomicity: every call reads and writes under one mutex and commits its
//!   writes as one fjall batch, so concurrent claims of a key from many
//!   partition tasks see exactly one `New`.
//! - Durability: batches reach the OS on commit (a `kill -9` loses nothing
//!   written); `sync()` fsyncs the journal and runs once per offset commit,
//!   not per record, so the disk is synced about once a second.
//! - Expiry: rows carry `expires_at_ms` and stop counting at once when it
//!   passes; an index keyspace ordered by expiry lets `sweep` delete expired
//!   rows in bounded chunks without scanning live ones. Every row a claim call
//!   creates expires at the same instant (the call's time plus the TTL), so
//!   the index holds one entry per call, listing its keys, not one per key.
//! - Writes per new event: the claim row, nothing else. A completion does
//!   not rewrite rows: it sets their bits in their claim call's completion
//!   bitmap, one write per call ([`Slot`]). Rewriting every row as done was
//!   the second of two skiplist inserts per key, the largest single cost of the
//!   pipeline (`kdedup bench` prints the writes per new event).
//!
//! - Reads per new event: none. The store keeps the keys it holds rows for in
//!   an aging filter ([`Known`]); a claim of a key the filter never saw skips
//!   the read, which was the largest single cost of a claim.
//!
//! Correct for a single consumer instance only: two processes cannot share it.

use foldhash::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tracing::{info, warn};

use super::{
    decide, kept_on_release, Acquired, Claim, ClaimRequest, ClaimRow, ClaimState, DedupStore, EffectResponse, Released,
    StoreStats,
};
use crate::aging::AgingCuckoo;
use crate::config::Retention;
use crate::error::StoreError;
use crate::event::{EventKey, Fingerprint, Position};

/// How many expired rows one sweep chunk deletes while holding the lock.
const SWEEP_CHUNK: usize = 10_000;
/// Rows without a [`Slot`] (written before slots; still read).
const ROW_VERSION: u8 = 1;
/// Rows with a [`Slot`].
const ROW_VERSION_SLOTTED: u8 = 2;
/// Past this many entries the in-flight cache is dropped whole (it is only a cache).
const PENDING_MAX: usize = 1_000_000;

/// In-flight rows this process wrote, by key, so `complete` (and a claim of
/// a key repeated in its batch) finds the row without reading the memtable's
/// skiplist: that read was a quarter of the pipeline's CPU (perf, `kdedup
/// bench`). Entries change only after their batch is committed, and every
/// write path under the lock updates or drops its key's entry, so an entry
/// is always the row on disk; a key missing here is read from disk.
type Pending = HashMap<Vec<u8>, Stored>;

/// Where an in-flight row's completion is recorded: bit `index` of the
/// completion bitmap of the claim call that wrote the row (`call`, see
/// [`Inner::completed`]). A row whose bit is set is done. A row keeps its slot
/// while it is renewed or resumed; a new claim of the key (after expiry, or a
/// takeover) writes a new row with a new slot. Call numbers are never reused
/// while a row or a bitmap names them (see [`Inner::calls`]), so a bit set for
/// one row never reads as another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    call: u64,
    index: u32,
}

/// A row as stored, with its state resolved against its bitmap when it has a slot.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    row: ClaimRow,
    /// `None` for rows written before slots (their state is in the row).
    slot: Option<Slot>,
}

/// Keys the aging filter of known keys is planned for, per TTL (about 2.5
/// bytes a key, allocated at the first claim). More keys than this never
/// cause a false negative: the filter grows overflow tables, and its checks
/// get a little slower.
const KNOWN_KEYS_PLANNED: u64 = 10_000_000;

/// The keys this store holds a row for, as an aging filter, so that a claim
/// of a key it has never seen skips the read (that read was 11% of the
/// pipeline's CPU, the largest single part of a claim: perf, `kdedup bench`).
///
/// A filter can stand in for a read only if it never misses a key that has a
/// live row. Here it cannot:
/// 1. Only this process writes the store: fjall locks its directory, and a
///    second open fails with [`StoreError::Locked`].
/// 2. A row comes to exist only in a claim call (complete, renew and record
///    change rows they read; the rest delete), and that call adds the key's
///    digest under the store lock before it commits the row.
/// 3. A row lives at most one TTL from the claim call that made it: its
///    `expires_at_ms` is that call's time plus the TTL, and neither a resume
///    nor a completion moves it. The aging filter reports a key added at t
///    until at least t + ttl, and never drops one for lack of room (it
///    spills into overflow tables); both measure time with the callers' clock.
/// 4. The rows already on disk are added by one scan, under the lock, before
///    the first claim relies on the filter. A row there that outlives now +
///    TTL (the TTL was shortened since it was written, or the clock went
///    back) could be forgotten while it counts: then the filter is never
///    relied on, and every key is read as before.
///
/// A false positive only costs the read. A digest keyed per process (see
/// [`EventKey::digest`]) keeps input from being chosen to pile into one bucket.
struct Known {
    keys: AgingCuckoo,
    /// Whether a miss stands for a read (see 4 above).
    trusted: bool,
    /// Whether the responses keyspace may hold an answer. A claim that skips
    /// its read cannot tell whether an expired row (not yet swept) had one,
    /// so while this holds it deletes the key's answer blindly.
    responses: bool,
}

impl Known {
    /// Adds every row on disk that still counts at `now_ms` (see [`Known`], 4).
    fn load(inner: &Inner, now_ms: u64) -> Result<Known, StoreError> {
        let started = std::time::Instant::now();
        let ttl = std::time::Duration::from_millis(inner.ttl_ms);
        let mut keys = AgingCuckoo::try_new(KNOWN_KEYS_PLANNED, 0.001, ttl, now_ms)
            .map_err(|e| inner.err(format!("the filter of known keys: {e}")))?;
        let (mut rows, mut outliving, mut last_call) = (0u64, 0u64, 0u64);
        for entry in inner.claims.iter() {
            let (key, value) = entry.into_inner().map_err(|e| inner.err(e))?;
            let Some(Stored { row, slot }) = decode_row(&value) else { continue };
            if let Some(slot) = slot {
                last_call = last_call.max(slot.call);
            }
            if row.expires_at_ms <= now_ms {
                continue;
            }
            rows += 1;
            if row.expires_at_ms > now_ms.saturating_add(inner.ttl_ms) {
                outliving += 1;
            }
            keys.insert(EventKey::digest_encoded(&key), now_ms);
        }
        if let Some(entry) = inner.completed.last_key_value() {
            let (key, _) = entry.into_inner().map_err(|e| inner.err(e))?;
            last_call = last_call.max(call_of(&key).unwrap_or(0));
        }
        // The open numbered calls from its clock; a clock set back must not reuse a number.
        inner.calls.fetch_max(last_call.saturating_add(1), Ordering::Relaxed);
        let responses = !inner.responses.is_empty().map_err(|e| inner.err(e))?;
        if outliving > 0 {
            warn!(
                rows = outliving,
                "{outliving} rows in the embedded store outlive the configured TTL from now \
                 (was it shortened?): every claim reads the store until they expire and the process restarts"
            );
        }
        if rows > 0 {
            info!(rows, ms = started.elapsed().as_millis() as u64, "indexed the embedded store's live keys");
        }
        Ok(Known { keys, trusted: outliving == 0, responses })
    }

    /// Whether `digest`'s key may have a row: `false` means it has none.
    fn may_hold(&mut self, digest: u128, now_ms: u64) -> bool {
        self.keys.advance(now_ms);
        !self.trusted || self.keys.check(digest)
    }
}

/// What the store lock guards.
struct Guarded {
    pending: Pending,
    /// Made by the first claim call (see [`Known::load`]).
    known: Option<Known>,
}

/// The embedded store: claims in a fjall keyspace on local disk, with real expiry.
/// Correct for one consumer instance (it cannot see another process's claims). Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    claims: Keyspace,
    /// `expires_at_ms (u64 BE) | call (u64 BE)` → the keys that claim call created,
    /// each `len (u32 BE) | encoded key`: the sweep's work list. (Stores written
    /// before this shape hold `expires_at_ms | encoded key` → empty; the sweep reads both.)
    expiry: Keyspace,
    /// Numbers the claim calls (their index entries and their rows' [`Slot`]s).
    /// Starts at the open's time in nanoseconds, and is raised at the first
    /// claim above every call a row or a bitmap on disk names (see
    /// [`Known::load`]), so a call of an earlier process is never numbered again.
    calls: AtomicU64,
    /// `call (u64 BE)` → the completion bitmap of that claim call's rows (see
    /// [`Slot`]); swept with the call's index entry, when its rows expire.
    completed: Keyspace,
    /// encoded key → the effect's recorded response (JSON); lives and dies with the claim row.
    responses: Keyspace,
    lock: Mutex<Guarded>,
    ttl_ms: u64,
    lease_ms: u64,
    path: PathBuf,
    round_trips: AtomicU64,
    /// Rows looked up on disk (the memtable first), for tests.
    reads: AtomicU64,
    /// Keys written: rows, index entries and deletions.
    writes: AtomicU64,
    syncs: AtomicU64,
}

impl EmbeddedStore {
    /// Reads every row of `scope` (see [`super::Store::census`]).
    pub async fn census(&self, scope: &str, now_ms: u64) -> Result<super::Census, StoreError> {
        let inner = self.inner.clone();
        let prefix = EventKey { scope: Arc::from(scope), id: Vec::new() }.encode();
        tokio::task::spawn_blocking(move || {
            let mut census = super::Census::default();
            for entry in inner.claims.prefix(&prefix) {
                let (key, value) = entry.into_inner().map_err(|e| inner.err(e))?;
                if key.as_ref() == prefix.as_slice() {
                    continue; // the scope's release marker, not an event
                }
                let Some(stored) = decode_row(&value) else { continue };
                let row = inner.resolve(stored)?.row;
                if row.expires_at_ms <= now_ms {
                    continue;
                }
                match row.state {
                    ClaimState::InFlight => census.in_flight += 1,
                    ClaimState::Done => census.done += 1,
                }
                census.oldest_claimed_at_ms =
                    Some(census.oldest_claimed_at_ms.map_or(row.claimed_at_ms, |o| o.min(row.claimed_at_ms)));
            }
            census.bytes = Some(dir_bytes(&inner.path));
            Ok(census)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Opens (or creates) the store in the directory `path`.
    pub fn open(path: &Path, retention: &Retention) -> Result<EmbeddedStore, StoreError> {
        let fail = |e: &dyn std::fmt::Display| StoreError::Embedded {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(path).map_err(|e| fail(&e))?;
        let db = Database::builder(path).open().map_err(|e| match e {
            fjall::Error::Locked => StoreError::Locked { path: path.display().to_string() },
            e => fail(&e),
        })?;
        let claims = db.keyspace("claims", KeyspaceCreateOptions::default).map_err(|e| fail(&e))?;
        let expiry = db.keyspace("expiry", KeyspaceCreateOptions::default).map_err(|e| fail(&e))?;
        let responses = db.keyspace("responses", KeyspaceCreateOptions::default).map_err(|e| fail(&e))?;
        let completed = db.keyspace("completed", KeyspaceCreateOptions::default).map_err(|e| fail(&e))?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                claims,
                expiry,
                responses,
                completed,
                lock: Mutex::new(Guarded { pending: HashMap::default(), known: None }),
                ttl_ms: retention.ttl.as_millis() as u64,
                lease_ms: retention.lease.as_millis() as u64,
                path: path.to_path_buf(),
                calls: AtomicU64::new(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64),
                ),
                round_trips: AtomicU64::new(0),
                reads: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                syncs: AtomicU64::new(0),
            }),
        })
    }

    /// Rows on disk, expired or not (scans: for tests and `inspect`).
    pub fn row_count(&self) -> Result<usize, StoreError> {
        self.inner.claims.len().map_err(|e| self.inner.err(e))
    }

    /// Runs `f` on the blocking pool under the store lock.
    async fn locked<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Pending) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.guarded(move |inner, guarded| f(inner, &mut guarded.pending)).await
    }

    /// As [`EmbeddedStore::locked`], with all the lock guards.
    async fn guarded<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &mut Guarded) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.round_trips.fetch_add(1, Ordering::Relaxed);
            let mut guarded = inner.lock.lock().unwrap_or_else(|p| p.into_inner());
            f(&inner, &mut guarded)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

impl Inner {
    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Embedded { path: self.path.display().to_string(), message: e.to_string() }
    }

    /// A batch with room for `capacity` writes whose commit hands the journal to
    /// the OS, as `Database::batch` does (a bare `with_capacity` batch would leave
    /// it in our buffer, where a `kill -9` loses it: `store_crash` caught that).
    fn batch(&self, capacity: usize) -> fjall::OwnedWriteBatch {
        fjall::OwnedWriteBatch::with_capacity(self.db.clone(), capacity).durability(Some(PersistMode::Buffer))
    }

    /// Commits one call's writes as one batch, counting them.
    fn commit(&self, batch: fjall::OwnedWriteBatch) -> Result<(), StoreError> {
        self.writes.fetch_add(batch.len() as u64, Ordering::Relaxed);
        batch.commit().map_err(|e| self.err(e))
    }

    /// The key's row, its state resolved (see [`Inner::resolve`]).
    fn read(&self, key: &[u8]) -> Result<Option<Stored>, StoreError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        match self.claims.get(key).map_err(|e| self.err(e))? {
            Some(bytes) => match decode_row(&bytes) {
                Some(stored) => self.resolve(stored).map(Some),
                None => Err(StoreError::Corrupt(format!("row of {} bytes", bytes.len()))),
            },
            None => Ok(None),
        }
    }

    /// An in-flight row whose bit is set in its call's bitmap is done.
    fn resolve(&self, mut stored: Stored) -> Result<Stored, StoreError> {
        if let (ClaimState::InFlight, Some(slot)) = (stored.row.state, stored.slot) {
            let bitmap = self.completed.get(slot.call.to_be_bytes()).map_err(|e| self.err(e))?;
            if bitmap.is_some_and(|b| bit(&b, slot.index)) {
                stored.row.state = ClaimState::Done;
                stored.row.lease_until_ms = 0;
            }
        }
        Ok(stored)
    }
}

/// Whether bit `index` of `bitmap` is set.
fn bit(bitmap: &[u8], index: u32) -> bool {
    bitmap.get(index as usize / 8).is_some_and(|byte| byte & (1 << (index % 8)) != 0)
}

fn set_bit(bitmap: &mut Vec<u8>, index: u32) {
    let at = index as usize / 8;
    if bitmap.len() <= at {
        bitmap.resize(at + 1, 0);
    }
    bitmap[at] |= 1 << (index % 8);
}

/// The call of a bitmap's key (see [`Inner::completed`]).
fn call_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

fn expiry_key(expires_at_ms: u64, call: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&expires_at_ms.to_be_bytes());
    k.extend_from_slice(&call.to_be_bytes());
    k
}

/// The keys of one index entry (see [`Inner::expiry`]); `None` when it is malformed.
fn indexed_keys<'a>(index_key: &'a [u8], value: &'a [u8]) -> Option<Vec<&'a [u8]>> {
    if value.is_empty() {
        // The former shape: one entry per key, the key after the expiry.
        return index_key.get(8..).map(|k| vec![k]);
    }
    let mut keys = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        keys.push(rest.get(4..4 + len)?);
        rest = &rest[4 + len..];
    }
    Some(keys)
}

impl DedupStore for EmbeddedStore {
    async fn claim(&self, requests: Vec<ClaimRequest>, now_ms: u64) -> Result<Vec<Claim>, StoreError> {
        self.guarded(move |s, guarded| {
            let known = match &mut guarded.known {
                Some(known) => known,
                known @ None => known.insert(Known::load(s, now_ms)?),
            };
            let pending = &mut guarded.pending;
            let mut batch = s.batch(requests.len() + 1);
            // Writes of this batch, so a key repeated in it sees the earlier request.
            let mut overlay: Pending = HashMap::with_capacity_and_hasher(requests.len(), Default::default());
            let mut answers = Vec::with_capacity(requests.len());
            // The keys whose rows this call creates: they all expire at now + ttl.
            let mut created = Vec::new();
            let (mut call, mut slots) = (None, 0u32);
            for request in requests {
                let key = request.key.encode();
                let digest = EventKey::digest_encoded(&key);
                let read = known.may_hold(digest, now_ms);
                let existing = match overlay.get(&key).or_else(|| pending.get(&key)) {
                    Some(stored) => Some(stored.clone()),
                    None if read => s.read(&key)?,
                    None => None,
                };
                let claim = decide(existing.as_ref().map(|e| &e.row), &request, now_ms, s.lease_ms);
                if let Claim::New(how) = claim {
                    let had_row = existing.is_some();
                    let stored = match (how, existing) {
                        // Resume keeps the original claim time, so the TTL does not stretch,
                        // and its slot.
                        (Acquired::Resumed, Some(old)) => {
                            Stored { row: ClaimRow { lease_until_ms: now_ms + s.lease_ms, ..old.row }, slot: old.slot }
                        }
                        _ => {
                            let call = *call.get_or_insert_with(|| s.calls.fetch_add(1, Ordering::Relaxed));
                            let slot = Slot { call, index: slots };
                            slots += 1;
                            let row = ClaimRow {
                                state: ClaimState::InFlight,
                                fingerprint: request.fingerprint,
                                position: request.position.clone(),
                                claimed_at_ms: now_ms,
                                lease_until_ms: now_ms + s.lease_ms,
                                expires_at_ms: now_ms + s.ttl_ms,
                            };
                            created.extend_from_slice(&(key.len() as u32).to_be_bytes());
                            created.extend_from_slice(&key);
                            if had_row || (!read && known.responses) {
                                // An earlier claim's answer is not this one's. (Without
                                // a row there is no answer: every path that deletes a
                                // row deletes its answer too. Unread, an expired row
                                // may still be there.)
                                batch.remove(&s.responses, key.clone());
                            }
                            Stored { row, slot: Some(slot) }
                        }
                    };
                    batch.insert(&s.claims, key.clone(), encode_row(&stored.row, stored.slot));
                    known.keys.insert(digest, now_ms);
                    overlay.insert(key, stored);
                }
                answers.push(claim);
            }
            if let Some(call) = call {
                batch.insert(&s.expiry, expiry_key(now_ms + s.ttl_ms, call), created);
            }
            s.commit(batch)?;
            if pending.len() + overlay.len() > PENDING_MAX {
                pending.clear();
            }
            pending.extend(overlay);
            Ok(answers)
        })
        .await
    }

    async fn complete(&self, done: Vec<(EventKey, Position)>, now_ms: u64) -> Result<Vec<bool>, StoreError> {
        self.locked(move |s, pending| {
            let mut batch = s.batch(done.len());
            let mut answers = Vec::with_capacity(done.len());
            // The slots completed, by call: one bitmap write per call.
            let mut completed: HashMap<u64, Vec<u32>> = HashMap::default();
            for (key, position) in done {
                let key = key.encode();
                let stored = match pending.remove(&key) {
                    Some(stored) => Some(stored),
                    None => s.read(&key)?,
                };
                let held = match stored {
                    Some(Stored { row, slot }) if row.position == position && row.expires_at_ms > now_ms => {
                        match (row.state, slot) {
                            (ClaimState::Done, _) => {}
                            (ClaimState::InFlight, Some(slot)) => completed.entry(slot.call).or_default().push(slot.index),
                            // A row written before slots is rewritten as done.
                            (ClaimState::InFlight, None) => {
                                let row = ClaimRow { state: ClaimState::Done, lease_until_ms: 0, ..row };
                                batch.insert(&s.claims, key, encode_row(&row, None));
                            }
                        }
                        true
                    }
                    _ => false,
                };
                answers.push(held);
            }
            for (call, indexes) in completed {
                let key = call.to_be_bytes();
                let mut bitmap = s.completed.get(key).map_err(|e| s.err(e))?.map_or_else(Vec::new, |b| b.to_vec());
                indexes.into_iter().for_each(|index| set_bit(&mut bitmap, index));
                batch.insert(&s.completed, key, bitmap);
            }
            s.commit(batch)?;
            Ok(answers)
        })
        .await
    }

    async fn renew(&self, held: Vec<(EventKey, Position)>, now_ms: u64) -> Result<Vec<bool>, StoreError> {
        let lease_ms = self.inner.lease_ms;
        self.locked(move |s, pending| {
            let mut batch = s.db.batch();
            let mut answers = Vec::with_capacity(held.len());
            for (key, position) in held {
                let key = key.encode();
                let stored = match pending.get(&key) {
                    Some(stored) => Some(stored.clone()),
                    None => s.read(&key)?,
                };
                let renewed = match stored {
                    Some(Stored { row, slot })
                        if row.state == ClaimState::InFlight
                            && row.position == position
                            && row.expires_at_ms > now_ms =>
                    {
                        let row = ClaimRow { lease_until_ms: (now_ms + lease_ms).max(row.lease_until_ms), ..row };
                        batch.insert(&s.claims, key.clone(), encode_row(&row, slot));
                        pending.insert(key, Stored { row, slot });
                        true
                    }
                    _ => false,
                };
                answers.push(renewed);
            }
            s.commit(batch)?;
            Ok(answers)
        })
        .await
    }

    async fn release(&self, keys: Vec<(EventKey, Position)>) -> Result<(), StoreError> {
        self.locked(move |s, pending| {
            let mut batch = s.db.batch();
            for (key, position) in keys {
                let key = key.encode();
                pending.remove(&key);
                if let Some(Stored { row, .. }) = s.read(&key)? {
                    if row.state == ClaimState::InFlight && row.position == position {
                        batch.remove(&s.responses, key.clone());
                        batch.remove(&s.claims, key);
                    }
                }
            }
            s.commit(batch)
        })
        .await
    }

    async fn record(&self, responses: Vec<(EventKey, Position, EffectResponse)>) -> Result<Vec<bool>, StoreError> {
        self.guarded(move |s, guarded| {
            let mut batch = s.db.batch();
            let mut answers = Vec::with_capacity(responses.len());
            for (key, position, response) in responses {
                let key = key.encode();
                let held = match guarded.pending.get(&key) {
                    Some(stored) => stored.row.position == position,
                    None => s.read(&key)?.is_some_and(|stored| stored.row.position == position),
                };
                if held {
                    batch.insert(&s.responses, key, response.encode().into_bytes());
                    // (Without `known` yet, its load finds this answer on disk.)
                    if let Some(known) = &mut guarded.known {
                        known.responses = true;
                    }
                }
                answers.push(held);
            }
            s.commit(batch)?;
            Ok(answers)
        })
        .await
    }

    async fn response(&self, key: EventKey, now_ms: u64) -> Result<Option<EffectResponse>, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let key = key.encode();
            if inner.read(&key)?.is_none_or(|stored| stored.row.expires_at_ms <= now_ms) {
                return Ok(None);
            }
            match inner.responses.get(&key).map_err(|e| inner.err(e))? {
                Some(bytes) => EffectResponse::decode(&String::from_utf8_lossy(&bytes)).map(Some),
                None => Ok(None),
            }
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn lookup(&self, keys: Vec<EventKey>, now_ms: u64) -> Result<Vec<Option<ClaimRow>>, StoreError> {
        // Reads need no lock: each key's row is written whole by one batch.
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.round_trips.fetch_add(1, Ordering::Relaxed);
            keys.iter()
                .map(|k| Ok(inner.read(&k.encode())?.map(|stored| stored.row).filter(|row| row.expires_at_ms > now_ms)))
                .collect()
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    async fn forget(&self, key: EventKey) -> Result<bool, StoreError> {
        self.locked(move |s, pending| {
            let key = key.encode();
            pending.remove(&key);
            let existed = s.read(&key)?.is_some();
            let mut batch = s.db.batch();
            batch.remove(&s.responses, key.clone());
            batch.remove(&s.claims, key);
            s.commit(batch)?;
            Ok(existed)
        })
        .await
    }

    async fn release_unless_live(
        &self,
        key: EventKey,
        now_ms: u64,
        claimed_before_ms: u64,
    ) -> Result<Released, StoreError> {
        self.locked(move |s, pending| {
            let key = key.encode();
            let Some(Stored { row, .. }) = s.read(&key)? else { return Ok(Released::Absent) };
            if let Some(kept) = kept_on_release(&row, now_ms, s.lease_ms, claimed_before_ms) {
                return Ok(kept);
            }
            pending.remove(&key);
            let mut batch = s.db.batch();
            batch.remove(&s.responses, key.clone());
            batch.remove(&s.claims, key);
            s.commit(batch)?;
            Ok(if row.expires_at_ms > now_ms { Released::Deleted } else { Released::Absent })
        })
        .await
    }

    async fn sweep(&self, now_ms: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        loop {
            let (count, more) = self
                .locked(move |s, pending| {
                    let mut batch = s.db.batch();
                    let mut count = 0;
                    let mut seen = 0;
                    let end = (now_ms + 1).to_be_bytes();
                    for entry in s.expiry.range(..end.as_slice()) {
                        if seen >= SWEEP_CHUNK {
                            break;
                        }
                        let (index_key, value) = entry.into_inner().map_err(|e| s.err(e))?;
                        let keys = indexed_keys(&index_key, &value).ok_or_else(|| {
                            StoreError::Corrupt(format!("expiry index entry of {} bytes", value.len()))
                        })?;
                        for key in keys {
                            seen += 1;
                            // The row may have been re-claimed since (a later expiry): keep it then.
                            if let Some(Stored { row, .. }) = s.read(key)? {
                                if row.expires_at_ms <= now_ms {
                                    pending.remove(key);
                                    batch.remove(&s.claims, key.to_vec());
                                    batch.remove(&s.responses, key.to_vec());
                                    count += 1;
                                }
                            }
                        }
                        // The call's bitmap goes with its rows (the former shape had none).
                        if let Some(call) = index_key.get(8..16).filter(|_| !value.is_empty()).and_then(call_of) {
                            batch.remove(&s.completed, call.to_be_bytes());
                        }
                        batch.remove(&s.expiry, index_key.to_vec());
                    }
                    s.commit(batch)?;
                    Ok((count, seen >= SWEEP_CHUNK))
                })
                .await?;
            removed += count;
            if !more {
                return Ok(removed);
            }
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.inner.syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.db.persist(PersistMode::SyncAll).map_err(|e| self.inner.err(e))
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            round_trips: self.inner.round_trips.load(Ordering::Relaxed),
            writes: Some(self.inner.writes.load(Ordering::Relaxed)),
            memory_bytes: Some(self.inner.db.write_buffer_size() + self.inner.db.cache_size()),
            syncs: self.inner.syncs.load(Ordering::Relaxed),
        }
    }
}

/// Bytes of the files under `path`, recursively (0 for what cannot be read).
fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `version | state | fingerprint(16) | claimed_at | lease_until | expires_at | partition | offset
/// | [call | index] | topic`; the slot only in rows of version 2.
fn encode_row(row: &ClaimRow, slot: Option<Slot>) -> Vec<u8> {
    let topic = row.position.topic.as_bytes();
    let mut v = Vec::with_capacity(2 + 16 + 24 + 12 + 12 + topic.len());
    v.push(if slot.is_some() { ROW_VERSION_SLOTTED } else { ROW_VERSION });
    v.push(match row.state {
        ClaimState::InFlight => 1,
        ClaimState::Done => 2,
    });
    v.extend_from_slice(&row.fingerprint.0.to_be_bytes());
    v.extend_from_slice(&row.claimed_at_ms.to_be_bytes());
    v.extend_from_slice(&row.lease_until_ms.to_be_bytes());
    v.extend_from_slice(&row.expires_at_ms.to_be_bytes());
    v.extend_from_slice(&row.position.partition.to_be_bytes());
    v.extend_from_slice(&row.position.offset.to_be_bytes());
    if let Some(slot) = slot {
        v.extend_from_slice(&slot.call.to_be_bytes());
        v.extend_from_slice(&slot.index.to_be_bytes());
    }
    v.extend_from_slice(topic);
    v
}

/// The row as written; its state is not resolved against its bitmap (see [`Inner::resolve`]).
fn decode_row(v: &[u8]) -> Option<Stored> {
    let (slot, topic_at) = match v.first() {
        Some(&ROW_VERSION) => (None, 54),
        Some(&ROW_VERSION_SLOTTED) => {
            let slot = Slot {
                call: u64::from_be_bytes(v.get(54..62)?.try_into().ok()?),
                index: u32::from_be_bytes(v.get(62..66)?.try_into().ok()?),
            };
            (Some(slot), 66)
        }
        _ => return None,
    };
    if v.len() < topic_at {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8-byte slice"));
    let state = match v[1] {
        1 => ClaimState::InFlight,
        2 => ClaimState::Done,
        _ => return None,
    };
    let row = ClaimRow {
        state,
        fingerprint: Fingerprint(u128::from_be_bytes(v[2..18].try_into().expect("16-byte slice"))),
        claimed_at_ms: u64_at(18),
        lease_until_ms: u64_at(26),
        expires_at_ms: u64_at(34),
        position: Position {
            partition: i32::from_be_bytes(v[42..46].try_into().expect("4-byte slice")),
            offset: i64::from_be_bytes(v[46..54].try_into().expect("8-byte slice")),
            topic: Arc::from(std::str::from_utf8(&v[topic_at..]).ok()?),
        },
    };
    Some(Stored { row, slot })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn retention() -> Retention {
        Retention {
            ttl: Duration::from_secs(100),
            lease: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(1),
        }
    }

    fn request(id: &str, fp: u128, offset: i64) -> ClaimRequest {
        ClaimRequest {
            key: EventKey { scope: Arc::from("s"), id: id.as_bytes().to_vec() },
            fingerprint: Fingerprint(fp),
            position: Position { topic: Arc::from("t"), partition: 0, offset },
        }
    }

    #[test]
    fn rows_round_trip() {
        let row = ClaimRow {
            state: ClaimState::Done,
            fingerprint: Fingerprint(u128::MAX - 3),
            position: Position { topic: Arc::from("orders"), partition: 7, offset: 1 << 40 },
            claimed_at_ms: 1,
            lease_until_ms: 2,
            expires_at_ms: 3,
        };
        let slot = Some(Slot { call: u64::MAX - 1, index: 999 });
        for slot in [None, slot] {
            let stored = Stored { row: row.clone(), slot };
            assert_eq!(decode_row(&encode_row(&row, slot)), Some(stored));
        }
        assert_eq!(decode_row(&[9; 60]), None);
        assert_eq!(decode_row(&[ROW_VERSION_SLOTTED; 60]), None, "too short for a slot");
    }

    #[tokio::test]
    async fn ttl_expiry_with_controlled_time_and_sweep_removes_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
        let t0 = 1_000_000;
        let r = request("a", 1, 5);
        assert_eq!(store.claim(vec![r.clone()], t0).await.unwrap(), vec![Claim::New(Acquired::Fresh)]);
        assert_eq!(store.complete(vec![(r.key.clone(), r.position.clone())], t0).await.unwrap(), vec![true]);
        let later = request("a", 1, 9);
        assert_eq!(
            store.claim(vec![later.clone()], t0 + 99_999).await.unwrap(),
            vec![Claim::Duplicate { first: r.position.clone(), claimed_at_ms: t0 }]
        );
        // At the TTL the row stops counting at once, before any sweep.
        assert_eq!(store.lookup(vec![r.key.clone()], t0 + 100_000).await.unwrap(), vec![None]);
        assert_eq!(store.sweep(t0 + 50_000).await.unwrap(), 0, "nothing expired yet");
        assert_eq!(store.row_count().unwrap(), 1);
        assert_eq!(store.sweep(t0 + 100_000).await.unwrap(), 1);
        assert_eq!(store.row_count().unwrap(), 0, "expired row is gone from disk");
        assert_eq!(store.claim(vec![later], t0 + 100_001).await.unwrap(), vec![Claim::New(Acquired::Fresh)]);
    }

    #[tokio::test]
    async fn a_new_key_costs_its_row_and_a_call_one_index_entry_and_one_completion_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
        let requests: Vec<_> = (0..100).map(|i| request(&format!("k{i}"), 1, i)).collect();
        let answers = store.claim(requests.clone(), 0).await.unwrap();
        assert!(answers.iter().all(|a| *a == Claim::New(Acquired::Fresh)));
        assert_eq!(store.stats().writes, Some(101), "100 rows and one index entry");
        let done: Vec<_> = requests.iter().map(|r| (r.key.clone(), r.position.clone())).collect();
        assert!(store.complete(done, 1).await.unwrap().into_iter().all(|held| held));
        assert_eq!(store.stats().writes, Some(102), "one bitmap for the call, no row rewritten");
        let rows = store.lookup(requests.iter().map(|r| r.key.clone()).collect(), 2).await.unwrap();
        assert!(rows.iter().all(|r| r.as_ref().is_some_and(|r| r.state == ClaimState::Done)), "every row reads done");
        assert_eq!(store.inner.expiry.len().unwrap(), 1);
        assert_eq!(store.inner.completed.len().unwrap(), 1);
        assert_eq!(store.sweep(99_999).await.unwrap(), 0);
        assert_eq!(store.sweep(100_000).await.unwrap(), 100, "the call's entry lists every key");
        assert_eq!(store.row_count().unwrap(), 0);
        assert_eq!(store.inner.expiry.len().unwrap(), 0);
        assert_eq!(store.inner.completed.len().unwrap(), 0, "the bitmap goes with the call's rows");
    }

    /// A completion is in the call's bitmap, on disk: after a reopen the key is done for
    /// everyone, and a key of the same call not completed is still in flight (resumed by its
    /// position, waited for by another).
    #[tokio::test]
    async fn completions_and_claims_in_flight_outlive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (request("a", 1, 1), request("b", 1, 2));
        {
            let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
            store.claim(vec![a.clone(), b.clone()], 0).await.unwrap();
            assert_eq!(store.complete(vec![(a.key.clone(), a.position.clone())], 1).await.unwrap(), vec![true]);
        }
        let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
        let elsewhere = |r: &ClaimRequest| ClaimRequest { position: Position { partition: 3, ..r.position.clone() }, ..r.clone() };
        assert_eq!(
            store.claim(vec![elsewhere(&a), elsewhere(&b)], 2).await.unwrap(),
            vec![
                Claim::Duplicate { first: a.position.clone(), claimed_at_ms: 0 },
                Claim::InFlight { holder: b.position.clone(), lease_until_ms: 10_000 },
            ]
        );
        assert_eq!(store.claim(vec![b.clone()], 3).await.unwrap(), vec![Claim::New(Acquired::Resumed)]);
        assert_eq!(store.complete(vec![(b.key.clone(), b.position.clone())], 4).await.unwrap(), vec![true]);
        let rows = store.lookup(vec![b.key.clone()], 5).await.unwrap();
        assert_eq!(rows[0].as_ref().map(|r| r.state), Some(ClaimState::Done), "resumed, it keeps its slot");
    }

    /// Rows written before slots carry their state: one in flight is completed by a rewrite.
    #[tokio::test]
    async fn a_row_written_before_slots_is_completed_by_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
        let a = request("a", 1, 1);
        let row = ClaimRow {
            state: ClaimState::InFlight,
            fingerprint: a.fingerprint,
            position: a.position.clone(),
            claimed_at_ms: 0,
            lease_until_ms: 10_000,
            expires_at_ms: 100_000,
        };
        store.inner.claims.insert(a.key.encode(), encode_row(&row, None)).unwrap();
        assert_eq!(store.claim(vec![a.clone()], 1).await.unwrap(), vec![Claim::New(Acquired::Resumed)]);
        assert_eq!(store.complete(vec![(a.key.clone(), a.position.clone())], 2).await.unwrap(), vec![true]);
        let rows = store.lookup(vec![a.key.clone()], 3).await.unwrap();
        assert_eq!(rows[0].as_ref().map(|r| r.state), Some(ClaimState::Done));
    }

    /// Calls are numbered from the clock at open; one set back must not number a new call
    /// as an earlier process's, whose bitmap would make the new rows read done. Failed
    /// before the first claim raised the numbering above the calls on disk.
    #[tokio::test]
    async fn a_call_is_never_numbered_again_after_the_clock_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (request("a", 1, 1), request("b", 1, 2));
        {
            let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
            store.inner.calls.store(7, Ordering::Relaxed);
            store.claim(vec![a.clone()], 0).await.unwrap();
            store.complete(vec![(a.key.clone(), a.position.clone())], 1).await.unwrap();
        }
        let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
        store.inner.calls.store(7, Ordering::Relaxed);
        store.claim(vec![b.clone()], 2).await.unwrap();
        let rows = store.lookup(vec![b.key.clone()], 3).await.unwrap();
        assert_eq!(rows[0].as_ref().map(|r| r.state), Some(ClaimState::InFlight));
    }

    #[tokio::test]
    async fn sweep_reads_index_entries_of_the_former_one_per_key_shape() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
        let r = request("old", 1, 5);
        store.claim(vec![r.clone()], 0).await.unwrap();
        // Replace the call's entry with the shape stores written before kept.
        let inner = &store.inner;
        let entries: Vec<_> = inner.expiry.iter().map(|e| e.key().unwrap().to_vec()).collect();
        for k in entries {
            inner.expiry.remove(k).unwrap();
        }
        let key = r.key.encode();
        let mut old = 100_000u64.to_be_bytes().to_vec();
        old.extend_from_slice(&key);
        inner.expiry.insert(old, []).unwrap();
        assert_eq!(store.sweep(100_000).await.unwrap(), 1);
        assert_eq!(store.row_count().unwrap(), 0);
    }

    #[tokio::test]
    async fn sweep_keeps_rows_reclaimed_after_their_first_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
        let r = request("a", 1, 5);
        store.claim(vec![r.clone()], 0).await.unwrap();
        store.claim(vec![request("a", 1, 6)], 100_000).await.unwrap(); // expired, claimed anew
        assert_eq!(store.sweep(150_000).await.unwrap(), 0);
        assert_eq!(store.row_count().unwrap(), 1);
        assert_eq!(store.sweep(200_000).await.unwrap(), 1);
    }

    fn reads(store: &EmbeddedStore) -> u64 {
        store.inner.reads.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_key_never_claimed_is_claimed_without_a_read_a_known_one_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
        let batch: Vec<_> = (0..50).map(|i| request(&format!("k{i}"), 1, i)).collect();
        assert!(store.claim(batch.clone(), 0).await.unwrap().iter().all(|a| *a == Claim::New(Acquired::Fresh)));
        assert_eq!(reads(&store), 0, "no key had a row");
        // A key repeated in one call is answered from the call's own writes.
        let twice = vec![request("x", 1, 100), request("x", 1, 101)];
        let answers = store.claim(twice, 1).await.unwrap();
        assert_eq!(answers[0], Claim::New(Acquired::Fresh));
        assert!(matches!(answers[1], Claim::InFlight { .. }), "{:?}", answers[1]);
        assert_eq!(reads(&store), 0);
        // In flight here: answered from memory. Done and dropped from memory: read.
        store.complete(vec![(batch[0].key.clone(), batch[0].position.clone())], 2).await.unwrap();
        let again = request("k0", 1, 7);
        assert_eq!(
            store.claim(vec![again], 3).await.unwrap(),
            vec![Claim::Duplicate { first: batch[0].position.clone(), claimed_at_ms: 0 }]
        );
        assert_eq!(reads(&store), 1, "a known key is read");
    }

    #[tokio::test]
    async fn rows_written_before_an_open_are_known_after_it_for_their_whole_life() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_000_000;
        let first = request("a", 1, 5);
        {
            let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
            store.claim(vec![first.clone()], t0).await.unwrap();
            store.complete(vec![(first.key.clone(), first.position.clone())], t0).await.unwrap();
        }
        let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
        // The first claim after the open (of another key) loads what is on disk...
        store.claim(vec![request("b", 1, 6)], t0 + 10_000).await.unwrap();
        // ...so the row is read, and counts, until the end of its TTL.
        let duplicate = Claim::Duplicate { first: first.position.clone(), claimed_at_ms: t0 };
        assert_eq!(store.claim(vec![request("a", 1, 7)], t0 + 99_999).await.unwrap(), vec![duplicate]);
        assert_eq!(reads(&store), 1);
        assert_eq!(store.claim(vec![request("a", 1, 8)], t0 + 100_000).await.unwrap(), vec![Claim::New(Acquired::Fresh)]);
    }

    #[tokio::test]
    async fn rows_that_outlive_a_shortened_ttl_are_read_for_as_long_as_they_count() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_000_000;
        let first = request("a", 1, 5);
        {
            let store = EmbeddedStore::open(dir.path(), &retention()).unwrap(); // TTL 100 s
            store.claim(vec![first.clone()], t0).await.unwrap();
            store.complete(vec![(first.key.clone(), first.position.clone())], t0).await.unwrap();
        }
        let short = Retention { ttl: Duration::from_secs(10), ..retention() };
        let store = EmbeddedStore::open(dir.path(), &short).unwrap();
        store.claim(vec![request("b", 1, 6)], t0).await.unwrap();
        // Past the new TTL, a filter trusted to stand for reads would have
        // forgotten "a", whose row counts until t0 + 100 s.
        let duplicate = Claim::Duplicate { first: first.position.clone(), claimed_at_ms: t0 };
        assert_eq!(store.claim(vec![request("a", 1, 7)], t0 + 50_000).await.unwrap(), vec![duplicate]);
    }

    #[tokio::test]
    async fn a_key_claimed_anew_unread_over_its_expired_row_does_not_inherit_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), &retention()).unwrap();
        let first = request("a", 1, 5);
        store.claim(vec![first.clone()], 0).await.unwrap();
        let answer = EffectResponse {
            status: 200,
            body_sha256: String::new(),
            body_bytes: 0,
            excerpt: String::new(),
            at_ms: 1,
            attempts: 1,
            headers: Vec::new(),
            body_base64: None,
        };
        assert_eq!(store.record(vec![(first.key.clone(), first.position.clone(), answer)]).await.unwrap(), vec![true]);
        store.complete(vec![(first.key.clone(), first.position.clone())], 1).await.unwrap();
        // Two TTLs on, unswept: the filter has forgotten the key and the claim skips its read.
        let later = 200_000;
        assert_eq!(store.claim(vec![request("a", 1, 9)], later).await.unwrap(), vec![Claim::New(Acquired::Fresh)]);
        assert_eq!(reads(&store), 0);
        assert_eq!(store.response(first.key.clone(), later).await.unwrap(), None, "the expired claim's answer");
    }
}
