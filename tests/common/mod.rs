//! Helpers shared by the integration tests: a seeded random source and a simulated disk that
//! can lose power.
#![allow(dead_code, reason = "each test binary uses a different part")]
#![allow(clippy::unwrap_used, reason = "test helpers")]

use std::io;
use std::sync::Arc;

use mqlite::redb::StorageBackend;
use parking_lot::Mutex;

/// splitmix64: small, seedable, good enough to drive tests.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What a simulated disk does to the writes not yet synced when the power goes.
#[derive(Debug, Default)]
struct Disk {
    /// What survives a power cut for sure: the image as of the last sync.
    durable: Vec<u8>,
    /// What reads see.
    live: Vec<u8>,
    /// Writes since the last sync, in order.
    pending: Vec<(u64, Vec<u8>)>,
    /// Operations so far.
    ops: u64,
    /// The operation at which the power goes.
    crash_at: Option<u64>,
    crashed: bool,
    /// Fail this operation once (`false`) or this and every later one (`true`).
    fail_at: Option<(u64, bool)>,
    /// Writes that would grow the image past this many bytes fail with "disk full".
    quota: Option<u64>,
}

/// A `StorageBackend` over an in-memory image that models a disk with a volatile write cache:
/// a crash keeps the synced image plus any subset of later writes, each dropped, kept, or torn
/// at 512-byte sectors, applied in any order.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    disk: Arc<Mutex<Disk>>,
}

const SECTOR: usize = 512;

impl SimDisk {
    pub fn new() -> Self {
        SimDisk::default()
    }

    /// A disk whose durable and live image is `image`.
    pub fn from_image(image: Vec<u8>) -> Self {
        let disk = SimDisk::default();
        {
            let mut d = disk.disk.lock();
            d.live = image.clone();
            d.durable = image;
        }
        disk
    }

    /// The power goes at operation `op` (counted from now on).
    pub fn crash_at(&self, op: u64) {
        let mut d = self.disk.lock();
        d.crash_at = Some(d.ops + op);
    }

    pub fn fail_at(&self, op: u64, forever: bool) {
        let mut d = self.disk.lock();
        d.fail_at = Some((d.ops + op, forever));
    }

    pub fn clear_failures(&self) {
        let mut d = self.disk.lock();
        d.fail_at = None;
        d.quota = None;
    }

    pub fn set_quota(&self, bytes: Option<u64>) {
        self.disk.lock().quota = bytes;
    }

    pub fn ops(&self) -> u64 {
        self.disk.lock().ops
    }

    pub fn crashed(&self) -> bool {
        self.disk.lock().crashed
    }

    pub fn live_image(&self) -> Vec<u8> {
        self.disk.lock().live.clone()
    }

    /// The image after a power cut now: the durable image plus a random fate for each
    /// pending write.
    pub fn crash_image(&self, rng: &mut Rng) -> Vec<u8> {
        let d = self.disk.lock();
        let mut image = d.durable.clone();
        let mut order: Vec<usize> = (0..d.pending.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for i in order {
            let (offset, data) = &d.pending[i];
            match rng.below(3) {
                0 => {}
                1 => apply(&mut image, *offset, data, |_| true),
                _ => {
                    let keep: Vec<bool> = (0..data.len().div_ceil(SECTOR))
                        .map(|_| rng.chance(50))
                        .collect();
                    apply(&mut image, *offset, data, |sector| keep[sector]);
                }
            }
        }
        image
    }

    fn begin(&self) -> Result<parking_lot::MutexGuard<'_, Disk>, io::Error> {
        let mut d = self.disk.lock();
        d.ops += 1;
        if d.crashed {
            return Err(io_err("simulated power cut"));
        }
        if d.crash_at == Some(d.ops) {
            d.crashed = true;
            return Err(io_err("simulated power cut"));
        }
        match d.fail_at {
            Some((at, false)) if at == d.ops => return Err(io_err("simulated i/o error")),
            Some((at, true)) if d.ops >= at => return Err(io_err("simulated i/o error")),
            _ => {}
        }
        Ok(d)
    }
}

fn apply(image: &mut Vec<u8>, offset: u64, data: &[u8], keep: impl Fn(usize) -> bool) {
    let offset = offset as usize;
    if image.len() < offset + data.len() {
        image.resize(offset + data.len(), 0);
    }
    for (sector, chunk) in data.chunks(SECTOR).enumerate() {
        if keep(sector) {
            let at = offset + sector * SECTOR;
            image[at..at + chunk.len()].copy_from_slice(chunk);
        }
    }
}

fn io_err(what: &str) -> io::Error {
    io::Error::other(what.to_owned())
}

fn full() -> io::Error {
    io::Error::from(io::ErrorKind::StorageFull)
}

impl StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.begin()?.live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let d = self.begin()?;
        let start = offset as usize;
        let end = start + out.len();
        if end > d.live.len() {
            return Err(io_err("read past the end"));
        }
        out.copy_from_slice(&d.live[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut d = self.begin()?;
        if d.quota.is_some_and(|q| len > q) {
            return Err(full());
        }
        d.live.resize(len as usize, 0);
        // A shrink or growth is metadata; model it as durable only at the next sync.
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut d = self.begin()?;
        d.durable = d.live.clone();
        d.pending.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut d = self.begin()?;
        let end = offset as usize + data.len();
        if d.quota.is_some_and(|q| end as u64 > q) {
            return Err(full());
        }
        if d.live.len() < end {
            d.live.resize(end, 0);
        }
        d.live[offset as usize..end].copy_from_slice(data);
        d.pending.push((offset, data.to_vec()));
        Ok(())
    }
}
