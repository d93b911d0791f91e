//! Recycled chunk buffers: large buffers go round walker → compressor → sink → here and
//! back, never freed mid-run (freed multi-MiB buffers linger in the allocator's
//! per-thread arenas, and fresh ones cost page faults on every chunk).
//!
//! Every pooled buffer has one capacity (a full chunk's compression output), and a chunk
//! held in one is charged that whole capacity ([`BufferPool::charge`]), whatever its
//! length: a recycled buffer's pages are all resident, so a short chunk in it costs as
//! much memory as a full one.
use crossbeam_channel::{Receiver, Sender};

/// Buffers smaller than this are left to the allocator, which handles them well; most
/// store paths are a few KiB.
const MIN_POOLED: usize = 256 << 10;

use crate::memory::output_bound;

/// Two free lists: buffers whose contents are mostly initialized (NAR chunks coming back
/// from compression; reused by the walker, which reads files straight into them and must
/// not pay a memset per chunk) and the others (compressed outputs; reused by compressors,
/// which only need capacity).
#[derive(Debug, Clone)]
pub struct BufferPool {
    /// The capacity of every pooled buffer.
    capacity: usize,
    /// Chunks are large enough to be pooled at all (else every buffer is the
    /// allocator's, and none is kept).
    pooling: bool,
    filled: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
    empty: (Sender<Vec<u8>>, Receiver<Vec<u8>>),
}

impl BufferPool {
    /// A pool of buffers able to hold a chunk of `chunk_size` bytes or its compressed
    /// output, keeping at most `max_free` of each kind for reuse (no more buffers than
    /// that exist at once in a run, so none is freed mid-run).
    pub fn new(max_free: usize, chunk_size: usize) -> Self {
        BufferPool {
            capacity: output_bound(chunk_size),
            pooling: chunk_size >= MIN_POOLED,
            filled: crossbeam_channel::bounded(max_free.max(1)),
            empty: crossbeam_channel::bounded(max_free.max(1)),
        }
    }

    /// Whether a chunk of `len` bytes lives in a pooled buffer.
    fn pooled(&self, len: usize) -> bool {
        self.pooling && len >= MIN_POOLED && len <= self.capacity
    }

    /// The memory a chunk of at most `len` bytes holds, from the walker to the sink,
    /// compressed or not: a pooled buffer's whole capacity, else room for its compressed
    /// output. A chunk's budget permit is this much.
    pub fn charge(&self, len: usize) -> u64 {
        if self.pooled(len) {
            self.capacity as u64
        } else {
            output_bound(len) as u64
        }
    }

    /// A pooled buffer, recycled when one is free (of either kind, `first` tried first).
    fn recycled(&self, first: &Receiver<Vec<u8>>, second: &Receiver<Vec<u8>>) -> Option<Vec<u8>> {
        first.try_recv().or_else(|_| second.try_recv()).ok()
    }

    /// An empty buffer for the compressed output of a chunk of `len` bytes, within the
    /// chunk's [`BufferPool::charge`].
    pub fn take_output(&self, len: usize) -> Vec<u8> {
        if !self.pooled(len) {
            return Vec::with_capacity(output_bound(len));
        }
        match self.recycled(&self.empty.1, &self.filled.1) {
            Some(mut buf) => {
                buf.clear();
                buf
            }
            None => Vec::with_capacity(self.capacity),
        }
    }

    /// A buffer of exactly `len` bytes whose contents are unspecified (old data or zeros),
    /// to be written over in place, within the chunk's [`BufferPool::charge`]. A recycled
    /// chunk keeps its length, so in steady state this costs no memset.
    pub fn take_filled(&self, len: usize) -> Vec<u8> {
        if !self.pooled(len) {
            // Zeroed by the allocator (fresh pages from the kernel for large sizes).
            return vec![0; len];
        }
        let mut buf = self
            .recycled(&self.filled.1, &self.empty.1)
            .unwrap_or_else(|| Vec::with_capacity(self.capacity));
        buf.resize(len, 0);
        buf
    }

    /// Gives a buffer back; one not of the pool's capacity, or beyond what the pool
    /// keeps, is freed.
    pub fn give(&self, buf: Vec<u8>) {
        if self.pooling && buf.capacity() == self.capacity {
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

    const CHUNK: usize = 1 << 20;

    #[test]
    fn large_buffers_are_reused_small_ones_are_not() {
        let pool = BufferPool::new(2, CHUNK);
        let mut a = pool.take_output(CHUNK);
        a.extend_from_slice(b"old");
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take_output(CHUNK);
        assert_eq!(
            (b.as_ptr(), b.len()),
            (ptr, 0),
            "the same allocation, emptied"
        );
        pool.give(vec![0; 10]);
        pool.give(vec![0; 2 * CHUNK]);
        assert_eq!(
            pool.empty.1.len() + pool.filled.1.len(),
            0,
            "buffers not of the pool's capacity are not kept"
        );
        for _ in 0..3 {
            pool.give(Vec::with_capacity(pool.capacity));
        }
        assert_eq!(pool.empty.1.len(), 2, "at most max_free are kept");
    }

    #[test]
    fn filled_buffers_go_to_the_walker_empty_ones_to_compressors() {
        let pool = BufferPool::new(4, CHUNK);
        let mut chunk = pool.take_filled(CHUNK);
        chunk.fill(7);
        let chunk_ptr = chunk.as_ptr();
        let mut out = pool.take_output(CHUNK);
        out.extend_from_slice(&[1; 1000]);
        let out_ptr = out.as_ptr();
        pool.give(out);
        pool.give(chunk);
        // The walker gets the full chunk back, length kept (no memset).
        let w = pool.take_filled(CHUNK);
        assert_eq!((w.as_ptr(), w.len()), (chunk_ptr, CHUNK));
        // A compressor gets the mostly empty one.
        let c = pool.take_output(CHUNK);
        assert_eq!((c.as_ptr(), c.len()), (out_ptr, 0));
        // Nothing pooled: a zeroed buffer of the asked length.
        assert_eq!(pool.take_filled(300 << 10), vec![0; 300 << 10]);
    }

    /// With chunks too small to pool, no buffer is kept: a full chunk's output buffer has
    /// the pool's capacity, but no chunk would ever take it again.
    #[test]
    fn a_pool_of_chunks_too_small_to_pool_keeps_nothing() {
        let pool = BufferPool::new(4, 128 << 10);
        for _ in 0..3 {
            pool.give(pool.take_output(128 << 10));
            pool.give(pool.take_filled(128 << 10));
        }
        assert_eq!(pool.empty.1.len() + pool.filled.1.len(), 0);
    }

    /// Whatever is free in the pool, a buffer for a chunk of any length (and the buffer
    /// its compressed output goes into) fits in what that chunk is charged: a short chunk
    /// in a recycled full-size buffer is charged the full size.
    #[test]
    fn every_buffer_fits_the_charge_of_its_chunk() {
        let pool = BufferPool::new(8, CHUNK);
        for _ in 0..4 {
            pool.give(pool.take_filled(CHUNK));
            pool.give(pool.take_output(CHUNK));
        }
        for len in [
            0,
            1,
            1000,
            MIN_POOLED - 1,
            MIN_POOLED,
            300 << 10,
            CHUNK / 2,
            CHUNK,
        ] {
            let charge = pool.charge(len);
            assert!(charge >= output_bound(len) as u64, "{len}: {charge}");
            let b = pool.take_filled(len);
            assert_eq!(b.len(), len);
            assert!(
                b.capacity() as u64 <= charge,
                "{len}: {} > {charge}",
                b.capacity()
            );
            let o = pool.take_output(len);
            assert!(o.capacity() >= output_bound(len), "{len}");
            assert!(
                o.capacity() as u64 <= charge,
                "{len}: {} > {charge}",
                o.capacity()
            );
            use crate::format::compression::{Compression, CompressionSettings};
            for settings in [
                CompressionSettings::new(Compression::Zstd, Some(3)).unwrap(),
                CompressionSettings::new(Compression::Xz, Some(1)).unwrap(),
            ] {
                // Incompressible data: compression fills the buffer without growing it.
                let data: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
                let o = pool.take_output(len);
                let cap = o.capacity();
                let c = super::super::compress::compress_chunk_into(settings, &data, o).unwrap();
                assert_eq!(c.capacity(), cap, "{len} {settings:?}: the output grew");
                pool.give(c);
            }
            pool.give(b);
        }
    }
}
