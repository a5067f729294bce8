//! The branch itself, generic over the vector backend and the element types.
//!
//! `h = act_e(X Eᵀ)` (n × r_e), `g_i = M_i h_i` (n × r_d), `out += scale · act_d(g Dᵀ)` (n × out),
//! where `M_i` is one core for every row or each row's own from a stack ([`Cores`]).
//! Two shapes of work:
//! - decode (few rows): dot products straight off the weights, so each weight is read once per
//!   call; the decoder's outputs are reduced one vector's worth at a time into one vector for the
//!   epilogue;
//! - prefill (many rows): the decoder is packed into panels of `Dᵀ` two vectors wide once per
//!   call and an `MR × 2`-vector register-blocked micro-kernel streams `g` against them, with the
//!   activation, scale and accumulation into `out` fused into its epilogue.
//!
//! Where the backend has a bf16 dot product and both operands of a dot product are bf16, pairs
//! of bf16 products are accumulated in f32 directly (the products are exact in f32).

use std::ops::Range;

use super::activation::apply;
use super::simd::{Elem, Simd, MAX_LANES};
use crate::activation::Activation;

/// Rows of `x` from which the packed (prefill) path is used.
pub const PREFILL_MIN_ROWS: usize = 32;
/// Decoder panel width of the prefill micro-kernel: two vectors.
pub const fn panel_width<S: Simd>() -> usize {
    2 * S::LANES
}
/// Slice of the input dimension kept hot while the encoder is applied to a block of rows.
pub const KC: usize = 512;

/// The core each row takes in the middle step.
#[derive(Clone, Copy)]
pub enum Cores<'a, W> {
    /// One `r_d × r_e` core for every row: a single adapter.
    One(&'a [W]),
    /// Row `i` takes core `index[i]` of a `T × r_d × r_e` stack; rows with index -1 have no
    /// branch and their output is left as it is. Indices were checked against `T`.
    PerRow { stack: &'a [W], index: &'a [i32] },
}

impl<W> Cores<'_, W> {
    /// Whether row `row` of the call has no branch.
    #[inline(always)]
    pub fn skips(&self, row: usize) -> bool {
        match self {
            Cores::One(_) => false,
            Cores::PerRow { index, .. } => index[row] < 0,
        }
    }
}

/// One call's operands. `out` is a raw pointer because tasks write disjoint parts of it.
pub struct Job<'a, X, W> {
    pub x: &'a [X],
    pub encoder: &'a [W],
    pub cores: Cores<'a, W>,
    pub decoder: &'a [W],
    pub out: *mut X,
    pub n: usize,
    pub d_in: usize,
    pub r_e: usize,
    pub r_d: usize,
    pub d_out: usize,
    pub scale: f32,
    pub act_e: Activation,
    pub act_d: Activation,
}

// SAFETY: `out` is only written through disjoint row or column ranges by concurrent tasks.
unsafe impl<X: Sync, W: Sync> Sync for Job<'_, X, W> {}
unsafe impl<X: Sync, W: Sync> Send for Job<'_, X, W> {}

/// `[[dot(a[i], b[j]); B]; A]` over `len` elements, A × B accumulators in registers.
#[inline(always)]
unsafe fn dot_tile<S: Simd, P: Elem, Q: Elem, const A: usize, const B: usize>(
    s: S,
    a: [*const P; A],
    b: [*const Q; B],
    len: usize,
) -> [[f32; B]; A] {
    let mut acc = [[s.zero(); B]; A];
    let mut k = 0;
    if S::DPBF16 && P::IS_BF16 && Q::IS_BF16 {
        // Pairs of bf16 straight into f32 accumulators; the last step loads only what is left.
        while k < len {
            let rem = len - k;
            let mut bv = [s.zero(); B];
            for j in 0..B {
                bv[j] = s.load_bf16_pairs(b[j].add(k) as *const u16, rem);
            }
            for i in 0..A {
                let av = s.load_bf16_pairs(a[i].add(k) as *const u16, rem);
                for j in 0..B {
                    acc[i][j] = s.dot_bf16(acc[i][j], av, bv[j]);
                }
            }
            k += 2 * S::LANES;
        }
        k = len;
    }
    while k + S::LANES <= len {
        let mut bv = [s.zero(); B];
        for j in 0..B {
            bv[j] = Q::load(s, b[j].add(k));
        }
        for i in 0..A {
            let av = P::load(s, a[i].add(k));
            for j in 0..B {
                acc[i][j] = s.fma(av, bv[j], acc[i][j]);
            }
        }
        k += S::LANES;
    }
    if k < len {
        let rem = len - k;
        let mut bv = [s.zero(); B];
        for j in 0..B {
            bv[j] = Q::load_partial(s, b[j].add(k), rem);
        }
        for i in 0..A {
            let av = P::load_partial(s, a[i].add(k), rem);
            for j in 0..B {
                acc[i][j] = s.fma(av, bv[j], acc[i][j]);
            }
        }
    }
    let mut out = [[0.0f32; B]; A];
    for i in 0..A {
        for j in 0..B {
            out[i][j] = s.hsum(acc[i][j]);
        }
    }
    out
}

/// `c[i*ldc + j] (+)= dot(a_i, b_j)` for rows `i` of `a` in `rows` and `j` of `b` in `cols`, over
/// `len` elements starting at column `k0` of both (row strides `lda`, `ldb`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dot_block<S: Simd, P: Elem, Q: Elem>(
    s: S,
    a: *const P,
    lda: usize,
    rows: Range<usize>,
    b: *const Q,
    ldb: usize,
    cols: Range<usize>,
    k0: usize,
    len: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    #[inline(always)]
    unsafe fn put<const A: usize, const B: usize>(
        r: [[f32; B]; A],
        c: *mut f32,
        ldc: usize,
        i: usize,
        j: usize,
        accumulate: bool,
    ) {
        for (di, row) in r.iter().enumerate() {
            for (dj, v) in row.iter().enumerate() {
                let p = c.add((i + di) * ldc + j + dj);
                *p = if accumulate { *p + v } else { *v };
            }
        }
    }
    macro_rules! tiles {
        ($a:literal, $i:expr) => {{
            let i = $i;
            let ap: [*const P; $a] = core::array::from_fn(|t| a.add((i + t) * lda + k0));
            let mut j = cols.start;
            while j + 3 <= cols.end {
                let bp = [b.add(j * ldb + k0), b.add((j + 1) * ldb + k0), b.add((j + 2) * ldb + k0)];
                put::<$a, 3>(dot_tile::<S, P, Q, $a, 3>(s, ap, bp, len), c, ldc, i, j, accumulate);
                j += 3;
            }
            while j < cols.end {
                put::<$a, 1>(dot_tile::<S, P, Q, $a, 1>(s, ap, [b.add(j * ldb + k0)], len), c, ldc, i, j, accumulate);
                j += 1;
            }
        }};
    }
    let mut i = rows.start;
    while i + 4 <= rows.end {
        tiles!(4, i);
        i += 4;
    }
    if i + 2 <= rows.end {
        tiles!(2, i);
        i += 2;
    }
    if i < rows.end {
        // One row: wider tiles over `b`, since nothing else reuses the loads.
        let ap = [a.add(i * lda + k0)];
        let mut j = cols.start;
        while j + 6 <= cols.end {
            let bp: [*const Q; 6] = core::array::from_fn(|t| b.add((j + t) * ldb + k0));
            put::<1, 6>(dot_tile::<S, P, Q, 1, 6>(s, ap, bp, len), c, ldc, i, j, accumulate);
            j += 6;
        }
        while j < cols.end {
            put::<1, 1>(dot_tile::<S, P, Q, 1, 1>(s, ap, [b.add(j * ldb + k0)], len), c, ldc, i, j, accumulate);
            j += 1;
        }
    }
}

/// `v = act(v)` over a contiguous f32 buffer.
#[inline(always)]
unsafe fn activate_in_place<S: Simd>(s: S, act: Activation, v: &mut [f32]) {
    if act == Activation::Identity {
        return;
    }
    let mut chunks = v.chunks_exact_mut(S::LANES);
    for c in &mut chunks {
        s.store(c.as_mut_ptr(), apply(s, act, s.load(c.as_ptr())));
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let y = apply(s, act, f32::load_partial(s, rest.as_ptr(), rest.len()));
        f32::store_partial(s, rest.as_mut_ptr(), y, rest.len());
    }
}

/// Vectors whose activations are evaluated together: independent chains the CPU overlaps,
/// where one alone would wait on its own latency.
const ACT_GROUP: usize = 4;

/// `ys[j] = act(ys[j])` for the whole group, as one straight run of code.
#[inline(always)]
fn activate_group<S: Simd>(s: S, act: Activation, ys: &mut [S::V; ACT_GROUP]) {
    if act != Activation::Identity {
        // A plain loop: a closure would not be inlined into the `#[target_feature]` caller.
        for y in ys.iter_mut() {
            *y = apply(s, act, *y);
        }
    }
}

/// `out[..len] += scale · y` for one run of up to one vector of outputs.
#[inline(always)]
unsafe fn accumulate<S: Simd, X: Elem>(s: S, scale: f32, y: S::V, out: *mut X, len: usize) {
    let y = s.mul(y, s.splat(scale));
    if len == S::LANES {
        X::store(s, out, s.add(X::load(s, out), y));
    } else {
        X::store_partial(s, out, s.add(X::load_partial(s, out, len), y), len);
    }
}

/// Decode step 1: `h[:, ks] = X E[ks]ᵀ` (before the activation) for all rows.
#[inline(always)]
pub unsafe fn encode_cols<S: Simd, X: Elem, W: Elem>(s: S, job: &Job<'_, X, W>, ks: Range<usize>, h: *mut f32) {
    dot_block(
        s,
        job.x.as_ptr(),
        job.d_in,
        0..job.n,
        job.encoder.as_ptr(),
        job.d_in,
        ks,
        0,
        job.d_in,
        h,
        job.r_e,
        false,
    );
}

/// `g[i] = M_i h[i]` for the call's rows `rows`, held in `h` and `g` from their row 0. Each run
/// of consecutive rows on one core is one blocked product (a single adapter is one run); rows
/// without a branch get `g = 0`.
#[inline(always)]
unsafe fn apply_cores<S: Simd, X: Elem, W: Elem>(
    s: S,
    job: &Job<'_, X, W>,
    rows: Range<usize>,
    h: &[f32],
    g: &mut [f32],
) {
    let (re, rd) = (job.r_e, job.r_d);
    // The product is written out in each arm: a closure would not be inlined into the
    // `#[target_feature]` caller.
    match job.cores {
        Cores::One(m) => {
            dot_block(s, h.as_ptr(), re, 0..rows.len(), m.as_ptr(), re, 0..rd, 0, re, g.as_mut_ptr(), rd, false)
        }
        Cores::PerRow { stack, index } => {
            let index = &index[rows];
            let mut i = 0;
            while i < index.len() {
                let t = index[i];
                let end = i + index[i..].iter().take_while(|&&u| u == t).count();
                if t < 0 {
                    g[i * rd..end * rd].fill(0.0);
                } else {
                    let m = stack.as_ptr().add(t as usize * rd * re);
                    dot_block(s, h.as_ptr(), re, i..end, m, re, 0..rd, 0, re, g.as_mut_ptr(), rd, false);
                }
                i = end;
            }
        }
    }
}

/// Decode step 2: `h = act_e(h)`, `g_i = M_i h_i`.
#[inline(always)]
pub unsafe fn middle<S: Simd, X: Elem, W: Elem>(s: S, job: &Job<'_, X, W>, rows: usize, h: &mut [f32], g: &mut [f32]) {
    activate_in_place(s, job.act_e, h);
    apply_cores(s, job, 0..rows, h, g);
}

/// Decode step 3: `out[:, os] += scale · act_d(g Dᵀ)` for outputs `os`.
/// Half-precision decoder rows are widened to f32 once per block of one vector of outputs, not once per
/// row of `g`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `t` also offsets `block`
pub unsafe fn decode_cols<S: Simd, X: Elem, W: Elem>(s: S, job: &Job<'_, X, W>, os: Range<usize>, g: &[f32]) {
    let rd = job.r_d;
    let d = job.decoder.as_ptr();
    let widen = std::mem::size_of::<W>() != std::mem::size_of::<f32>() && job.n > 1;
    let mut block = if widen { vec![0.0f32; S::LANES * rd] } else { Vec::new() };
    let mut o = os.start;
    while o < os.end {
        let cnt = S::LANES.min(os.end - o);
        // Past the end, repeat the last row; those lanes are never stored.
        let rows: [*const W; MAX_LANES] = core::array::from_fn(|t| d.add((o + t.min(cnt - 1)) * rd));
        if widen {
            let dst = block.as_mut_ptr();
            for t in 0..S::LANES {
                let mut k = 0;
                while k + S::LANES <= rd {
                    s.store(dst.add(t * rd + k), W::load(s, rows[t].add(k)));
                    k += S::LANES;
                }
                while k < rd {
                    *dst.add(t * rd + k) = (*rows[t].add(k)).to_f32();
                    k += 1;
                }
            }
            let wide: [*const f32; MAX_LANES] = core::array::from_fn(|t| block.as_ptr().add(t.min(S::LANES - 1) * rd));
            decode_tile(s, job, wide, o, cnt, g);
        } else {
            decode_tile(s, job, rows, o, cnt, g);
        }
        o += cnt;
    }
}

/// One vector's worth of decoder rows (`rows[..LANES]`, length `r_d`) against every row of `g`, into `out[:, o..o+cnt]`.
#[inline(always)]
unsafe fn decode_tile<S: Simd, X: Elem, W: Elem, R: Elem>(
    s: S,
    job: &Job<'_, X, W>,
    rows: [*const R; MAX_LANES],
    o: usize,
    cnt: usize,
    g: &[f32],
) {
    let rd = job.r_d;
    let mut ys = [s.zero(); ACT_GROUP];
    for i in 0..job.n {
        let gi = g.as_ptr().add(i * rd);
        let mut acc = [s.zero(); MAX_LANES];
        let mut k = 0;
        while k + S::LANES <= rd {
            let gv = s.load(gi.add(k));
            for t in 0..S::LANES {
                acc[t] = s.fma(R::load(s, rows[t].add(k)), gv, acc[t]);
            }
            k += S::LANES;
        }
        if k < rd {
            let rem = rd - k;
            let gv = f32::load_partial(s, gi.add(k), rem);
            for t in 0..S::LANES {
                acc[t] = s.fma(R::load_partial(s, rows[t].add(k), rem), gv, acc[t]);
            }
        }
        ys[i % ACT_GROUP] = s.hsum_lanes(&acc);
        if i % ACT_GROUP == ACT_GROUP - 1 || i + 1 == job.n {
            let first = i - i % ACT_GROUP;
            if i + 1 - first == ACT_GROUP {
                activate_group(s, job.act_d, &mut ys);
            } else {
                // A short group (always, for one row): only the vectors it has.
                for y in ys.iter_mut().take(i + 1 - first) {
                    *y = apply(s, job.act_d, *y);
                }
            }
            for (j, &y) in ys.iter().enumerate().take(i + 1 - first) {
                if !job.cores.skips(first + j) {
                    accumulate(s, job.scale, y, job.out.add((first + j) * job.d_out + o), cnt);
                }
            }
        }
    }
}

/// Prefill: pack decoder panels `ps` as `Dᵀ` in column panels two vectors wide, zero-padded, f32.
#[inline(always)]
pub unsafe fn pack_decoder<S: Simd, X: Elem, W: Elem>(_s: S, job: &Job<'_, X, W>, ps: Range<usize>, packed: *mut f32) {
    let rd = job.r_d;
    for p in ps {
        let panel = packed.add(p * panel_width::<S>() * rd);
        for j in 0..panel_width::<S>() {
            let o = p * panel_width::<S>() + j;
            if o < job.d_out {
                let row = &job.decoder[o * rd..(o + 1) * rd];
                for (k, v) in row.iter().enumerate() {
                    *panel.add(k * panel_width::<S>() + j) = v.to_f32();
                }
            } else {
                for k in 0..rd {
                    *panel.add(k * panel_width::<S>() + j) = 0.0;
                }
            }
        }
    }
}

/// `R` rows of `g` (stride `r_d`) against one packed panel, then the fused epilogue.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `r` also offsets `g` and `out`
unsafe fn micro<S: Simd, X: Elem, W: Elem, const R: usize>(
    s: S,
    job: &Job<'_, X, W>,
    g: *const f32,
    panel: *const f32,
    row0: usize,
    col0: usize,
) {
    let rd = job.r_d;
    let mut acc = [[s.zero(); 2]; R];
    for k in 0..rd {
        let b0 = s.load(panel.add(k * panel_width::<S>()));
        let b1 = s.load(panel.add(k * panel_width::<S>() + S::LANES));
        for r in 0..R {
            let a = s.splat(*g.add(r * rd + k));
            acc[r][0] = s.fma(a, b0, acc[r][0]);
            acc[r][1] = s.fma(a, b1, acc[r][1]);
        }
    }
    // The epilogue runs from memory in a loop of its own: interleaved with the live
    // accumulators, the activation's constants and temporaries would not fit in registers.
    let mut tile = [[0.0f32; 2 * MAX_LANES]; R];
    for r in 0..R {
        s.store(tile[r].as_mut_ptr(), acc[r][0]);
        s.store(tile[r].as_mut_ptr().add(S::LANES), acc[r][1]);
    }
    epilogue_tile(s, job, &tile, row0, col0);
}

#[inline(always)]
#[allow(clippy::needless_range_loop)] // `r` also offsets `out`
unsafe fn epilogue_tile<S: Simd, X: Elem, W: Elem, const R: usize>(
    s: S,
    job: &Job<'_, X, W>,
    tile: &[[f32; 2 * MAX_LANES]; R],
    row0: usize,
    col0: usize,
) {
    for r in 0..R {
        if job.cores.skips(row0 + r) {
            continue;
        }
        let out = job.out.add((row0 + r) * job.d_out);
        for half in 0..2 {
            let o = col0 + half * S::LANES;
            if o < job.d_out {
                let y = apply(s, job.act_d, s.load(tile[r].as_ptr().add(half * S::LANES)));
                accumulate(s, job.scale, y, out.add(o), S::LANES.min(job.d_out - o));
            }
        }
    }
}

/// Prefill for the rows `rows`: all three steps, with `h`, `g` and `xbuf` scratch sized for
/// them. `encoder` is the job's encoder, possibly already widened to f32; half-precision rows of
/// `x` are widened into `xbuf` once per slice of the input dimension, so the encoder's tiles
/// read plain f32 (except for bf16 against bf16 with a bf16 dot product, read as they are).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn prefill_rows<S: Simd, X: Elem, W: Elem, E: Elem>(
    s: S,
    job: &Job<'_, X, W>,
    encoder: &[E],
    rows: Range<usize>,
    packed: &[f32],
    h: &mut [f32],
    g: &mut [f32],
    xbuf: &mut [f32],
) {
    let nb = rows.len();
    let (re, rd) = (job.r_e, job.r_d);
    let x = job.x.as_ptr().add(rows.start * job.d_in);
    let widen = std::mem::size_of::<X>() != std::mem::size_of::<f32>() && !(S::DPBF16 && X::IS_BF16 && E::IS_BF16);
    let mut k0 = 0;
    loop {
        let len = KC.min(job.d_in - k0);
        if widen {
            for i in 0..nb {
                let src = x.add(i * job.d_in + k0);
                let dst = xbuf.as_mut_ptr().add(i * KC);
                let mut k = 0;
                while k + S::LANES <= len {
                    s.store(dst.add(k), X::load(s, src.add(k)));
                    k += S::LANES;
                }
                while k < len {
                    *dst.add(k) = (*src.add(k)).to_f32();
                    k += 1;
                }
            }
            dot_block(
                s,
                xbuf.as_ptr(),
                KC,
                0..nb,
                encoder.as_ptr().add(k0),
                job.d_in,
                0..re,
                0,
                len,
                h.as_mut_ptr(),
                re,
                k0 > 0,
            );
        } else {
            dot_block(s, x, job.d_in, 0..nb, encoder.as_ptr(), job.d_in, 0..re, k0, len, h.as_mut_ptr(), re, k0 > 0);
        }
        k0 += KC;
        if k0 >= job.d_in {
            break;
        }
    }
    activate_in_place(s, job.act_e, &mut h[..nb * re]);
    apply_cores(s, job, rows.clone(), h, g);
    let panels = job.d_out.div_ceil(panel_width::<S>());
    for p in 0..panels {
        let panel = packed.as_ptr().add(p * panel_width::<S>() * rd);
        let mut i = 0;
        while i + S::MR <= nb {
            let (gi, r0, c0) = (g.as_ptr().add(i * rd), rows.start + i, p * panel_width::<S>());
            match S::MR {
                12 => micro::<S, X, W, 12>(s, job, gi, panel, r0, c0),
                _ => micro::<S, X, W, 6>(s, job, gi, panel, r0, c0),
            }
            i += S::MR;
        }
        let gi = g.as_ptr().add(i * rd);
        let (r0, c0) = (rows.start + i, p * panel_width::<S>());
        macro_rules! rest {
            ($($r:literal)*) => {
                match nb - i {
                    $($r => micro::<S, X, W, $r>(s, job, gi, panel, r0, c0),)*
                    _ => {}
                }
            };
        }
        rest!(1 2 3 4 5 6 7 8 9 10 11);
    }
}

/// `dst = src` widened to f32.
#[inline(always)]
pub unsafe fn widen<S: Simd, T: Elem>(s: S, src: &[T], dst: *mut f32) {
    let mut k = 0;
    while k + S::LANES <= src.len() {
        s.store(dst.add(k), T::load(s, src.as_ptr().add(k)));
        k += S::LANES;
    }
    while k < src.len() {
        *dst.add(k) = src[k].to_f32();
        k += 1;
    }
}
