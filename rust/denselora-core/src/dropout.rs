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

/// The 16-bit value of element `c` of the stream for `seed` (scalar reference).
pub fn value(seed: u64, c: u64) -> u16 {
    let h = word_hash(seed, c >> 1);
    if c & 1 == 0 {
        h as u16
    } else {
        (h >> 16) as u16
    }
}

/// Whether element `c` of the stream for `seed` is dropped at `threshold` (scalar reference).
pub fn is_dropped(seed: u64, c: u64, threshold: u16) -> bool {
    value(seed, c) < threshold
}

/// Fills `out[i]` with whether element `offset + i` of the stream for `seed` is dropped: its
/// 16-bit value is below `threshold`. Counters wrap modulo 2^64.
pub fn fill_dropout_mask(out: &mut [bool], seed: u64, offset: u64, threshold: u16) {
    #[cfg(target_arch = "x86_64")]
    match x86_level() {
        // SAFETY (both): the CPU has the features the function is compiled for.
        X86Level::Avx512 => return unsafe { fill_avx512(out, seed, offset, threshold) },
        X86Level::Avx2 => return unsafe { fill_avx2(out, seed, offset, threshold) },
        X86Level::Baseline => {}
    }
    fill_generic(out, seed, offset, threshold)
}

/// Sets `data[i]` to zero (all bits clear: +0.0 for IEEE floats of the element's width) where
/// element `offset + i` of the stream for `seed` is dropped: the mask of `fill_dropout_mask`,
/// applied in the pass that draws it, with no mask in memory. Callers view float data as the
/// unsigned integers of its width.
pub fn zero_dropped<T: Zeroable>(data: &mut [T], seed: u64, offset: u64, threshold: u16) {
    #[cfg(target_arch = "x86_64")]
    match x86_level() {
        // SAFETY (both): the CPU has the features the function is compiled for.
        X86Level::Avx512 => return unsafe { zero_avx512(data, seed, offset, threshold) },
        X86Level::Avx2 => return unsafe { zero_avx2(data, seed, offset, threshold) },
        X86Level::Baseline => {}
    }
    zero_generic(data, seed, offset, threshold)
}

/// Element types `zero_dropped` writes zeros into.
pub trait Zeroable: Copy + Send {
    const ZERO: Self;
}

macro_rules! zeroable {
    ($($t:ty),*) => {$(
        impl Zeroable for $t {
            const ZERO: Self = 0;
        }
    )*};
}
zeroable!(u16, u32, u64, i16, i32, i64);

#[cfg(target_arch = "x86_64")]
enum X86Level {
    Avx512,
    Avx2,
    Baseline,
}

#[cfg(target_arch = "x86_64")]
fn x86_level() -> X86Level {
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
        X86Level::Avx512
    } else if std::is_x86_feature_detected!("avx2") {
        X86Level::Avx2
    } else {
        X86Level::Baseline
    }
}

// The portable bodies instantiated inside `#[target_feature]` functions, so that LLVM vectorizes
// the hash for each instruction set.

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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn zero_avx512<T: Zeroable>(data: &mut [T], seed: u64, offset: u64, threshold: u16) {
    zero_generic(data, seed, offset, threshold)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn zero_avx2<T: Zeroable>(data: &mut [T], seed: u64, offset: u64, threshold: u16) {
    zero_generic(data, seed, offset, threshold)
}

/// Calls `f(start, values)` with the 16-bit values of elements `offset + start ..` of the stream
/// for `seed`, in order, until `len` elements are covered. Inlined into each caller so that LLVM
/// vectorizes the hash loop and the caller's use of the values together.
#[inline(always)]
fn for_each_batch(len: usize, seed: u64, offset: u64, mut f: impl FnMut(usize, &[u16])) {
    let mut done = 0;
    let mut c = offset;
    // An odd start takes the high half of its word alone, so that the rest is whole words.
    if c & 1 == 1 && len > 0 {
        f(0, &[value(seed, c)]);
        done = 1;
        c = c.wrapping_add(1);
    }
    let mut halves = [0u16; 2 * BATCH_WORDS];
    while len - done >= 2 {
        let w = c >> 1;
        let (k1, k2) = block_keys(seed, w >> 32);
        // Whole words left in this block (the low word runs up to 2^32 - 1), and in the output.
        let in_block = (1u64 << 32) - (w & 0xffff_ffff);
        let words = (in_block.min(((len - done) / 2) as u64) as usize).min(BATCH_WORDS);
        let lo = w as u32;
        for (j, pair) in halves[..2 * words].chunks_exact_mut(2).enumerate() {
            let h = fmix32(fmix32(lo.wrapping_add(j as u32) ^ k1) ^ k2);
            pair[0] = h as u16;
            pair[1] = (h >> 16) as u16;
        }
        f(done, &halves[..2 * words]);
        done += 2 * words;
        c = c.wrapping_add(2 * words as u64);
    }
    if done < len {
        f(done, &[value(seed, c)]);
    }
}

#[inline(always)]
fn fill_generic(out: &mut [bool], seed: u64, offset: u64, threshold: u16) {
    for_each_batch(out.len(), seed, offset, |start, values| {
        for (o, &v) in out[start..start + values.len()].iter_mut().zip(values) {
            *o = v < threshold;
        }
    });
}

#[inline(always)]
fn zero_generic<T: Zeroable>(data: &mut [T], seed: u64, offset: u64, threshold: u16) {
    for_each_batch(data.len(), seed, offset, |start, values| {
        for (d, &v) in data[start..start + values.len()].iter_mut().zip(values) {
            // A select rather than a branch: vectorizes as a masked blend.
            *d = if v < threshold { T::ZERO } else { *d };
        }
    });
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
    fn zeroing_applies_the_mask_of_the_same_stream() {
        let n = 3_001;
        for offset in [0u64, 1, 1_000] {
            let mask = mask(n, 11, offset, 20_000);
            let mut words: Vec<u32> = (1..=n as u32).collect();
            zero_dropped(&mut words, 11, offset, 20_000);
            let mut halves: Vec<u16> = (1..=n as u16).collect();
            zero_dropped(&mut halves, 11, offset, 20_000);
            for i in 0..n {
                let kept = if mask[i] { 0 } else { i as u32 + 1 };
                assert_eq!((words[i], halves[i] as u32), (kept, kept), "offset {offset}, element {i}");
            }
        }
        let mut doubles = vec![f64::to_bits(1.5); 100];
        zero_dropped(&mut doubles, 3, 0, 65_535);
        assert!(doubles.iter().all(|&d| d == 0 || d == f64::to_bits(1.5)));
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
