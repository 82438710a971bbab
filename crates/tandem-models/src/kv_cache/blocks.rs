//! The bookkeeping of a paged KV cache, without tensors: which blocks of the pool hold what,
//! how many sequences hold each, and the prefix index that lets a new sequence reuse blocks an
//! earlier one computed.
//!
//! The index is keyed by a block's whole content (its tokens, the weights that computed it)
//! and the exact block before it, so a hit is never a hash collision: two sequences share a
//! block only if they agree on every token up to its end. (A hash chain over token ids, as
//! vLLM keys blocks, would need a collision-resistant hash; a radix tree, as SGLang keeps,
//! walks token by token. Full-block keys need neither and cost one map lookup per 16 tokens.)
//! A block that stops being held keeps its content and stays findable until a new block is
//! needed and it is the least recently released one.
use std::collections::{BTreeMap, HashMap};

/// Tokens per block. A multiple of eight: attention reads keys in groups of eight that must not
/// straddle two blocks.
pub const BLOCK: usize = 16;

/// What a full block holds: the block before it (with that block's generation, so a block id
/// reused for other content never matches a stale child), the weights (0: the served model,
/// else a weight version's id + 1) and its tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct BlockKey {
    pub parent: Option<(u32, u32)>,
    pub salt: u64,
    pub tokens: [u32; BLOCK],
}

pub(crate) struct BlockPool {
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Bumped each time a block's content stops being what its index key says.
    generation: Vec<u32>,
    /// The index key of each indexed block.
    key: Vec<Option<BlockKey>>,
    /// Blocks with nothing worth keeping.
    free: Vec<u32>,
    index: HashMap<BlockKey, u32>,
    /// Indexed blocks nobody holds, by release time (oldest first): reused last.
    idle: BTreeMap<u64, u32>,
    /// Release time of each block in `idle`.
    released_at: Vec<u64>,
    clock: u64,
}

impl BlockPool {
    pub fn new(blocks: usize) -> Self {
        BlockPool {
            refs: vec![0; blocks],
            generation: vec![0; blocks],
            key: vec![None; blocks],
            free: (0..blocks as u32).rev().collect(),
            index: HashMap::new(),
            idle: BTreeMap::new(),
            released_at: vec![0; blocks],
            clock: 0,
        }
    }

    pub fn blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a sequence can take now: free ones and indexed ones nobody holds.
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Indexed blocks nobody holds (cached prefixes waiting for a reuse).
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    #[cfg(test)]
    pub fn refs(&self, block: u32) -> u32 {
        self.refs[block as usize]
    }

    /// The key a child of `block` is indexed under.
    pub fn parent_key(&self, block: u32) -> (u32, u32) {
        (block, self.generation[block as usize])
    }

    /// A block for new content, held once: a free one, else the least recently released
    /// indexed one (it leaves the index). None when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                self.forget(b);
                b
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// One more sequence holds `block` (an indexed block found for a prefix).
    pub fn retain(&mut self, block: u32) {
        let b = block as usize;
        if self.refs[b] == 0 {
            self.idle.remove(&self.released_at[b]);
        }
        self.refs[b] += 1;
    }

    /// A sequence stops holding `block`: when none does, an indexed block waits in `idle` for a
    /// reuse and any other is free.
    pub fn release(&mut self, block: u32) {
        let b = block as usize;
        debug_assert!(self.refs[b] > 0, "block {b} released more often than held");
        self.refs[b] -= 1;
        if self.refs[b] == 0 {
            if self.key[b].is_some() {
                self.clock += 1;
                self.released_at[b] = self.clock;
                self.idle.insert(self.clock, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// The indexed block with this content, if any.
    pub fn lookup(&self, key: &BlockKey) -> Option<u32> {
        self.index.get(key).copied()
    }

    /// Indexes held `block` under `key`; returns the block that holds this content from now on:
    /// `block`, or another that was indexed with the same content first.
    pub fn register(&mut self, block: u32, key: BlockKey) -> u32 {
        if let Some(&other) = self.index.get(&key) {
            return other;
        }
        self.index.insert(key.clone(), block);
        self.key[block as usize] = Some(key);
        block
    }

    /// Whether a holder may write into `block`: it alone holds it and no index entry promises
    /// its content.
    pub fn writable(&self, block: u32) -> bool {
        self.refs[block as usize] == 1 && self.key[block as usize].is_none()
    }

    /// Empties the prefix index: cached blocks nobody holds become free, held ones stay with
    /// their holders but are no longer offered to new prompts. Returns the blocks freed.
    pub fn flush(&mut self) -> usize {
        let freed = std::mem::take(&mut self.idle);
        for &b in freed.values() {
            self.free.push(b);
        }
        for b in 0..self.key.len() as u32 {
            self.forget(b);
        }
        freed.len()
    }

    /// Drops `block`'s index entry: it is taken for other content.
    fn forget(&mut self, block: u32) {
        let b = block as usize;
        if let Some(key) = self.key[b].take() {
            self.index.remove(&key);
            self.generation[b] = self.generation[b].wrapping_add(1);
        }
    }

    /// The pool's rules against the blocks the sequences' tables hold; an error names the first
    /// broken one.
    pub fn check<'a>(&self, tables: impl Iterator<Item = &'a Vec<u32>>) -> Result<(), String> {
        let mut held = vec![0u32; self.refs.len()];
        for table in tables {
            for &b in table {
                held[b as usize] += 1;
            }
        }
        if held != self.refs {
            return Err("block holders disagree with the sequences' tables".into());
        }
        let idle_ok = self.idle.values().all(|&b| self.refs[b as usize] == 0 && self.key[b as usize].is_some());
        let free_ok = self.free.iter().all(|&b| self.refs[b as usize] == 0 && self.key[b as usize].is_none());
        let unheld = self.refs.iter().filter(|&&r| r == 0).count();
        if !idle_ok || !free_ok || unheld != self.free.len() + self.idle.len() {
            return Err("a block is lost, or both free and held".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(parent: Option<(u32, u32)>, t: u32) -> BlockKey {
        BlockKey { parent, salt: 0, tokens: [t; BLOCK] }
    }

    #[test]
    fn released_indexed_blocks_are_reused_last_and_oldest_first() {
        let mut pool = BlockPool::new(3);
        let (a, b, c) = (pool.allocate().unwrap(), pool.allocate().unwrap(), pool.allocate().unwrap());
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.register(a, key(None, 1)), a);
        assert_eq!(pool.register(b, key(Some(pool.parent_key(a)), 2)), b);
        pool.release(b);
        pool.release(a);
        pool.release(c); // never indexed: free at once
        assert_eq!((pool.available(), pool.idle()), (3, 2));
        // The free block first, then the least recently released indexed one (b), which leaves
        // the index; a is still found.
        assert_eq!(pool.allocate(), Some(c));
        assert_eq!(pool.allocate(), Some(b));
        assert_eq!(pool.lookup(&key(Some((a, 0)), 2)), None);
        assert_eq!(pool.lookup(&key(None, 1)), Some(a));
        pool.retain(a);
        assert_eq!((pool.refs(a), pool.idle()), (1, 0));
        pool.check([vec![a], vec![b], vec![c]].iter()).unwrap();
    }

    #[test]
    fn a_flush_frees_idle_cached_blocks_and_unindexes_held_ones() {
        let mut pool = BlockPool::new(3);
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        pool.register(a, key(None, 1));
        pool.register(b, key(None, 2));
        pool.release(a); // cached, idle
        assert_eq!(pool.flush(), 1);
        assert_eq!((pool.available(), pool.idle()), (2, 0));
        assert_eq!(pool.lookup(&key(None, 1)), None);
        assert_eq!(pool.lookup(&key(None, 2)), None, "a held block is no longer offered");
        assert!(pool.writable(b), "its holder may write it again");
        pool.check([vec![b]].iter()).unwrap();
        pool.release(b);
        assert_eq!(pool.available(), 3);
    }

    #[test]
    fn a_reused_block_never_matches_its_old_children() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate().unwrap();
        pool.register(a, key(None, 1));
        let child = key(Some(pool.parent_key(a)), 2);
        let b = pool.allocate().unwrap();
        pool.register(b, child.clone());
        // a is released and taken for other content: its entry goes, and a child key naming it
        // is stale.
        pool.release(a);
        assert_eq!(pool.allocate(), Some(a));
        assert!(pool.writable(a));
        assert_ne!(Some(pool.parent_key(a)), child.parent);
        assert_eq!(pool.lookup(&child), Some(b), "the stale child is still indexed but unreachable");
    }

    #[test]
    fn the_same_content_is_indexed_once() {
        let mut pool = BlockPool::new(2);
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        assert_eq!(pool.register(a, key(None, 5)), a);
        assert_eq!(pool.register(b, key(None, 5)), a, "the second copy is told to use the first");
        assert!(!pool.writable(a) && pool.writable(b));
    }
}
