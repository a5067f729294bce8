//! The portable backend: plain 8-lane arrays, which LLVM vectorises for the baseline target.
//! Every platform has it; it is also the reference the x86 backends are tested against.

use half::f16;

use super::{Simd, MAX_LANES};

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
