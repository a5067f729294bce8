//! Checks against an f64 reference written independently of the kernel (series and continued
//! fraction for erf), on every backend this CPU can run (those it cannot are skipped).
#![allow(clippy::too_many_arguments, clippy::type_complexity, clippy::useless_vec)]

use half::{bf16, f16};

use super::activation;
use super::simd::{Elem, Portable, Simd};
use super::*;

/// erf in f64: Taylor series near 0, Lentz continued fraction for erfc further out.
fn erf64(z: f64) -> f64 {
    if z < 0.0 {
        return -erf64(-z);
    }
    if z < 2.5 {
        let (mut term, mut sum, mut k) = (z, z, 0.0f64);
        while term.abs() > 1e-17 * sum.abs() {
            k += 1.0;
            term *= -z * z / k;
            sum += term / (2.0 * k + 1.0);
        }
        return sum * 2.0 / std::f64::consts::PI.sqrt();
    }
    1.0 - erfc64_cf(z)
}

fn erfc64_cf(z: f64) -> f64 {
    // erfc(z) = exp(-z²)/√π · 1/(z + 1/2/(z + 1/(z + 3/2/(z + 2/(z + ...)))))
    let mut f = 0.0f64;
    for k in (1..200).rev() {
        f = (k as f64 / 2.0) / (z + f);
    }
    (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f)
}

fn phi64(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    if z < -2.5 {
        0.5 * erfc64_cf(-z)
    } else {
        0.5 * (1.0 + erf64(z))
    }
}

fn act64(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Identity => x,
        Activation::Gelu => x * phi64(x),
        Activation::Silu => x / (1.0 + (-x).exp()),
    }
}

/// A small deterministic generator (xorshift), uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.next() * scale).collect()
    }
}

fn eval_act<S: Simd>(s: S, act: Activation, xs: &[f32]) -> Vec<f32> {
    xs.chunks(S::LANES)
        .flat_map(|c| {
            let mut buf = [0.0f32; simd::MAX_LANES];
            buf[..c.len()].copy_from_slice(c);
            let mut out = [0.0f32; simd::MAX_LANES];
            unsafe { s.store(out.as_mut_ptr(), activation::apply(s, act, s.load(buf.as_ptr()))) };
            out[..c.len()].to_vec()
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn eval_act_avx2(act: Activation, xs: &[f32]) -> Vec<f32> {
    eval_act(simd::Avx2::assume(), act, xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn eval_act_avx512(act: Activation, xs: &[f32]) -> Vec<f32> {
    eval_act(simd::Avx512::<false>::assume(), act, xs)
}

fn backends_act(act: Activation, xs: &[f32]) -> Vec<(&'static str, Vec<f32>)> {
    let v = vec![("portable", eval_act(Portable, act, xs))];
    #[cfg(target_arch = "x86_64")]
    let v = {
        let mut v = v;
        if simd::Avx2::detect().is_some() {
            v.push(("avx2", unsafe { eval_act_avx2(act, xs) }));
        }
        if simd::Avx512::<false>::detect().is_some() {
            v.push(("avx512", unsafe { eval_act_avx512(act, xs) }));
        }
        v
    };
    v
}

#[test]
fn gelu_and_silu_match_f64_reference() {
    let xs: Vec<f32> = (-12000..=12000).map(|i| i as f32 * 1e-3).chain([1e-30, -1e-30, 0.0, -0.0]).collect();
    for act in [Activation::Gelu, Activation::Silu] {
        for (name, ys) in backends_act(act, &xs) {
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = act64(act, x as f64);
                // Relative to the value, plus the unavoidable error of the f32 input (|x·f'(x)|·ε).
                let slope = (act64(act, x as f64 * (1.0 + 1e-7)) - want).abs() * 1e7;
                let tol = 4e-7 * want.abs() + 2.0 * f32::EPSILON as f64 * slope + 1e-37;
                assert!((y as f64 - want).abs() <= tol, "{name} {act:?}({x}) = {y}, want {want}");
            }
        }
    }
}

#[test]
fn activations_propagate_nan() {
    for act in [Activation::Gelu, Activation::Silu, Activation::Identity] {
        for (name, ys) in backends_act(act, &[f32::NAN, 1.0]) {
            assert!(ys[0].is_nan(), "{name} {act:?}(NaN) = {}", ys[0]);
            assert!(ys[1].is_finite());
        }
    }
}

#[test]
fn bf16_and_f16_conversions_round_to_nearest_even() {
    let mut rng = Rng(7);
    let mut xs: Vec<f32> = (0..4096).map(|_| f32::from_bits((rng.next().to_bits()).wrapping_mul(2654435761))).collect();
    xs.extend([f32::NAN, f32::INFINITY, -0.0, 1.0 + f32::EPSILON, 65520.0, 1e-8]);
    xs.truncate(xs.len() / 16 * 16);
    let check = |name: &str, bf: Vec<u16>, hf: Vec<u16>| {
        for (i, &x) in xs.iter().enumerate() {
            let want_bf = bf16::from_f32(x);
            let got_bf = bf16::from_bits(bf[i]);
            assert!(want_bf == got_bf || (x.is_nan() && got_bf.is_nan()), "{name} bf16({x})");
            let want_hf = f16::from_f32(x);
            let got_hf = f16::from_bits(hf[i]);
            assert!(want_hf.to_bits() == got_hf.to_bits() || (x.is_nan() && got_hf.is_nan()), "{name} f16({x})");
        }
    };
    fn convert<S: Simd>(s: S, xs: &[f32]) -> (Vec<u16>, Vec<u16>) {
        let mut bf = vec![0u16; xs.len()];
        let mut hf = vec![0u16; xs.len()];
        for i in (0..xs.len()).step_by(S::LANES) {
            unsafe {
                let v = s.load(xs.as_ptr().add(i));
                s.store_bf16(bf.as_mut_ptr().add(i), v);
                s.store_f16(hf.as_mut_ptr().add(i), v);
                // Round trip through the loads as well.
                let mut back = [0.0f32; simd::MAX_LANES];
                s.store(back.as_mut_ptr(), s.load_bf16(bf.as_ptr().add(i)));
                for j in 0..S::LANES {
                    let want = bf16::from_bits(bf[i + j]).to_f32();
                    assert!(back[j] == want || (want.is_nan() && back[j].is_nan()));
                }
            }
        }
        (bf, hf)
    }
    let (bf, hf) = convert(Portable, &xs);
    check("portable", bf, hf);
    #[cfg(target_arch = "x86_64")]
    if simd::Avx2::detect().is_some() {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx(xs: &[f32]) -> (Vec<u16>, Vec<u16>) {
            convert(simd::Avx2::assume(), xs)
        }
        let (bf, hf) = unsafe { avx(&xs) };
        check("avx2", bf, hf);
    }
    #[cfg(target_arch = "x86_64")]
    if simd::Avx512::<false>::detect().is_some() {
        #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
        unsafe fn avx512(xs: &[f32]) -> (Vec<u16>, Vec<u16>) {
            convert(simd::Avx512::<false>::assume(), xs)
        }
        let (bf, hf) = unsafe { avx512(&xs) };
        check("avx512", bf, hf);
    }
}

/// The branch in f64 from the already-rounded inputs.
#[allow(clippy::too_many_arguments)]
fn reference(
    x: &[f32],
    e: &[f32],
    m: &[f32],
    d: &[f32],
    dims: (usize, usize, usize, usize, usize),
    scale: f32,
    acts: (Activation, Activation),
) -> Vec<f64> {
    let (n, din, re, rd, dout) = dims;
    let mut out = vec![0.0f64; n * dout];
    for i in 0..n {
        let h: Vec<f64> = (0..re)
            .map(|k| act64(acts.0, (0..din).map(|j| x[i * din + j] as f64 * e[k * din + j] as f64).sum()))
            .collect();
        let g: Vec<f64> = (0..rd).map(|l| (0..re).map(|k| m[l * re + k] as f64 * h[k]).sum()).collect();
        for o in 0..dout {
            let y: f64 = (0..rd).map(|l| d[o * rd + l] as f64 * g[l]).sum();
            out[i * dout + o] = scale as f64 * act64(acts.1, y);
        }
    }
    out
}

fn round_to<T: Elem>(v: &[f32]) -> (Vec<T>, Vec<f32>) {
    let t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    let back = t.iter().map(|x| x.to_f32()).collect();
    (t, back)
}

trait AsSrc: Elem {
    fn src(v: &[Self]) -> Src<'_>;
    fn dst(v: &mut [Self]) -> Dst<'_>;
    const EPS: f64;
}
impl AsSrc for f32 {
    fn src(v: &[Self]) -> Src<'_> {
        Src::F32(v)
    }
    fn dst(v: &mut [Self]) -> Dst<'_> {
        Dst::F32(v)
    }
    const EPS: f64 = 1.2e-7;
}
impl AsSrc for bf16 {
    fn src(v: &[Self]) -> Src<'_> {
        Src::BF16(v)
    }
    fn dst(v: &mut [Self]) -> Dst<'_> {
        Dst::BF16(v)
    }
    const EPS: f64 = 7.9e-3;
}
impl AsSrc for f16 {
    fn src(v: &[Self]) -> Src<'_> {
        Src::F16(v)
    }
    fn dst(v: &mut [Self]) -> Dst<'_> {
        Dst::F16(v)
    }
    const EPS: f64 = 9.8e-4;
}

fn params(acts: (Activation, Activation), threads: usize) -> BranchParams {
    BranchParams {
        scale: 0.75,
        encoder_activation: acts.0,
        decoder_activation: acts.1,
        num_threads: threads,
        check_finite: false,
    }
}

/// Runs the kernel on random data and compares `out` (pre-filled) with the f64 reference.
fn check_case<X: AsSrc, W: AsSrc>(
    seed: u64,
    dims: (usize, usize, usize, usize, usize),
    acts: (Activation, Activation),
    threads: usize,
) -> Vec<X> {
    let (n, din, re, rd, dout) = dims;
    let mut rng = Rng(seed);
    let (x, xf) = round_to::<X>(&rng.vec(n * din, 2.0));
    let (e, ef) = round_to::<W>(&rng.vec(re * din, 1.0 / (din as f32).sqrt()));
    let (m, mf) = round_to::<W>(&rng.vec(rd * re, 1.0));
    let (d, df) = round_to::<W>(&rng.vec(dout * rd, 1.0));
    let (mut out, outf) = round_to::<X>(&rng.vec(n * dout, 1.0));
    let want = reference(&xf, &ef, &mf, &df, dims, 0.75, acts);
    fused_branch(
        Operand { shape: &[n, din], data: X::src(&x) },
        Operand { shape: &[re, din], data: W::src(&e) },
        Operand { shape: &[rd, re], data: W::src(&m) },
        Operand { shape: &[dout, rd], data: W::src(&d) },
        X::dst(&mut out),
        &[n, dout],
        &params(acts, threads),
    )
    .unwrap();
    // f32 accumulation error grows with the reduction lengths; then one rounding to X.
    let acc_tol = 2e-6 * ((din + re + rd) as f64).sqrt() * 4.0;
    for i in 0..n * dout {
        let exact = outf[i] as f64 + want[i];
        let got = out[i].to_f32() as f64;
        let tol = X::EPS * exact.abs() + acc_tol * (1.0 + want[i].abs()) + X::EPS * 1e-3;
        assert!((got - exact).abs() <= tol, "dims {dims:?} acts {acts:?} at {i}: got {got}, want {exact}");
    }
    out
}

const SHAPES: [(usize, usize, usize, usize, usize); 8] = [
    (1, 5, 3, 3, 7),
    (2, 64, 8, 8, 16),
    (3, 17, 4, 6, 9),
    (8, 96, 16, 16, 40),
    (5, 1, 1, 1, 1),
    (33, 40, 5, 7, 33),
    (100, 129, 16, 16, 70),
    (200, 600, 13, 9, 17),
];

fn all_acts() -> Vec<(Activation, Activation)> {
    use Activation::*;
    vec![(Gelu, Gelu), (Identity, Identity), (Silu, Gelu), (Gelu, Identity), (Identity, Silu)]
}

/// Runs `f` once on each backend this CPU has.
fn both_backends(f: impl Fn()) {
    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
        isa::FORCE.with(|p| p.set(Some(isa)));
        f();
    }
    isa::FORCE.with(|p| p.set(None));
}

#[test]
fn f32_matches_reference() {
    both_backends(|| {
        for (s, &dims) in SHAPES.iter().enumerate() {
            for acts in all_acts() {
                check_case::<f32, f32>(s as u64 + 1, dims, acts, 1);
            }
        }
    });
}

#[test]
fn half_types_match_reference() {
    both_backends(|| {
        for (s, &dims) in SHAPES.iter().enumerate() {
            let acts = (Activation::Gelu, Activation::Gelu);
            check_case::<bf16, f32>(s as u64 + 11, dims, acts, 1);
            check_case::<bf16, bf16>(s as u64 + 21, dims, acts, 1);
            check_case::<f16, f32>(s as u64 + 31, dims, acts, 1);
            check_case::<f16, f16>(s as u64 + 41, dims, acts, 1);
            check_case::<f32, bf16>(s as u64 + 51, dims, acts, 1);
        }
    });
}

#[test]
fn threads_give_identical_results() {
    let acts = (Activation::Gelu, Activation::Silu);
    for dims in [(4, 512, 64, 64, 700), (300, 256, 32, 32, 200), (2, 1024, 64, 64, 2048)] {
        let one = check_case::<f32, f32>(5, dims, acts, 1);
        for threads in [2, 3] {
            let many = check_case::<f32, f32>(5, dims, acts, threads);
            assert_eq!(
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                many.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}

fn call(
    x: &[f32],
    xs: &[usize],
    e: &[f32],
    es: &[usize],
    m: &[f32],
    ms: &[usize],
    d: &[f32],
    ds: &[usize],
    out: &mut [f32],
    os: &[usize],
    p: &BranchParams,
) -> Result<()> {
    fused_branch(
        Operand { shape: xs, data: Src::F32(x) },
        Operand { shape: es, data: Src::F32(e) },
        Operand { shape: ms, data: Src::F32(m) },
        Operand { shape: ds, data: Src::F32(d) },
        Dst::F32(out),
        os,
        p,
    )
}

fn argument_of(err: Error) -> (String, Option<ArgumentKind>) {
    match err {
        Error::InvalidArgument { argument, kind, .. } => (argument, Some(kind)),
        Error::NonFinite { context, .. } => (context, None),
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn bad_arguments_are_named() {
    let p = params((Activation::Gelu, Activation::Gelu), 1);
    let v = vec![0.0f32; 64];
    let mut out = vec![0.0f32; 64];
    let cases: Vec<(&[usize], &[usize], &[usize], &[usize], &[usize], &str)> = vec![
        (&[2, 4], &[2, 5], &[2, 2], &[4, 2], &[2, 4], "encoder"),
        (&[2, 4], &[2, 4], &[2, 3], &[4, 2], &[2, 4], "m"),
        (&[2, 4], &[2, 4], &[2, 2], &[4, 3], &[2, 4], "decoder"),
        (&[2, 4], &[2, 4], &[2, 2], &[4, 2], &[3, 4], "out"),
        (&[8], &[2, 4], &[2, 2], &[4, 2], &[2, 4], "x"),
    ];
    for (xs, es, ms, ds, os, name) in cases {
        let size = |s: &[usize]| s.iter().product::<usize>();
        let err = call(
            &v[..size(xs)],
            xs,
            &v[..size(es)],
            es,
            &v[..size(ms)],
            ms,
            &v[..size(ds)],
            ds,
            &mut out[..size(os)],
            os,
            &p,
        )
        .unwrap_err();
        assert_eq!(argument_of(err), (name.to_string(), Some(ArgumentKind::Shape)));
    }
    // dtype mismatches
    let vb = vec![bf16::ZERO; 16];
    let err = fused_branch(
        Operand { shape: &[2, 4], data: Src::F32(&v[..8]) },
        Operand { shape: &[2, 4], data: Src::F32(&v[..8]) },
        Operand { shape: &[2, 2], data: Src::BF16(&vb[..4]) },
        Operand { shape: &[4, 2], data: Src::F32(&v[..8]) },
        Dst::F32(&mut out[..8]),
        &[2, 4],
        &p,
    )
    .unwrap_err();
    assert_eq!(argument_of(err), ("m".into(), Some(ArgumentKind::DType)));
    let mut ob = vec![bf16::ZERO; 8];
    let err = fused_branch(
        Operand { shape: &[2, 4], data: Src::F32(&v[..8]) },
        Operand { shape: &[2, 4], data: Src::F32(&v[..8]) },
        Operand { shape: &[2, 2], data: Src::F32(&v[..4]) },
        Operand { shape: &[4, 2], data: Src::F32(&v[..8]) },
        Dst::BF16(&mut ob),
        &[2, 4],
        &p,
    )
    .unwrap_err();
    assert_eq!(argument_of(err), ("out".into(), Some(ArgumentKind::DType)));
    // values
    let s = [2usize, 4];
    let zero_threads = BranchParams { num_threads: 0, ..p };
    let err = call(&v[..8], &s, &v[..8], &s, &v[..4], &[2, 2], &v[..8], &[4, 2], &mut out[..8], &s, &zero_threads)
        .unwrap_err();
    assert_eq!(argument_of(err), ("num_threads".into(), Some(ArgumentKind::Value)));
    let nan_scale = BranchParams { scale: f32::NAN, ..p };
    let err =
        call(&v[..8], &s, &v[..8], &s, &v[..4], &[2, 2], &v[..8], &[4, 2], &mut out[..8], &s, &nan_scale).unwrap_err();
    assert_eq!(argument_of(err), ("scale".into(), Some(ArgumentKind::Value)));
    // misaligned bytes
    let bytes = [0u8; 17];
    let err = Src::from_bytes(DType::F32, &bytes[1..17], "encoder").unwrap_err();
    assert_eq!(argument_of(err), ("encoder".into(), Some(ArgumentKind::Layout)));
}

#[test]
fn non_finite_inputs_propagate_or_are_reported() {
    let (n, din, r, dout) = (3, 16, 4, 8);
    let mut rng = Rng(3);
    let mut x = rng.vec(n * din, 1.0);
    let e = rng.vec(r * din, 1.0);
    let m = rng.vec(r * r, 1.0);
    let mut d = rng.vec(dout * r, 1.0);
    x[din + 2] = f32::NAN; // row 1 only
    let p = params((Activation::Gelu, Activation::Gelu), 1);
    let mut out = vec![0.0f32; n * dout];
    call(&x, &[n, din], &e, &[r, din], &m, &[r, r], &d, &[dout, r], &mut out, &[n, dout], &p).unwrap();
    for i in 0..n {
        for o in 0..dout {
            assert_eq!(out[i * dout + o].is_nan(), i == 1, "row {i} col {o}");
        }
    }
    let checked = BranchParams { check_finite: true, ..p };
    let mut out2 = vec![1.0f32; n * dout];
    let err =
        call(&x, &[n, din], &e, &[r, din], &m, &[r, r], &d, &[dout, r], &mut out2, &[n, dout], &checked).unwrap_err();
    assert_eq!(argument_of(err), ("x".into(), None));
    assert!(out2.iter().all(|&v| v == 1.0), "nothing written before the error");
    x[din + 2] = 0.0;
    d[5] = f32::INFINITY;
    let err =
        call(&x, &[n, din], &e, &[r, din], &m, &[r, r], &d, &[dout, r], &mut out2, &[n, dout], &checked).unwrap_err();
    assert_eq!(argument_of(err), ("decoder".into(), None));
}

#[test]
fn empty_dimensions_are_fine() {
    let p = params((Activation::Gelu, Activation::Gelu), 2);
    let mut out = vec![1.0f32; 6];
    // r = 0: the branch is act_d(0) = 0.
    call(&[0.5; 6], &[2, 3], &[], &[0, 3], &[], &[0, 0], &[], &[3, 0], &mut out, &[2, 3], &p).unwrap();
    assert!(out.iter().all(|&v| v == 1.0));
    call(&[], &[0, 3], &[0.0; 6], &[2, 3], &[0.0; 4], &[2, 2], &[0.0; 6], &[3, 2], &mut [], &[0, 3], &p).unwrap();
}

#[test]
fn hsum_lanes_puts_each_sum_in_its_lane() {
    fn sums<S: Simd>(s: S) -> Vec<f32> {
        let data: Vec<f32> =
            (0..simd::MAX_LANES * simd::MAX_LANES).map(|i| (i % 97) as f32 + 0.25 * (i / 16) as f32).collect();
        let v: [S::V; simd::MAX_LANES] = core::array::from_fn(|t| unsafe { s.load(data.as_ptr().add(t * S::LANES)) });
        let mut out = [0.0f32; simd::MAX_LANES];
        unsafe { s.store(out.as_mut_ptr(), s.hsum_lanes(&v)) };
        let want: Vec<f32> = (0..S::LANES).map(|t| data[t * S::LANES..(t + 1) * S::LANES].iter().sum()).collect();
        assert_eq!(&out[..S::LANES], &want[..], "{}-lane hsum_lanes", S::LANES);
        want
    }
    sums(Portable);
    #[cfg(target_arch = "x86_64")]
    {
        if simd::Avx2::detect().is_some() {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2() {
                sums(simd::Avx2::assume());
            }
            unsafe { avx2() };
        }
        if simd::Avx512::<false>::detect().is_some() {
            #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
            unsafe fn avx512() {
                sums(simd::Avx512::<false>::assume());
            }
            unsafe { avx512() };
        }
    }
}

mod routed;
