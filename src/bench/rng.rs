//! Randomness and vocabulary: the seeded generator every workload's bytes and names come from.

/// SplitMix64: tiny, fast, and good enough to make content that looks random to zstd.
#[derive(Debug, Clone)]
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
    /// Uniform in `lo..=hi`.
    pub(super) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi - lo + 1)
    }
    pub(super) fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
    /// In `0..n`, small values far more likely (roughly like word frequencies).
    pub(super) fn skewed(&mut self, n: u64) -> u64 {
        let r = self.below(n);
        self.below(r + 1)
    }
    /// Log-uniform in `lo..=hi`: a power-of-two band first, then uniform inside it.
    /// Integer-only so every platform draws the same sizes.
    pub(super) fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let lo = lo.max(1);
        if hi <= lo {
            return lo;
        }
        let (blo, bhi) = (63 - lo.leading_zeros(), 63 - hi.leading_zeros());
        let band = self.range(u64::from(blo), u64::from(bhi)) as u32;
        let start = (1u64 << band).max(lo);
        let end = (1u64 << band).saturating_mul(2).saturating_sub(1).min(hi);
        self.range(start, end)
    }
    /// A store path size in `lo..=hi` as a closure has them: half the draws log-uniform,
    /// half favouring the small end, so most paths are small and some are many chunks
    /// long (mean about 1.7 MiB for 1 KiB–20 MiB). Integer-only, like [`Rng::log_uniform`].
    pub(super) fn closure_size(&mut self, lo: u64, hi: u64) -> u64 {
        let lo = lo.max(1);
        if hi <= lo {
            return lo;
        }
        if self.percent(50) {
            return self.log_uniform(lo, hi);
        }
        let (blo, bhi) = (63 - lo.leading_zeros(), 63 - hi.leading_zeros());
        let band = blo + self.skewed(u64::from(bhi - blo) + 1) as u32;
        let start = (1u64 << band).max(lo);
        let end = (1u64 << band).saturating_mul(2).saturating_sub(1).min(hi);
        self.range(start, end)
    }
    pub(super) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    /// An independent generator, so one path's content does not shift the next one's.
    pub(super) fn fork(&mut self) -> Rng {
        Rng(self.next_u64())
    }
}

/// Words for text and names, and instruction templates for machine code; one set per
/// workload, drawn from its seed.
#[derive(Debug)]
pub(super) struct Vocab {
    pub(super) words: Vec<Vec<u8>>,
    pub(super) ops: Vec<Vec<u8>>,
}

impl Vocab {
    pub(super) fn new(rng: &mut Rng) -> Self {
        const CONSONANTS: &[u8] = b"bcdfghklmnprstvwz";
        const VOWELS: &[u8] = b"aeiou";
        let words = (0..1024)
            .map(|_| {
                let syllables = 1 + rng.skewed(4);
                let mut w = Vec::new();
                for _ in 0..=syllables {
                    w.push(CONSONANTS[rng.below(CONSONANTS.len() as u64) as usize]);
                    w.push(VOWELS[rng.below(VOWELS.len() as u64) as usize]);
                    if rng.percent(25) {
                        w.push(CONSONANTS[rng.below(CONSONANTS.len() as u64) as usize]);
                    }
                }
                w
            })
            .collect();
        // x86-64-like opcode prefixes: REX, two-byte escape, mov, call, jcc, cmp, lea, ...
        const LEADS: &[u8] = &[
            0x48, 0x48, 0x48, 0x49, 0x4c, 0x0f, 0x89, 0x8b, 0xe8, 0xe9, 0x83, 0x85, 0x74, 0x75,
            0xeb, 0x31, 0x39, 0xff, 0x41, 0x44, 0x66, 0x8d, 0xc3, 0x5d, 0x55, 0x53,
        ];
        let ops = (0..160)
            .map(|_| {
                let len = 1 + rng.skewed(6) as usize;
                let mut op = vec![LEADS[rng.below(LEADS.len() as u64) as usize]];
                for _ in 1..len {
                    // ModRM/SIB-like bytes: few distinct values.
                    op.push((rng.skewed(64) as u8).wrapping_mul(5).wrapping_add(0x40));
                }
                op
            })
            .collect();
        Vocab { words, ops }
    }
    pub(super) fn word(&self, rng: &mut Rng) -> &[u8] {
        &self.words[rng.skewed(self.words.len() as u64) as usize]
    }
    pub(super) fn word_str(&self, rng: &mut Rng) -> String {
        String::from_utf8_lossy(self.word(rng)).into_owned()
    }
}
