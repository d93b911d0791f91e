//! The memory budget: a byte semaphore that every chunk of NAR data in flight holds a
//! permit of. It is what makes peak memory a function of configuration, not of NAR size.
use std::sync::{Arc, Condvar, Mutex};

/// A counting semaphore over bytes.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    capacity: u64,
    available: Mutex<u64>,
    freed: Condvar,
}

impl ByteBudget {
    pub fn new(capacity: u64) -> Self {
        assert!(capacity > 0, "a zero budget could never admit a chunk");
        ByteBudget {
            inner: Arc::new(Inner {
                capacity,
                available: Mutex::new(capacity),
                freed: Condvar::new(),
            }),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Blocks until `bytes` are available and takes them. Requests above the capacity are
    /// clamped to it, so one oversized request waits for the whole budget instead of
    /// waiting forever.
    pub fn acquire(&self, bytes: u64) -> Permit {
        let bytes = bytes.min(self.inner.capacity);
        let mut available = self
            .inner
            .available
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while *available < bytes {
            available = self
                .inner
                .freed
                .wait(available)
                .unwrap_or_else(|e| e.into_inner());
        }
        *available -= bytes;
        Permit {
            budget: self.inner.clone(),
            bytes,
        }
    }

    /// Bytes currently free (for tests and statistics).
    pub fn available(&self) -> u64 {
        *self
            .inner
            .available
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// Bytes taken from a [`ByteBudget`]; returned when dropped.
#[must_use = "dropping a permit releases its bytes at once"]
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Inner>,
    bytes: u64,
}

impl Permit {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Inner {
    fn release(&self, bytes: u64) {
        let mut available = self.available.lock().unwrap_or_else(|e| e.into_inner());
        *available += bytes;
        debug_assert!(*available <= self.capacity);
        self.freed.notify_all();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn acquire_blocks_until_bytes_are_released() {
        let b = ByteBudget::new(100);
        let p = b.acquire(80);
        assert_eq!(b.available(), 20);
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || b2.acquire(90).bytes());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "90 bytes are not free yet");
        drop(p);
        assert_eq!(waiter.join().unwrap(), 90);
        assert_eq!(b.available(), 100);
    }

    #[test]
    fn oversized_requests_are_clamped() {
        let b = ByteBudget::new(10);
        assert_eq!(b.acquire(1000).bytes(), 10);
    }
}
