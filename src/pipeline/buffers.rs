//! Recycled chunk buffers. Large buffers go round walker → compressor → sink → here and
//! back, instead of being freed and allocated again: the allocator would keep freed
//! multi-MiB buffers in per-thread arenas (peak memory would creep towards twice the
//! budget) and fresh buffers cost page faults on every chunk.
use crossbeam_channel::{Receiver, Sender};

/// Buffers smaller than this are left to the allocator, which handles them well; most
/// store paths are a few KiB.
const MIN_POOLED: usize = 256 << 10;

/// Two free lists: buffers whose contents are mostly initialized (NAR chunks coming back
/// from compression; reused by the walker, which reads files straight into them and must
/// not pay a memset per chunk) and the others (compressed outputs; reused by compressors,
/// which only need capacity).
#[derive(Debug, Clone)]
pub struct BufferPool {
    filled: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    empty: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
}

impl BufferPool {
    /// A pool keeping at most `max_free` buffers of each kind for reuse (no more buffers
    /// than that exist at once in a run, so none is freed mid-run).
    pub fn new(max_free: usize) -> Self {
        BufferPool {
            filled: crossbeam_channel::bounded(max_free.max(1)),
            empty: crossbeam_channel::bounded(max_free.max(1)),
        }
    }

    /// An empty buffer with room for at least `capacity` bytes.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        if capacity >= MIN_POOLED
            && let Ok(mut buf) = self
                .empty
                .1
                .try_recv()
                .or_else(|_| self.filled.1.try_recv())
        {
            buf.clear();
            buf.reserve(capacity);
            return buf;
        }
        Vec::with_capacity(capacity)
    }

    /// A buffer of exactly `len` bytes whose contents are unspecified (old data or zeros),
    /// to be written over in place. A recycled chunk keeps its length, so in steady state
    /// this costs no memset.
    pub fn take_filled(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED
            && let Ok(mut buf) = self
                .filled
                .1
                .try_recv()
                .or_else(|_| self.empty.1.try_recv())
        {
            buf.resize(len, 0);
            return buf;
        }
        // Zeroed by the allocator (fresh pages from the kernel for large sizes).
        vec![0; len]
    }

    /// Gives a buffer back; a small one, or one beyond what the pool keeps, is freed.
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() >= MIN_POOLED {
            let list = if buf.len() >= buf.capacity() / 2 {
                &self.filled
            } else {
                &self.empty
            };
            let _ = list.0.try_send(buf);
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
        assert_eq!(
            pool.empty.1.len() + pool.filled.1.len(),
            0,
            "small buffers are not kept"
        );
        for _ in 0..3 {
            pool.give(Vec::with_capacity(1 << 20));
        }
        assert_eq!(pool.empty.1.len(), 2, "at most max_free are kept");
    }

    #[test]
    fn filled_buffers_go_to_the_walker_empty_ones_to_compressors() {
        let pool = BufferPool::new(4);
        let chunk = vec![7u8; 1 << 20];
        let chunk_ptr = chunk.as_ptr();
        let mut out = Vec::with_capacity(1 << 20);
        out.extend_from_slice(&[1; 1000]);
        let out_ptr = out.as_ptr();
        pool.give(out);
        pool.give(chunk);
        // The walker gets the full chunk back, length kept (no memset).
        let w = pool.take_filled(1 << 20);
        assert_eq!((w.as_ptr(), w.len()), (chunk_ptr, 1 << 20));
        // A compressor gets the mostly empty one.
        let c = pool.take(1 << 20);
        assert_eq!((c.as_ptr(), c.len()), (out_ptr, 0));
        // Nothing pooled: a zeroed buffer of the asked length.
        assert_eq!(pool.take_filled(300 << 10), vec![0; 300 << 10]);
    }
}
