//! The engine-owned KV cache, paged: per layer a pool of blocks [blocks, kv_heads, BLOCK,
//! head_dim] (a latent layer: [blocks, 1, BLOCK, rank]), and per sequence (slot) a table of the
//! blocks holding its positions. Memory is taken a block at a time as tokens are written and
//! given back when they are dropped, so the pool bounds tokens actually held, not slots × longest
//! context. Full blocks are indexed by
//! their tokens (see `blocks`): a new sequence starts on every cached block its tokens begin
//! with, and a block several sequences hold is copied before one of them writes into it.
//! Truncating (rejected draft tokens) gives back whole blocks past the new end.
mod blocks;

pub use blocks::BLOCK;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::ops::{self, kernels::TokenSlot, OpsPath};
use blocks::{BlockKey, BlockPool};
use candle_core::{Device, Tensor};

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
        self.keys.iter().chain(&self.values).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
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
    /// Prompt tokens looked up in the cache since the start, and those found there.
    pub prefix_queries: u64,
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
    prefix_queries: u64,
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
        let mut keys = Vec::with_capacity(config.num_layers);
        let mut values = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            // A latent layer (CARE) caches one row of its rank per token for keys and for values.
            let [(kh, kw), (vh, vw)] = config.cache_rows(l);
            let dtype = config.kv_dtype.dtype();
            keys.push(Tensor::zeros((blocks, kh, BLOCK, kw), dtype, device)?);
            values.push(Tensor::zeros((blocks, vh, BLOCK, vw), dtype, device)?);
        }
        Ok(KvCache {
            keys,
            values,
            tables: vec![Vec::new(); slots],
            lens: vec![0; slots],
            indexed: vec![0; slots],
            capacity,
            pool: BlockPool::new(blocks),
            prefix_queries: 0,
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
            prefix_queries: self.prefix_queries,
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
            // A copy, never a view: with one KV head the transpose is already contiguous, and
            // writing a view of the cache into the cache aliases. `force_contiguous` copies the
            // row alone; candle's `copy` clones the whole storage (every block of the layer),
            // which made each copy on write and each accepted sibling cost the cache's size.
            let row = cache.narrow(0, block, 1)?.narrow(2, row, 1)?.squeeze(0)?.transpose(0, 1)?.force_contiguous()?;
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
        self.keys.iter().chain(&self.values).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
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
        self.prefix_queries += most.min(tokens.len()) as u64;
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

    /// Forgets every cached prefix (`BlockPool::flush`); sequences keep their blocks. Returns
    /// the blocks freed.
    pub fn flush_prefixes(&mut self) -> usize {
        self.pool.flush()
    }

    /// Forgets every sequence and every cached block (after a bug broke the books): all blocks
    /// free, nothing indexed. The counters are kept.
    pub fn clear(&mut self) {
        let slots = self.lens.len();
        (self.tables, self.lens, self.indexed) = (vec![Vec::new(); slots], vec![0; slots], vec![0; slots]);
        self.pool = BlockPool::new(self.pool.blocks());
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
            // A fresh copy of the block alone (see move_position).
            let rows = cache.narrow(0, from, 1)?.squeeze(0)?.transpose(0, 1)?.force_contiguous()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;

    fn config() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: 8,
            intermediate_size: 8,
            num_layers: 2,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 8,
            vocab_size: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            rope_interleaved: false,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            latent_kv: None,
            kv_dtype: crate::config::KvDtype::F32,
        }
    }

    /// What a model would store at a position: a function of every token up to it and the
    /// weights, like real keys and values.
    fn row_value(tokens: &[u32], salt: u64) -> f32 {
        let h =
            tokens.iter().fold(salt.wrapping_mul(0x9E37_79B9) ^ 7, |h, &t| h.wrapping_mul(31).wrapping_add(t as u64));
        (h % 100_003) as f32
    }

    /// A sequence as the test knows it: its tokens, weights and the value of each held row.
    #[derive(Default, Clone)]
    struct Shadow {
        tokens: Vec<u32>,
        rows: Vec<f32>,
        salt: u64,
    }

    /// Writes rows of value `values` at positions len.. of `slot` (reserve, write, set length).
    fn write(cache: &mut KvCache, slot: usize, values: &[f32]) -> Result<()> {
        let len = cache.len(slot);
        cache.reserve(slot, len, len + values.len())?;
        let d = cache.keys[0].dim(3)?;
        let rows: Vec<f32> = values.iter().flat_map(|&v| std::iter::repeat_n(v, d)).collect();
        let rows = Tensor::from_vec(rows, (values.len(), 1, d), &Device::Cpu)?;
        let tokens: Vec<TokenSlot> = (len..len + values.len()).map(|p| TokenSlot::causal(slot, p)).collect();
        for cache_t in cache.keys.iter().chain(&cache.values) {
            ops::cache_write(cache_t, &rows, &tokens, &cache.tables, OpsPath::CpuKernels)?;
        }
        cache.set_len(slot, len + values.len());
        Ok(())
    }

    /// Every slot holds exactly its shadow's rows.
    fn verify(cache: &KvCache, shadows: &[Shadow], step: usize) {
        for (slot, s) in shadows.iter().enumerate() {
            assert_eq!(cache.len(slot), s.rows.len(), "step {step}: slot {slot}'s length");
            let snap = cache.snapshot(slot).unwrap();
            for t in snap.keys.iter().chain(&snap.values) {
                let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                let want: Vec<f32> = s.rows.iter().flat_map(|&v| std::iter::repeat_n(v, 8)).collect();
                assert_eq!(got, want, "step {step}: slot {slot}'s rows");
            }
        }
    }

    /// Thousands of random steps of what the engine does (start on a cached prefix, prefill in
    /// chunks, decode, index, roll back, move a sibling into place, end), in a pool small enough
    /// to run out: the bookkeeping holds after every step (no leak, no double free, holders
    /// equal to table entries), a failed reservation changes nothing, and every slot's rows stay
    /// exactly what it wrote or shared, whatever other slots do to shared blocks.
    #[test]
    fn random_steps_keep_the_books_and_every_row() {
        let mut cache = KvCache::with_blocks(&config(), 5, 96, 10, &Device::Cpu).unwrap();
        let mut shadows = vec![Shadow::default(); 5];
        let mut seed = 12345u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let bases: Vec<Vec<u32>> = (0..3).map(|b| (0..70).map(|i| ((i * 7 + b * 13) % 60) as u32).collect()).collect();
        let (mut hits, mut failures) = (0, 0);
        for step in 0..6000 {
            let slot = next(5) as usize;
            let s = &mut shadows[slot];
            let before = (cache.len(slot), cache.available_blocks());
            let outcome: Result<()> = if s.rows.is_empty() {
                // A new sequence: a shared-looking prompt, started on whatever is cached.
                let base = &bases[next(3) as usize];
                let mut prompt = base[..20 + next(40) as usize].to_vec();
                prompt.extend((0..next(6)).map(|_| next(60) as u32));
                let salt = next(4) / 3; // mostly the served model's weights
                let found = cache.share_prefix(slot, &prompt, salt, prompt.len() - 1).unwrap();
                hits += found;
                s.tokens = prompt[..found].to_vec();
                s.rows = (1..=found).map(|p| row_value(&prompt[..p], salt)).collect();
                s.salt = salt;
                let chunk = (prompt.len() - found).min(1 + next(16) as usize);
                let values: Vec<f32> = (found..found + chunk).map(|p| row_value(&prompt[..=p], salt)).collect();
                match write(&mut cache, slot, &values) {
                    Ok(()) => {
                        s.tokens.extend_from_slice(&prompt[found..found + chunk]);
                        s.rows.extend(values);
                        Ok(())
                    }
                    // The pool cannot take it: it gives back what it shared (the engine's
                    // admission does the same) and waits.
                    Err(e) => {
                        cache.reset(slot).unwrap();
                        *s = Shadow::default();
                        Err(e)
                    }
                }
            } else {
                match next(10) {
                    0 => {
                        cache.reset(slot).unwrap();
                        *s = Shadow::default();
                        Ok(())
                    }
                    1 | 2 => {
                        // A rejected draft: back to an earlier length.
                        let keep = s.rows.len() - next(s.rows.len().min(6) as u64 + 1) as usize;
                        cache.truncate(slot, keep).unwrap();
                        s.rows.truncate(keep);
                        s.tokens.truncate(keep);
                        Ok(())
                    }
                    3 if s.rows.len() >= 3 && s.rows.len() < cache.capacity() => {
                        // A winning tree sibling of the token at `to`, computed after the chain.
                        let to = s.rows.len() - 1 - next(2) as usize;
                        let token = next(60) as u32;
                        let mut seen = s.tokens[..to].to_vec();
                        seen.push(token);
                        let value = row_value(&seen, s.salt);
                        write(&mut cache, slot, &[value]).and_then(|_| {
                            let from = cache.len(slot) - 1;
                            match cache.move_position(slot, from, to) {
                                Ok(()) => {
                                    s.tokens = seen;
                                    s.rows.truncate(to);
                                    s.rows.push(value);
                                    Ok(())
                                }
                                // No block for the copy: the sibling is dropped (the engine
                                // never gets here: its step already copied that block).
                                Err(e) => cache.truncate(slot, from).and(Err(e)),
                            }
                        })
                    }
                    _ => {
                        // Decode (or a prompt chunk): a few more tokens.
                        let new: Vec<u32> = (0..1 + next(4)).map(|_| next(60) as u32).collect();
                        let mut all = s.tokens.clone();
                        let values: Vec<f32> = new
                            .iter()
                            .map(|&t| {
                                all.push(t);
                                row_value(&all, s.salt)
                            })
                            .collect();
                        match s.rows.len() + values.len() <= cache.capacity() {
                            true => write(&mut cache, slot, &values).map(|_| {
                                s.tokens = all;
                                s.rows.extend(values);
                            }),
                            false => Ok(()),
                        }
                    }
                }
            };
            if let Err(e) = outcome {
                assert!(e.to_string().contains("out of KV blocks"), "step {step}: {e}");
                assert_eq!(
                    (cache.len(slot), cache.available_blocks()),
                    before,
                    "step {step}: a failure changed things"
                );
                failures += 1;
            }
            let s = &shadows[slot];
            cache.index_prefix(slot, &s.tokens, s.salt).unwrap();
            cache.check().unwrap_or_else(|e| panic!("step {step}: {e}"));
            if step % 25 == 0 {
                verify(&cache, &shadows, step);
            }
        }
        verify(&cache, &shadows, 6000);
        assert!(hits > 1000, "prefixes were shared ({hits} tokens)");
        assert!(failures > 10, "the pool ran out ({failures} times)");
    }
}
