//! Eight-lane f32 vectors behind one trait, with two implementations: AVX2+FMA+F16C intrinsics
//! and a portable array fallback. Kernels are written once, generic over [`Simd`], and
//! instantiated inside `#[target_feature]` functions, so every `#[inline(always)]` method here
//! is compiled with the features of the function it ends up in.

use half::{bf16, f16};

pub const LANES: usize = 8;

pub trait Simd: Copy + Send + Sync + 'static {
    type V: Copy;

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
    /// Lane `t` of the result is the sum of the lanes of `v[t]`.
    fn hsum8(self, v: [Self::V; 8]) -> Self::V;
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

    /// Load `len < 8` elements, zero-filling the rest.
    /// # Safety
    /// `p` must be valid for reading `len` elements.
    #[inline(always)]
    unsafe fn load_partial<S: Simd>(s: S, p: *const Self, len: usize) -> S::V {
        let mut buf = [Self::ZERO; LANES];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len);
        Self::load(s, buf.as_ptr())
    }

    /// Store the first `len < 8` lanes.
    /// # Safety
    /// `p` must be valid for writing `len` elements.
    #[inline(always)]
    unsafe fn store_partial<S: Simd>(s: S, p: *mut Self, v: S::V, len: usize) {
        let mut buf = [Self::ZERO; LANES];
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
    fn hsum8(self, v: [A8; 8]) -> A8 {
        let mut r = [0.0; LANES];
        for i in 0..LANES {
            r[i] = self.hsum(v[i]);
        }
        r
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::Avx2;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
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
        fn hsum8(self, v: [__m256; 8]) -> __m256 {
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
}
