//! The routed branch: each row against the f64 reference with its own core, rows without a
//! branch untouched bit for bit, agreement with the single-adapter kernel, and its errors.

use super::*;

/// Shapes (n, in, r_e, r_d, out, cores): decode and prefill row counts.
const ROUTED_SHAPES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 5, 3, 3, 7, 2),
    (3, 64, 8, 8, 16, 4),
    (8, 96, 16, 16, 40, 9),
    (13, 17, 4, 6, 9, 3),
    (33, 40, 5, 7, 33, 5),
    (100, 129, 16, 16, 70, 7),
    (200, 600, 13, 9, 17, 40),
];

/// Row indices in -1..t: runs of equal indices (rows of one sequence) and single rows; row 0
/// takes a core and row 1 none.
fn row_cores(rng: &mut Rng, n: usize, t: usize) -> Vec<i32> {
    let mut v = vec![0, -1];
    while v.len() < n {
        let core = ((rng.next() + 1.0) * 0.5 * (t + 1) as f32) as i32 - 1;
        let run = if rng.next() > 0.0 { 1 } else { 1 + ((rng.next() + 1.0) * 6.0) as usize };
        v.extend(std::iter::repeat_n(core.min(t as i32 - 1), run));
    }
    v.truncate(n);
    v
}

/// The routed kernel on arrays of the shapes `dims` = (n, in, r_e, r_d, out, cores) give.
fn routed(
    dims: (usize, usize, usize, usize, usize, usize),
    [x, e, cores, d]: [Src<'_>; 4],
    row_core: &[i32],
    out: Dst<'_>,
    p: &BranchParams,
) -> Result<()> {
    let (n, din, re, rd, dout, t) = dims;
    fused_routed_branch(
        Operand { shape: &[n, din], data: x },
        Operand { shape: &[re, din], data: e },
        Operand { shape: &[t, rd, re], data: cores },
        Operand { shape: &[dout, rd], data: d },
        row_core,
        out,
        &[n, dout],
        p,
    )
}

/// Runs the routed kernel on random data; checks routed rows against the reference with their
/// own core and the others for the very bits they had. Returns `out`.
fn check_routed<X: AsSrc, W: AsSrc>(
    seed: u64,
    dims: (usize, usize, usize, usize, usize, usize),
    acts: (Activation, Activation),
    threads: usize,
) -> Vec<X> {
    let (n, din, re, rd, dout, t) = dims;
    let mut rng = Rng(seed);
    let (x, xf) = round_to::<X>(&rng.vec(n * din, 2.0));
    let (e, ef) = round_to::<W>(&rng.vec(re * din, 1.0 / (din as f32).sqrt()));
    let (stack, sf) = round_to::<W>(&rng.vec(t * rd * re, 1.0));
    let (d, df) = round_to::<W>(&rng.vec(dout * rd, 1.0));
    let (mut out, outf) = round_to::<X>(&rng.vec(n * dout, 1.0));
    let index = row_cores(&mut rng, n, t);
    // Rows without a branch hold a negative zero and a NaN: adding 0 would change their bits.
    for (i, &c) in index.iter().enumerate() {
        if c < 0 {
            out[i * dout] = X::from_f32(-0.0);
            out[i * dout + dout - 1] = X::from_f32(f32::NAN);
        }
    }
    let before: Vec<X> = out.clone();
    let arrays = [X::src(&x), W::src(&e), W::src(&stack), W::src(&d)];
    routed(dims, arrays, &index, X::dst(&mut out), &params(acts, threads)).unwrap();
    let acc_tol = 2e-6 * ((din + re + rd) as f64).sqrt() * 4.0;
    for (i, &c) in index.iter().enumerate() {
        let row = i * dout..(i + 1) * dout;
        if c < 0 {
            let bits = |v: &[X]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out[row.clone()]), bits(&before[row]), "dims {dims:?}: row {i} has no branch");
            continue;
        }
        let core = &sf[c as usize * rd * re..(c as usize + 1) * rd * re];
        let want = reference(&xf[i * din..(i + 1) * din], &ef, core, &df, (1, din, re, rd, dout), 0.75, acts);
        for (o, w) in want.iter().enumerate() {
            let exact = outf[i * dout + o] as f64 + w;
            let got = out[i * dout + o].to_f32() as f64;
            let tol = X::EPS * exact.abs() + acc_tol * (1.0 + w.abs()) + X::EPS * 1e-3;
            assert!(
                (got - exact).abs() <= tol,
                "dims {dims:?} acts {acts:?} row {i} (core {c}) col {o}: got {got}, want {exact}"
            );
        }
    }
    out
}

#[test]
fn routed_rows_match_reference_with_their_own_core() {
    both_backends(|| {
        for (s, &dims) in ROUTED_SHAPES.iter().enumerate() {
            for acts in all_acts() {
                check_routed::<f32, f32>(s as u64 + 101, dims, acts, 1);
            }
            let acts = (Activation::Gelu, Activation::Gelu);
            check_routed::<bf16, bf16>(s as u64 + 111, dims, acts, 1);
            check_routed::<bf16, f32>(s as u64 + 121, dims, acts, 1);
            check_routed::<f16, f16>(s as u64 + 131, dims, acts, 1);
            check_routed::<f32, bf16>(s as u64 + 141, dims, acts, 1);
        }
    });
}

#[test]
fn routed_threads_give_identical_results() {
    let acts = (Activation::Gelu, Activation::Silu);
    for dims in [(4, 512, 64, 64, 700, 3), (300, 256, 32, 32, 200, 11), (2, 1024, 64, 64, 2048, 2)] {
        let one = check_routed::<f32, f32>(9, dims, acts, 1);
        let many = check_routed::<f32, f32>(9, dims, acts, 3);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one), bits(&many), "dims {dims:?}");
    }
}

/// The single-adapter kernel on `rows` of `x`, with core `m`, into a copy of `out0`'s rows.
fn single<X: AsSrc, W: AsSrc>(
    x: &[X],
    e: &[W],
    m: &[W],
    d: &[W],
    out0: &[X],
    dims: (usize, usize, usize, usize, usize),
    acts: (Activation, Activation),
) -> Vec<X> {
    let (n, din, re, rd, dout) = dims;
    let mut out = out0.to_vec();
    fused_branch(
        Operand { shape: &[n, din], data: X::src(x) },
        Operand { shape: &[re, din], data: W::src(e) },
        Operand { shape: &[rd, re], data: W::src(m) },
        Operand { shape: &[dout, rd], data: W::src(d) },
        X::dst(&mut out),
        &[n, dout],
        &params(acts, 1),
    )
    .unwrap();
    out
}

fn agree_with_single<X: AsSrc, W: AsSrc>(seed: u64, dims: (usize, usize, usize, usize, usize, usize)) {
    let (n, din, re, rd, dout, t) = dims;
    let acts = (Activation::Gelu, Activation::Silu);
    let mut rng = Rng(seed);
    let (x, _) = round_to::<X>(&rng.vec(n * din, 2.0));
    let (e, _) = round_to::<W>(&rng.vec(re * din, 1.0 / (din as f32).sqrt()));
    let (stack, _) = round_to::<W>(&rng.vec(t * rd * re, 1.0));
    let (d, _) = round_to::<W>(&rng.vec(dout * rd, 1.0));
    let (out0, _) = round_to::<X>(&rng.vec(n * dout, 1.0));
    let core = rd * re;
    let bits = |v: &[X]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
    let run = |index: &[i32], cores: &[W], t: usize| {
        let mut out = out0.clone();
        let arrays = [X::src(&x), W::src(&e), W::src(cores), W::src(&d)];
        routed((n, din, re, rd, dout, t), arrays, index, X::dst(&mut out), &params(acts, 1)).unwrap();
        out
    };
    // A stack of one core taken by every row is the single-adapter kernel, bit for bit.
    let all_first = run(&vec![0; n], &stack[..core], 1);
    let one = single(&x, &e, &stack[..core], &d, &out0, (n, din, re, rd, dout), acts);
    assert_eq!(bits(&all_first), bits(&one), "dims {dims:?}: T = 1");
    // Each row as the single-adapter kernel on that row alone with its own core, to rounding
    // (a batch of rows may take the prefill path, one row takes the decode path).
    let index = row_cores(&mut rng, n, t);
    let got = run(&index, &stack, t);
    for (i, &c) in index.iter().enumerate() {
        let row = i * dout..(i + 1) * dout;
        if c < 0 {
            assert_eq!(bits(&got[row.clone()]), bits(&out0[row]));
            continue;
        }
        let m = &stack[c as usize * core..(c as usize + 1) * core];
        let alone = single(&x[i * din..(i + 1) * din], &e, m, &d, &out0[row.clone()], (1, din, re, rd, dout), acts);
        for (o, (a, b)) in got[row].iter().zip(&alone).enumerate() {
            let (a, b) = (a.to_f32() as f64, b.to_f32() as f64);
            // Both roundings to X, and f32 sums in a different order.
            let tol = 2.0 * X::EPS * b.abs() + 1e-5 * (1.0 + b.abs());
            assert!((a - b).abs() <= tol, "dims {dims:?} row {i} col {o}: {a} vs {b}");
        }
    }
}

#[test]
fn routed_is_the_single_kernel_with_a_per_row_core() {
    both_backends(|| {
        for (s, &dims) in ROUTED_SHAPES.iter().enumerate() {
            agree_with_single::<f32, f32>(s as u64 + 201, dims);
            agree_with_single::<bf16, bf16>(s as u64 + 211, dims);
        }
    });
}

#[test]
fn routed_arguments_are_checked_before_writing() {
    let p = params((Activation::Gelu, Activation::Gelu), 1);
    let (n, din, r, dout, t) = (3, 8, 2, 4, 2);
    let v = vec![0.5f32; 64];
    let mut out = vec![1.0f32; n * dout];
    // `cores` defaults to f32 values of the size `cs` says.
    let mut call = |index: &[i32], cs: &[usize], cores: Option<Src<'_>>| {
        let size: usize = cs.iter().product();
        fused_routed_branch(
            Operand { shape: &[n, din], data: Src::F32(&v[..n * din]) },
            Operand { shape: &[r, din], data: Src::F32(&v[..r * din]) },
            Operand { shape: cs, data: cores.unwrap_or(Src::F32(&v[..size])) },
            Operand { shape: &[dout, r], data: Src::F32(&v[..dout * r]) },
            index,
            Dst::F32(&mut out),
            &[n, dout],
            &p,
        )
        .map_err(argument_of_with_message)
    };
    // Index out of range, either side: named with its row and value.
    for (index, row, value) in [(vec![0, 2, 1], 1, 2), (vec![0, 1, -2], 2, -2), (vec![i32::MIN, 0, 0], 0, i32::MIN)] {
        let (arg, kind, message) = call(&index, &[t, r, r], None).unwrap_err();
        assert_eq!((arg.as_str(), kind), ("row_core", Some(ArgumentKind::Value)));
        assert!(message.contains(&format!("row {row} has core index {value}")), "{message}");
    }
    let (arg, _, message) = call(&[0, -1, 0], &[0, r, r], None).unwrap_err();
    assert!(arg == "row_core" && message.contains("row 0") && message.contains("empty"), "{message}");
    // Shapes: index count, stack rank and core shape against the encoder and decoder.
    let shape_cases: [(&[i32], &[usize], &str); 5] = [
        (&[0, 0], &[t, r, r], "row_core"),
        (&[0, 0, 0], &[t * r, r], "cores"),
        (&[0, 0, 0], &[t, r, r + 1], "cores"),
        (&[0, 0, 0], &[t, r + 1, r], "decoder"),
        (&[0, 0, 0], &[t, r, r, 1, 1], "cores"),
    ];
    for (index, cs, name) in shape_cases {
        let (arg, kind, _) = call(index, cs, None).unwrap_err();
        assert_eq!((arg.as_str(), kind), (name, Some(ArgumentKind::Shape)), "{cs:?}");
    }
    // A stack whose dtype differs from the encoder's.
    let vb = vec![bf16::ZERO; t * r * r];
    let (arg, kind, _) = call(&[0, 0, 0], &[t, r, r], Some(Src::BF16(&vb))).unwrap_err();
    assert_eq!((arg.as_str(), kind), ("cores", Some(ArgumentKind::DType)));
    assert!(out.iter().all(|&v| v == 1.0), "nothing written before an error");
}

fn argument_of_with_message(err: Error) -> (String, Option<ArgumentKind>, String) {
    let message = err.to_string();
    let (arg, kind) = argument_of(err);
    (arg, kind, message)
}

#[test]
fn routed_non_finite_values_reach_only_rows_that_read_them() {
    let (n, din, r, dout, t) = (4, 16, 4, 8, 3);
    let mut rng = Rng(17);
    let mut x = rng.vec(n * din, 1.0);
    let e = rng.vec(r * din, 1.0);
    let mut stack = rng.vec(t * r * r, 1.0);
    let d = rng.vec(dout * r, 1.0);
    stack[r * r + 3] = f32::NAN; // core 1
    stack[2 * r * r] = f32::INFINITY; // core 2, which no row takes
    x[3 * din] = f32::NAN; // row 3, which has no branch
    let index = [0, 1, 0, -1];
    let p = params((Activation::Gelu, Activation::Gelu), 1);
    let call = |out: &mut [f32], p: &BranchParams, index: &[i32], x: &[f32]| {
        let arrays = [Src::F32(x), Src::F32(&e), Src::F32(&stack), Src::F32(&d)];
        routed((n, din, r, r, dout, t), arrays, index, Dst::F32(out), p)
    };
    let mut out = vec![0.0f32; n * dout];
    call(&mut out, &p, &index, &x).unwrap();
    for i in 0..n {
        assert!(out[i * dout..(i + 1) * dout].iter().all(|v| v.is_nan() == (i == 1)), "row {i}");
    }
    // check_finite looks at what the call reads: core 1 is read, core 2 and row 3 of x are not.
    let checked = BranchParams { check_finite: true, ..p };
    let mut out = vec![1.0f32; n * dout];
    let (arg, kind) = argument_of(call(&mut out, &checked, &index, &x).unwrap_err());
    assert_eq!((arg.as_str(), kind), ("cores", None));
    assert!(out.iter().all(|&v| v == 1.0));
    call(&mut out, &checked, &[0, -1, 0, -1], &x).unwrap();
    let (arg, _) = argument_of(call(&mut out, &checked, &[0, -1, 0, 0], &x).unwrap_err());
    assert_eq!(arg, "x");
}

#[test]
fn routed_empty_dimensions_are_fine() {
    let p = params((Activation::Gelu, Activation::Gelu), 2);
    let mut out = vec![1.0f32; 6];
    // r = 0: the branch is act_d(0) = 0.
    let arrays = [Src::F32(&[0.5; 6]), Src::F32(&[]), Src::F32(&[]), Src::F32(&[])];
    routed((2, 3, 0, 0, 3, 2), arrays, &[1, -1], Dst::F32(&mut out), &p).unwrap();
    assert!(out.iter().all(|&v| v == 1.0));
    // No rows; and an empty stack when no row takes a core.
    let arrays = [Src::F32(&[]), Src::F32(&[0.0; 6]), Src::F32(&[]), Src::F32(&[0.0; 6])];
    routed((0, 3, 2, 2, 3, 0), arrays, &[], Dst::F32(&mut []), &p).unwrap();
    let mut out = vec![1.0f32; 3];
    let arrays = [Src::F32(&[0.5; 3]), Src::F32(&[0.0; 6]), Src::F32(&[]), Src::F32(&[0.0; 6])];
    routed((1, 3, 2, 2, 3, 0), arrays, &[-1], Dst::F32(&mut out), &p).unwrap();
    assert!(out.iter().all(|&v| v == 1.0));
}
