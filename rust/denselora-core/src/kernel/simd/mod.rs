//! f32 vectors behind one trait, with three implementations: AVX-512 (16 lanes, optionally with
//! the AVX512-BF16 dot product) and AVX2+FMA+F16C (8 lanes) in `x86`, and a portable 8-lane
//! array fallback in `portable`.
//! Kernels are written once, generic over [`Simd`], and instantiated inside `#[target_feature]`
//! functions, so every `#[inline(always)]` method here is compiled with the features of the
//! function it ends up in.

use half::{bf16, f16};

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use portable::Portable;
#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

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
