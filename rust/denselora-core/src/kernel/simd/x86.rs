//! The x86-64 backends: AVX2 + FMA + F16C (8 lanes) and AVX-512 (16 lanes, optionally with the
//! AVX512-BF16 dot product). Compiled only for x86-64; each value exists only once its features
//! were detected at run time.

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
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb));
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
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb));
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
