//! The engine-owned KV cache: preallocated per layer as [slots, kv_heads, capacity, head_dim],
//! one slot per sequence. Appending writes rows in place (no concatenation of the whole cache);
//! truncating is setting a length, which is how rejected draft tokens are rolled back.
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};

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

    pub fn reset(&mut self, slot: usize) -> Result<()> {
        self.truncate(slot, 0)
    }

    /// Bytes held by the cache tensors.
    pub fn bytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(|t| t.elem_count() * 4).sum()
    }

    pub(crate) fn set_len(&mut self, slot: usize, len: usize) {
        self.lens[slot] = len;
    }
}
