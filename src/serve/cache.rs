//! The image cache: identical image bytes reuse their image features across requests.
//!
//! An image's key is the SHA-256 of its bytes as the request brought them (the decoded `data:`
//! URI, or the file); its value is what the model's image stage computed from them
//! ([`Model::encode_images`]: BLIP-2's projected Q-Former queries, LLaVA's projected patch
//! features, InstructBLIP's vision tower output). The worker looks every image of a call up,
//! computes the missing ones as one batch, and runs the call with all of them
//! ([`crate::api::Request::features`]), so a hit skips the vision tower (and Q-Former or
//! projector). The answer is the same as without the cache: on the CPU an image's features do
//! not depend on the batch they were computed in (tests/image_features.rs, tests/serve.rs).
//!
//! Least recently used entries go first once the features held would pass `capacity` bytes
//! (their f32 values); an image larger than the whole capacity is used but not kept.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::metrics::Metrics;
use crate::api::{ImageFeatures, Model};
use crate::image::PixelValues;

/// SHA-256 of an image's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageKey([u8; 32]);

impl ImageKey {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

pub struct ImageCache {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<ImageKey, (ImageFeatures, u64)>,
    /// Entries by last use (a counter), oldest first.
    order: BTreeMap<u64, ImageKey>,
    clock: u64,
    bytes: usize,
}

impl State {
    fn touch(&mut self, key: ImageKey) -> Option<ImageFeatures> {
        self.clock += 1;
        let clock = self.clock;
        let (features, used) = self.entries.get_mut(&key)?;
        self.order.remove(used);
        *used = clock;
        self.order.insert(clock, key);
        Some(features.clone())
    }

    fn insert(&mut self, key: ImageKey, features: ImageFeatures, capacity: usize) {
        let size = features.size_bytes();
        if size > capacity || self.entries.contains_key(&key) {
            return;
        }
        while self.bytes + size > capacity {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some((f, _)) = self.entries.remove(&oldest) {
                self.bytes -= f.size_bytes();
            }
        }
        self.clock += 1;
        self.order.insert(self.clock, key);
        self.entries.insert(key, (features, self.clock));
        self.bytes += size;
    }
}

impl ImageCache {
    /// A cache holding at most `capacity` bytes of features.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The features of each image (`keys[i]` the key of `pixels[i]`): cached ones reused, the
    /// others computed as one batch and kept. A miss is an image whose features were computed,
    /// a hit one that was not (a repeat within the call included).
    pub fn features(
        &self,
        model: &Model,
        keys: &[ImageKey],
        pixels: &[PixelValues],
        metrics: &Metrics,
    ) -> crate::Result<Vec<ImageFeatures>> {
        let mut found: HashMap<ImageKey, ImageFeatures> = HashMap::new();
        let mut missing: Vec<usize> = Vec::new();
        {
            let mut s = self.lock();
            for (i, key) in keys.iter().enumerate() {
                if found.contains_key(key) || missing.iter().any(|&m| keys[m] == *key) {
                    continue;
                }
                match s.touch(*key) {
                    Some(f) => {
                        found.insert(*key, f);
                    }
                    None => missing.push(i),
                }
            }
        }
        if !missing.is_empty() {
            let batch: Vec<PixelValues> = missing.iter().map(|&i| pixels[i].clone()).collect();
            let computed = model.encode_images(&batch)?;
            let mut s = self.lock();
            for (&i, f) in missing.iter().zip(computed) {
                s.insert(keys[i], f.clone(), self.capacity);
                found.insert(keys[i], f);
            }
        }
        let misses = missing.len();
        metrics.image_cache_misses.fetch_add(misses as u64, Ordering::Relaxed);
        metrics.image_cache_hits.fetch_add((keys.len() - misses) as u64, Ordering::Relaxed);
        self.publish(metrics);
        keys.iter()
            .map(|k| {
                found
                    .get(k)
                    .cloned()
                    .ok_or_else(|| crate::Error::InvalidInput("an image's features went missing".into()))
            })
            .collect()
    }

    fn publish(&self, metrics: &Metrics) {
        let s = self.lock();
        metrics.image_cache_entries.store(s.entries.len() as u64, Ordering::Relaxed);
        metrics.image_cache_bytes.store(s.bytes as u64, Ordering::Relaxed);
    }

    #[cfg(test)]
    fn keys(&self) -> Vec<ImageKey> {
        self.lock().order.values().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(n: usize) -> ImageFeatures {
        ImageFeatures::from(vec![0.5; n])
    }

    #[test]
    fn least_recently_used_entries_go_first_and_bytes_stay_bounded() {
        let cache = ImageCache::new(100);
        let (a, b, c) = (ImageKey::of(b"a"), ImageKey::of(b"b"), ImageKey::of(b"c"));
        assert_ne!(a, b);
        let mut s = cache.lock();
        s.insert(a, features(10), 100); // 40 bytes
        s.insert(b, features(10), 100); // 80 bytes
        assert!(s.touch(a).is_some()); // a is now the most recent
        s.insert(c, features(10), 100); // 120 > 100: b goes
        assert_eq!(s.bytes, 80);
        assert!(s.touch(b).is_none());
        assert_eq!(s.entries.len(), 2);
        s.insert(ImageKey::of(b"big"), features(26), 100); // 104 bytes: never kept
        assert_eq!(s.bytes, 80);
        drop(s);
        assert_eq!(cache.keys(), vec![a, c]);
    }
}
