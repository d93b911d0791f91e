//! What the live uploads of this process own in a cache (temporary files, staging keys,
//! multipart upload ids), so a sweep never removes it whatever its age. Age tells a sweep
//! what a killed upload left, not what a slow live one still needs (a NAR written for
//! days at a low `--max-rate`, or committed and waiting for a slow reference).
//!
//! Each name belongs to a [`Claim`] and goes when the claim is dropped, so an upload that
//! ends in any way (committed, failed, dropped) leaves nothing behind here.
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

/// The names live uploads own.
#[derive(Debug)]
pub(crate) struct Owned<K: Eq + Hash>(Mutex<HashSet<K>>);

impl<K: Eq + Hash> Default for Owned<K> {
    fn default() -> Self {
        Owned(Mutex::default())
    }
}

impl<K: Eq + Hash + Clone> Owned<K> {
    fn names(&self) -> MutexGuard<'_, HashSet<K>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Owns `name` until the claim is dropped.
    pub(crate) fn claim(self: &Arc<Self>, name: K) -> Claim<K> {
        self.names().insert(name.clone());
        Claim {
            owned: self.clone(),
            name,
        }
    }

    /// Whether a live upload owns `name`.
    pub(crate) fn contains(&self, name: &K) -> bool {
        self.names().contains(name)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.names().is_empty()
    }
}

/// One name of an [`Owned`], released when this is dropped.
#[derive(Debug)]
#[must_use = "what it owns is unprotected once it is dropped"]
pub(crate) struct Claim<K: Eq + Hash + Clone> {
    owned: Arc<Owned<K>>,
    name: K,
}

impl<K: Eq + Hash + Clone> Drop for Claim<K> {
    fn drop(&mut self) {
        self.owned.names().remove(&self.name);
    }
}
