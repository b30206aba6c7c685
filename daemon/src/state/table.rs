//! [`Table`]: a hash table whose clones share their entries until one of them changes.

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable};

/// The table is split into `1 << SHARD_BITS` shards, chosen by the top bits of the hash.
const SHARD_BITS: u32 = 10;

/// An entry, found by a key it holds.
pub(super) trait Keyed: Clone {
    type Key<'a>: Hash
    where
        Self: 'a;

    fn key(&self) -> Self::Key<'_>;
}

/// An entry keyed by its first half (an address: a workload's IP, a Service's VIP and port).
impl<K: Hash + Copy, V: Clone> Keyed for (K, V) {
    type Key<'a>
        = K
    where
        Self: 'a;

    fn key(&self) -> K {
        self.0
    }
}

/// A hash table split into shards that are copied on write. Cloning copies the list of
/// shards, not the entries; an insert or a removal copies the one shard it touches, and only
/// if a clone still holds it. A snapshot that differs from the last by one pod costs one
/// shard (a thousandth of the cluster), not a rebuild.
#[derive(Debug, Clone)]
pub(super) struct Table<T> {
    hasher: DefaultHashBuilder,
    shards: Vec<Arc<HashTable<T>>>,
    len: usize,
}

impl<T: Keyed> Default for Table<T> {
    fn default() -> Self {
        // Every shard starts as one shared empty table: a small table allocates only the
        // shards it writes to.
        let empty = Arc::new(HashTable::new());
        Self {
            hasher: DefaultHashBuilder::default(),
            shards: vec![empty; 1 << SHARD_BITS],
            len: 0,
        }
    }
}

impl<T: Keyed> Table<T> {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The hash of `key`, as entries' keys hash: look up and remove with it.
    pub(super) fn hash<K: Hash + ?Sized>(&self, key: &K) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(hash: u64) -> usize {
        (hash >> (u64::BITS - SHARD_BITS)) as usize
    }

    pub(super) fn find(&self, hash: u64, is: impl FnMut(&T) -> bool) -> Option<&T> {
        self.shards[Self::shard(hash)].find(hash, is)
    }

    /// Adds `entry`, replacing (and returning) the entry with its key, if there was one.
    pub(super) fn insert(&mut self, entry: T, is: impl FnMut(&T) -> bool) -> Option<T> {
        let hash = self.hash(&entry.key());
        let hasher = &self.hasher;
        let shard = Arc::make_mut(&mut self.shards[Self::shard(hash)]);
        match shard.entry(hash, is, |e| hasher.hash_one(e.key())) {
            hashbrown::hash_table::Entry::Occupied(mut e) => {
                Some(std::mem::replace(e.get_mut(), entry))
            }
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(entry);
                self.len += 1;
                None
            }
        }
    }

    pub(super) fn remove(&mut self, hash: u64, mut is: impl FnMut(&T) -> bool) -> Option<T> {
        let shard = &mut self.shards[Self::shard(hash)];
        // Look before copying: removing what is not there copies nothing.
        shard.find(hash, &mut is)?;
        let (removed, _) = Arc::make_mut(shard).find_entry(hash, is).ok()?.remove();
        self.len -= 1;
        Some(removed)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &T> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_shards_until_written_and_see_none_of_each_others_writes() {
        let mut table = Table::default();
        for i in 0..10_000 {
            assert!(table.insert((i, "a"), |e| e.0 == i).is_none());
        }
        let before = table.clone();
        fn find(t: &Table<(u32, &'static str)>, k: u32) -> Option<&'static str> {
            t.find(t.hash(&k), |e| e.0 == k).map(|e| e.1)
        }
        assert_eq!(table.insert((7, "b"), |e| e.0 == 7), Some((7, "a")));
        assert_eq!(table.remove(table.hash(&8), |e| e.0 == 8), Some((8, "a")));
        assert_eq!(table.remove(table.hash(&8), |e| e.0 == 8), None);
        assert_eq!((find(&table, 7), find(&table, 8)), (Some("b"), None));
        assert_eq!((find(&before, 7), find(&before, 8)), (Some("a"), Some("a")));
        assert_eq!((table.len(), before.len()), (9_999, 10_000));
        assert_eq!(table.iter().count(), 9_999);
        let copied = table
            .shards
            .iter()
            .zip(&before.shards)
            .filter(|(a, b)| !Arc::ptr_eq(a, b))
            .count();
        assert!(copied <= 2, "only the written shards are copied: {copied}");
        for i in 0..10_000 {
            table.remove(table.hash(&i), |e| e.0 == i);
        }
        assert_eq!((table.len(), table.iter().count()), (0, 0));
    }
}
