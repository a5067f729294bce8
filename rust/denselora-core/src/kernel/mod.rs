//! The fused CPU kernel of the DenseLoRA branch:
//! `out[i] += scale · act_d(D · M · act_e(E · x[i]))` for every row `i` of `x` ([`fused_branch`]),
//! and its routed form for batches whose rows belong to different adapters on one basis, each
//! row with its own core `M[t_i]` from a stack, or none ([`fused_routed_branch`]).
//!
//! - Element types: `x` and `out` are f32, f16 or bf16 (the same type); `encoder`, `m` and
//!   `decoder` are f32, f16 or bf16 (one type for the three). Arithmetic is f32. With the
//!   AVX512-BF16 backend, `encoder · x` for bf16 against bf16 sums exact products of bf16 pairs in
//!   f32 (the instruction treats subnormal bf16 inputs as zero); everything else is plain f32
//!   arithmetic.
//! - SIMD: the widest backend the CPU has, detected at run time: AVX-512 (F + BW, 16 lanes) with
//!   the AVX512-BF16 dot product for bf16 against bf16 where available, else AVX-512 alone, else
//!   AVX2 + FMA + F16C, else portable code. `DENSELORA_KERNEL_ISA` (`avx512bf16`, `avx512`,
//!   `avx2`, `portable`) in the environment, or [`set_isa`], chooses a narrower one (a backend
//!   the CPU lacks is never used).
//! - Threads: `num_threads` workers from a pool kept per thread count; small calls run on the
//!   calling thread with no synchronisation at all.
//! - Non-finite values propagate as in IEEE arithmetic (a NaN in row `i` of `x` makes row `i` of
//!   the branch NaN; a NaN weight reaches every row it touches). With `check_finite`, any NaN or
//!   infinity in an input is reported as [`Error::NonFinite`] naming the argument, before any
//!   output is written.

mod activation;
mod branch;
mod isa;
mod simd;
mod threads;

use half::{bf16, f16};

use branch::{Cores, Job};
use isa::{dispatch, Isa};
use simd::Elem;
use threads::{pool, split, tasks_for, SharedMut, PARALLEL_MIN_WORK};

pub use isa::{available_isas, isa, set_isa};

use crate::activation::Activation;
use crate::dtype::DType;
use crate::error::{ArgumentKind, Error, Result};

/// A read-only operand: its dtype travels in the variant.
#[derive(Clone, Copy, Debug)]
pub enum Src<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

/// The output, added into in place.
#[derive(Debug)]
pub enum Dst<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

fn cast_bytes<'a, T>(bytes: &'a [u8], name: &str) -> Result<&'a [T]> {
    // SAFETY: f32, f16 and bf16 accept every bit pattern; `align_to` only yields aligned middles.
    let (head, body, tail) = unsafe { bytes.align_to::<T>() };
    if !head.is_empty() || !tail.is_empty() {
        return Err(Error::argument(name, ArgumentKind::Layout, "data is not aligned to its element size"));
    }
    Ok(body)
}

fn cast_bytes_mut<'a, T>(bytes: &'a mut [u8], name: &str) -> Result<&'a mut [T]> {
    // SAFETY: as in `cast_bytes`.
    let (head, body, tail) = unsafe { bytes.align_to_mut::<T>() };
    if !head.is_empty() || !tail.is_empty() {
        return Err(Error::argument(name, ArgumentKind::Layout, "data is not aligned to its element size"));
    }
    Ok(body)
}

impl<'a> Src<'a> {
    /// View little-endian bytes of `dtype` in place (`name` is the argument errors speak of).
    pub fn from_bytes(dtype: DType, bytes: &'a [u8], name: &str) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Src::F32(cast_bytes(bytes, name)?),
            DType::F16 => Src::F16(cast_bytes(bytes, name)?),
            DType::BF16 => Src::BF16(cast_bytes(bytes, name)?),
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            Src::F32(_) => DType::F32,
            Src::F16(_) => DType::F16,
            Src::BF16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Src::F32(v) => v.len(),
            Src::F16(v) => v.len(),
            Src::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements in `range`.
    fn slice(&self, range: std::ops::Range<usize>) -> Src<'a> {
        match self {
            Src::F32(v) => Src::F32(&v[range]),
            Src::F16(v) => Src::F16(&v[range]),
            Src::BF16(v) => Src::BF16(&v[range]),
        }
    }

    fn all_finite(&self) -> bool {
        match self {
            Src::F32(v) => v.iter().all(|x| x.is_finite()),
            Src::F16(v) => v.iter().all(|x| x.is_finite()),
            Src::BF16(v) => v.iter().all(|x| x.is_finite()),
        }
    }
}

impl<'a> Dst<'a> {
    /// View little-endian bytes of `dtype` in place, for writing.
    pub fn from_bytes(dtype: DType, bytes: &'a mut [u8], name: &str) -> Result<Self> {
        Ok(match dtype {
            DType::F32 => Dst::F32(cast_bytes_mut(bytes, name)?),
            DType::F16 => Dst::F16(cast_bytes_mut(bytes, name)?),
            DType::BF16 => Dst::BF16(cast_bytes_mut(bytes, name)?),
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            Dst::F32(_) => DType::F32,
            Dst::F16(_) => DType::F16,
            Dst::BF16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Dst::F32(v) => v.len(),
            Dst::F16(v) => v.len(),
            Dst::BF16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An input with its shape.
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    pub shape: &'a [usize],
    pub data: Src<'a>,
}

/// Everything but the arrays.
#[derive(Clone, Copy, Debug)]
pub struct BranchParams {
    pub scale: f32,
    pub encoder_activation: Activation,
    pub decoder_activation: Activation,
    /// Worker threads, at least 1.
    pub num_threads: usize,
    /// Reject NaN and infinity in the inputs instead of propagating them.
    pub check_finite: bool,
}

fn shape_err(name: &str, message: String) -> Error {
    Error::argument(name, ArgumentKind::Shape, message)
}

fn matrix(op: &Operand<'_>, name: &str, what: &str) -> Result<(usize, usize)> {
    if op.shape.len() != 2 {
        return Err(shape_err(name, format!("expected a 2-D array {what}, got shape {:?}", op.shape)));
    }
    let (rows, cols) = (op.shape[0], op.shape[1]);
    if rows.checked_mul(cols) != Some(op.data.len()) {
        return Err(shape_err(name, format!("shape {:?} does not match its {} elements", op.shape, op.data.len())));
    }
    Ok((rows, cols))
}

/// The fused branch: `out += scale · act_d(decoder · m · act_e(encoder · x[i]))` for every row
/// of `x`, in one pass without materialising more than a block of latents.
///
/// Shapes: `x` (n, in), `encoder` (r_e, in), `m` (r_d, r_e), `decoder` (out, r_d), and `out`
/// given as (n, out) by `out_shape`.
pub fn fused_branch(
    x: Operand<'_>,
    encoder: Operand<'_>,
    m: Operand<'_>,
    decoder: Operand<'_>,
    out: Dst<'_>,
    out_shape: &[usize],
    params: &BranchParams,
) -> Result<()> {
    branch(x, encoder, Middle::One(m), decoder, out, out_shape, params)
}

/// The routed branch of a batch whose rows belong to different adapters on one basis (shared
/// encoder and decoder, a core each): `out[i] += scale · act_d(decoder · cores[row_core[i]] ·
/// act_e(encoder · x[i]))` for every row with `row_core[i] >= 0`; rows with `row_core[i] == -1`
/// take no branch and their output is left bit for bit as it is.
///
/// Shapes: `cores` (T, r_d, r_e), `row_core` n indices in `-1..T`, the rest as in
/// [`fused_branch`], which this is with a per-row core (same paths, same speed per row). An index
/// out of range is an error naming its row, reported before anything is written. With
/// `check_finite`, of the stack only the cores some row takes are checked, and of `x` only the
/// rows with a branch.
#[allow(clippy::too_many_arguments)]
pub fn fused_routed_branch(
    x: Operand<'_>,
    encoder: Operand<'_>,
    cores: Operand<'_>,
    decoder: Operand<'_>,
    row_core: &[i32],
    out: Dst<'_>,
    out_shape: &[usize],
    params: &BranchParams,
) -> Result<()> {
    branch(x, encoder, Middle::PerRow(cores, row_core), decoder, out, out_shape, params)
}

/// The middle step's operands as the caller gave them.
#[derive(Clone, Copy)]
enum Middle<'a> {
    One(Operand<'a>),
    PerRow(Operand<'a>, &'a [i32]),
}

impl<'a> Middle<'a> {
    fn operand(&self) -> (&Operand<'a>, &'static str) {
        match self {
            Middle::One(m) => (m, "m"),
            Middle::PerRow(cores, _) => (cores, "cores"),
        }
    }

    /// `(T, r_d, r_e)`, with `T = 1` for a single core.
    fn dims(&self) -> Result<(usize, usize, usize)> {
        match self {
            Middle::One(m) => matrix(m, "m", "(r_decoder, r_encoder)").map(|(r_d, r_e)| (1, r_d, r_e)),
            Middle::PerRow(cores, _) => {
                let &[t, r_d, r_e] = cores.shape else {
                    let message =
                        format!("expected a 3-D array (cores, r_decoder, r_encoder), got shape {:?}", cores.shape);
                    return Err(shape_err("cores", message));
                };
                let len = t.checked_mul(r_d).and_then(|v| v.checked_mul(r_e));
                if len != Some(cores.data.len()) {
                    let message = format!("shape {:?} does not match its {} elements", cores.shape, cores.data.len());
                    return Err(shape_err("cores", message));
                }
                Ok((t, r_d, r_e))
            }
        }
    }
}

/// Every `row_core` index names a core of the stack or is -1.
fn check_row_core(row_core: &[i32], n: usize, cores: usize) -> Result<()> {
    if row_core.len() != n {
        return Err(shape_err("row_core", format!("has {} indices but x has {n} rows", row_core.len())));
    }
    if let Some((row, &t)) = row_core.iter().enumerate().find(|&(_, &t)| t < -1 || t as i64 >= cores as i64) {
        let range = if cores == 0 { "-1 (the stack is empty)".to_string() } else { format!("-1 or 0..{cores}") };
        return Err(Error::argument(
            "row_core",
            ArgumentKind::Value,
            format!("row {row} has core index {t}, expected {range}"),
        ));
    }
    Ok(())
}

/// Whether `op`'s rows (of `width` elements) that `take` selects are all finite.
fn rows_finite(op: &Src<'_>, width: usize, take: impl Fn(usize) -> bool) -> bool {
    let rows = op.len().checked_div(width).unwrap_or(0);
    (0..rows).filter(|&i| take(i)).all(|i| op.slice(i * width..(i + 1) * width).all_finite())
}

/// The checks and dispatch shared by the single and the routed branch.
fn branch(
    x: Operand<'_>,
    encoder: Operand<'_>,
    middle: Middle<'_>,
    decoder: Operand<'_>,
    out: Dst<'_>,
    out_shape: &[usize],
    params: &BranchParams,
) -> Result<()> {
    let (n, d_in) = matrix(&x, "x", "(n, in_features)")?;
    let (r_e, e_in) = matrix(&encoder, "encoder", "(r, in_features)")?;
    let (t_cores, r_d, m_re) = middle.dims()?;
    let (m, m_name) = middle.operand();
    let (d_out, d_rd) = matrix(&decoder, "decoder", "(out_features, r)")?;
    if e_in != d_in {
        return Err(shape_err("encoder", format!("has {e_in} columns but x has {d_in} features")));
    }
    if m_re != r_e {
        return Err(shape_err(m_name, format!("has {m_re} columns but the encoder has rank {r_e}")));
    }
    if d_rd != r_d {
        return Err(shape_err("decoder", format!("has {d_rd} columns but {m_name} has {r_d} rows")));
    }
    if out_shape != [n, d_out] {
        return Err(shape_err("out", format!("expected shape [{n}, {d_out}], got {out_shape:?}")));
    }
    if out.len() != n * d_out {
        return Err(shape_err("out", format!("shape {out_shape:?} does not match its {} elements", out.len())));
    }
    let row_core = match middle {
        Middle::One(_) => None,
        Middle::PerRow(_, row_core) => {
            check_row_core(row_core, n, t_cores)?;
            Some(row_core)
        }
    };
    let wtype = encoder.data.dtype();
    for (name, op) in [(m_name, m), ("decoder", &decoder)] {
        if op.data.dtype() != wtype {
            return Err(Error::argument(
                name,
                ArgumentKind::DType,
                format!("is {} but the encoder is {wtype}; the three weights must share one dtype", op.data.dtype()),
            ));
        }
    }
    if out.dtype() != x.data.dtype() {
        return Err(Error::argument(
            "out",
            ArgumentKind::DType,
            format!("is {} but x is {}; they must match", out.dtype(), x.data.dtype()),
        ));
    }
    if !params.scale.is_finite() {
        return Err(Error::argument("scale", ArgumentKind::Value, format!("must be finite, got {}", params.scale)));
    }
    if params.num_threads == 0 {
        return Err(Error::argument("num_threads", ArgumentKind::Value, "must be at least 1"));
    }
    if params.check_finite {
        // What the branch reads: the rows of `x` that take one, and the cores they take.
        let mut used = vec![row_core.is_none(); t_cores];
        for &t in row_core.unwrap_or_default().iter().filter(|&&t| t >= 0) {
            used[t as usize] = true;
        }
        let checks = [
            ("x", rows_finite(&x.data, d_in, |i| row_core.is_none_or(|rc| rc[i] >= 0))),
            ("encoder", encoder.data.all_finite()),
            (m_name, rows_finite(&m.data, r_d * r_e, |t| used[t])),
            ("decoder", decoder.data.all_finite()),
        ];
        if let Some((name, _)) = checks.into_iter().find(|(_, finite)| !finite) {
            return Err(Error::non_finite(name, "contains NaN or infinity (check_finite is set)"));
        }
    }
    if n == 0 || d_out == 0 {
        return Ok(());
    }
    let isa = Isa::for_call();
    let dims = Dims { n, d_in, r_e, r_d, d_out };
    macro_rules! weights {
        ($xs:expr, $out:expr) => {
            match (encoder.data, m.data, decoder.data) {
                (Src::F32(e), Src::F32(mm), Src::F32(d)) => {
                    run(job($xs, e, select(mm, row_core), d, $out, dims, params), params.num_threads, isa)
                }
                (Src::F16(e), Src::F16(mm), Src::F16(d)) => {
                    run(job($xs, e, select(mm, row_core), d, $out, dims, params), params.num_threads, isa)
                }
                (Src::BF16(e), Src::BF16(mm), Src::BF16(d)) => {
                    run(job($xs, e, select(mm, row_core), d, $out, dims, params), params.num_threads, isa)
                }
                _ => unreachable!("weight dtypes checked above"),
            }
        };
    }
    match (x.data, out) {
        (Src::F32(xs), Dst::F32(o)) => weights!(xs, o),
        (Src::F16(xs), Dst::F16(o)) => weights!(xs, o),
        (Src::BF16(xs), Dst::BF16(o)) => weights!(xs, o),
        _ => unreachable!("x and out dtypes checked above"),
    }
    Ok(())
}

/// One core for every row, or each row's own from the stack.
fn select<'a, W>(m: &'a [W], row_core: Option<&'a [i32]>) -> Cores<'a, W> {
    match row_core {
        None => Cores::One(m),
        Some(index) => Cores::PerRow { stack: m, index },
    }
}

#[derive(Clone, Copy)]
struct Dims {
    n: usize,
    d_in: usize,
    r_e: usize,
    r_d: usize,
    d_out: usize,
}

fn job<'a, X, W>(
    x: &'a [X],
    e: &'a [W],
    cores: Cores<'a, W>,
    d: &'a [W],
    out: &'a mut [X],
    dims: Dims,
    p: &BranchParams,
) -> Job<'a, X, W> {
    Job {
        x,
        encoder: e,
        cores,
        decoder: d,
        out: out.as_mut_ptr(),
        n: dims.n,
        d_in: dims.d_in,
        r_e: dims.r_e,
        r_d: dims.r_d,
        d_out: dims.d_out,
        scale: p.scale,
        act_e: p.encoder_activation,
        act_d: p.decoder_activation,
    }
}

fn run<X: Elem, W: Elem>(job: Job<'_, X, W>, threads: usize, isa: Isa) {
    let Job { n, d_in, r_e, r_d, d_out, .. } = job;
    let job = &job;
    let work = n * (d_in * r_e + r_e * r_d + r_d * d_out);
    let want_pool = threads > 1 && work >= PARALLEL_MIN_WORK;
    let pool = if want_pool { pool(threads) } else { None };

    if n < branch::PREFILL_MIN_ROWS {
        let mut h = vec![0.0f32; n * r_e];
        let mut g = vec![0.0f32; n * r_d];
        let hp = SharedMut(h.as_mut_ptr());
        let tasks = tasks_for(n * d_in * r_e, r_e, threads);
        split(&pool, r_e, tasks, 1, |ks| {
            let hp = &hp;
            dispatch!(isa, encode_cols(job, ks, hp.0))
        });
        dispatch!(isa, middle(job, n, &mut h, &mut g));
        let lanes = isa.lanes();
        let tasks = tasks_for(n * r_d * d_out, d_out.div_ceil(lanes), threads);
        split(&pool, d_out, tasks, lanes, |os| dispatch!(isa, decode_cols(job, os, &g)));
        return;
    }

    let panel = 2 * isa.lanes();
    let panels = d_out.div_ceil(panel);
    let mut packed = vec![0.0f32; panels * panel * r_d];
    let pp = SharedMut(packed.as_mut_ptr());
    let tasks = tasks_for(n * r_d * d_out, panels, threads);
    split(&pool, panels, tasks, 1, |ps| {
        let pp = &pp;
        dispatch!(isa, pack_decoder(job, ps, pp.0))
    });
    let packed = &packed;
    // Half-precision encoders are widened once per call: every row block reads them again.
    // A bf16 encoder against bf16 rows stays as it is where the CPU has the bf16 dot product.
    let native_bf16 = isa == Isa::Avx512Bf16 && X::IS_BF16 && W::IS_BF16;
    let widened: Vec<f32> = if std::mem::size_of::<W>() != std::mem::size_of::<f32>() && !native_bf16 {
        let mut v = vec![0.0f32; job.encoder.len()];
        dispatch!(isa, widen(job.encoder, v.as_mut_ptr()));
        v
    } else {
        Vec::new()
    };
    let x_widen = std::mem::size_of::<X>() != std::mem::size_of::<f32>() && !native_bf16;
    // Row blocks small enough for h and g to stay in cache, and enough of them for every thread.
    const BLOCK: usize = 96;
    let blocks = n.div_ceil(BLOCK);
    let tasks = tasks_for(work, blocks, threads);
    split(&pool, blocks, tasks, 1, |bs| {
        let mut h = vec![0.0f32; BLOCK * r_e];
        let mut g = vec![0.0f32; BLOCK * r_d];
        let mut xbuf = if x_widen { vec![0.0f32; BLOCK * branch::KC] } else { Vec::new() };
        for b in bs {
            let rows = b * BLOCK..((b + 1) * BLOCK).min(n);
            if widened.is_empty() {
                dispatch!(isa, prefill_rows(job, job.encoder, rows, packed, &mut h, &mut g, &mut xbuf))
            } else {
                dispatch!(isa, prefill_rows(job, &widened, rows, packed, &mut h, &mut g, &mut xbuf))
            }
        }
    });
}

#[cfg(test)]
mod tests;
