//! The S3 upload memory: the bytes of NAR data buffered on their way to S3, reserved a
//! whole part at a time before the part is filled. It never waits where waiting could not
//! end (see [`UploadMemory`]).
use std::sync::Arc;

/// The S3 upload memory: bytes of NAR data buffered on their way to S3.
///
/// A buffer reserves the whole part it will hold before the first byte goes in (no
/// hold-and-wait: a writer never holds part of a buffer while waiting for the rest), and
/// keeps its reservation until its request is done. Reservations of buffers still being
/// filled are counted apart: they are only released by the thread that fills them, which
/// may be the very thread that waits. A buffer stops counting as being filled once it is
/// full and sent as a part, or once its NAR is all written
/// ([`crate::cache::NarUpload::written`]): from then on another thread (a request in
/// flight, or the finisher that commits it) releases it without help. So a reservation waits while such buffers can still free enough; when
/// only buffers being filled hold the memory, waiting could never end, and the
/// reservation is granted beyond the capacity instead (by at most those buffers) — never
/// a deadlock.
#[derive(Debug)]
pub(super) struct UploadMemory {
    pub(super) capacity: u64,
    state: std::sync::Mutex<MemoryState>,
    freed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct MemoryState {
    /// Bytes reserved in all.
    reserved: u64,
    /// Of those, reserved by buffers being filled (see [`Reservation::handed_on`]).
    filling: u64,
}

impl UploadMemory {
    pub(super) fn new(capacity: u64) -> Self {
        UploadMemory {
            capacity,
            state: std::sync::Mutex::new(MemoryState::default()),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Bytes reserved in all.
    #[cfg(test)]
    pub(super) fn reserved(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reserved
    }

    /// Reserves `bytes` for a buffer about to be filled.
    pub(super) fn reserve(self: &Arc<Self>, bytes: u64) -> Reservation {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.reserved + bytes > self.capacity
            && st.filling + bytes <= self.capacity
            && st.reserved > st.filling
        {
            st = self.freed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.reserved + bytes > self.capacity {
            tracing::debug!(
                "S3 upload memory: {bytes} bytes granted beyond {} ({} held by buffers being filled)",
                self.capacity,
                st.filling
            );
        }
        st.reserved += bytes;
        st.filling += bytes;
        Reservation {
            memory: self.clone(),
            bytes,
            filling: true,
        }
    }
}

/// Bytes of [`UploadMemory`], returned when dropped.
#[derive(Debug)]
pub(super) struct Reservation {
    memory: Arc<UploadMemory>,
    pub(super) bytes: u64,
    /// Held by a buffer being filled (else by one that is full or all written, which
    /// another thread releases).
    filling: bool,
}

impl Reservation {
    /// The buffer takes no more bytes: it goes out in a request, or waits, all written,
    /// for the finisher that commits it. Either releases it without the filling thread.
    pub(super) fn handed_on(mut self) -> Self {
        if self.filling {
            let mut st = self.memory.state.lock().unwrap_or_else(|e| e.into_inner());
            st.filling -= self.bytes;
            self.filling = false;
            drop(st);
            // A waiter may now see that waiting can succeed.
            self.memory.freed.notify_all();
        }
        self
    }

    /// Takes over `other`'s bytes (both held by the same buffer being filled).
    pub(super) fn absorb(&mut self, mut other: Reservation) {
        debug_assert!(self.filling && other.filling);
        self.bytes += other.bytes;
        other.bytes = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.memory.state.lock().unwrap_or_else(|e| e.into_inner());
        st.reserved -= self.bytes;
        if self.filling {
            st.filling -= self.bytes;
        }
        drop(st);
        self.memory.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::within_deadline;
    use super::*;
    use std::time::Duration;

    /// Three buffers filled by one thread, as the sink fills its open uploads: the third
    /// does not fit, and nothing but the other two (which only this thread can finish)
    /// holds the memory, so waiting would never end; it is granted instead.
    #[test]
    fn a_reservation_only_buffers_being_filled_could_free_is_granted() {
        let memory = Arc::new(UploadMemory::new(100));
        let held = within_deadline(Duration::from_secs(30), "waiting for memory", {
            let memory = memory.clone();
            move || [memory.reserve(40), memory.reserve(40), memory.reserve(40)]
        });
        assert_eq!(memory.reserved(), 120);
        drop(held);
        assert_eq!(memory.reserved(), 0);
    }

    /// While parts in flight hold the memory, a reservation waits for them (they finish
    /// on their own) instead of going beyond the capacity.
    #[test]
    fn a_reservation_waits_for_parts_in_flight() {
        let memory = Arc::new(UploadMemory::new(100));
        let part = memory.reserve(70).handed_on();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let waiter = {
            let memory = memory.clone();
            std::thread::spawn(move || {
                let r = memory.reserve(50);
                tx.send(()).unwrap();
                r
            })
        };
        // Not granted while the part is in flight: 70 + 50 > 100.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(part);
        rx.recv_timeout(Duration::from_secs(30))
            .expect("granted once the part is done");
        let r = waiter.join().unwrap();
        assert_eq!(memory.reserved(), 50);
        drop(r);
    }
}
