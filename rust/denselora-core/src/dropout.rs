//! Dropout masks from a counter-based generator: element `c` of the mask stream for `seed` is a
//! pure function of `(seed, c)`, so any range of the stream can be generated on its own (forward
//! and backward redraw the same masks from the seed; chunks of one stream equal the whole).
//!
//! The stream: `key = splitmix64(seed)`. Counter `c` belongs to word `w = c / 2`; the 32-bit hash
//! of the word is
//!
//! ```text
//! block  = splitmix64(key + (w >> 32))           (k1, k2 = its low and high 32 bits)
//! hash(w) = fmix32(fmix32(lo32(w) ^ k1) ^ k2)     (fmix32: murmur3's 32-bit finalizer)
//! ```
//!
//! and element `c` takes its low 16 bits when `c` is even, its high 16 bits when odd. It is
//! dropped iff that 16-bit value is below `threshold` (so P(drop) = threshold / 65536).
//!
//! Why this is good enough for dropout: dropout needs each element dropped with the right
//! probability, independently of its neighbours and of other seeds, with no pattern that lines up
//! with the tensor layout; nobody is predicting it. `fmix32` is a bijection of `u32` in which
//! every input bit flips each output bit with probability close to 1/2; two keyed rounds remove
//! the residual bias a single round shows on consecutive inputs (the counters here), and the
//! keys come from splitmix64, so seeds that differ in one bit give unrelated streams. Within a
//! block the hash is a permutation of the counters, so no value repeats in 2^32 words. The rate,
//! neighbour independence and seed independence are checked statistically in the tests (Rust and
//! Python, the latter against scipy's binomial test).
//!
//! The inner loop uses only 32-bit multiplies, xors and shifts on independent lanes, which LLVM
//! vectorizes (`vpmulld` on 8 lanes with AVX2, on 16 with AVX-512); the only 64-bit
//! multiplies are in `splitmix64`, once per block of 2^32 words.

const FMIX_C1: u32 = 0x85eb_ca6b;
const FMIX_C2: u32 = 0xc2b2_ae35;
/// Words hashed per batch before being compared (a stack buffer that stays in L1).
const BATCH_WORDS: usize = 256;

/// SplitMix64's output function (Steele, Lea, Flood 2014) of `x + golden gamma`.
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Murmur3's 32-bit finalizer: a bijection with full avalanche.
#[inline(always)]
pub fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(FMIX_C1);
    h ^= h >> 13;
    h = h.wrapping_mul(FMIX_C2);
    h ^ (h >> 16)
}

/// The keys of the block of words `[hi << 32, (hi + 1) << 32)` of the stream for `seed`.
#[inline]
fn block_keys(seed: u64, hi: u64) -> (u32, u32) {
    let block = splitmix64(splitmix64(seed).wrapping_add(hi));
    (block as u32, (block >> 32) as u32)
}

/// The 32-bit hash of word `w` of the stream for `seed` (two mask values: low and high half).
pub fn word_hash(seed: u64, w: u64) -> u32 {
    let (k1, k2) = block_keys(seed, w >> 32);
    fmix32(fmix32(w as u32 ^ k1) ^ k2)
}

/// Whether element `c` of the stream for `seed` is dropped at `threshold` (scalar reference).
pub fn is_dropped(seed: u64, c: u64, threshold: u16) -> bool {
    let h = word_hash(seed, c >> 1);
    let v = if c & 1 == 0 { h as u16 } else { (h >> 16) as u16 };
    v < threshold
}

/// Fills `out[i]` with whether element `offset + i` of the stream for `seed` is dropped: its
/// 16-bit value is below `threshold`. Counters wrap modulo 2^64.
pub fn fill_dropout_mask(out: &mut [bool], seed: u64, offset: u64, threshold: u16) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { fill_avx512(out, seed, offset, threshold) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { fill_avx2(out, seed, offset, threshold) };
        }
    }
    fill_generic(out, seed, offset, threshold)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn fill_avx512(out: &mut [bool], seed: u64, offset: u64, threshold: u16) {
    fill_generic(out, seed, offset, threshold)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_avx2(out: &mut [bool], seed: u64, offset: u64, threshold: u16) {
    fill_generic(out, seed, offset, threshold)
}

/// The portable body, inlined into each `#[target_feature]` entry so that LLVM vectorizes it
/// for that instruction set.
#[inline(always)]
fn fill_generic(out: &mut [bool], seed: u64, offset: u64, threshold: u16) {
    let mut out = out;
    let mut c = offset;
    // An odd start takes the high half of its word alone, so that the rest is whole words.
    if c & 1 == 1 && !out.is_empty() {
        out[0] = is_dropped(seed, c, threshold);
        out = &mut out[1..];
        c = c.wrapping_add(1);
    }
    let mut halves = [0u16; 2 * BATCH_WORDS];
    while out.len() >= 2 {
        let w = c >> 1;
        let hi = w >> 32;
        let (k1, k2) = block_keys(seed, hi);
        // Whole words left in this block (the low word runs up to 2^32 - 1), and in `out`.
        let in_block = (1u64 << 32) - (w & 0xffff_ffff);
        let words = (in_block.min((out.len() / 2) as u64) as usize).min(BATCH_WORDS);
        let lo = w as u32;
        for (j, pair) in halves[..2 * words].chunks_exact_mut(2).enumerate() {
            let h = fmix32(fmix32(lo.wrapping_add(j as u32) ^ k1) ^ k2);
            pair[0] = h as u16;
            pair[1] = (h >> 16) as u16;
        }
        let (head, rest) = out.split_at_mut(2 * words);
        for (o, &v) in head.iter_mut().zip(&halves[..2 * words]) {
            *o = v < threshold;
        }
        out = rest;
        c = c.wrapping_add(2 * words as u64);
    }
    if let Some(last) = out.first_mut() {
        *last = is_dropped(seed, c, threshold);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(n: usize, seed: u64, offset: u64, threshold: u16) -> Vec<bool> {
        let mut out = vec![false; n];
        fill_dropout_mask(&mut out, seed, offset, threshold);
        out
    }

    #[test]
    fn deterministic_and_matches_scalar_reference() {
        let a = mask(10_001, 42, 0, 20_000);
        assert_eq!(a, mask(10_001, 42, 0, 20_000));
        for (i, &d) in a.iter().enumerate() {
            assert_eq!(d, is_dropped(42, i as u64, 20_000), "element {i}");
        }
    }

    #[test]
    fn fmix32_reference_values() {
        // Values of murmur3's fmix32 evaluated outside this crate (Python integers).
        assert_eq!(fmix32(0), 0);
        assert_eq!(fmix32(1), 0x514e_28b7);
        assert_eq!(fmix32(0x1234_5678), 0xe37c_d1bc);
    }

    #[test]
    fn chunks_equal_the_whole() {
        let n = 5_000;
        let whole = mask(n, 7, 0, 30_000);
        for k in [0, 1, 2, 3, 511, 512, 513, 1_001, n - 1, n] {
            let mut parts = mask(k, 7, 0, 30_000);
            parts.extend(mask(n - k, 7, k as u64, 30_000));
            assert_eq!(parts, whole, "split at {k}");
        }
        // Odd offsets and lengths, including the portable fallback.
        let mut generic = vec![false; n - 3];
        fill_generic(&mut generic, 7, 3, 30_000);
        assert_eq!(generic, whole[3..]);
    }

    #[test]
    fn counters_across_the_32_bit_block_boundary() {
        // Words 2^32 - 3 .. 2^32 + 3: a chunk crossing the boundary equals element-wise generation,
        // and the next block is keyed differently (not a repeat of block 0).
        let start = (1u64 << 33) - 6;
        let crossing = mask(13, 9, start, 32_768);
        for (i, &d) in crossing.iter().enumerate() {
            assert_eq!(d, is_dropped(9, start + i as u64, 32_768), "element {i}");
        }
        let h0: Vec<u32> = (0..64).map(|w| word_hash(9, w)).collect();
        let h1: Vec<u32> = (0..64).map(|w| word_hash(9, (1 << 32) + w)).collect();
        assert_ne!(h0, h1);
        // Counters near 2^64 wrap instead of panicking.
        let wrap = mask(8, 9, u64::MAX - 3, 32_768);
        assert_eq!(wrap[4..], mask(4, 9, 0, 32_768)[..]);
    }

    /// |count - n p| within 5 standard deviations of a binomial(n, p).
    fn assert_binomial(count: usize, n: usize, p: f64, what: &str) {
        let mean = n as f64 * p;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        assert!((count as f64 - mean).abs() < 5.0 * sd, "{what}: {count} of {n}, expected {mean:.0} ± {sd:.0}");
    }

    #[test]
    fn rate_matches_threshold() {
        let n = 1 << 20;
        for threshold in [1u16, 3_277, 6_554, 32_768, 65_535] {
            let dropped = mask(n, 1234, 0, threshold).iter().filter(|&&d| d).count();
            assert_binomial(dropped, n, threshold as f64 / 65_536.0, &format!("threshold {threshold}"));
        }
    }

    #[test]
    fn neighbours_and_seeds_are_independent() {
        let n = 1 << 20;
        let a = mask(n, 5, 0, 32_768);
        let pairs = a.windows(2).filter(|w| w[0] && w[1]).count();
        assert_binomial(pairs, n - 1, 0.25, "adjacent pairs");
        let same_word = a.chunks_exact(2).filter(|w| w[0] && w[1]).count();
        assert_binomial(same_word, n / 2, 0.25, "halves of a word");
        let b = mask(n, 6, 0, 32_768);
        let both = a.iter().zip(&b).filter(|(x, y)| **x && **y).count();
        assert_binomial(both, n, 0.25, "seeds 5 and 6");
        assert_ne!(a, b);
    }
}
