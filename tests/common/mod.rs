//! Helpers shared by the integration tests: a seeded random source and a simulated disk that
//! can lose power.
#![allow(dead_code, reason = "each test binary uses a different part")]
#![allow(clippy::unwrap_used, reason = "test helpers")]

use std::io;
use std::sync::Arc;

use mqlite::redb::StorageBackend;
use parking_lot::{Condvar, Mutex};

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
    /// Length changes since the last sync, in order with `pending` (index into it, length).
    resizes: Vec<(usize, usize)>,
    /// Operations so far.
    ops: u64,
    /// The operation at which the power goes.
    crash_at: Option<u64>,
    crashed: bool,
    /// Fail this operation once (`false`) or this and every later one (`true`).
    fail_at: Option<(u64, bool)>,
    /// Writes that would grow the image past this many bytes fail with "disk full".
    quota: Option<u64>,
    /// Completed syncs.
    syncs: u64,
    /// The next sync waits for [`SimDisk::resume_sync`] before it takes effect; `sync_paused`
    /// while it waits.
    pause_next_sync: bool,
    sync_paused: bool,
    /// The power goes as the next sync begins.
    crash_at_next_sync: bool,
    /// How long a sync takes (a slow disk), in microseconds.
    sync_latency_us: u64,
}

/// A `StorageBackend` over an in-memory image that models a disk with a volatile write cache:
/// a crash keeps the synced image plus any subset of later writes, each dropped, kept, or torn
/// at 512-byte sectors, applied in any order.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    disk: Arc<Mutex<Disk>>,
    /// Signals a paused sync's changes of state.
    paused: Arc<Condvar>,
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

    /// Holds the next sync, before it makes anything durable, until [`SimDisk::resume_sync`]:
    /// a disk flush that is still in flight while other threads go on.
    pub fn pause_next_sync(&self) {
        self.disk.lock().pause_next_sync = true;
    }

    /// Waits until a sync is held by [`SimDisk::pause_next_sync`].
    pub fn wait_for_paused_sync(&self) {
        let mut d = self.disk.lock();
        while !d.sync_paused {
            self.paused.wait(&mut d);
        }
    }

    pub fn resume_sync(&self) {
        self.disk.lock().sync_paused = false;
        self.paused.notify_all();
    }

    /// The power goes as the next sync begins: nothing it would have covered becomes durable.
    pub fn crash_at_next_sync(&self) {
        self.disk.lock().crash_at_next_sync = true;
    }

    pub fn syncs(&self) -> u64 {
        self.disk.lock().syncs
    }

    /// Makes every sync take this long, like a real disk's flush.
    pub fn set_sync_latency_us(&self, us: u64) {
        self.disk.lock().sync_latency_us = us;
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
        let at = d.pending.len();
        d.resizes.push((at, len as usize));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let latency = {
            let mut d = self.disk.lock();
            if d.pause_next_sync {
                d.pause_next_sync = false;
                d.sync_paused = true;
                self.paused.notify_all();
                while d.sync_paused {
                    self.paused.wait(&mut d);
                }
            }
            if d.crash_at_next_sync && !d.crashed {
                d.crashed = true;
                return Err(io_err("simulated power cut"));
            }
            d.sync_latency_us
        };
        if latency > 0 {
            std::thread::sleep(std::time::Duration::from_micros(latency));
        }
        let mut d = self.begin()?;
        // Replay the writes and length changes since the last sync onto the durable image
        // (cheaper than copying the whole live image at every sync).
        let pending = std::mem::take(&mut d.pending);
        let resizes = std::mem::take(&mut d.resizes);
        let mut next_resize = resizes.iter().peekable();
        for (i, (offset, data)) in pending.iter().enumerate() {
            while let Some((_, len)) = next_resize.next_if(|(at, _)| *at <= i) {
                d.durable.resize(*len, 0);
            }
            apply(&mut d.durable, *offset, data, |_| true);
        }
        for (_, len) in next_resize {
            d.durable.resize(*len, 0);
        }
        debug_assert_eq!(d.durable.len(), d.live.len());
        d.syncs += 1;
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

/// A TCP gate in front of a real server on loopback: while open it forwards connections,
/// while closed it refuses them and cuts the ones it carried. Lets a test make a broker
/// unreachable without stopping it.
#[derive(Clone)]
pub struct Gate {
    pub port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Gate {
    /// A closed gate in front of `127.0.0.1:upstream`.
    pub fn new(upstream: u16) -> Gate {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let gate = Gate {
            port: listener.local_addr().unwrap().port(),
            open: Arc::default(),
            live: Arc::default(),
        };
        let g = gate.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !g.open.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut live = g.live.lock();
                    live.push(client.try_clone().unwrap());
                    live.push(server.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        gate
    }

    pub fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Opens or closes the gate; handy as the `reachable` of the broker scenarios.
    pub fn set(&self, open: bool) {
        if open { self.open() } else { self.close() }
    }

    pub fn close(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for s in self.live.lock().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Fails loudly unless a server listens on `127.0.0.1:port`.
pub fn require_service(name: &str, port: u16) {
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        panic!(
            "{name} is not reachable on 127.0.0.1:{port}: start it (.ci/run does) and run again"
        );
    }
}

/// A name unique to this test run.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}{}x{}", std::process::id(), nanos % 1_000_000_000)
}

/// A sink that publishes, then reports a failure once when armed, as if the relay died after
/// the broker's confirm but before its mark-delivered commit.
pub struct DiesAfterConfirm<S> {
    pub inner: S,
    pub armed: Arc<std::sync::atomic::AtomicBool>,
}

impl<S: mqlite::Sink> DiesAfterConfirm<S> {
    pub fn new(inner: S) -> Self {
        DiesAfterConfirm {
            inner,
            armed: Arc::default(),
        }
    }
}

impl<S: mqlite::Sink> mqlite::Sink for DiesAfterConfirm<S> {
    fn publish(&mut self, messages: &[mqlite::OutboxMessage]) -> Result<(), mqlite::SinkError> {
        self.inner.publish(messages)?;
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(mqlite::SinkError::new(
                0,
                "relay killed after the broker confirmed",
            ));
        }
        Ok(())
    }
}

/// A source whose `ack` fails once when armed, as if the bridge died after its local commit
/// but before acking the broker.
pub struct DiesBeforeAck<S> {
    pub inner: S,
    pub armed: bool,
}

impl<S: mqlite::Source> mqlite::Source for DiesBeforeAck<S> {
    type Token = S::Token;

    fn fetch(
        &mut self,
        max: usize,
        timeout: std::time::Duration,
    ) -> Result<Vec<(mqlite::Message, S::Token)>, mqlite::SourceError> {
        self.inner.fetch(max, timeout)
    }

    fn ack(&mut self, tokens: Vec<S::Token>) -> Result<(), mqlite::SourceError> {
        if std::mem::take(&mut self.armed) {
            return Err(mqlite::SourceError::new("bridge killed before the ack"));
        }
        self.inner.ack(tokens)
    }
}

/// The relay half of every broker scenario: with the broker unreachable (the gate closed),
/// `n` outbox messages accumulate while the relay fails and backs off; then the gate opens and
/// the backlog drains. Returns the source database, its clock and the relay.
pub fn offline_backlog_then_drain<S: mqlite::Sink>(
    sink: S,
    reachable: impl Fn(bool),
    n: u32,
    destination: &str,
) -> (mqlite::Database, mqlite::ManualClock, mqlite::Relay<S>) {
    offline_backlog_then_drain_paced(sink, reachable, n, destination, |_| {})
}

/// As [`offline_backlog_then_drain`], but before each relay step `pace(sent so far)` may hold
/// the relay back (for a broker that drops what a slow subscriber cannot take).
pub fn offline_backlog_then_drain_paced<S: mqlite::Sink>(
    sink: S,
    reachable: impl Fn(bool),
    n: u32,
    destination: &str,
    mut pace: impl FnMut(u64),
) -> (mqlite::Database, mqlite::ManualClock, mqlite::Relay<S>) {
    let clock = mqlite::ManualClock::new(1_000_000);
    let db = mqlite::Database::builder()
        .clock(clock.clone())
        .open_in_memory()
        .unwrap();
    reachable(false);
    let ids: Vec<u32> = (0..n).collect();
    for chunk in ids.chunks(1000) {
        db.write(|txn| {
            for i in chunk {
                let m =
                    mqlite::Message::new(i.to_le_bytes().to_vec()).with_key(format!("k{}", i % 7));
                txn.outbox_put(destination, &m)?;
            }
            Ok::<_, mqlite::Error>(())
        })
        .unwrap();
    }
    let config = mqlite::RelayConfig {
        batch_size: 200,
        max_attempts: 1_000,
        ..Default::default()
    };
    let mut relay = mqlite::Relay::with_config(db.clone(), sink, config);
    for _ in 0..3 {
        let step = relay.run_once().unwrap();
        assert_eq!(step.sent, 0, "the broker is unreachable");
        assert!(step.failure.is_some());
        clock.advance_ms(3_600_000);
    }
    let info = db.read(|r| r.outbox_info()).unwrap();
    assert_eq!(
        info.backlog,
        u64::from(n),
        "offline: the backlog only grows"
    );
    assert!(info.last_error.is_some());
    reachable(true);
    let mut sent = 0;
    for _ in 0..10_000 {
        if db.read(|r| r.outbox_info()).unwrap().backlog == 0 {
            return (db, clock, relay);
        }
        pace(sent);
        let step = relay.run_once().unwrap();
        sent += step.sent as u64;
        if step.sent == 0 {
            clock.advance_ms(3_600_000);
        }
    }
    panic!(
        "the relay did not drain: {:?}",
        db.read(|r| r.outbox_info()).unwrap()
    );
}

/// The relay killed between the broker's confirm and its mark-delivered commit: 100 more
/// rows (`from..from + 100`) go out, the armed sink reports a failure after the broker
/// confirmed them, and the next steps send them again; the far side must deduplicate. Returns
/// how many rows were sent in all (`from + 100`).
pub fn resend_after_confirm<S: mqlite::Sink>(
    db: &mqlite::Database,
    clock: &mqlite::ManualClock,
    relay: &mut mqlite::Relay<S>,
    armed: &std::sync::atomic::AtomicBool,
    destination: &str,
    from: u32,
) -> u32 {
    db.write(|txn| {
        for i in from..from + 100 {
            txn.outbox_put(destination, &mqlite::Message::new(i.to_le_bytes().to_vec()))?;
        }
        Ok::<_, mqlite::Error>(())
    })
    .unwrap();
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(relay.run_once().unwrap().failure.is_some());
    drain(db, clock, relay);
    from + 100
}

/// Steps the relay until the outbox is empty (bounded).
pub fn drain<S: mqlite::Sink>(
    db: &mqlite::Database,
    clock: &mqlite::ManualClock,
    relay: &mut mqlite::Relay<S>,
) {
    for _ in 0..10_000 {
        if db.read(|r| r.outbox_info()).unwrap().backlog == 0 {
            return;
        }
        let step = relay.run_once().unwrap();
        if step.sent == 0 {
            clock.advance_ms(3_600_000);
        }
    }
    panic!(
        "the relay did not drain: {:?}",
        db.read(|r| r.outbox_info()).unwrap()
    );
}

/// The environment variable that makes a test binary act as a child process.
pub const ROLE_VAR: &str = "MQLITE_TEST_ROLE";

/// Starts this test binary again as a child process that runs only the test named `entry`,
/// with `role` in [`ROLE_VAR`]; that test reads it with [`child_role`]. Its stdout is piped.
pub fn spawn_child(entry: &str, role: &str, args: &[&str]) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            entry,
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env(ROLE_VAR, role)
        .env("MQLITE_TEST_ARGS", args.join("\u{1f}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// In a child started by [`spawn_child`]: its role and arguments.
pub fn child_role() -> Option<(String, Vec<String>)> {
    let role = std::env::var(ROLE_VAR).ok()?;
    let args = std::env::var("MQLITE_TEST_ARGS").unwrap_or_default();
    Some((role, args.split('\u{1f}').map(str::to_owned).collect()))
}

/// Reads lines from a child's stdout until one starts with `prefix`; returns it.
pub fn read_until(lines: &mut impl Iterator<Item = io::Result<String>>, prefix: &str) -> String {
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with(prefix) {
            return line;
        }
    }
    panic!("child ended before printing {prefix:?}");
}

/// Microseconds since the Unix epoch: a clock two processes share.
pub fn epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}
