//! The engine-owned KV cache, paged: per layer a pool of blocks [blocks, kv_heads, BLOCK,
//! head_dim], and per sequence (slot) a table of the blocks holding its positions. Memory is
//! taken a block at a time as tokens are written and given back when they are dropped, so the
//! pool bounds tokens actually held, not slots × longest context. Full blocks are indexed by
//! their tokens (see `blocks`): a new sequence starts on every cached block its tokens begin
//! with, and a block several sequences hold is copied before one of them writes into it.
//! Truncating (rejected draft tokens) gives back whole blocks past the new end.
mod blocks;

pub use blocks::BLOCK;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::ops::{self, kernels::TokenSlot, OpsPath};
use blocks::{BlockKey, BlockPool};
use candle_core::{DType, Device, Tensor};

/// One sequence's keys and values, copied out of a cache ([len, kv_heads, head_dim] per layer).
pub struct KvSnapshot {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
}

impl KvSnapshot {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|t| t.elem_count() * 4).sum()
    }
}

/// Blocks in use, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvUsage {
    pub blocks: usize,
    /// Held by some sequence.
    pub held: usize,
    /// Held by no one, kept for a prefix that may come again.
    pub cached: usize,
    /// Prompt tokens found in the cache since the start.
    pub prefix_hits: u64,
}

pub struct KvCache {
    pub(crate) keys: Vec<Tensor>,
    pub(crate) values: Vec<Tensor>,
    /// Each slot's blocks, in position order.
    pub(crate) tables: Vec<Vec<u32>>,
    lens: Vec<usize>,
    /// Leading full blocks of each slot already in the prefix index.
    indexed: Vec<usize>,
    capacity: usize,
    pool: BlockPool,
    prefix_hits: u64,
}

impl KvCache {
    /// A cache of `slots` sequences of up to `capacity` tokens each, with blocks for all of them
    /// at full length.
    pub fn new(config: &ModelConfig, slots: usize, capacity: usize, device: &Device) -> Result<Self> {
        Self::with_blocks(config, slots, capacity, slots * capacity.div_ceil(BLOCK), device)
    }

    /// A cache of `slots` sequences of up to `capacity` tokens each, sharing `blocks` blocks.
    pub fn with_blocks(
        config: &ModelConfig,
        slots: usize,
        capacity: usize,
        blocks: usize,
        device: &Device,
    ) -> Result<Self> {
        if slots == 0 || capacity == 0 || blocks < capacity.div_ceil(BLOCK) {
            return Err(ModelError::KvCache(format!(
                "{slots} slots of {capacity} tokens in {blocks} blocks of {BLOCK}: slots and capacity must be \
                 positive and the blocks must hold one sequence of full length"
            )));
        }
        let shape = (blocks, config.num_kv_heads, BLOCK, config.head_dim);
        let mut keys = Vec::with_capacity(config.num_layers);
        let mut values = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            keys.push(Tensor::zeros(shape, DType::F32, device)?);
            values.push(Tensor::zeros(shape, DType::F32, device)?);
        }
        Ok(KvCache {
            keys,
            values,
            tables: vec![Vec::new(); slots],
            lens: vec![0; slots],
            indexed: vec![0; slots],
            capacity,
            pool: BlockPool::new(blocks),
            prefix_hits: 0,
        })
    }

    pub fn num_slots(&self) -> usize {
        self.lens.len()
    }

    /// Most tokens one slot may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens held for `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    pub fn is_empty(&self, slot: usize) -> bool {
        self.lens[slot] == 0
    }

    pub fn usage(&self) -> KvUsage {
        let blocks = self.pool.blocks();
        KvUsage {
            blocks,
            held: blocks - self.pool.available(),
            cached: self.pool.idle(),
            prefix_hits: self.prefix_hits,
        }
    }

    /// Blocks that can be taken now (free, or cached and held by no one).
    pub fn available_blocks(&self) -> usize {
        self.pool.available()
    }

    /// New blocks writing positions from..to of `slot` takes: blocks past its table, and a copy
    /// of each held block in the range it may not write into (shared with other sequences, or
    /// indexed: its content is promised to later prompts).
    pub fn blocks_to_write(&self, slot: usize, from: usize, to: usize) -> usize {
        let table = &self.tables[slot];
        let (first, end) = (from / BLOCK, to.div_ceil(BLOCK));
        let copies = (first..end.min(table.len())).filter(|&i| !self.pool.writable(table[i])).count();
        copies + end.saturating_sub(table.len())
    }

    /// Makes positions from..to of `slot` writable: takes blocks past its table, and gives it its
    /// own copy of any block in the range it may not write into (copy on write). All or nothing.
    pub fn reserve(&mut self, slot: usize, from: usize, to: usize) -> Result<()> {
        self.slot_ok(slot)?;
        if to > self.capacity || from > self.lens[slot] {
            return Err(ModelError::KvCache(format!(
                "slot {slot} cannot write positions {from}..{to} ({} held, {} at most)",
                self.lens[slot], self.capacity
            )));
        }
        let need = self.blocks_to_write(slot, from, to);
        if need > self.pool.available() {
            return Err(ModelError::KvCache(format!(
                "out of KV blocks: slot {slot} needs {need}, {} available",
                self.pool.available()
            )));
        }
        for i in from / BLOCK..to.div_ceil(BLOCK) {
            match self.tables[slot].get(i).copied() {
                Some(b) if !self.pool.writable(b) => {
                    let copy = self.pool.allocate().expect("counted above");
                    self.copy_block(b, copy)?;
                    self.pool.release(b);
                    self.tables[slot][i] = copy;
                }
                Some(_) => {}
                None => {
                    let b = self.pool.allocate().expect("counted above");
                    self.tables[slot].push(b);
                }
            }
        }
        self.indexed[slot] = self.indexed[slot].min(from / BLOCK);
        Ok(())
    }

    /// Makes room for `n` new tokens after each listed slot's end: all slots or none.
    pub fn reserve_batch(&mut self, appends: impl Iterator<Item = (usize, usize)> + Clone) -> Result<()> {
        let mut need = 0;
        for (slot, n) in appends.clone() {
            self.slot_ok(slot)?;
            need += self.blocks_to_write(slot, self.lens[slot], self.lens[slot] + n);
        }
        if need > self.pool.available() {
            return Err(ModelError::KvCache(format!(
                "out of KV blocks: the step needs {need}, {} available",
                self.pool.available()
            )));
        }
        for (slot, n) in appends {
            self.reserve(slot, self.lens[slot], self.lens[slot] + n)?;
        }
        Ok(())
    }

    /// Sets `slot`'s length after its rows were written (the model's forward).
    pub(crate) fn set_len(&mut self, slot: usize, len: usize) {
        debug_assert!(len <= self.tables[slot].len() * BLOCK);
        self.lens[slot] = len;
    }

    /// Forgets everything past `len` tokens of `slot`; whole blocks past it are given back.
    pub fn truncate(&mut self, slot: usize, len: usize) -> Result<()> {
        self.slot_ok(slot)?;
        let cur = self.lens[slot];
        if len > cur {
            return Err(ModelError::KvCache(format!("cannot truncate slot {slot} from {cur} up to {len} tokens")));
        }
        self.lens[slot] = len;
        for b in self.tables[slot].drain(len.div_ceil(BLOCK)..) {
            self.pool.release(b);
        }
        self.indexed[slot] = self.indexed[slot].min(len / BLOCK);
        Ok(())
    }

    /// Copies the keys and values of position `from` of `slot` to position `to` (< from) and keeps
    /// `to + 1` positions: a verified draft-tree sibling takes the place of the branch it beat.
    pub fn move_position(&mut self, slot: usize, from: usize, to: usize) -> Result<()> {
        self.slot_ok(slot)?;
        let cur = self.lens[slot];
        if to >= from || from >= cur {
            return Err(ModelError::KvCache(format!(
                "cannot move position {from} of slot {slot} ({cur} held) to {to}"
            )));
        }
        self.reserve(slot, to, to + 1)?;
        let path = self.ops_path();
        let tokens = [TokenSlot::causal(slot, to)];
        let (block, row) = (self.tables[slot][from / BLOCK] as usize, from % BLOCK);
        for cache in self.keys.iter().chain(&self.values) {
            // [1, kv_heads, 1, head_dim] -> [1, kv_heads, head_dim], the layout cache_write takes.
            let row = cache.narrow(0, block, 1)?.narrow(2, row, 1)?.squeeze(0)?.transpose(0, 1)?.contiguous()?;
            ops::cache_write(cache, &row, &tokens, &self.tables, path)?;
        }
        self.truncate(slot, to + 1)
    }

    /// Empties `slot`: its blocks are given back (indexed ones stay cached).
    pub fn reset(&mut self, slot: usize) -> Result<()> {
        self.truncate(slot, 0)
    }

    /// Bytes held by the cache tensors.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|t| t.elem_count() * 4).sum()
    }

    /// Copies out `slot`'s keys and values (swap-out preemption: the copy can be restored into any
    /// free slot later, instead of recomputing the sequence).
    pub fn snapshot(&self, slot: usize) -> Result<KvSnapshot> {
        self.slot_ok(slot)?;
        let len = self.lens[slot];
        let used = len.div_ceil(BLOCK);
        let ids = Tensor::from_slice(&self.tables[slot][..used], used, self.keys[0].device())?;
        let take = |t: &Tensor| -> Result<Tensor> {
            // [used, kv_heads, BLOCK, head_dim] -> [len, kv_heads, head_dim], the layout cache_write takes.
            let (_, kv_heads, _, head_dim) = t.dims4()?;
            let rows = t.index_select(&ids, 0)?.transpose(1, 2)?.contiguous()?;
            Ok(rows.reshape((used * BLOCK, kv_heads, head_dim))?.narrow(0, 0, len)?.contiguous()?)
        };
        Ok(KvSnapshot {
            keys: self.keys.iter().map(take).collect::<Result<_>>()?,
            values: self.values.iter().map(take).collect::<Result<_>>()?,
            len,
        })
    }

    /// Writes a snapshot into the empty `slot`.
    pub fn restore(&mut self, slot: usize, snapshot: &KvSnapshot) -> Result<()> {
        self.slot_ok(slot)?;
        if self.lens[slot] != 0 {
            return Err(ModelError::KvCache(format!("slot {slot} is not free")));
        }
        if snapshot.len > self.capacity || snapshot.keys.len() != self.keys.len() {
            return Err(ModelError::KvCache("the snapshot does not fit this cache".into()));
        }
        if snapshot.len > 0 {
            self.reserve(slot, 0, snapshot.len)?;
            let tokens: Vec<TokenSlot> = (0..snapshot.len).map(|pos| TokenSlot::causal(slot, pos)).collect();
            let path = self.ops_path();
            for (cache, rows) in self.keys.iter().zip(&snapshot.keys).chain(self.values.iter().zip(&snapshot.values)) {
                ops::cache_write(cache, rows, &tokens, &self.tables, path)?;
            }
        }
        self.lens[slot] = snapshot.len;
        Ok(())
    }

    /// Starts the empty `slot` on the cached blocks `tokens` begin with (computed with weights
    /// `salt`), holding at most `most` of their positions; returns the positions it holds.
    pub fn share_prefix(&mut self, slot: usize, tokens: &[u32], salt: u64, most: usize) -> Result<usize> {
        self.slot_ok(slot)?;
        if self.lens[slot] != 0 {
            return Err(ModelError::KvCache(format!("slot {slot} is not free")));
        }
        let mut parent = None;
        for chunk in tokens.chunks_exact(BLOCK).take(self.capacity / BLOCK) {
            let key = BlockKey { parent, salt, tokens: chunk.try_into().expect("a full block") };
            let Some(b) = self.pool.lookup(&key) else { break };
            self.pool.retain(b);
            self.tables[slot].push(b);
            parent = Some(self.pool.parent_key(b));
        }
        let found = self.tables[slot].len() * BLOCK;
        self.lens[slot] = found;
        self.indexed[slot] = self.tables[slot].len();
        let kept = found.min(most);
        self.truncate(slot, kept)?;
        self.prefix_hits += kept as u64;
        Ok(kept)
    }

    /// Indexes `slot`'s full blocks, whose positions hold `tokens` (computed with weights
    /// `salt`), so later sequences can start on them. A block whose content another block
    /// already holds is given back for that one.
    pub fn index_prefix(&mut self, slot: usize, tokens: &[u32], salt: u64) -> Result<()> {
        self.slot_ok(slot)?;
        let full = tokens.len().min(self.lens[slot]) / BLOCK;
        for i in self.indexed[slot]..full {
            let parent = match i {
                0 => None,
                _ => Some(self.pool.parent_key(self.tables[slot][i - 1])),
            };
            let key =
                BlockKey { parent, salt, tokens: tokens[i * BLOCK..(i + 1) * BLOCK].try_into().expect("a block") };
            let mine = self.tables[slot][i];
            let kept = self.pool.register(mine, key);
            if kept != mine {
                self.pool.retain(kept);
                self.pool.release(mine);
                self.tables[slot][i] = kept;
            }
        }
        self.indexed[slot] = self.indexed[slot].max(full);
        Ok(())
    }

    /// The pool's bookkeeping against the slots' tables and lengths.
    pub fn check(&self) -> Result<()> {
        for (slot, (table, &len)) in self.tables.iter().zip(&self.lens).enumerate() {
            if table.len() != len.div_ceil(BLOCK) {
                return Err(ModelError::KvCache(format!("slot {slot} holds {} blocks for {len} tokens", table.len())));
            }
        }
        self.pool.check(self.tables.iter()).map_err(ModelError::KvCache)
    }

    /// Copies every layer's rows of block `from` into block `to`.
    fn copy_block(&self, from: u32, to: u32) -> Result<()> {
        let (from, to) = (from as usize, to as usize);
        let tables = [vec![to as u32]];
        let tokens: Vec<TokenSlot> = (0..BLOCK).map(|pos| TokenSlot::causal(0, pos)).collect();
        let path = self.ops_path();
        for cache in self.keys.iter().chain(&self.values) {
            // [1, kv_heads, BLOCK, head_dim] -> [BLOCK, kv_heads, head_dim], the layout cache_write takes.
            let rows = cache.narrow(0, from, 1)?.squeeze(0)?.transpose(0, 1)?.contiguous()?;
            ops::cache_write(cache, &rows, &tokens, &tables, path)?;
        }
        Ok(())
    }

    fn slot_ok(&self, slot: usize) -> Result<()> {
        match slot < self.lens.len() {
            true => Ok(()),
            false => Err(ModelError::KvCache(format!("no slot {slot}"))),
        }
    }

    /// The op path for writing rows into this cache's tensors.
    fn ops_path(&self) -> OpsPath {
        if self.keys[0].device().is_cpu() {
            OpsPath::CpuKernels
        } else {
            OpsPath::Generic
        }
    }
}
