//! The hasher of mqlite's own integer keys: the journal's page numbers and the unwritten
//! leases' (queue id, sequence) pairs.
//!
//! Those keys are never chosen by a peer, so SipHash's defence against flooding, the
//! standard maps' default, buys nothing there, and it was not cheap: 6 % of a
//! receive-and-ack in the W5 profile, about 1.5 % of the instructions of a one-publish
//! durable commit in the journal's page maps.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map keyed by mqlite's own integers.
pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// FxHash's rotate and multiply per integer, and the high half folded into the low one at the
/// end.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // An odd multiplier mixes every bit of the key into the high bits, from which
        // hashbrown takes its tag.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        // hashbrown takes the bucket from the low bits, and the low bits of a product see
        // only the low bits of the key: keys a power of two apart would share a bucket
        // without the high half folded in.
        self.0 ^ (self.0 >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// How many of 64 buckets the keys land in.
    fn buckets<K: std::hash::Hash>(keys: impl Iterator<Item = K>) -> usize {
        let hasher = BuildHasherDefault::<IdHasher>::default();
        let mut seen: Vec<u64> = keys.map(|k| hasher.hash_one(k) & 63).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    #[test]
    fn keys_spread_over_buckets_like_a_random_hash() {
        // 64 keys in 64 buckets: a random hash fills 40 on average. Consecutive pages, pages
        // 2^20 apart (the same low bits: without the fold all 64 would share one bucket), and
        // a queue's consecutive sequences.
        assert!(buckets(1000..1064u64) >= 32);
        assert!(buckets((0..64u64).map(|i| i << 20)) >= 32);
        assert!(buckets((0..64u64).map(|s| (7u64, 5000 + s))) >= 32);
    }
}
