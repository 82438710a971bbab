//! A small least-recently-used map (sampling sessions, in-memory checkpoint weights).
use std::collections::HashMap;

/// A map of at most `cap` entries: inserting beyond it drops the least recently used.
pub struct Recent<V> {
    cap: usize,
    map: HashMap<String, (V, std::time::Instant)>,
}

impl<V: Clone> Recent<V> {
    pub fn new(cap: usize) -> Self {
        Recent { cap: cap.max(1), map: HashMap::new() }
    }

    /// The entry, marked as used now.
    pub fn get(&mut self, key: &str) -> Option<V> {
        let (v, used) = self.map.get_mut(key)?;
        *used = std::time::Instant::now();
        Some(v.clone())
    }

    pub fn insert(&mut self, key: String, value: V) {
        while self.map.len() >= self.cap && !self.map.contains_key(&key) {
            let oldest = self.map.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.map.remove(&k),
                None => break,
            };
        }
        self.map.insert(key, (value, std::time::Instant::now()));
    }

    pub fn remove(&mut self, key: &str) {
        self.map.remove(key);
    }

    /// Keeps the entries for which `keep(value, last used)` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&V, std::time::Instant) -> bool) {
        self.map.retain(|_, (v, used)| keep(v, *used));
    }
}
