//! The engine-owned KV cache: preallocated per layer as [slots, kv_heads, capacity, head_dim],
//! one slot per sequence. Appending writes rows in place (no concatenation of the whole cache);
//! truncating is setting a length, which is how rejected draft tokens are rolled back.
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::ops::{self, kernels::TokenSlot, OpsPath};
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

pub struct KvCache {
    pub(crate) keys: Vec<Tensor>,
    pub(crate) values: Vec<Tensor>,
    lens: Vec<usize>,
    capacity: usize,
}

impl KvCache {
    /// A cache of `slots` sequences of up to `capacity` tokens each.
    pub fn new(config: &ModelConfig, slots: usize, capacity: usize, device: &Device) -> Result<Self> {
        if slots == 0 || capacity == 0 {
            return Err(ModelError::KvCache("slots and capacity must be positive".into()));
        }
        let shape = (slots, config.num_kv_heads, capacity, config.head_dim);
        let mut keys = Vec::with_capacity(config.num_layers);
        let mut values = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            keys.push(Tensor::zeros(shape, DType::F32, device)?);
            values.push(Tensor::zeros(shape, DType::F32, device)?);
        }
        Ok(KvCache { keys, values, lens: vec![0; slots], capacity })
    }

    pub fn num_slots(&self) -> usize {
        self.lens.len()
    }

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

    /// Forgets everything past `len` tokens of `slot`.
    pub fn truncate(&mut self, slot: usize, len: usize) -> Result<()> {
        let cur = *self.lens.get(slot).ok_or_else(|| ModelError::KvCache(format!("no slot {slot}")))?;
        if len > cur {
            return Err(ModelError::KvCache(format!("cannot truncate slot {slot} from {cur} up to {len} tokens")));
        }
        self.lens[slot] = len;
        Ok(())
    }

    /// Copies the keys and values of position `from` of `slot` to position `to` (< from) and keeps
    /// `to + 1` positions: a verified draft-tree sibling takes the place of the branch it beat.
    pub fn move_position(&mut self, slot: usize, from: usize, to: usize) -> Result<()> {
        let cur = *self.lens.get(slot).ok_or_else(|| ModelError::KvCache(format!("no slot {slot}")))?;
        if to >= from || from >= cur {
            return Err(ModelError::KvCache(format!(
                "cannot move position {from} of slot {slot} ({cur} held) to {to}"
            )));
        }
        let path = self.ops_path();
        let tokens = [TokenSlot::causal(slot, to)];
        for cache in self.keys.iter().chain(&self.values) {
            // [1, kv_heads, 1, head_dim] -> [1, kv_heads, head_dim], the layout cache_write takes.
            let row = cache.narrow(0, slot, 1)?.narrow(2, from, 1)?.squeeze(0)?.transpose(0, 1)?.contiguous()?;
            ops::cache_write(cache, &row, &tokens, path)?;
        }
        self.lens[slot] = to + 1;
        Ok(())
    }

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
        let len = *self.lens.get(slot).ok_or_else(|| ModelError::KvCache(format!("no slot {slot}")))?;
        let take = |t: &Tensor| -> Result<Tensor> {
            // [1, kv_heads, len, head_dim] -> [len, kv_heads, head_dim], the layout cache_write takes.
            Ok(t.narrow(0, slot, 1)?.narrow(2, 0, len)?.squeeze(0)?.transpose(0, 1)?.contiguous()?)
        };
        Ok(KvSnapshot {
            keys: self.keys.iter().map(take).collect::<Result<_>>()?,
            values: self.values.iter().map(take).collect::<Result<_>>()?,
            len,
        })
    }

    /// Writes a snapshot into the empty `slot`.
    pub fn restore(&mut self, slot: usize, snapshot: &KvSnapshot) -> Result<()> {
        if self.lens.get(slot) != Some(&0) {
            return Err(ModelError::KvCache(format!("slot {slot} is not free")));
        }
        if snapshot.len > self.capacity || snapshot.keys.len() != self.keys.len() {
            return Err(ModelError::KvCache("the snapshot does not fit this cache".into()));
        }
        if snapshot.len > 0 {
            let tokens: Vec<TokenSlot> = (0..snapshot.len).map(|pos| TokenSlot::causal(slot, pos)).collect();
            let path = self.ops_path();
            for (cache, rows) in self.keys.iter().zip(&snapshot.keys).chain(self.values.iter().zip(&snapshot.values)) {
                ops::cache_write(cache, rows, &tokens, path)?;
            }
        }
        self.lens[slot] = snapshot.len;
        Ok(())
    }

    /// The op path for writing rows into this cache's tensors.
    fn ops_path(&self) -> OpsPath {
        if self.keys[0].device().is_cpu() {
            OpsPath::CpuKernels
        } else {
            OpsPath::Generic
        }
    }

    pub(crate) fn set_len(&mut self, slot: usize, len: usize) {
        self.lens[slot] = len;
    }
}
