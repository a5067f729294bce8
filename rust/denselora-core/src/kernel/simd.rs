//! f32 vectors behind one trait, with three implementations: AVX-512 (16 lanes, optionally with
//! the AVX512-BF16 dot product), AVX2+FMA+F16C (8 lanes), and a portable 8-lane array fallback.
//! Kernels are written once, generic over [`Simd`], and instantiated inside `#[target_feature]`
//! functions, so every `#[inline(always)]` method here is compiled with the features of the
//! function it ends up in.

use half::{bf16, f16};

/// The widest vector of any backend, in f32 lanes: the size of scratch arrays sized per lane.
pub const MAX_LANES: usize = 16;

pub trait Simd: Copy + Send + Sync + 'static {
    type V: Copy;
    /// f32 lanes per vector (at most [`MAX_LANES`]). Comments on the methods say "8" for it.
    const LANES: usize;
    /// Rows of the prefill micro-kernel tile (its accumulators are `MR × 2` vectors).
    const MR: usize;
    /// Whether [`Simd::dot_bf16`] is a native pairwise bf16 dot product.
    const DPBF16: bool = false;

    fn splat(self, v: f32) -> Self::V;
    fn zero(self) -> Self::V;
    /// # Safety
    /// `p` must be valid for reading 8 f32.
    unsafe fn load(self, p: *const f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for writing 8 f32.
    unsafe fn store(self, p: *mut f32, v: Self::V);
    /// # Safety
    /// `p` must be valid for reading 8 bf16 bit patterns.
    unsafe fn load_bf16(self, p: *const u16) -> Self::V;
    /// Round to nearest even; NaN stays NaN.
    /// # Safety
    /// `p` must be valid for writing 8 u16.
    unsafe fn store_bf16(self, p: *mut u16, v: Self::V);
    /// # Safety
    /// `p` must be valid for reading 8 f16 bit patterns.
    unsafe fn load_f16(self, p: *const u16) -> Self::V;
    /// # Safety
    /// `p` must be valid for writing 8 u16.
    unsafe fn store_f16(self, p: *mut u16, v: Self::V);

    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `1 / d` to about 1 ulp of f32 precision (not necessarily correctly rounded).
    fn recip(self, d: Self::V) -> Self::V;
    /// `a * b + c` (fused where the hardware has it).
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `min(a, b)` / `max(a, b)`; when `b` is NaN the result is NaN.
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    fn abs(self, a: Self::V) -> Self::V;
    /// Round to the nearest integer (the value stays a float).
    fn round(self, a: Self::V) -> Self::V;
    /// `2^n` for integral `n` in [-126, 127].
    fn exp2_int(self, n: Self::V) -> Self::V;
    /// Lane mask of `a < b`.
    fn lt(self, a: Self::V, b: Self::V) -> Self::V;
    /// `mask ? a : b` lane by lane.
    fn select(self, mask: Self::V, a: Self::V, b: Self::V) -> Self::V;
    fn hsum(self, a: Self::V) -> f32;
    /// Lane `t` of the result is the sum of the lanes of `v[t]`, for `t < LANES` (the rest of
    /// `v` is ignored).
    fn hsum_lanes(self, v: &[Self::V; MAX_LANES]) -> Self::V;
    /// Raw bits of `2·LANES` bf16 values (zero past `len`, when `len < 2·LANES`), for
    /// [`Simd::dot_bf16`]. Only called when `DPBF16` is set.
    /// # Safety
    /// `p` must be valid for reading `min(len, 2·LANES)` u16.
    #[inline(always)]
    unsafe fn load_bf16_pairs(self, _p: *const u16, _len: usize) -> Self::V {
        unreachable!("only with DPBF16")
    }
    /// `acc + ` the pairwise products of the bf16 in `a` and `b` (from `load_bf16_pairs`): lane
    /// `t` adds the products of elements `2t` and `2t + 1`. Only called when `DPBF16` is set.
    #[inline(always)]
    fn dot_bf16(self, _acc: Self::V, _a: Self::V, _b: Self::V) -> Self::V {
        unreachable!("only with DPBF16")
    }
}

/// Element types the kernel reads and writes; all arithmetic is f32.
pub trait Elem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    fn to_f32(self) -> f32;
    #[allow(dead_code)] // used by the tests
    fn from_f32(v: f32) -> Self;
    /// # Safety
    /// `p` must be valid for reading 8 elements.
    unsafe fn load<S: Simd>(s: S, p: *const Self) -> S::V;
    /// # Safety
    /// `p` must be valid for writing 8 elements.
    unsafe fn store<S: Simd>(s: S, p: *mut Self, v: S::V);

    /// Whether this is bf16 (whose pairs [`Simd::dot_bf16`] multiplies natively).
    const IS_BF16: bool = false;

    /// Load `len < 8` elements, zero-filling the rest.
    /// # Safety
    /// `p` must be valid for reading `len` elements.
    #[inline(always)]
    unsafe fn load_partial<S: Simd>(s: S, p: *const Self, len: usize) -> S::V {
        let mut buf = [Self::ZERO; MAX_LANES];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len);
        Self::load(s, buf.as_ptr())
    }

    /// Store the first `len < 8` lanes.
    /// # Safety
    /// `p` must be valid for writing `len` elements.
    #[inline(always)]
    unsafe fn store_partial<S: Simd>(s: S, p: *mut Self, v: S::V, len: usize) {
        let mut buf = [Self::ZERO; MAX_LANES];
        Self::store(s, buf.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(buf.as_ptr(), p, len);
    }
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(s: S, p: *const Self) -> S::V {
        s.load(p)
    }
    #[inline(always)]
    unsafe fn store<S: Simd>(s: S, p: *mut Self, v: S::V) {
        s.store(p, v)
    }
}

impl Elem for bf16 {
    const ZERO: Self = bf16::ZERO;
    const IS_BF16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(s: S, p: *const Self) -> S::V {
        s.load_bf16(p as *const u16)
    }
    #[inline(always)]
    unsafe fn store<S: Simd>(s: S, p: *mut Self, v: S::V) {
        s.store_bf16(p as *mut u16, v)
    }
}

impl Elem for f16 {
    const ZERO: Self = f16::ZERO;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(s: S, p: *const Self) -> S::V {
        s.load_f16(p as *const u16)
    }
    #[inline(always)]
    unsafe fn store<S: Simd>(s: S, p: *mut Self, v: S::V) {
        s.store_f16(p as *mut u16, v)
    }
}

/// Plain arrays; LLVM vectorises most of it for the baseline target.
#[derive(Clone, Copy, Debug, Default)]
pub struct Portable;

const LANES: usize = 8;
type A8 = [f32; LANES];

#[inline(always)]
fn map2(a: A8, b: A8, f: impl Fn(f32, f32) -> f32) -> A8 {
    let mut r = [0.0; LANES];
    for i in 0..LANES {
        r[i] = f(a[i], b[i]);
    }
    r
}

#[inline(always)]
fn bf16_bits_rne(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        ((bits >> 16) | 0x40) as u16
    } else {
        ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
    }
}

impl Simd for Portable {
    type V = A8;
    const LANES: usize = LANES;
    const MR: usize = 6;

    #[inline(always)]
    fn splat(self, v: f32) -> A8 {
        [v; LANES]
    }
    #[inline(always)]
    fn zero(self) -> A8 {
        [0.0; LANES]
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> A8 {
        std::ptr::read_unaligned(p as *const A8)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: A8) {
        std::ptr::write_unaligned(p as *mut A8, v)
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> A8 {
        let bits = std::ptr::read_unaligned(p as *const [u16; LANES]);
        bits.map(|b| f32::from_bits((b as u32) << 16))
    }
    #[inline(always)]
    unsafe fn store_bf16(self, p: *mut u16, v: A8) {
        std::ptr::write_unaligned(p as *mut [u16; LANES], v.map(bf16_bits_rne))
    }
    #[inline(always)]
    unsafe fn load_f16(self, p: *const u16) -> A8 {
        let bits = std::ptr::read_unaligned(p as *const [u16; LANES]);
        bits.map(|b| f16::from_bits(b).to_f32())
    }
    #[inline(always)]
    unsafe fn store_f16(self, p: *mut u16, v: A8) {
        std::ptr::write_unaligned(p as *mut [u16; LANES], v.map(|x| f16::from_f32(x).to_bits()))
    }
    #[inline(always)]
    fn add(self, a: A8, b: A8) -> A8 {
        map2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(self, a: A8, b: A8) -> A8 {
        map2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(self, a: A8, b: A8) -> A8 {
        map2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    fn recip(self, d: A8) -> A8 {
        d.map(|v| 1.0 / v)
    }
    #[inline(always)]
    fn fma(self, a: A8, b: A8, c: A8) -> A8 {
        // Unfused: `mul_add` without hardware FMA is a slow library call.
        let mut r = [0.0; LANES];
        for i in 0..LANES {
            r[i] = a[i] * b[i] + c[i];
        }
        r
    }
    #[inline(always)]
    fn min(self, a: A8, b: A8) -> A8 {
        map2(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    fn max(self, a: A8, b: A8) -> A8 {
        map2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    fn abs(self, a: A8) -> A8 {
        a.map(f32::abs)
    }
    #[inline(always)]
    fn round(self, a: A8) -> A8 {
        a.map(f32::round_ties_even)
    }
    #[inline(always)]
    fn exp2_int(self, n: A8) -> A8 {
        n.map(|v| f32::from_bits((((v as i32) + 127) as u32) << 23))
    }
    #[inline(always)]
    fn lt(self, a: A8, b: A8) -> A8 {
        map2(a, b, |x, y| if x < y { f32::from_bits(u32::MAX) } else { 0.0 })
    }
    #[inline(always)]
    fn select(self, mask: A8, a: A8, b: A8) -> A8 {
        let mut r = [0.0; LANES];
        for i in 0..LANES {
            r[i] = if mask[i].to_bits() != 0 { a[i] } else { b[i] };
        }
        r
    }
    #[inline(always)]
    fn hsum(self, a: A8) -> f32 {
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }
    #[inline(always)]
    fn hsum_lanes(self, v: &[A8; MAX_LANES]) -> A8 {
        let mut r = [0.0; LANES];
        for i in 0..LANES {
            r[i] = self.hsum(v[i]);
        }
        r
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Simd, MAX_LANES};
    use std::arch::x86_64::*;

    /// AVX2 + FMA + F16C. Only constructed (see `Avx2::detect`) on a CPU that has them, and only
    /// used inside functions compiled with those features.
    #[derive(Clone, Copy, Debug)]
    pub struct Avx2(());

    impl Avx2 {
        pub fn detect() -> Option<Avx2> {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                Some(Avx2(()))
            } else {
                None
            }
        }

        /// # Safety
        /// The CPU must have AVX2, FMA and F16C.
        #[inline(always)]
        pub unsafe fn assume() -> Avx2 {
            Avx2(())
        }
    }

    // SAFETY (whole impl): an `Avx2` value exists only after the features were detected.
    impl Simd for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        const MR: usize = 6;

        #[inline(always)]
        fn splat(self, v: f32) -> __m256 {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        fn zero(self) -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_bf16(self, p: *const u16) -> __m256 {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
        #[inline(always)]
        unsafe fn store_bf16(self, p: *mut u16, v: __m256) {
            let bits = _mm256_castps_si256(v);
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
            let rounded =
                _mm256_srli_epi32::<16>(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb));
            let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
            let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            let halves = _mm256_blendv_epi8(rounded, quiet, nan);
            let packed = _mm256_packus_epi32(halves, halves);
            let ordered = _mm256_permute4x64_epi64::<0b1000>(packed);
            _mm_storeu_si128(p as *mut __m128i, _mm256_castsi256_si128(ordered));
        }
        #[inline(always)]
        unsafe fn load_f16(self, p: *const u16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn store_f16(self, p: *mut u16, v: __m256) {
            _mm_storeu_si128(p as *mut __m128i, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn recip(self, d: __m256) -> __m256 {
            // The 12-bit estimate and one Newton step: cheaper than vdivps, within 2 ulp.
            unsafe {
                let r = _mm256_rcp_ps(d);
                let e = _mm256_fnmadd_ps(d, r, _mm256_set1_ps(1.0));
                _mm256_fmadd_ps(r, e, r)
            }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn min(self, a: __m256, b: __m256) -> __m256 {
            // vminps returns its second operand when either is NaN.
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: __m256) -> __m256 {
            unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), a) }
        }
        #[inline(always)]
        fn round(self, a: __m256) -> __m256 {
            unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
        }
        #[inline(always)]
        fn exp2_int(self, n: __m256) -> __m256 {
            unsafe {
                let i = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(i))
            }
        }
        #[inline(always)]
        fn lt(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(a, b) }
        }
        #[inline(always)]
        fn select(self, mask: __m256, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_blendv_ps(b, a, mask) }
        }
        #[inline(always)]
        fn hsum(self, a: __m256) -> f32 {
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn hsum_lanes(self, v: &[__m256; MAX_LANES]) -> __m256 {
            unsafe {
                let a01 = _mm256_hadd_ps(v[0], v[1]);
                let a23 = _mm256_hadd_ps(v[2], v[3]);
                let a45 = _mm256_hadd_ps(v[4], v[5]);
                let a67 = _mm256_hadd_ps(v[6], v[7]);
                let b0 = _mm256_hadd_ps(a01, a23);
                let b1 = _mm256_hadd_ps(a45, a67);
                let lo = _mm256_permute2f128_ps::<0x20>(b0, b1);
                let hi = _mm256_permute2f128_ps::<0x31>(b0, b1);
                _mm256_add_ps(lo, hi)
            }
        }
    }

    /// AVX-512 (F + BW) with AVX2, FMA and F16C; with `BF16`, also AVX512-BF16 for
    /// [`Simd::dot_bf16`]. Only constructed (see `Avx512::detect`) on a CPU that has them, and
    /// only used inside functions compiled with those features.
    #[derive(Clone, Copy, Debug)]
    pub struct Avx512<const BF16: bool>(());

    impl<const BF16: bool> Avx512<BF16> {
        pub fn detect() -> Option<Self> {
            let base =
                Avx2::detect().is_some() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
            if base && (!BF16 || is_x86_feature_detected!("avx512bf16")) {
                Some(Avx512(()))
            } else {
                None
            }
        }

        /// # Safety
        /// The CPU must have the features `detect` checks.
        #[inline(always)]
        pub unsafe fn assume() -> Self {
            Avx512(())
        }
    }

    /// bf16 bit patterns as the vector type the dot product takes.
    #[inline(always)]
    unsafe fn as_bh(v: __m512i) -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(v)
    }

    // SAFETY (whole impl): an `Avx512` value exists only after the features were detected.
    impl<const BF16: bool> Simd for Avx512<BF16> {
        type V = __m512;
        const LANES: usize = 16;
        // 2 × 12 accumulators, two panel vectors and a broadcast: 27 of the 32 registers.
        const MR: usize = 12;
        const DPBF16: bool = BF16;

        #[inline(always)]
        fn splat(self, v: f32) -> __m512 {
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        fn zero(self) -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn load_bf16(self, p: *const u16) -> __m512 {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
        #[inline(always)]
        unsafe fn store_bf16(self, p: *mut u16, v: __m512) {
            // Integer rounding rather than vcvtneps2bf16, which flushes subnormals.
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let rounded =
                _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb));
            let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let halves = _mm512_mask_blend_epi32(nan, rounded, quiet);
            _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(halves));
        }
        #[inline(always)]
        unsafe fn load_f16(self, p: *const u16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn store_f16(self, p: *mut u16, v: __m512) {
            _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn recip(self, d: __m512) -> __m512 {
            // The 14-bit estimate and one Newton step.
            unsafe {
                let r = _mm512_rcp14_ps(d);
                let e = _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0));
                _mm512_fmadd_ps(r, e, r)
            }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn min(self, a: __m512, b: __m512) -> __m512 {
            // vminps returns its second operand when either is NaN.
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: __m512) -> __m512 {
            unsafe { _mm512_abs_ps(a) }
        }
        #[inline(always)]
        fn round(self, a: __m512) -> __m512 {
            unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
        }
        #[inline(always)]
        fn exp2_int(self, n: __m512) -> __m512 {
            unsafe {
                let i = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(i))
            }
        }
        #[inline(always)]
        fn lt(self, a: __m512, b: __m512) -> __m512 {
            // As a vector of all-ones lanes, like the other backends; LLVM keeps it a k-mask.
            unsafe {
                let k = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b);
                _mm512_castsi512_ps(_mm512_maskz_mov_epi32(k, _mm512_set1_epi32(-1)))
            }
        }
        #[inline(always)]
        fn select(self, mask: __m512, a: __m512, b: __m512) -> __m512 {
            unsafe {
                let m = _mm512_castps_si512(mask);
                _mm512_mask_blend_ps(_mm512_test_epi32_mask(m, m), b, a)
            }
        }
        #[inline(always)]
        fn hsum(self, a: __m512) -> f32 {
            unsafe {
                let s = _mm256_add_ps(
                    _mm512_castps512_ps256(a),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))),
                );
                let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn hsum_lanes(self, v: &[__m512; MAX_LANES]) -> __m512 {
            // A transposing tree: each level halves the partial sums per output and the
            // number of vectors; a final permutation puts output `t` in lane `t`.
            unsafe {
                let mut a = [_mm512_setzero_ps(); 8];
                for t in 0..8 {
                    // 256-bit halves of v[t] and v[t + 8].
                    let x = _mm512_shuffle_f32x4::<0b01_00_01_00>(v[t], v[t + 8]);
                    let y = _mm512_shuffle_f32x4::<0b11_10_11_10>(v[t], v[t + 8]);
                    a[t] = _mm512_add_ps(x, y);
                }
                let mut b = [_mm512_setzero_ps(); 4];
                for t in 0..4 {
                    let x = _mm512_shuffle_f32x4::<0b10_00_10_00>(a[t], a[t + 4]);
                    let y = _mm512_shuffle_f32x4::<0b11_01_11_01>(a[t], a[t + 4]);
                    b[t] = _mm512_add_ps(x, y);
                }
                let mut c = [_mm512_setzero_ps(); 2];
                for t in 0..2 {
                    let x = _mm512_shuffle_ps::<0b10_00_10_00>(b[t], b[t + 2]);
                    let y = _mm512_shuffle_ps::<0b11_01_11_01>(b[t], b[t + 2]);
                    c[t] = _mm512_add_ps(x, y);
                }
                let x = _mm512_shuffle_ps::<0b10_00_10_00>(c[0], c[1]);
                let y = _mm512_shuffle_ps::<0b11_01_11_01>(c[0], c[1]);
                _mm512_permutexvar_ps(_mm512_loadu_si512(HSUM_ORDER.as_ptr() as *const _), _mm512_add_ps(x, y))
            }
        }
        #[inline(always)]
        unsafe fn load_bf16_pairs(self, p: *const u16, len: usize) -> __m512 {
            let v = if len >= 32 {
                _mm512_loadu_si512(p as *const _)
            } else {
                _mm512_maskz_loadu_epi16((1u32 << len) - 1, p as *const i16)
            };
            _mm512_castsi512_ps(v)
        }
        #[inline(always)]
        fn dot_bf16(self, acc: __m512, a: __m512, b: __m512) -> __m512 {
            // SAFETY: `DPBF16` (the only case this is called) means AVX512-BF16 was detected.
            unsafe { _mm512_dpbf16_ps(acc, as_bh(_mm512_castps_si512(a)), as_bh(_mm512_castps_si512(b))) }
        }
    }

    /// Lane of the tree's result that holds output `t`, for `t` in lane order.
    static HSUM_ORDER: [i32; 16] = [0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15];
}
