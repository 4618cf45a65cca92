//! The write-ahead journal: a storage layer under redb that turns each durable commit into one
//! sequential write and one fsync.
//!
//! redb commits by writing its dirty pages where they live (a one-message commit touches about
//! eight pages across the file) and then fsyncing; the flush of scattered blocks costs up to
//! twice a flush of the same bytes in one run. A journaled file keeps a fixed region in front of
//! redb's pages. A sync appends every page written since the last sync to that region as one
//! record and fsyncs once; the pages are copied to their places later, many records at a time,
//! when the region is full or the file closes (a *checkpoint*). Until then they are served from
//! memory. This is SQLite's WAL, inside the one file. On Linux, a file opened by path for the
//! exclusive writer writes its durable records through a second handle with `O_DIRECT |
//! O_DSYNC`: one write that returns once the record is on the disk, where a write into the page
//! cache and an fdatasync cost two system calls, a copy and the kernel's writeback (PostgreSQL's
//! `wal_sync_method = open_datasync`). A record goes that way only when every record before it
//! is synced, and a file system that refuses it gets the write and the fsync.
//!
//! The file, a journaled one (a plain redb file starts with redb's magic and has none of this):
//!
//! ```text
//! offset         size       what
//! 0              4 KiB      header slot 0  } the slot with the higher valid counter counts;
//! 4 KiB          4 KiB      header slot 1  } a checkpoint writes the other one
//! 8 KiB          J          the journal: records, each starting on a 4 KiB boundary
//! 8 KiB + J      ...        redb's file, byte for byte as it would be on its own
//! ```
//!
//! A header slot: magic (16 bytes), version u32 (3; 1 and 2 are read), crc32c u32 (of the
//! slot's 48 bytes, this field zero), journal size J u64, counter u64 (the journal's
//! generation), all little-endian.
//!
//! A record: magic (8, `mqjrec03`), generation u64, sequence u64 (0 for the first record of a
//! generation), the logical length after it u64, the smallest logical length since the
//! previous record u64 (a shrink followed by growth reads as zeros), page count n u32, crc32c
//! u32 (of the whole record, this field zero), placed count m u32, zero u32, n entries of page
//! number u64, start u32 and length u32, m placed entries of page number u64, crc32c u32 and
//! zero u32, then each entry's bytes, packed, and zero padding to 4 KiB. An entry of 4 096
//! bytes is the page whole; a shorter one patches the page's image in an earlier record of the
//! chain (a commit rewrites whole pages but changes a small part of most of them). A version 2
//! record (`mqjrec02`) has no placed count, zero or placed entries; a version 1 record
//! (`mqjrec01`, written by builds before patches) has page numbers only, padding to 4 KiB, and
//! every image whole.
//!
//! A durable sync *places* long runs of new pages (large values: a topic's record batches):
//! it writes them in place before its record, which names each with the checksum of its
//! bytes, and one fsync makes both durable. So a 1 000-message commit writes its payloads
//! once, not in the record and again at the checkpoint. Only pages whose bytes in
//! place no state a recovery can return to reads are placed (see [`Journal::pages_to_place`]),
//! on blocks written with zeros ahead of them (see [`Journal::prepare`]).
//!
//! Recovery reads the chain of records of the header's generation from the start of the
//! region, stopping at the first record that fails its checksum, breaks the sequence or
//! belongs to another generation, and before the last one if a page it placed fails its
//! checksum: a torn record was never acknowledged (its fsync had not returned). (A page an
//! earlier record placed fails its checksum only when a checkpoint cut short wrote a later
//! record's image over it, which the chain brings back.) The chain is then checkpointed. A checkpoint writes the pages in place, fsyncs,
//! then writes the next generation into the older header slot and fsyncs again: records of the
//! old generation are from then on ignored, and the new generation's first record is written
//! only after that; a writable open starts a new generation too, so that records a crash left
//! past a torn one can never join a later chain. So every state a crash can leave is the last
//! synced state plus, at most, a part of the writes after it, which is the state redb is built
//! to recover from on a plain file; and in the common case it is exactly the last synced
//! state, but for pages an unacknowledged sync placed, where that state holds zeros nothing
//! wrote (pages redb has free).
//!
//! The journal serves one process. In the shared concurrency modes, where other processes
//! read and write the file too, the handle first checkpoints what an earlier exclusive writer
//! left in the journal (under redb's writer lock, which redb takes before its first read), and
//! then reads and writes redb's pages in place, as on a plain file: the journal stays empty
//! while the file is shared. A read-only handle in a shared mode refuses a file whose journal
//! holds records (a writer must recover it first); in the exclusive mode it replays them in
//! memory.

use std::io;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock};
use redb::{BackendError, StorageBackend};

use crate::codec::crc32c;
use crate::id_hash::IdMap;

/// The unit of the page maps and of alignment in the journal.
const PAGE: u64 = 4096;
/// The two header slots.
const HEADER_BYTES: u64 = 2 * PAGE;
/// The journal size of a new file. A record larger than this is written in place instead.
pub(crate) const DEFAULT_JOURNAL_BYTES: u64 = 2 << 20;
/// The largest region a header may name (the builder's bound too).
pub(crate) const MAX_JOURNAL_BYTES: u64 = 1 << 30;
/// The largest file length a record may name: far beyond any real file, and small enough that
/// no offset computed from it overflows.
const MAX_LEN: u64 = 1 << 52;
const MAGIC: [u8; 16] = *b"mqlite-journal\r\n";
/// The header version written: 3, whose records may name pages put in place ahead of them.
/// Versions 1 and 2 are read; a build that knows an older version refuses a newer header
/// instead of skipping records it cannot read.
const VERSION: u32 = 3;
const RECORD_MAGIC: [u8; 8] = *b"mqjrec03";
/// Version 2 records (patches, nothing placed), as builds before placed pages wrote them.
const RECORD_MAGIC_2: [u8; 8] = *b"mqjrec02";
/// Version 1 records (every page image whole), as builds before patches wrote them.
const RECORD_MAGIC_1: [u8; 8] = *b"mqjrec01";
/// A record's entry per page in it (versions 2 and 3): page number u64, start u32, length u32.
const ENTRY_BYTES: u64 = 16;
/// A version 3 record's entry per page it placed: page number u64, crc32c u32, zero u32.
const PLACED_BYTES: u64 = 16;
/// The fixed part of a version 3 record, and of a version 1 or 2 one.
const RECORD_FIXED: usize = 56;
const RECORD_FIXED_2: usize = 48;
/// The fewest consecutive new pages a durable sync puts in place instead of in its record: a
/// large value (a record batch is 32 KiB); a few scattered pages are cheaper in the record.
const PLACE_MIN_RUN: usize = 8;
/// The most pages a generation places: recovery holds them all in memory.
const PLACED_LIMIT_PAGES: usize = 4096;
/// How far past the pages in place the file's blocks are written with zeros ahead of the
/// pages placed there: a write into blocks the file system has not allocated yet costs it a
/// metadata commit at the next fsync.
const ZERO_AHEAD_BYTES: u64 = 8 << 20;
/// Unsynced pages kept in memory before they go to the journal without an fsync.
const PENDING_LIMIT_PAGES: usize = 1024;
/// The most pages a layer's emptied map keeps room for.
const KEPT_ROOM_PAGES: usize = 4096;
/// The most page images kept for reuse (1 MiB).
const SPARE_PAGES: usize = 256;
/// The largest record buffer kept for the next sync.
const RECORD_BUFFER_BYTES: usize = 1 << 20;

/// Whether the first bytes of a file (up to [`DETECT_LEN`]) are a journaled file's header:
/// either slot's magic counts, since a new file writes slot 0 only at its first checkpoint and
/// recovery survives one damaged slot.
pub(crate) fn is_journaled(head: &[u8]) -> bool {
    let magic_at = |at: usize| head.get(at..at + MAGIC.len()) == Some(&MAGIC[..]);
    magic_at(0) || magic_at(PAGE as usize)
}

/// The bytes to read to tell a journaled file from a plain one: both header slots.
pub(crate) const DETECT_LEN: usize = HEADER_BYTES as usize;

type IoResult<T> = std::result::Result<T, io::Error>;

/// What a commit asks to run once its record is on the disk.
pub(crate) type Hook = std::sync::Arc<dyn Fn() + Send + Sync>;

/// A handle on `path` whose writes bypass the page cache and return once the bytes are on
/// the disk (`O_DIRECT | O_DSYNC`), for a journal's durable records; `None` where the system
/// or the file system has no such writes (some refuse `O_DIRECT` at the open), and the
/// journal then writes and fsyncs.
/// `same_as` is the handle already open on `path`: a file renamed over `path` in between is
/// never written to.
pub(crate) fn open_write_through(
    path: &std::path::Path,
    same_as: &std::fs::File,
) -> Option<std::fs::File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let through = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(path)
            .ok()?;
        let (a, b) = (same_as.metadata().ok()?, through.metadata().ok()?);
        (a.dev() == b.dev() && a.ino() == b.ino()).then_some(through)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (path, same_as);
        None
    }
}

/// Where a durable record can go in one write that returns once the bytes are on the disk,
/// beside the lower backend's write and fsync: a handle from [`open_write_through`] (and, in
/// the tests, a simulated disk that can lose power).
pub(crate) trait WriteThrough: Send + Sync {
    /// Writes `data` at `offset` of the whole file and returns once it is durable. `data`,
    /// `offset` and the length are page-aligned, as direct I/O needs. `InvalidInput` means the
    /// file system refuses such writes before any byte moved: the journal then writes and
    /// fsyncs from now on.
    fn write_through(&self, offset: u64, data: &[u8]) -> IoResult<()>;
}

impl WriteThrough for std::fs::File {
    fn write_through(&self, offset: u64, data: &[u8]) -> IoResult<()> {
        #[cfg(unix)]
        {
            std::os::unix::fs::FileExt::write_all_at(self, data, offset)
        }
        #[cfg(not(unix))]
        {
            let _ = (offset, data);
            Err(io::ErrorKind::Unsupported.into())
        }
    }
}

/// A read-only open in a shared mode found commits in the journal, which only a writable open
/// puts in place (`Error::NeedsRecovery` to the caller).
#[derive(Debug)]
pub(crate) struct Unrecovered;

impl std::fmt::Display for Unrecovered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the journal holds commits not yet in place; open the file for writing once")
    }
}

impl std::error::Error for Unrecovered {}

fn damaged(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("mqlite journal: {what}"),
    )
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn align(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

/// The bytes of a page that differ between two images, as `start..end`; `None` when none do.
/// Pages are whole blocks long (4 KiB). Blocks of 32 bytes compare as vectors without a call
/// each, so the scan from either end takes a quarter of the steps of one a word at a time;
/// the differing block is then narrowed to its byte.
fn changed(new: &[u8], old: &[u8]) -> Option<(usize, usize)> {
    const BLOCK: usize = 32;
    let (blocks_new, blocks_old) = (new.as_chunks::<BLOCK>().0, old.as_chunks::<BLOCK>().0);
    let differs = |(a, b): (&[u8; BLOCK], &[u8; BLOCK])| a != b;
    let first = blocks_new.iter().zip(blocks_old).position(differs)?;
    let last = blocks_new
        .iter()
        .zip(blocks_old)
        .rposition(differs)
        .unwrap_or(first);
    let byte = |i: usize| new[i] != old[i];
    let (first, last) = (first * BLOCK, last * BLOCK);
    let start = (first..first + BLOCK).find(|&i| byte(i)).unwrap_or(first);
    let end = (last..last + BLOCK)
        .rev()
        .find(|&i| byte(i))
        .unwrap_or(last + BLOCK - 1)
        + 1;
    Some((start, end))
}

/// A header slot as read: `None` when it fails its checks.
fn parse_slot(b: &[u8]) -> Option<(u64, u64)> {
    if b[..16] != MAGIC || !(1..=VERSION).contains(&le_u32(b, 16)) {
        return None;
    }
    // The checksum covers the slot's 48 bytes with its own field read as zeros.
    if crc32c(&[&b[..20], &[0; 4], &b[24..48]]) != le_u32(b, 20) {
        return None;
    }
    let (journal_bytes, counter) = (le_u64(b, 24), le_u64(b, 32));
    ((PAGE..=MAX_JOURNAL_BYTES).contains(&journal_bytes) && journal_bytes.is_multiple_of(PAGE))
        .then_some((journal_bytes, counter))
}

fn encode_slot(journal_bytes: u64, counter: u64) -> Vec<u8> {
    let mut b = vec![0u8; PAGE as usize];
    b[..16].copy_from_slice(&MAGIC);
    b[16..20].copy_from_slice(&VERSION.to_le_bytes());
    b[24..32].copy_from_slice(&journal_bytes.to_le_bytes());
    b[32..40].copy_from_slice(&counter.to_le_bytes());
    let crc = crc32c(&[&b[..48]]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A page image.
type Image = Box<[u8]>;

/// Page images by page number.
type PageMap = IdMap<u64, Image>;

/// Page images no layer holds any more, for the next pages written: a commit writes a few
/// pages, each a 4 KiB allocation that glibc serves from its slower bins, and replaces as
/// many older images. About 2 % of a one-publish commit's instructions went to those
/// allocations and frees.
#[derive(Default)]
struct Spare(Vec<Image>);

impl Spare {
    /// An image to overwrite whole: its bytes are an old page's.
    fn take(&mut self) -> Image {
        self.0
            .pop()
            .unwrap_or_else(|| vec![0u8; PAGE as usize].into_boxed_slice())
    }

    /// Keeps `image` for reuse, unless it is a placed page's empty marker (see [`Layer`]).
    fn give(&mut self, image: Image) {
        if image.len() == PAGE as usize && self.0.len() < SPARE_PAGES {
            self.0.push(image);
        }
    }
}

/// A journal record as read back, its checksum checked.
struct Record {
    bytes: Vec<u8>,
    version: u32,
    /// Entries (pages in the record), and pages placed.
    count: usize,
    placed: usize,
    /// The bytes of the fixed part, and of an entry.
    fixed: usize,
    entry_bytes: usize,
}

impl Record {
    fn generation(&self) -> u64 {
        le_u64(&self.bytes, 8)
    }

    fn len(&self) -> u64 {
        le_u64(&self.bytes, 24)
    }

    /// Entry `i`: its page, and where in the page its bytes go and how many there are.
    fn entry(&self, i: usize) -> (u64, u64, u64) {
        let at = self.fixed + self.entry_bytes * i;
        let page = le_u64(&self.bytes, at);
        if self.version == 1 {
            (page, 0, PAGE)
        } else {
            let start = u64::from(le_u32(&self.bytes, at + 8));
            (page, start, u64::from(le_u32(&self.bytes, at + 12)))
        }
    }

    /// Placed page `i`: its number and checksum.
    fn placed(&self, i: usize) -> (u64, u32) {
        let at = self.fixed + self.entry_bytes * self.count + PLACED_BYTES as usize * i;
        (le_u64(&self.bytes, at), le_u32(&self.bytes, at + 8))
    }

    /// Where the entries' bytes start: version 1 put them on a page boundary, later versions
    /// pack them after the lists.
    fn images_at(&self) -> usize {
        let lists =
            self.fixed + self.entry_bytes * self.count + PLACED_BYTES as usize * self.placed;
        if self.version == 1 {
            align(lists as u64) as usize
        } else {
            lists
        }
    }

    /// Its size in the journal.
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// A set of page numbers, as a bitmap: a bit for each page of the file (32 KiB for 1 GiB).
#[derive(Default)]
struct PageSet(Vec<u64>);

impl PageSet {
    fn contains(&self, page: u64) -> bool {
        let (word, bit) = ((page / 64) as usize, page % 64);
        self.0.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn insert(&mut self, page: u64) {
        let (word, bit) = ((page / 64) as usize, page % 64);
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << bit;
    }

    fn insert_range(&mut self, from: u64, to: u64) {
        let mut page = from;
        while page < to {
            if page.is_multiple_of(64) && to - page >= 64 {
                let word = (page / 64) as usize;
                if self.0.len() <= word {
                    self.0.resize(word + 1, 0);
                }
                self.0[word] = u64::MAX;
                page += 64;
            } else {
                self.insert(page);
                page += 1;
            }
        }
    }

    /// Takes out every page from `page` on.
    fn remove_from(&mut self, page: u64) {
        let word = (page / 64) as usize;
        if word < self.0.len() {
            self.0.truncate(word + 1);
            self.0[word] &= (1 << (page % 64)) - 1;
        }
    }

    fn extend(&mut self, pages: impl IntoIterator<Item = u64>) {
        for page in pages {
            self.insert(page);
        }
    }
}

/// The pages of one layer: written since the last sync, or synced to the journal since the
/// last checkpoint. In the durable layer, a page a record placed (see [`State::in_place`]) has an
/// empty image: its bytes are in place, where a read finds them.
#[derive(Default)]
struct Layer {
    pages: PageMap,
    /// The smallest logical length since the layer began: pages at and above it, and not in
    /// `pages`, read as zeros (the file shrank over them).
    floor: u64,
}

impl Layer {
    fn new(len: u64) -> Self {
        Layer {
            pages: PageMap::default(),
            floor: len,
        }
    }

    /// Empties the layer for a file of `len` bytes, keeping the map's room (up to
    /// [`KEPT_ROOM_PAGES`]): the pending layer fills again with about as many pages each
    /// commit, and a map that grows from nothing rehashes several times on the way.
    fn reset(&mut self, len: u64, spare: &mut Spare) {
        for (_, image) in self.pages.drain() {
            spare.give(image);
        }
        if self.pages.capacity() > KEPT_ROOM_PAGES {
            self.pages = PageMap::default();
        }
        self.floor = len;
    }

    /// Lays `newer` over this layer, whose pages all lie below `len`, and leaves `newer`
    /// empty (with its room); the images it replaces go to `spare`.
    fn absorb(&mut self, newer: &mut Layer, len: u64, spare: &mut Spare) {
        let floor = newer.floor;
        // Only a shrink hides pages; without one (the common sync) there is nothing to scan.
        if floor < len {
            self.pages.retain(|&p, _| p * PAGE < floor);
        }
        for (page, image) in newer.pages.drain() {
            if let Some(old) = self.pages.insert(page, image) {
                spare.give(old);
            }
        }
        self.floor = self.floor.min(floor);
    }
}

struct State {
    journal_bytes: u64,
    /// The header counter: the generation whose records count.
    generation: u64,
    /// The next record's sequence number and place in the journal.
    seq: u64,
    pos: u64,
    /// redb's length of the file.
    len: u64,
    /// The length of redb's file as it stands in place (behind the journal).
    home_len: u64,
    /// The length after the last synced record.
    durable_len: u64,
    pending: Layer,
    durable: Layer,
    spare: Spare,
    /// A write to the storage failed: refuse the rest (redb reopens, which recovers).
    poisoned: bool,
    /// The buffer records are built in, kept between syncs: a commit's record is tens of
    /// KiB, and allocating and freeing that much each commit costs the allocator more than
    /// the copy into it.
    record: Vec<u8>,
    /// Shared with other processes: every access goes to the pages in place.
    direct: bool,
    /// Records written since the journal was read, and how many of them an fsync covers. No
    /// page goes in place while a record is unsynced: the pages in place are the state the
    /// synced records apply to.
    written: u64,
    synced: u64,
    /// Pages in the records written since the last durable one.
    pages_unsynced: usize,
    /// The pages in place that may hold bytes of a state a recovery can return to: every page
    /// written in place since the open, and at the open every page of the file. A durable sync
    /// may write any other page in place before its record (it *places* the page, and the
    /// record names it with a checksum): no state reads its bytes there but through a record
    /// that holds the page (see [`Journal::pages_to_place`]).
    in_place: PageSet,
    /// Pages not `in_place` whose blocks were written with zeros (see [`Journal::prepare`]).
    zeroed: PageSet,
    /// The pages placed in this generation, and how many.
    placed: PageSet,
    placed_count: usize,
    /// Pages placed in this generation that a shrink hid since: their bytes are still in
    /// place, past the length the next checkpoint starts from, and it writes zeros over them.
    hidden: Vec<u64>,
    /// A length the lower file has at least, when known. Kept rather than asked for at each
    /// sync: asking (`fstat`) marks the file's times as seen, Linux (6.13 on, multigrain
    /// timestamps) then stamps the next write with a fine-grained time, and the fdatasync
    /// after it writes the inode too, one more synchronous write a commit (W3's harness:
    /// one metadata write a commit, see docs/performance.md, 2026-12-08 from 01:13).
    lower_len: Option<u64>,
}

impl State {
    fn home(&self) -> u64 {
        HEADER_BYTES + self.journal_bytes
    }
}

/// The journal over a lower backend that holds the whole file.
pub(crate) struct Journal<B: StorageBackend> {
    lower: B,
    writable: bool,
    shared: bool,
    ready: AtomicBool,
    /// Set around a commit whose fsync its caller makes afterwards, by [`Deferred::fsync`].
    defer: AtomicBool,
    /// A second handle on the file, opened by [`open_write_through`]: a durable record goes
    /// out through it in one write that returns once the bytes are on the disk. On this
    /// project's disks that took 86-114 µs where a write into the page cache and an
    /// fdatasync took 101-135 µs (alternating rounds of 12 KiB records, 2026-12-06).
    through: Option<Box<dyn WriteThrough>>,
    /// Off once the file system refused a write through `through`.
    through_works: AtomicBool,
    /// Run once the next durable record is on the disk (see [`Deferred::on_durable`]).
    on_durable: Mutex<Option<Hook>>,
    /// The pages the last durable sync made durable (see [`Deferred::last_sync_pages`]).
    last_sync_pages: AtomicUsize,
    /// The fewest consecutive new pages a sync places ([`PLACE_MIN_RUN`]; the tests lower it).
    place_min_run: usize,
    /// Pages placed since the open.
    #[cfg(test)]
    pages_placed: AtomicUsize,
    /// The pages a sync began to place and has not finished writing the record of: what a
    /// power cut now may leave in place without its record.
    #[cfg(test)]
    placing: Mutex<Vec<u64>>,
    state: RwLock<State>,
}

impl<B: StorageBackend> std::fmt::Debug for Journal<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("lower", &self.lower)
            .finish_non_exhaustive()
    }
}

impl<B: StorageBackend> Journal<B> {
    /// Lays a new, empty journaled file on `lower`, which must be empty; the header and the
    /// zeroed journal region are synced before this returns (a region written once is cheaper
    /// to flush later than a sparse one).
    pub(crate) fn create(lower: B, journal_bytes: u64) -> IoResult<Self> {
        let journal_bytes = align(journal_bytes.max(PAGE));
        lower.set_len(HEADER_BYTES + journal_bytes)?;
        let zeros = vec![0u8; (1 << 20).min(journal_bytes) as usize];
        let mut at = 0;
        while at < journal_bytes {
            let n = (journal_bytes - at).min(zeros.len() as u64) as usize;
            lower.write(HEADER_BYTES + at, &zeros[..n])?;
            at += n as u64;
        }
        lower.write(PAGE, &encode_slot(journal_bytes, 1))?;
        lower.sync_data()?;
        Ok(Self::open(lower, true, false))
    }

    /// A journaled file on `lower`; it is read (and recovered, when `writable`) at redb's first
    /// access, which comes after redb has taken the file's lock. `shared`: other processes may
    /// have the file open (redb's `SingleWriter` and `MultiWriter` modes).
    pub(crate) fn open(lower: B, writable: bool, shared: bool) -> Self {
        Journal {
            lower,
            writable,
            shared,
            ready: AtomicBool::new(false),
            defer: AtomicBool::new(false),
            through: None,
            through_works: AtomicBool::new(true),
            on_durable: Mutex::new(None),
            last_sync_pages: AtomicUsize::new(0),
            place_min_run: PLACE_MIN_RUN,
            #[cfg(test)]
            pages_placed: AtomicUsize::new(0),
            #[cfg(test)]
            placing: Mutex::new(Vec::new()),
            state: RwLock::new(State {
                journal_bytes: 0,
                generation: 0,
                seq: 0,
                pos: 0,
                len: 0,
                home_len: 0,
                durable_len: 0,
                pending: Layer::default(),
                durable: Layer::default(),
                spare: Spare::default(),
                poisoned: false,
                record: Vec::new(),
                direct: false,
                written: 0,
                synced: 0,
                pages_unsynced: 0,
                in_place: PageSet::default(),
                zeroed: PageSet::default(),
                placed: PageSet::default(),
                placed_count: 0,
                hidden: Vec::new(),
                lower_len: None,
            }),
        }
    }

    /// Writes durable records through `through`: a handle from [`open_write_through`] on the
    /// same file as the lower backend.
    pub(crate) fn with_write_through(
        mut self,
        through: Option<impl WriteThrough + 'static>,
    ) -> Self {
        self.through = through.map(|t| Box::new(t) as Box<dyn WriteThrough>);
        self
    }

    fn ensure(&self) -> IoResult<()> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut s = self.state.write();
        if !self.ready.load(Ordering::Acquire) {
            self.recover(&mut s)?;
            self.ready.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Reads the header and the chain of records, and checkpoints them when writable.
    fn recover(&self, s: &mut State) -> IoResult<()> {
        let mut slots = vec![0u8; HEADER_BYTES as usize];
        self.lower.read(0, &mut slots)?;
        let a = parse_slot(&slots[..PAGE as usize]);
        let b = parse_slot(&slots[PAGE as usize..]);
        let ((journal_bytes, generation), one_damaged) = match (a, b) {
            (Some(x), Some(y)) => (if x.1 >= y.1 { x } else { y }, false),
            (Some(x), None) | (None, Some(x)) => (x, true),
            (None, None) => return Err(damaged("both header slots fail their checksum")),
        };
        let physical = self.lower.len()?;
        s.lower_len = Some(physical);
        let home = HEADER_BYTES + journal_bytes;
        s.journal_bytes = journal_bytes;
        s.generation = generation;
        s.home_len = physical.saturating_sub(home);
        s.len = s.home_len;
        s.durable_len = s.home_len;
        s.durable = Layer::new(s.len);
        s.pending = Layer::new(s.len);
        s.in_place = PageSet::default();
        s.in_place.insert_range(0, s.home_len.div_ceil(PAGE));
        s.zeroed = PageSet::default();
        // A checkpoint that wrote the newer slot and then lost it to damage leaves records of
        // the next generation: they prove that slot's counter.
        let accept = |g: u64| g == generation || (one_damaged && g == generation + 1);
        // The chain first, then its pages: whether its last record counts depends on the
        // pages it placed, and those of a record before the last may have been written over.
        let (mut pos, mut seq, mut chain) = (0u64, 0u64, None);
        loop {
            let want = |g: u64| chain.map_or(accept(g), |c| c == g);
            let Some(record) = self.read_record(s, pos, seq, want)? else {
                break;
            };
            chain = Some(record.generation());
            pos += record.size();
            seq += 1;
        }
        let records = seq;
        let (mut pos, mut seq) = (0u64, 0u64);
        // Pages that records placed whose bytes in place fail their checksum: a checkpoint cut
        // short wrote over them, and a later record holds them (or cut the file below them).
        let mut written_over: Vec<u64> = Vec::new();
        while seq < records {
            let Some(record) = self.read_record(s, pos, seq, |_| true)? else {
                return Err(damaged("a record changed while it was read"));
            };
            let (mut layer, mismatched) = self.apply_record(s, &record)?;
            if seq + 1 == records && !mismatched.is_empty() {
                // The last record's pages did not all reach the disk: its fsync never
                // returned, and no checkpoint ran after it (it would have synced it first).
                break;
            }
            written_over.retain(|&p| !layer.pages.contains_key(&p) && p * PAGE < layer.floor);
            written_over.extend(mismatched);
            s.durable.absorb(&mut layer, s.durable_len, &mut s.spare);
            s.durable_len = record.len();
            s.len = record.len();
            pos += record.size();
            seq += 1;
        }
        if !written_over.is_empty() {
            return Err(damaged(
                "a page a record placed is neither in place nor in a later record",
            ));
        }
        if let Some(g) = chain {
            s.generation = g;
        }
        s.seq = seq;
        s.pos = pos;
        // Records read back may be in the page cache only (the writer was killed before their
        // fsync): the checkpoint syncs them before it puts any page in place.
        s.written = seq;
        s.pending = Layer::new(s.len);
        if seq > 0 && self.writable {
            tracing::info!(target: "mqlite::store", records = seq, "replayed the journal");
            self.checkpoint(s)?;
        } else if seq > 0 && self.shared {
            return Err(io::Error::new(io::ErrorKind::InvalidData, Unrecovered));
        } else if self.writable && !self.shared {
            // Records of this generation may lie past a first one that a power cut tore (both
            // unsynced, landed out of order): this process's records start a new generation,
            // so that none of those can ever join their chain.
            self.next_generation(s)?;
        }
        s.direct = self.shared;
        Ok(())
    }

    /// The record at `pos`, if it is whole (its checksum holds), is number `seq` and belongs
    /// to a generation `want` takes.
    fn read_record(
        &self,
        s: &State,
        pos: u64,
        seq: u64,
        want: impl Fn(u64) -> bool,
    ) -> IoResult<Option<Record>> {
        if pos + PAGE > s.journal_bytes {
            return Ok(None);
        }
        let room = s.journal_bytes - pos;
        let mut bytes = vec![0u8; PAGE as usize];
        self.lower.read(HEADER_BYTES + pos, &mut bytes)?;
        let version = match &bytes[..8] {
            m if *m == RECORD_MAGIC => 3,
            m if *m == RECORD_MAGIC_2 => 2,
            m if *m == RECORD_MAGIC_1 => 1,
            _ => return Ok(None),
        };
        if le_u64(&bytes, 16) != seq {
            return Ok(None);
        }
        let count = le_u32(&bytes, 40) as usize;
        let (fixed, placed) = if version == 3 {
            (RECORD_FIXED, le_u32(&bytes, 48) as usize)
        } else {
            (RECORD_FIXED_2, 0)
        };
        let entry_bytes = if version == 1 {
            8
        } else {
            ENTRY_BYTES as usize
        };
        let lists = (fixed + entry_bytes * count + PLACED_BYTES as usize * placed) as u64;
        if align(lists) > room {
            return Ok(None);
        }
        self.read_more(pos, &mut bytes, align(lists))?;
        let mut record = Record {
            bytes,
            version,
            count,
            placed,
            fixed,
            entry_bytes,
        };
        let mut patched = 0u64;
        for i in 0..count {
            let (_, start, n) = record.entry(i);
            if start + n > PAGE {
                return Ok(None);
            }
            patched += n;
        }
        let size = align(record.images_at() as u64 + patched);
        if size > room {
            return Ok(None);
        }
        self.read_more(pos, &mut record.bytes, size)?;
        let stored = le_u32(&record.bytes, 44);
        record.bytes[44..48].fill(0);
        if crc32c(&[&record.bytes]) != stored {
            return Ok(None);
        }
        let len = record.len();
        if len > MAX_LEN || !want(record.generation()) {
            return Ok(None);
        }
        // Every page it names lies in the file, and every page it placed lies in it whole.
        if (0..count).any(|i| record.entry(i).0 > len / PAGE)
            || (0..placed).any(|i| record.placed(i).0 >= len / PAGE)
        {
            return Ok(None);
        }
        Ok(Some(record))
    }

    /// The pages of `record` over those of the records before it in the chain, which recovery
    /// has gathered in `s.durable` (a record's patches apply to them), and the pages it placed
    /// whose bytes in place fail their checksum: a power cut kept the record and lost the page,
    /// or a checkpoint cut short wrote a later record's image over it.
    fn apply_record(&self, s: &State, record: &Record) -> IoResult<(Layer, Vec<u64>)> {
        let (len, floor) = (record.len(), le_u64(&record.bytes, 32));
        let mut layer = Layer::new(floor.min(len));
        let mut at = record.images_at();
        for i in 0..record.count {
            let (page, start, n) = record.entry(i);
            let (start, n) = (start as usize, n as usize);
            let bytes = &record.bytes[at..at + n];
            at += n;
            let image: Image = if n == PAGE as usize {
                bytes.into()
            } else {
                // The writer patches only pages an earlier record of the chain holds.
                let Some(base) = s.durable.pages.get(&page) else {
                    return Err(damaged("a record patches a page no earlier record holds"));
                };
                let mut image = base.clone();
                image[start..start + n].copy_from_slice(bytes);
                image
            };
            layer.pages.insert(page, image);
        }
        let physical = self.lower.len()?;
        let mut mismatched = Vec::new();
        for i in 0..record.placed {
            let (page, crc) = record.placed(i);
            let offset = s.home() + page * PAGE;
            let mut image = vec![0u8; PAGE as usize].into_boxed_slice();
            if offset + PAGE <= physical {
                self.lower.read(offset, &mut image)?;
            }
            if offset + PAGE > physical || crc32c(&[&image]) != crc {
                mismatched.push(page);
            }
            layer.pages.insert(page, image);
        }
        Ok((layer, mismatched))
    }

    /// Reads the record at `pos` on, from what `record` holds up to `size` bytes.
    fn read_more(&self, pos: u64, record: &mut Vec<u8>, size: u64) -> IoResult<()> {
        let have = record.len();
        if size as usize > have {
            record.resize(size as usize, 0);
            self.lower
                .read(HEADER_BYTES + pos + have as u64, &mut record[have..])?;
        }
        Ok(())
    }

    /// Copies one page as redb would read it now into `out` (whole page).
    fn visible(&self, s: &State, page: u64, out: &mut [u8]) -> IoResult<()> {
        let at = page * PAGE;
        if let Some(img) = s.pending.pages.get(&page) {
            out.copy_from_slice(img);
            return Ok(());
        }
        if at < s.pending.floor {
            if let Some(img) = s.durable.pages.get(&page) {
                if img.is_empty() {
                    // Placed: its bytes are in place.
                    return self.lower.read(s.home() + at, out);
                }
                out.copy_from_slice(img);
                return Ok(());
            }
            if at < s.durable.floor && at < s.home_len {
                let n = (s.home_len - at).min(PAGE) as usize;
                self.lower.read(s.home() + at, &mut out[..n])?;
                out[n..].fill(0);
                return Ok(());
            }
        }
        out.fill(0);
        Ok(())
    }

    fn read_locked(&self, s: &State, offset: u64, out: &mut [u8]) -> IoResult<()> {
        let end = offset + out.len() as u64;
        if end > s.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        let mut at = offset;
        let mut page = vec![0u8; PAGE as usize];
        while at < end {
            let p = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = ((PAGE as usize - in_page) as u64).min(end - at) as usize;
            let dst = (at - offset) as usize;
            // A run of pages that only the file in place holds: one read for all of them.
            let home_limit = s.pending.floor.min(s.durable.floor).min(s.home_len);
            if in_page == 0
                && !s.pending.pages.contains_key(&p)
                && !s.durable.pages.contains_key(&p)
                && at < home_limit
            {
                let mut run_end = at + n as u64;
                while run_end < end
                    && run_end < home_limit
                    && !s.pending.pages.contains_key(&(run_end / PAGE))
                    && !s.durable.pages.contains_key(&(run_end / PAGE))
                {
                    run_end = (run_end + PAGE).min(end);
                }
                let run_end = run_end.min(home_limit);
                let len = (run_end - at) as usize;
                if len >= n {
                    self.lower.read(s.home() + at, &mut out[dst..dst + len])?;
                    at = run_end;
                    continue;
                }
            }
            self.visible(s, p, &mut page)?;
            out[dst..dst + n].copy_from_slice(&page[in_page..in_page + n]);
            at += n as u64;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of the lower file and makes it durable: through the
    /// write-through handle when `through` allows and there is one, else a write and an fsync.
    fn write_synced(&self, offset: u64, data: &[u8], through: bool) -> IoResult<()> {
        if through
            && let Some(handle) = &self.through
            && self.through_works.load(Ordering::Acquire)
        {
            match handle.write_through(offset, data) {
                Ok(()) => return Ok(()),
                // The file system takes the flags at open but not the write (EINVAL, checked
                // before any byte moves): the page cache from now on.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    self.through_works.store(false, Ordering::Release);
                }
                Err(e) => return Err(e),
            }
        }
        self.lower.write(offset, data)?;
        self.lower.sync_data()
    }

    fn fail<T>(s: &mut State, e: io::Error) -> IoResult<T> {
        s.poisoned = true;
        Err(e)
    }

    fn check(s: &State) -> IoResult<()> {
        if s.poisoned {
            return Err(io::Error::other(
                "mqlite journal: an earlier write failed; reopen the database",
            ));
        }
        Ok(())
    }

    /// Appends the pending pages as a record, fsyncing it when `durable` (unless the caller
    /// defers the fsync).
    fn sync_locked(&self, s: &mut State, durable: bool) -> IoResult<()> {
        let sync_now = durable && !self.defer.load(Ordering::Acquire);
        if s.pending.pages.is_empty() && s.len == s.durable_len && s.pending.floor >= s.len {
            // Nothing new to write, but a deferred record may still wait for its fsync: a
            // durable sync covers every record before it.
            if sync_now && s.synced < s.written {
                if let Err(e) = self.lower.sync_data() {
                    return Self::fail(s, e);
                }
                s.synced = s.written;
            }
            return Ok(());
        }
        // Each page as the bytes that differ from its image in an earlier record of this
        // generation, when there is one (redb's header and allocator pages, and pages it frees
        // and reuses): a commit rewrites whole pages but changes a part of each. One run per
        // page, first to last changed byte: one run per change saved 0.7 KiB a record and
        // measured slower.
        let mut patches: Vec<(u64, usize, usize)> = s
            .pending
            .pages
            .iter()
            .map(|(&p, new)| match s.durable.pages.get(&p) {
                Some(old) if !old.is_empty() => {
                    let (start, end) = changed(new, old).unwrap_or((0, 0));
                    (p, start, end)
                }
                // New, or placed (its image is in place, not in memory): whole.
                _ => (p, 0, PAGE as usize),
            })
            .collect();
        patches.sort_unstable_by_key(|&(p, _, _)| p);
        // Pages go in place ahead of a durable record only once every record before it is
        // synced (a lost one would take with it the images that make those pages' bytes in
        // place moot) and the generation has one: with no record, a recovery would take the
        // file's length from the file, which placed pages may have grown.
        let placing = sync_now && s.seq > 0 && s.synced == s.written;
        let place = if placing {
            self.pages_to_place(s, &patches)
        } else {
            Vec::new()
        };
        if !place.is_empty() {
            let mut placed = place.iter().peekable();
            patches.retain(|&(p, _, _)| placed.next_if_eq(&&p).is_none());
        }
        let bytes: u64 = patches
            .iter()
            .map(|&(_, start, end)| (end - start) as u64)
            .sum();
        let lists = RECORD_FIXED as u64
            + ENTRY_BYTES * patches.len() as u64
            + PLACED_BYTES * place.len() as u64;
        let size = align(lists + bytes);
        if size > s.journal_bytes {
            return self.write_in_place(s);
        }
        if s.pos + size > s.journal_bytes {
            self.checkpoint(s)?;
            // The checkpoint emptied the layer the patches were taken against.
            return self.sync_locked(s, durable);
        }
        if !place.is_empty()
            && let Err(e) = self.place(s, &place)
        {
            return Self::fail(s, e);
        }
        let mut buffer = std::mem::take(&mut s.record);
        buffer.clear();
        // Built at a page-aligned address inside the buffer, as a write-through handle needs;
        // the capacity reserved keeps that address while it fills. Only the padding is zeroed.
        buffer.reserve(size as usize + PAGE as usize);
        let at = buffer.as_ptr().align_offset(PAGE as usize);
        buffer.resize(at, 0);
        buffer.extend_from_slice(&RECORD_MAGIC);
        buffer.extend_from_slice(&s.generation.to_le_bytes());
        buffer.extend_from_slice(&s.seq.to_le_bytes());
        buffer.extend_from_slice(&s.len.to_le_bytes());
        buffer.extend_from_slice(&s.pending.floor.to_le_bytes());
        buffer.extend_from_slice(&(patches.len() as u32).to_le_bytes());
        buffer.extend_from_slice(&0u32.to_le_bytes()); // the checksum, below
        buffer.extend_from_slice(&(place.len() as u32).to_le_bytes());
        buffer.extend_from_slice(&0u32.to_le_bytes());
        for &(p, start, end) in &patches {
            buffer.extend_from_slice(&p.to_le_bytes());
            buffer.extend_from_slice(&(start as u32).to_le_bytes());
            buffer.extend_from_slice(&((end - start) as u32).to_le_bytes());
        }
        for p in &place {
            buffer.extend_from_slice(&p.to_le_bytes());
            buffer.extend_from_slice(&crc32c(&[&s.pending.pages[p]]).to_le_bytes());
            buffer.extend_from_slice(&0u32.to_le_bytes());
        }
        for &(p, start, end) in &patches {
            buffer.extend_from_slice(&s.pending.pages[&p][start..end]);
        }
        debug_assert_eq!(buffer.len(), at + lists as usize + bytes as usize);
        buffer.resize(at + size as usize, 0);
        let record = &mut buffer[at..];
        let crc = crc32c(&[record]);
        record[44..48].copy_from_slice(&crc.to_le_bytes());
        let offset = HEADER_BYTES + s.pos;
        // Written through, a record goes out in one write that returns once it is on the
        // disk, which leaves the records before it to the page cache: only when they are
        // synced already (a crash that lost one would end the chain in front of this one).
        // With pages placed, the record goes out as they did, and one fsync makes both
        // durable (a write through would make only its own bytes durable on a disk with FUA).
        let written = if !place.is_empty() {
            self.lower
                .write(offset, record)
                .and_then(|()| self.lower.sync_data())
        } else if sync_now {
            self.write_synced(offset, record, s.synced == s.written)
        } else {
            self.lower.write(offset, record)
        };
        // Kept for the next sync, unless an unusually large one grew it.
        if buffer.capacity() <= RECORD_BUFFER_BYTES {
            s.record = buffer;
        }
        if let Err(e) = written {
            return Self::fail(s, e);
        }
        s.written += 1;
        #[cfg(test)]
        self.placing.lock().clear();
        s.pages_unsynced += patches.len() + place.len();
        if !place.is_empty() {
            // The durable layer keeps an empty image for each: its bytes are in place.
            for &p in &place {
                if let Some(image) = s.pending.pages.insert(p, Image::default()) {
                    s.spare.give(image);
                }
                s.in_place.insert(p);
                s.placed.insert(p);
            }
            s.placed_count += place.len();
            #[cfg(test)]
            self.pages_placed.fetch_add(place.len(), Ordering::Relaxed);
        }
        if sync_now {
            s.synced = s.written;
            self.last_sync_pages
                .store(std::mem::take(&mut s.pages_unsynced), Ordering::Relaxed);
        }
        s.pos += size;
        s.seq += 1;
        if s.pending.floor < s.durable_len {
            let (floor, pending, placed) = (s.pending.floor, &s.pending.pages, &s.placed);
            let hidden =
                s.durable.pages.keys().filter(|&&p| {
                    placed.contains(p) && p * PAGE >= floor && !pending.contains_key(&p)
                });
            s.hidden.extend(hidden);
        }
        s.durable
            .absorb(&mut s.pending, s.durable_len, &mut s.spare);
        s.pending.reset(s.len, &mut s.spare);
        s.durable_len = s.len;
        if sync_now && let Some(hook) = self.on_durable.lock().take() {
            hook();
        }
        Ok(())
    }

    /// Writes the synced pages in place and starts the next generation.
    fn checkpoint(&self, s: &mut State) -> IoResult<()> {
        let result = self.checkpoint_inner(s);
        if result.is_err() {
            s.poisoned = true;
        }
        result
    }

    fn checkpoint_inner(&self, s: &mut State) -> IoResult<()> {
        // A deferred fsync may still be in flight for a durable commit whose write returned,
        // and redb reuses the pages that commit freed at once: pages the state in place still
        // holds. Putting them in place before that record is synced could leave, after a power
        // cut, neither the old state nor the new one (tests/power_cut.rs builds it).
        if s.synced < s.written {
            self.lower.sync_data()?;
            s.synced = s.written;
        }
        if s.durable.floor < s.home_len {
            // The cut frees the blocks from there on.
            s.zeroed.remove_from(s.durable.floor / PAGE);
        }
        let written = self.put_in_place(s, &s.durable, s.durable_len);
        s.lower_len = None;
        s.in_place.extend(written?);
        s.hidden.clear();
        s.home_len = s.durable_len;
        s.durable.reset(s.durable_len, &mut s.spare);
        self.next_generation(s)
    }

    /// Starts the next generation: the older header slot names it, synced before any record
    /// of it is written.
    fn next_generation(&self, s: &mut State) -> IoResult<()> {
        let next = s.generation + 1;
        self.lower
            .write((next % 2) * PAGE, &encode_slot(s.journal_bytes, next))?;
        self.lower.sync_data()?;
        s.generation = next;
        s.seq = 0;
        s.pos = 0;
        s.placed = PageSet::default();
        s.placed_count = 0;
        Ok(())
    }

    /// Writes `layer` over the pages in place, for a file of `len` bytes, and fsyncs: the
    /// file is cut at the layer's floor (the bytes a shrink hid) and grown to `len`, then the
    /// pages go out, consecutive ones in one write; placed pages are in place already (none
    /// lies at or above a floor that cuts the file: see [`Journal::pages_to_place`]). Returns
    /// the pages written.
    fn put_in_place(&self, s: &State, layer: &Layer, len: u64) -> IoResult<Vec<u64>> {
        let home = s.home();
        if layer.floor < s.home_len {
            self.lower.set_len(home + layer.floor)?;
        }
        if layer.floor < s.home_len || s.home_len != len {
            self.lower.set_len(home + len)?;
        }
        for &p in &s.hidden {
            if p * PAGE < len && !layer.pages.contains_key(&p) {
                let n = (len - p * PAGE).min(PAGE) as usize;
                self.lower
                    .write(home + p * PAGE, &[0; PAGE as usize][..n])?;
            }
        }
        let mut pages: Vec<u64> = layer
            .pages
            .iter()
            .filter(|(_, image)| !image.is_empty())
            .map(|(&p, _)| p)
            .collect();
        pages.sort_unstable();
        pages.retain(|&p| p * PAGE < len);
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0;
        for &p in &pages {
            let at = p * PAGE;
            if !run.is_empty() && run_start + run.len() as u64 != at {
                self.lower.write(home + run_start, &run)?;
                run.clear();
            }
            if run.is_empty() {
                run_start = at;
            }
            let n = (len - at).min(PAGE) as usize;
            run.extend_from_slice(&layer.pages[&p][..n]);
        }
        if !run.is_empty() {
            self.lower.write(home + run_start, &run)?;
        }
        self.lower.sync_data()?;
        Ok(pages)
    }

    /// The pages of a durable sync to place instead of carrying them in its record, sorted:
    /// runs of at least `place_min_run` consecutive pages written whole whose bytes in place
    /// no state a recovery can return to reads. That is a page not `in_place` that no record
    /// of this generation holds (no state ever had bytes there: its bytes are zeros, or those
    /// of a placement a power cut tore, never read), or one an earlier record of this
    /// generation holds (the chain brings its bytes back). A page placed before in this
    /// generation is not placed again, even once a later record holds it: the record that
    /// placed it checks its bytes in place. A page at or above a floor that cuts
    /// the file at the next checkpoint is not placed either (the cut would take its bytes).
    fn pages_to_place(&self, s: &State, patches: &[(u64, usize, usize)]) -> Vec<u64> {
        let floor = s.durable.floor.min(s.pending.floor);
        let limit = if floor < s.home_len { floor } else { s.len };
        let fits = |p: u64, start: usize, end: usize| {
            (start, end) == (0, PAGE as usize)
                && (p + 1) * PAGE <= limit.min(s.len)
                && !s.placed.contains(p)
                && match s.durable.pages.get(&p) {
                    Some(_) => true,
                    None => !s.in_place.contains(p),
                }
        };
        let mut room = PLACED_LIMIT_PAGES.saturating_sub(s.placed_count);
        let mut place = Vec::new();
        let mut run: Vec<u64> = Vec::new();
        let mut take = |run: &mut Vec<u64>| {
            if run.len() >= self.place_min_run && run.len() <= room {
                room -= run.len();
                place.append(run);
            }
            run.clear();
        };
        for &(p, start, end) in patches {
            if !fits(p, start, end) {
                take(&mut run);
                continue;
            }
            if run.last().is_some_and(|&last| last + 1 != p) {
                take(&mut run);
            }
            run.push(p);
        }
        take(&mut run);
        place
    }

    /// Writes the pending images of `place` (sorted) in place, consecutive ones in one write,
    /// after the blocks under them were written (see [`Journal::prepare`]); the fsync after
    /// their record makes them durable. They go through the page cache, where the consumers
    /// that read them soon find them: written past it (`O_DIRECT`), W3's harness gained 5-7 %,
    /// and a first read of 44 MB of them took 2.4 times as long (2026-12-07).
    fn place(&self, s: &mut State, place: &[u64]) -> IoResult<()> {
        // The pages and zeros go within the file's new length, which a backend may need set
        // before a write past its end (a recovery cuts the file back if the record is torn).
        let want = s.home() + s.len;
        let known = match s.lower_len {
            Some(len) => len,
            None => self.lower.len()?,
        };
        if known < want {
            self.lower.set_len(want)?;
        }
        s.lower_len = Some(known.max(want));
        self.prepare(s, place)?;
        #[cfg(test)]
        {
            let mut placing = self.placing.lock();
            placing.clear();
            placing.extend_from_slice(place);
        }
        // Gathered in the record's buffer, which the record takes over next.
        let mut buffer = std::mem::take(&mut s.record);
        for run in place.chunk_by(|a, b| a + 1 == *b) {
            buffer.clear();
            for p in run {
                buffer.extend_from_slice(&s.pending.pages[p]);
            }
            self.lower.write(s.home() + run[0] * PAGE, &buffer)?;
        }
        s.record = buffer;
        Ok(())
    }

    /// For each run of `place` (sorted) with a page whose blocks are not written yet, writes
    /// zeros over the pages neither `in_place` nor zeroed from the run's first page to a little
    /// past its last, within the file, and fsyncs: pages placed where the file system has no
    /// blocks yet cost it the blocks' allocation at the fsync (W3's harness: 1.57-1.80 M msg/s
    /// into holes, 1.83-2.00 M with the zeros). No state reads those pages' bytes in place (see
    /// [`Journal::pages_to_place`]).
    fn prepare(&self, s: &mut State, place: &[u64]) -> IoResult<()> {
        const PIECE: u64 = 256;
        let ready = |s: &State, p: u64| s.in_place.contains(p) || s.zeroed.contains(p);
        let mut zeros = Vec::new();
        let mut written = false;
        for run in place.chunk_by(|a, b| a + 1 == *b) {
            let (first, last) = (run[0], run[run.len() - 1]);
            if run.iter().all(|&p| ready(s, p)) {
                continue;
            }
            let to = ((last * PAGE + PAGE + ZERO_AHEAD_BYTES).min(s.len) / PAGE).max(last + 1);
            zeros.resize((PIECE * PAGE) as usize, 0);
            let mut page = first;
            while page < to {
                if ready(s, page) {
                    page += 1;
                    continue;
                }
                let mut n = 1;
                while n < PIECE && page + n < to && !ready(s, page + n) {
                    n += 1;
                }
                self.lower
                    .write(s.home() + page * PAGE, &zeros[..(n * PAGE) as usize])?;
                s.zeroed.insert_range(page, page + n);
                written = true;
                page += n;
            }
        }
        if written {
            self.lower.sync_data()?;
        }
        Ok(())
    }

    /// A sync too large for the journal: checkpoint, then write the pages in place, as redb
    /// does on a plain file (it recovers from a crash in the middle by its own checksums).
    fn write_in_place(&self, s: &mut State) -> IoResult<()> {
        // With no record since the last checkpoint (or the open), the pages in place are
        // already the synced state: a checkpoint would only cost two fsyncs.
        if s.seq > 0 {
            self.checkpoint(s)?;
        }
        if s.pending.floor < s.home_len {
            s.zeroed.remove_from(s.pending.floor / PAGE);
        }
        let written = self.put_in_place(s, &s.pending, s.len);
        s.lower_len = None;
        match written {
            Ok(written) => s.in_place.extend(written),
            Err(e) => return Self::fail(s, e),
        }
        self.last_sync_pages
            .store(s.pages_unsynced + s.pending.pages.len(), Ordering::Relaxed);
        s.pages_unsynced = 0;
        s.home_len = s.len;
        s.durable_len = s.len;
        s.durable.reset(s.len, &mut s.spare);
        s.pending.reset(s.len, &mut s.spare);
        Ok(())
    }
}

/// The journal as the database holds it beside redb, for a durable commit that releases redb's
/// write lock before its fsync: the flush of relaxed commits, which would otherwise hold up
/// every writer for the length of an fsync.
pub(crate) trait Deferred: Send + Sync + std::fmt::Debug {
    /// While on, a sync writes its record and leaves the fsync to [`Deferred::fsync`].
    fn defer_fsync(&self, on: bool);
    /// Calls `hook` once, as soon as the next durable record is on the disk (`None` takes a
    /// hook that has not run back).
    fn on_durable(&self, hook: Option<Hook>);
    /// Makes every record written so far durable. Holds no lock across the fsync, so commits
    /// go on meanwhile (their records are covered by the next one).
    fn fsync(&self) -> IoResult<()>;
    /// The pages (4 KiB) in the records of the last sync that wrote one and fsynced it, with
    /// those written without an fsync since the sync before: about the size of the last
    /// durable commit. A deferred fsync ([`Deferred::fsync`]) leaves it; 0 before the first.
    fn last_sync_pages(&self) -> usize;
}

impl<B: StorageBackend> Deferred for Journal<B> {
    fn defer_fsync(&self, on: bool) {
        self.defer.store(on, Ordering::Release);
    }

    fn on_durable(&self, hook: Option<Hook>) {
        *self.on_durable.lock() = hook;
    }

    fn last_sync_pages(&self) -> usize {
        self.last_sync_pages.load(Ordering::Relaxed)
    }

    fn fsync(&self) -> IoResult<()> {
        let target = {
            let s = self.state.read();
            Self::check(&s)?;
            if s.synced >= s.written {
                return Ok(());
            }
            s.written
        };
        let synced = self.lower.sync_data();
        let mut s = self.state.write();
        match synced {
            Ok(()) => {
                s.synced = s.synced.max(target);
                Ok(())
            }
            // After a failed fsync the kernel may have dropped the pages: trust nothing
            // written since the last good one (redb reopens, which recovers from the file).
            Err(e) => Self::fail(&mut s, e),
        }
    }
}

impl<B: StorageBackend> StorageBackend for Journal<B> {
    fn len(&self) -> IoResult<u64> {
        self.ensure()?;
        let s = self.state.read();
        if s.direct {
            return Ok(self.lower.len()?.saturating_sub(s.home()));
        }
        Ok(s.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> IoResult<()> {
        self.ensure()?;
        let s = self.state.read();
        if s.direct {
            return self.lower.read(s.home() + offset, out);
        }
        self.read_locked(&s, offset, out)
    }

    fn set_len(&self, len: u64) -> IoResult<()> {
        self.ensure()?;
        let mut s = self.state.write();
        Self::check(&s)?;
        if s.direct {
            return self.lower.set_len(s.home() + len);
        }
        if len < s.len {
            s.pending.pages.retain(|&p, _| p * PAGE < len);
            if !len.is_multiple_of(PAGE) {
                // The page the file now ends in keeps its head and reads zeros after it.
                let p = len / PAGE;
                let mut img = s.spare.take();
                self.visible(&s, p, &mut img)?;
                img[(len % PAGE) as usize..].fill(0);
                s.pending.pages.insert(p, img);
            }
            s.pending.floor = s.pending.floor.min(len);
        }
        s.len = len;
        Ok(())
    }

    fn sync_data(&self) -> IoResult<()> {
        self.ensure()?;
        let mut s = self.state.write();
        Self::check(&s)?;
        if s.direct {
            return self.lower.sync_data();
        }
        self.sync_locked(&mut s, true)
    }

    fn write(&self, offset: u64, data: &[u8]) -> IoResult<()> {
        self.ensure()?;
        let mut s = self.state.write();
        Self::check(&s)?;
        if s.direct {
            return self.lower.write(s.home() + offset, data);
        }
        let end = offset + data.len() as u64;
        let mut at = offset;
        while at < end {
            let p = at / PAGE;
            let in_page = (at % PAGE) as usize;
            let n = ((PAGE as usize - in_page) as u64).min(end - at) as usize;
            let src = (at - offset) as usize;
            if let Some(img) = s.pending.pages.get_mut(&p) {
                img[in_page..in_page + n].copy_from_slice(&data[src..src + n]);
            } else if n == PAGE as usize {
                let mut img = s.spare.take();
                img.copy_from_slice(&data[src..src + n]);
                s.pending.pages.insert(p, img);
            } else {
                let mut img = s.spare.take();
                self.visible(&s, p, &mut img)?;
                img[in_page..in_page + n].copy_from_slice(&data[src..src + n]);
                s.pending.pages.insert(p, img);
            }
            at += n as u64;
        }
        s.len = s.len.max(end);
        if s.pending.pages.len() > PENDING_LIMIT_PAGES {
            // Unsynced writes beyond the budget go to the journal without an fsync: a crash
            // keeps a prefix of them, as it may on a plain file.
            self.sync_locked(&mut s, false)?;
        }
        Ok(())
    }

    fn close(&self) -> IoResult<()> {
        let result = if self.writable && self.ready.load(Ordering::Acquire) {
            let mut s = self.state.write();
            if s.poisoned || s.direct {
                Ok(())
            } else {
                self.sync_locked(&mut s, true).and_then(|()| {
                    if s.seq > 0 {
                        self.checkpoint(&mut s)
                    } else {
                        Ok(())
                    }
                })
            }
        } else {
            Ok(())
        };
        let closed = self.lower.close();
        result.and(closed)
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.lower.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.lower.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.lower.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.lower.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.lower.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.lower.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use redb::backends::InMemoryBackend;

    use super::*;
    use crate::store::Storage;
    use crate::testing::xorshift;

    type Disk = Arc<dyn StorageBackend>;

    fn disk() -> Disk {
        Arc::new(InMemoryBackend::new())
    }

    fn create(d: &Disk, bytes: u64) -> Journal<Storage> {
        Journal::create(Storage::shared(d.clone()), bytes).unwrap()
    }

    /// A reopen without a close: what a crash leaves (the memory backend keeps every write).
    fn reopen(d: &Disk) -> Journal<Storage> {
        Journal::open(Storage::shared(d.clone()), true, false)
    }

    fn contents(j: &impl StorageBackend) -> Vec<u8> {
        let mut out = vec![0u8; j.len().unwrap() as usize];
        j.read(0, &mut out).unwrap();
        out
    }

    fn state(j: &Journal<Storage>) -> (u64, u64, usize) {
        let s = j.state.read();
        (s.generation, s.seq, s.durable.pages.len())
    }

    #[test]
    fn synced_writes_survive_a_crash_and_unsynced_ones_do_not() {
        let d = disk();
        let j = create(&d, 64 * PAGE);
        j.set_len(3 * PAGE).unwrap();
        j.write(100, b"hello").unwrap();
        j.write(PAGE - 2, b"across").unwrap();
        j.sync_data().unwrap();
        j.write(2 * PAGE, b"lost").unwrap();
        assert_eq!(&contents(&j)[2 * PAGE as usize..][..4], b"lost");
        let after = reopen(&d);
        let bytes = contents(&after);
        assert_eq!(bytes.len() as u64, 3 * PAGE);
        assert_eq!(&bytes[100..105], b"hello");
        assert_eq!(&bytes[PAGE as usize - 2..][..6], b"across");
        assert_eq!(&bytes[2 * PAGE as usize..][..4], [0; 4]);
        // The first open started generation 2; the reopen replayed its one record and
        // checkpointed it: generation 3, nothing pending.
        assert_eq!(state(&after), (3, 0, 0));
    }

    #[test]
    fn the_durable_hook_runs_once_when_a_record_is_on_the_disk() {
        use std::sync::atomic::AtomicUsize;
        let d = disk();
        let j = create(&d, 64 * PAGE);
        let runs = Arc::new(AtomicUsize::new(0));
        let hook: Hook = {
            let runs = runs.clone();
            Arc::new(move || {
                runs.fetch_add(1, Ordering::SeqCst);
            })
        };
        j.on_durable(Some(hook));
        j.set_len(PAGE).unwrap();
        j.write(0, b"x").unwrap();
        // A record whose fsync its caller makes later is not on the disk yet.
        j.defer_fsync(true);
        j.sync_data().unwrap();
        j.defer_fsync(false);
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        j.write(1, b"y").unwrap();
        j.sync_data().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        j.write(2, b"z").unwrap();
        j.sync_data().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1, "once");
    }

    /// A journal on a real file, with the write-through handle when the file system has one.
    #[cfg(target_os = "linux")]
    fn on_file(path: &std::path::Path, through: bool) -> Journal<Storage> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let handle = if through {
            open_write_through(path, &file)
        } else {
            None
        };
        let plain = Storage::owned(redb::backends::FileBackend::new(file).unwrap());
        Journal::open(plain, true, false).with_write_through(handle)
    }

    /// A new journaled file with a 64-page region, in `dir`.
    #[cfg(target_os = "linux")]
    fn journaled_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
        let path = dir.path().join("journaled");
        let file = std::fs::File::create_new(&path).unwrap();
        let plain = Storage::owned(redb::backends::FileBackend::new(file).unwrap());
        drop(Journal::create(plain, 64 * PAGE).unwrap());
        path
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn records_written_through_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = journaled_file(&dir);
        let j = on_file(&path, true);
        // tempfile's directory is on the project's disk, which takes direct I/O; on one
        // that does not, this checks the fallback instead.
        let through = j.through.is_some();
        j.set_len(2 * PAGE).unwrap();
        j.write(10, b"first").unwrap();
        j.sync_data().unwrap();
        j.write(PAGE + 10, b"second").unwrap();
        j.sync_data().unwrap();
        {
            let s = j.state.read();
            assert_eq!((s.seq, s.written, s.synced), (2, 2, 2));
        }
        assert_eq!(j.through_works.load(Ordering::Acquire), through);
        // A crash: the handle goes without a close, and a plain open reads the records back
        // through the page cache.
        drop(j);
        let after = on_file(&path, false);
        let bytes = contents(&after);
        assert_eq!(&bytes[10..15], b"first");
        assert_eq!(&bytes[PAGE as usize + 10..][..6], b"second");
        assert_eq!(state(&after).1, 0, "replayed and checkpointed");
    }

    /// Syncs that place pages past the file's end grow it without asking it for its length:
    /// asking (`fstat`) would make Linux write the inode at the next fdatasync (see
    /// `State::lower_len`). It is asked at the open, and once after a checkpoint.
    #[test]
    fn syncs_that_grow_the_file_do_not_ask_it_for_its_length() {
        let disk = Arc::new(Volatile::default());
        drop(Journal::create(Storage::shared(disk.clone()), 256 * PAGE).unwrap());
        let j = Journal::open(Storage::shared(disk.clone()), true, false)
            .with_write_through(Some(disk.clone()));
        j.set_len(PAGE).unwrap();
        j.write(0, b"first").unwrap();
        j.sync_data().unwrap();
        let asked = disk.0.lock().lens;
        let generation = j.state.read().generation;
        let mut expected = contents(&j);
        for i in 0..20u8 {
            let run = vec![i + 1; 8 * PAGE as usize];
            let end = j.len().unwrap();
            j.write(end, &run).unwrap();
            j.sync_data().unwrap();
            expected.extend_from_slice(&run);
        }
        assert_eq!(j.pages_placed.load(Ordering::Relaxed), 160);
        assert_eq!(
            j.state.read().generation,
            generation,
            "no checkpoint in between"
        );
        assert_eq!(disk.0.lock().lens, asked);
        j.checkpoint(&mut j.state.write()).unwrap();
        let end = j.len().unwrap();
        j.write(end, &[9; 8 * PAGE as usize]).unwrap();
        j.sync_data().unwrap();
        j.write(end + 8 * PAGE, &[10; 8 * PAGE as usize]).unwrap();
        j.sync_data().unwrap();
        assert_eq!(disk.0.lock().lens, asked + 1, "once after the checkpoint");
        expected.extend_from_slice(&[9; 8 * PAGE as usize]);
        expected.extend_from_slice(&[10; 8 * PAGE as usize]);
        drop(j);
        let after = Journal::open(Storage::shared(disk.clone()), false, false);
        assert_eq!(contents(&after), expected);
    }

    /// On a real file: a run of new pages is placed, its record names it, and a crash (no
    /// close) recovers it; a placed page whose bytes in place are not what its record names
    /// ends the chain before that record.
    #[cfg(target_os = "linux")]
    #[test]
    fn pages_placed_on_a_file_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = journaled_file(&dir);
        let j = on_file(&path, true);
        j.set_len(PAGE).unwrap();
        j.write(0, b"first").unwrap();
        j.sync_data().unwrap();
        // Twelve new pages, written whole: placed, the first record of the generation aside.
        let run: Vec<u8> = (0..12 * PAGE).map(|i| (i / PAGE) as u8 + 1).collect();
        j.write(PAGE, &run).unwrap();
        j.write(0, b"again").unwrap();
        j.sync_data().unwrap();
        assert_eq!(j.pages_placed.load(Ordering::Relaxed), 12);
        {
            // The record carries page 0 only; the placed pages are read back from their place.
            let s = j.state.read();
            assert_eq!(s.durable.pages.len(), 13);
            assert_eq!(
                s.durable.pages.values().filter(|i| i.is_empty()).count(),
                12
            );
        }
        assert_eq!(&contents(&j)[PAGE as usize..], &run[..]);
        drop(j);
        let after = on_file(&path, false);
        let bytes = contents(&after);
        assert_eq!(&bytes[..5], b"again");
        assert_eq!(&bytes[PAGE as usize..], &run[..]);
        assert_eq!(state(&after).1, 0, "replayed and checkpointed");
        drop(after);
        let j = on_file(&path, true);
        j.write(0, b"fourth").unwrap();
        j.sync_data().unwrap();
        j.write(13 * PAGE, &run[..8 * PAGE as usize]).unwrap();
        j.sync_data().unwrap();
        assert_eq!(j.pages_placed.load(Ordering::Relaxed), 8);
        drop(j);
        // One of those eight pages is not what the record names: the record is the chain's
        // last, so it was never acknowledged, and recovery ends the chain before it.
        let home = HEADER_BYTES + 64 * PAGE; // journaled_file's region
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
            b"torn",
            home + 14 * PAGE + 100,
        )
        .unwrap();
        let bytes = contents(&on_file(&path, false));
        assert_eq!(bytes.len() as u64, 13 * PAGE, "the last record was dropped");
        assert_eq!(&bytes[..6], b"fourth");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn no_write_through_handle_on_a_file_renamed_over_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let (path, other) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&path, b"a").unwrap();
        std::fs::write(&other, b"b").unwrap();
        let opened = std::fs::File::open(&path).unwrap();
        assert!(open_write_through(&path, &opened).is_some());
        std::fs::rename(&other, &path).unwrap();
        assert!(open_write_through(&path, &opened).is_none());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_refused_write_through_falls_back_to_write_and_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let path = journaled_file(&dir);
        let j = on_file(&path, true);
        if j.through.is_none() {
            // No direct I/O on this file system: the open already chose the fallback.
            return;
        }
        // Direct I/O refuses a length that is not a multiple of the block size (EINVAL).
        j.write_synced(HEADER_BYTES, b"odd length", true).unwrap();
        assert!(!j.through_works.load(Ordering::Acquire));
        let mut back = [0u8; 10];
        j.lower.read(HEADER_BYTES, &mut back).unwrap();
        assert_eq!(&back, b"odd length");
    }

    #[test]
    fn version_1_records_are_replayed() {
        let d = disk();
        drop(create(&d, 64 * PAGE)); // generation 1, never opened
        // A record as builds before patches wrote it: the page list padded to a page, then
        // each image whole.
        let mut record = vec![0u8; 2 * PAGE as usize];
        record[..8].copy_from_slice(&RECORD_MAGIC_1);
        record[8..16].copy_from_slice(&1u64.to_le_bytes()); // generation; sequence 0
        record[24..32].copy_from_slice(&PAGE.to_le_bytes()); // length; floor 0
        record[40..44].copy_from_slice(&1u32.to_le_bytes()); // one page: page 0
        record[PAGE as usize..][..5].copy_from_slice(b"v1-ok");
        let crc = crc32c(&[&record]);
        record[44..48].copy_from_slice(&crc.to_le_bytes());
        d.write(HEADER_BYTES, &record).unwrap();
        let j = reopen(&d);
        assert_eq!(&contents(&j)[..5], b"v1-ok");
        // Replayed and checkpointed: the page is in place.
        assert_eq!(state(&j), (2, 0, 0));
    }

    #[test]
    fn records_past_a_torn_first_record_never_join_a_later_chain() {
        let d = disk();
        let j = create(&d, 64 * PAGE);
        j.set_len(PAGE).unwrap();
        j.write(0, b"old-0").unwrap();
        j.sync_data().unwrap(); // the page whole: two pages of journal
        j.write(0, b"old-1").unwrap();
        j.sync_data().unwrap(); // a patch of it, at two pages in
        // The power went with the first record torn and the second whole (say both were
        // unsynced and landed out of order).
        d.write(HEADER_BYTES + 100, b"x").unwrap();
        let j = reopen(&d);
        assert!(contents(&j).is_empty());
        // The next first record is as large as the torn one, so the stale second record
        // follows it where a second record of its chain would.
        j.set_len(PAGE).unwrap();
        j.write(0, b"new-0").unwrap();
        j.sync_data().unwrap();
        assert_eq!(&contents(&reopen(&d))[..5], b"new-0");
    }

    #[test]
    fn a_close_checkpoints_and_the_pages_are_in_place() {
        let d = disk();
        let j = create(&d, 64 * PAGE);
        j.set_len(2 * PAGE).unwrap();
        j.write(PAGE, &[7u8; 4096]).unwrap();
        j.sync_data().unwrap();
        j.close().unwrap();
        let home = HEADER_BYTES + 64 * PAGE;
        assert_eq!(d.len().unwrap(), home + 2 * PAGE);
        let mut page = vec![0u8; PAGE as usize];
        d.read(home + PAGE, &mut page).unwrap();
        assert_eq!(page, vec![7u8; 4096]);
        assert_eq!(contents(&reopen(&d))[PAGE as usize..], page[..]);
    }

    #[test]
    fn a_shrink_then_growth_reads_zeros_before_and_after_recovery() {
        let d = disk();
        let j = create(&d, 64 * PAGE);
        j.set_len(4 * PAGE).unwrap();
        j.write(0, &vec![9u8; 4 * PAGE as usize]).unwrap();
        j.sync_data().unwrap();
        j.close().unwrap();
        let j = reopen(&d);
        j.set_len(PAGE + 10).unwrap();
        j.set_len(4 * PAGE).unwrap();
        j.sync_data().unwrap();
        let mut want = vec![9u8; PAGE as usize + 10];
        want.resize(4 * PAGE as usize, 0);
        assert_eq!(contents(&j), want);
        assert_eq!(contents(&reopen(&d)), want);
    }

    #[test]
    fn a_full_journal_is_checkpointed_and_a_record_larger_than_it_goes_in_place() {
        let d = disk();
        let j = create(&d, 8 * PAGE);
        j.set_len(16 * PAGE).unwrap();
        for round in 0..20u8 {
            j.write(u64::from(round % 16) * PAGE, &[round; 4096])
                .unwrap();
            j.sync_data().unwrap();
        }
        // Each record is two pages: four fit, so twenty syncs made several checkpoints.
        assert!(state(&j).0 > 4, "{:?}", state(&j));
        j.write(0, &vec![0xAB; 12 * PAGE as usize]).unwrap();
        j.sync_data().unwrap();
        let bytes = contents(&reopen(&d));
        assert!(bytes[..12 * PAGE as usize].iter().all(|&b| b == 0xAB));
        // Pages 12 to 15 were last written in rounds 12 to 15.
        for p in 12..16u8 {
            assert!(
                bytes[usize::from(p) * PAGE as usize..][..PAGE as usize]
                    .iter()
                    .all(|&b| b == p)
            );
        }
    }

    #[test]
    fn records_of_an_old_generation_and_damaged_records_are_ignored() {
        let d = disk();
        let j = create(&d, 64 * PAGE);
        j.set_len(PAGE).unwrap();
        j.write(0, b"first").unwrap();
        j.sync_data().unwrap();
        j.close().unwrap(); // checkpointed: the record at the journal's start is stale now
        let j = reopen(&d);
        j.write(0, b"again").unwrap();
        j.sync_data().unwrap();
        j.write(0, b"third").unwrap();
        j.sync_data().unwrap();
        // Damage the second record: recovery keeps the first and stops there.
        // The first record holds the page whole (two pages of journal), the second patches it.
        let second = HEADER_BYTES + 2 * PAGE;
        d.write(second + RECORD_FIXED as u64 + ENTRY_BYTES, b"x")
            .unwrap();
        assert_eq!(&contents(&reopen(&d))[..5], b"again");
    }

    #[test]
    fn a_damaged_newer_header_slot_is_proved_by_the_records_after_it() {
        let d = disk();
        let j = create(&d, 64 * PAGE); // generation 1, in slot 1
        j.set_len(PAGE).unwrap();
        j.write(0, b"one").unwrap();
        j.sync_data().unwrap();
        j.close().unwrap(); // generation 2, in slot 0
        let j = reopen(&d);
        j.write(0, b"two").unwrap();
        j.sync_data().unwrap(); // a record of generation 2
        d.write(40, b"\xff").unwrap(); // slot 0 fails its checksum
        let after = reopen(&d);
        assert_eq!(&contents(&after)[..3], b"two");
        // Both slots damaged: refused, not guessed.
        d.write(PAGE + 40, b"\xff").unwrap();
        let err = Journal::open(Storage::shared(d.clone()), false, false)
            .len()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// The changed run of a page against every single-byte and two-byte difference, at word
    /// edges and inside words, checked against a byte-by-byte scan.
    #[test]
    fn changed_finds_the_first_and_last_differing_bytes() {
        let old = vec![0x5au8; PAGE as usize];
        assert_eq!(changed(&old, &old), None);
        let naive = |new: &[u8]| {
            let first = (0..new.len()).find(|&i| new[i] != old[i])?;
            let last = (0..new.len()).rev().find(|&i| new[i] != old[i])?;
            Some((first, last + 1))
        };
        let spots = [0, 1, 7, 8, 9, 63, 64, 2047, 2048, 4088, 4094, 4095];
        for &a in &spots {
            for &b in &spots {
                let mut new = old.clone();
                new[a] ^= 1;
                new[b] ^= 0x80;
                assert_eq!(
                    changed(&new, &old),
                    naive(&new),
                    "bytes {a} and {b} changed"
                );
            }
        }
    }

    /// A disk with a volatile write cache, for power cuts. Reads see every write. A cut keeps
    /// the image as of the last fsync and then, in order, each later write dropped, kept or
    /// torn at 512-byte sectors; a write through the second handle ([`WriteThrough`]) was on
    /// the disk when it returned, and made nothing else durable. Once the power is gone,
    /// every operation fails.
    #[derive(Debug, Default)]
    struct Volatile(Mutex<Cache>);

    #[derive(Debug, Default)]
    struct Cache {
        synced: Vec<u8>,
        live: Vec<u8>,
        /// Writes since the last fsync, and whether each went through.
        since: Vec<(u64, Vec<u8>, bool)>,
        /// Operations left before the power goes; `None`: it stays on.
        power_for: Option<u64>,
        writes_through: u64,
        /// Times the file was asked for its length.
        lens: u64,
    }

    fn put(image: &mut Vec<u8>, offset: u64, data: &[u8], keep: impl Fn(usize) -> bool) {
        let at = offset as usize;
        if image.len() < at + data.len() {
            image.resize(at + data.len(), 0);
        }
        for (i, sector) in data.chunks(512).enumerate() {
            if keep(i) {
                image[at + i * 512..][..sector.len()].copy_from_slice(sector);
            }
        }
    }

    impl Volatile {
        fn on(image: Vec<u8>) -> Arc<Volatile> {
            let disk = Volatile::default();
            {
                let mut c = disk.0.lock();
                c.live.clone_from(&image);
                c.synced = image;
            }
            Arc::new(disk)
        }

        /// Runs one operation, unless the power is gone.
        fn op<T>(&self, f: impl FnOnce(&mut Cache) -> T) -> IoResult<T> {
            let mut c = self.0.lock();
            match &mut c.power_for {
                Some(0) => return Err(io::Error::other("the power is gone")),
                Some(n) => *n -= 1,
                None => {}
            }
            Ok(f(&mut c))
        }

        /// What the disk holds after a power cut now; `fate(n)` picks from `0..n`.
        fn after_cut(&self, fate: &mut impl FnMut(u64) -> u64) -> Vec<u8> {
            let c = self.0.lock();
            let mut image = c.synced.clone();
            for (offset, data, through) in &c.since {
                let keep: Vec<bool> = match if *through { 1 } else { fate(3) } {
                    0 => continue,
                    1 => vec![true; data.len().div_ceil(512)],
                    _ => (0..data.len().div_ceil(512))
                        .map(|_| fate(2) == 0)
                        .collect(),
                };
                put(&mut image, *offset, data, |i| keep[i]);
            }
            image
        }
    }

    impl StorageBackend for Volatile {
        fn len(&self) -> IoResult<u64> {
            self.op(|c| {
                c.lens += 1;
                c.live.len() as u64
            })
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> IoResult<()> {
            self.op(|c| out.copy_from_slice(&c.live[offset as usize..][..out.len()]))
        }

        fn set_len(&self, len: u64) -> IoResult<()> {
            self.op(|c| c.live.resize(len as usize, 0))
        }

        fn sync_data(&self) -> IoResult<()> {
            self.op(|c| {
                c.synced.clone_from(&c.live);
                c.since.clear();
            })
        }

        fn write(&self, offset: u64, data: &[u8]) -> IoResult<()> {
            self.op(|c| {
                put(&mut c.live, offset, data, |_| true);
                c.since.push((offset, data.to_vec(), false));
            })
        }
    }

    impl WriteThrough for Arc<Volatile> {
        fn write_through(&self, offset: u64, data: &[u8]) -> IoResult<()> {
            self.op(|c| {
                put(&mut c.live, offset, data, |_| true);
                c.since.push((offset, data.to_vec(), true));
                c.writes_through += 1;
            })
        }
    }

    /// What [`power_cuts`] counted: cuts, records written through, durable syncs after
    /// deferred ones, and pages placed.
    struct Cuts {
        cuts: u32,
        through: u64,
        after_deferred: u32,
        placed: usize,
    }

    /// The pages where `a` and `b` differ.
    fn differing_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
        let pages = a.chunks(PAGE as usize).zip(b.chunks(PAGE as usize));
        pages
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(p, _)| p)
            .collect()
    }

    /// Whether `found` is `state`, but for pages of `placing` where `state` holds zeros: the
    /// pages a sync cut short may have placed, which no state had written.
    fn same_but_placed(found: &[u8], state: &[u8], placing: &[u64]) -> bool {
        found.len() == state.len()
            && found
                .chunks(PAGE as usize)
                .zip(state.chunks(PAGE as usize))
                .enumerate()
                .all(|(p, (f, s))| {
                    f == s || (placing.contains(&(p as u64)) && s.iter().all(|&b| b == 0))
                })
    }

    /// Durable syncs, deferred ones and their fsyncs, checkpoints and closes, with records
    /// written through (and pages placed, in runs of `place_min_run`), and power cuts between
    /// operations and inside them: what recovery finds is the last acknowledged state or a
    /// record written after it, never less, but for zeros of pages a sync cut short placed.
    fn power_cuts(seed: u64, place_min_run: usize) -> Cuts {
        let mut next = xorshift(seed);
        let open = |disk: &Arc<Volatile>| {
            let mut j = Journal::open(Storage::shared(disk.clone()), true, false)
                .with_write_through(Some(disk.clone()));
            j.place_min_run = place_min_run;
            j
        };
        let mut disk = Arc::new(Volatile::default());
        drop(Journal::create(Storage::shared(disk.clone()), 16 * PAGE).unwrap());
        let mut j = open(&disk);
        // The contents as last acknowledged durable; those of each record written since.
        let (mut acked, mut since, mut live) = (Vec::new(), Vec::<Vec<u8>>::new(), Vec::new());
        let (mut cuts, mut through, mut after_deferred, mut placed) = (0, 0, 0, 0);
        for _ in 0..20_000 {
            let op = next(16);
            let done = match op {
                0..=6 if !live.is_empty() => {
                    let at = next(live.len() as u64) as usize;
                    let end = (at + 1 + next(2 * PAGE) as usize).min(live.len());
                    let byte = next(255) as u8 + 1;
                    live[at..end].fill(byte);
                    j.write(at as u64, &live[at..end])
                }
                7 => {
                    let len = next(10 * PAGE) as usize;
                    live.resize(len, 0);
                    j.set_len(len as u64)
                }
                8..=10 => {
                    let deferred_before = !since.is_empty();
                    since.push(live.clone());
                    let synced = j.sync_data();
                    if synced.is_ok() {
                        after_deferred += u32::from(deferred_before);
                        acked = since.pop().unwrap_or_default();
                        since.clear();
                    }
                    synced
                }
                11 | 12 => {
                    since.push(live.clone());
                    j.defer_fsync(true);
                    let written = j.sync_data();
                    j.defer_fsync(false);
                    written
                }
                13 => {
                    let synced = Deferred::fsync(&j);
                    if synced.is_ok()
                        && let Some(last) = since.pop()
                    {
                        acked = last;
                        since.clear();
                    }
                    synced
                }
                14 => {
                    // The power goes within the next few operations of the disk.
                    disk.0.lock().power_for = Some(next(8));
                    Ok(())
                }
                _ => {
                    since.push(live.clone());
                    let closed = j.close();
                    if closed.is_ok() {
                        acked = live.clone();
                        since.clear();
                    }
                    // A close ends the handle: open the file again.
                    disk.0.lock().power_for.get_or_insert(0);
                    Err(io::Error::other("closed"))
                }
            };
            if done.is_ok() && next(40) != 0 {
                // Reads of pages in place count as operations of the disk too.
                let mut out = vec![0u8; live.len()];
                if j.len().and_then(|_| j.read(0, &mut out)).is_ok() {
                    assert_eq!(out, live);
                    continue;
                }
            }
            // The power goes now (or went inside the operation): recover from what the disk kept.
            cuts += 1;
            through += disk.0.lock().writes_through;
            placed += j.pages_placed.load(Ordering::Relaxed);
            let placing = std::mem::take(&mut *j.placing.lock());
            disk = Volatile::on(disk.after_cut(&mut next));
            j = open(&disk);
            let found = contents(&j);
            assert!(
                std::iter::once(&acked)
                    .chain(&since)
                    .any(|state| same_but_placed(&found, state, &placing)),
                "cut {cuts}: recovered {} bytes, acknowledged {}, {} records since; pages \
                 differing from the acknowledged state {:?}, placing {placing:?}",
                found.len(),
                acked.len(),
                since.len(),
                differing_pages(&found, &acked),
            );
            live.clone_from(&found);
            acked = found;
            since.clear();
        }
        Cuts {
            cuts,
            through,
            after_deferred,
            placed,
        }
    }

    #[test]
    fn power_cuts_keep_every_acknowledged_sync_with_records_written_through() {
        let c = power_cuts(0xC0FF_EE11_u64, PLACE_MIN_RUN);
        // Both ways to a durable record ran: written through, and written then fsynced after
        // deferred records (which a record written through could leave behind).
        assert!(
            c.cuts > 50 && c.through > 200 && c.after_deferred > 50,
            "{} {} {}",
            c.cuts,
            c.through,
            c.after_deferred
        );
    }

    /// The same with pages placed in runs down to one page. (Swept over 1 100 seeds with runs
    /// of one to four pages when written; these are a few of them.)
    #[test]
    fn power_cuts_keep_every_acknowledged_sync_with_pages_placed() {
        let mut placed = 0;
        for (seed, run) in [
            (0x9_1ACE_u64, 1),
            (194 * 7919, 3),
            (0xD15C, 1),
            (4 * 7919, 2),
        ] {
            let c = power_cuts(seed, run);
            assert!(c.cuts > 50, "{}", c.cuts);
            placed += c.placed;
        }
        assert!(placed > 500, "{placed}");
    }

    #[test]
    fn random_operations_match_a_model_across_crashes() {
        let mut next = xorshift(0x5EED_u64);
        let d = disk();
        let mut j = create(&d, 16 * PAGE);
        let (mut live, mut synced) = (Vec::<u8>::new(), Vec::<u8>::new());
        for _ in 0..3000 {
            match next(10) {
                0..=5 if !live.is_empty() => {
                    let at = next(live.len() as u64) as usize;
                    let n = (1 + next(3 * PAGE)) as usize;
                    let byte = next(255) as u8 + 1;
                    let end = (at + n).min(live.len());
                    j.write(at as u64, &vec![byte; end - at]).unwrap();
                    live[at..end].fill(byte);
                }
                6 => {
                    let len = next(12 * PAGE) as usize;
                    j.set_len(len as u64).unwrap();
                    live.resize(len, 0);
                }
                7 | 8 => {
                    j.sync_data().unwrap();
                    synced.clone_from(&live);
                }
                _ => {
                    j = if next(2) == 0 {
                        reopen(&d)
                    } else {
                        j.close().unwrap();
                        synced.clone_from(&live);
                        reopen(&d)
                    };
                    live.clone_from(&synced);
                }
            }
            assert_eq!(contents(&j), live);
        }
    }

    /// redb on the journal, values large enough that their pages are placed (each commit adds
    /// one and removes the one 16 before, so that freed pages come back), and power cuts at
    /// random points of its commits: every commit that returned is there after recovery, the
    /// one in flight is there whole or not at all, and redb finds its file whole.
    #[test]
    fn redb_keeps_every_acknowledged_commit_across_power_cuts_with_pages_placed() {
        use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
        const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
        let value = |row: u64| vec![(row % 251) as u8 + 1; 40_000 + (row % 7) as usize * 1000];
        let mut next = xorshift(0xB16_B0A7);
        let mut disk = Arc::new(Volatile::default());
        drop(Journal::create(Storage::shared(disk.clone()), 1024 * PAGE).unwrap());
        let (mut acked, mut placed) = (0u64, 0);
        for _ in 0..40 {
            let journal = Arc::new(
                Journal::open(Storage::shared(disk.clone()), true, false)
                    .with_write_through(Some(disk.clone())),
            );
            let mut db = redb::Database::builder()
                .create_with_backend(Storage::shared(journal.clone()))
                .unwrap();
            assert!(db.check_integrity().unwrap());
            let rows = {
                let read = db.begin_read().unwrap();
                match read.open_table(T) {
                    Ok(t) => {
                        let last = t.last().unwrap().map_or(0, |(k, _)| k.value() + 1);
                        assert_eq!(t.len().unwrap(), last.min(16));
                        for row in last.saturating_sub(16)..last {
                            assert_eq!(t.get(row).unwrap().unwrap().value(), value(row));
                        }
                        last
                    }
                    Err(_) => 0,
                }
            };
            assert!(
                rows == acked || rows == acked + 1,
                "{rows} rows, {acked} acknowledged"
            );
            acked = rows;
            disk.0.lock().power_for = Some(50 + next(600));
            loop {
                let committed = (|| -> Result<(), redb::Error> {
                    let w = db.begin_write()?;
                    {
                        let mut t = w.open_table(T)?;
                        t.insert(acked, value(acked).as_slice())?;
                        if acked >= 16 {
                            t.remove(acked - 16)?;
                        }
                    }
                    w.commit()?;
                    Ok(())
                })();
                if committed.is_err() {
                    break;
                }
                acked += 1;
            }
            drop(db);
            placed += journal.pages_placed.load(Ordering::Relaxed);
            disk = Volatile::on(disk.after_cut(&mut next));
        }
        assert!(
            acked > 100 && placed > 1000,
            "{acked} commits, {placed} pages placed"
        );
    }
}
