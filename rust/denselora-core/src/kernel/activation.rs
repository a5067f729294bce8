//! Vectorised activations. GELU is the exact (erf) form, `x * Φ(x)`, accurate to a few 1e-7
//! relative in f32; SiLU is `x * sigmoid(x)`. NaN inputs give NaN outputs.
//!
//! Φ is evaluated without cancellation on both sides: for `z = |x|/√2 < 1`, `erf(z) = z·P(z²)`;
//! beyond, `erfc(z) = exp(-z²)·Q(1/(1 + z/2))`. P and Q are least-squares fits (relative error
//! below 5e-8 in f64) made for this crate.

use std::str::FromStr;

use super::simd::Simd;

/// The activation on one side of the branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Gelu,
    Silu,
}

impl Activation {
    pub const fn name(self) -> &'static str {
        match self {
            Activation::Identity => "identity",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
        }
    }
}

impl FromStr for Activation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "identity" => Ok(Activation::Identity),
            "gelu" => Ok(Activation::Gelu),
            "silu" => Ok(Activation::Silu),
            _ => Err(format!("unknown activation {s:?} (expected \"gelu\", \"identity\" or \"silu\")")),
        }
    }
}

#[allow(clippy::excessive_precision)]
// erf(z) / z as a polynomial in z², for 0 <= z < 1.
const ERF_SMALL: [f32; 6] = [
    1.128_379_147_0e0,
    -3.761_239_052_9e-1,
    1.128_057_788_1e-1,
    -2.672_086_719_3e-2,
    4.927_389_873_4e-3,
    -5.667_873_391_1e-4,
];

#[allow(clippy::excessive_precision)]
// erfc(z)·exp(z²) as a polynomial in t = 1/(1 + z/2), for z >= 1.
const ERFC_LARGE: [f32; 9] = [
    -2.738_730_398_5e-6,
    2.821_641_490_2e-1,
    2.813_757_388_2e-1,
    2.506_478_104_2e-1,
    1.664_799_273_2e-1,
    8.634_483_855_1e-2,
    5.094_201_315_6e-2,
    -2.045_809_679_3e-1,
    8.716_195_240_7e-2,
];

#[inline(always)]
fn horner<S: Simd, const N: usize>(s: S, coeffs: &[f32; N], t: S::V) -> S::V {
    let mut p = s.splat(coeffs[N - 1]);
    let mut i = N - 1;
    while i > 0 {
        i -= 1;
        p = s.fma(p, t, s.splat(coeffs[i]));
    }
    p
}

/// `exp(x)`, with `x` clamped to the range where the result is a normal f32.
#[inline(always)]
pub fn exp<S: Simd>(s: S, x: S::V) -> S::V {
    let x = s.max(s.splat(-87.3), s.min(s.splat(88.3), x));
    let n = s.round(s.mul(x, s.splat(std::f32::consts::LOG2_E)));
    // x - n·ln2 in two steps (Cody-Waite), so the reduced argument stays exact.
    let r = s.fma(n, s.splat(-0.693_359_375), x);
    let r = s.fma(n, s.splat(2.121_944_4e-4), r);
    const TAYLOR: [f32; 8] =
        [1.0, 1.0, 0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];
    s.mul(horner(s, &TAYLOR, r), s.exp2_int(n))
}

#[inline(always)]
pub fn gelu<S: Simd>(s: S, x: S::V) -> S::V {
    let one = s.splat(1.0);
    let z = s.mul(s.abs(x), s.splat(std::f32::consts::FRAC_1_SQRT_2));
    let zz = s.mul(z, z);
    let erf_small = s.mul(z, horner(s, &ERF_SMALL, zz));
    let t = s.div(one, s.fma(z, s.splat(0.5), one));
    // exp(-z²) with the rounding error of z² put back: exp(-zz - e) ≈ exp(-zz)·(1 - e).
    let e = s.fma(z, z, s.sub(s.zero(), zz));
    let gauss = s.mul(exp(s, s.sub(s.zero(), zz)), s.sub(one, e));
    let erfc_large = s.mul(gauss, horner(s, &ERFC_LARGE, t));
    let small = s.lt(z, one);
    let erf = s.select(small, erf_small, s.sub(one, erfc_large));
    let erfc = s.select(small, s.sub(one, erf_small), erfc_large);
    let phi2 = s.select(s.lt(x, s.zero()), erfc, s.add(one, erf));
    s.mul(x, s.mul(s.splat(0.5), phi2))
}

#[inline(always)]
pub fn silu<S: Simd>(s: S, x: S::V) -> S::V {
    let one = s.splat(1.0);
    s.div(x, s.add(one, exp(s, s.sub(s.zero(), x))))
}

#[inline(always)]
pub fn apply<S: Simd>(s: S, act: Activation, x: S::V) -> S::V {
    match act {
        Activation::Identity => x,
        Activation::Gelu => gelu(s, x),
        Activation::Silu => silu(s, x),
    }
}
