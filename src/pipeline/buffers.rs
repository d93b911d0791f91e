//! Recycled chunk buffers. Large buffers go round walker → compressor → sink → here and
//! back, instead of being freed and allocated again: the allocator would keep freed
//! multi-MiB buffers in per-thread arenas (peak memory would creep towards twice the
//! budget) and fresh buffers cost page faults on every chunk.
use crossbeam_channel::{Receiver, Sender};

/// Buffers smaller than this are left to the allocator, which handles them well; most
/// store paths are a few KiB.
const MIN_POOLED: usize = 256 << 10;

#[derive(Debug, Clone)]
pub struct BufferPool {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
}

impl BufferPool {
    /// A pool keeping at most `max_free` buffers for reuse.
    pub fn new(max_free: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(max_free.max(1));
        BufferPool { tx, rx }
    }

    /// An empty buffer with room for at least `capacity` bytes.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        if capacity >= MIN_POOLED
            && let Ok(mut buf) = self.rx.try_recv()
        {
            buf.clear();
            buf.reserve(capacity);
            return buf;
        }
        Vec::with_capacity(capacity)
    }

    /// Gives a buffer back; a small one, or one beyond what the pool keeps, is freed.
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() >= MIN_POOLED {
            let _ = self.tx.try_send(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_are_reused_small_ones_are_not() {
        let pool = BufferPool::new(2);
        let mut a = pool.take(1 << 20);
        a.extend_from_slice(b"old");
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(1 << 20);
        assert_eq!(
            (b.as_ptr(), b.len()),
            (ptr, 0),
            "the same allocation, emptied"
        );
        pool.give(vec![0; 10]);
        assert_eq!(pool.rx.len(), 0, "small buffers are not kept");
        for _ in 0..3 {
            pool.give(Vec::with_capacity(1 << 20));
        }
        assert_eq!(pool.rx.len(), 2, "at most max_free are kept");
    }
}
