//! Binding of the fused branch kernel, single-adapter and routed: numpy arrays are viewed in place
//! (no copy) and the GIL is released while the kernel runs.

use denselora_core::kernel::{self, BranchParams, Dst, Operand, Src};
use denselora_core::{Activation, ArgumentKind, DType, Error};
use numpy::npyffi::flags::NPY_ARRAY_WRITEABLE;
use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::arrays::{array_bytes, array_dtype};
use crate::errors::BindingResult;

fn activation(name: &str, argument: &str) -> Result<Activation, Error> {
    name.parse().map_err(|m: String| Error::argument(argument, ArgumentKind::Value, m))
}

fn byte_range(bytes: &[u8]) -> std::ops::Range<usize> {
    let start = bytes.as_ptr() as usize;
    start..start + bytes.len()
}

type View<'py> = (Vec<usize>, DType, &'py [u8]);
type ViewMut<'py> = (Vec<usize>, DType, &'py mut [u8]);

fn view<'py>(a: &Bound<'py, PyUntypedArray>, name: &str) -> Result<View<'py>, Error> {
    let dtype = array_dtype(a, name)?;
    Ok((a.shape().to_vec(), dtype, array_bytes(a, name, dtype)?))
}

/// `x` (..., in) and `out` (..., out) of a call viewed as (rows, features), after the checks
/// every call makes: leading dimensions equal, `out` writeable and overlapping none of `inputs`.
fn rows_and_out<'py>(
    x: &Bound<'py, PyUntypedArray>,
    out: &Bound<'py, PyUntypedArray>,
    inputs: &[(&str, &[u8])],
) -> Result<(View<'py>, ViewMut<'py>), Error> {
    let (xs, xt, xb) = view(x, "x")?;
    let (os, ot, ob) = view(out, "out")?;
    if xs.is_empty() || os.is_empty() {
        let name = if xs.is_empty() { "x" } else { "out" };
        return Err(Error::argument(name, ArgumentKind::Shape, "expected at least 1 dimension, got a scalar"));
    }
    if xs[..xs.len() - 1] != os[..os.len() - 1] {
        let message = format!("leading dimensions {:?} differ from x's {:?}", &os[..os.len() - 1], &xs[..xs.len() - 1]);
        return Err(Error::argument("out", ArgumentKind::Shape, message));
    }
    let rows = |s: &[usize]| vec![s[..s.len() - 1].iter().product::<usize>(), s[s.len() - 1]];
    // SAFETY: reading the flags word of a live array.
    let writeable = unsafe { (*out.as_array_ptr()).fields.flags } & NPY_ARRAY_WRITEABLE != 0;
    if !writeable {
        return Err(Error::argument("out", ArgumentKind::Layout, "array is read-only"));
    }
    let out_range = byte_range(ob);
    for &(name, bytes) in [("x", xb)].iter().chain(inputs) {
        let r = byte_range(bytes);
        if !bytes.is_empty() && !ob.is_empty() && r.start < out_range.end && out_range.start < r.end {
            return Err(Error::argument("out", ArgumentKind::Layout, format!("shares memory with {name}")));
        }
    }
    // SAFETY: `out` is a writeable, C-contiguous array alive for the call, and overlaps no input;
    // nothing else touches it while the GIL is released (the caller owns it for the call).
    let ob_mut = unsafe { std::slice::from_raw_parts_mut(ob.as_ptr() as *mut u8, ob.len()) };
    Ok(((rows(&xs), xt, xb), (rows(&os), ot, ob_mut)))
}

/// The kernel's parameters from the binding's arguments.
fn params(
    scale: f32,
    encoder_activation: &str,
    decoder_activation: &str,
    num_threads: usize,
    check_finite: bool,
) -> Result<BranchParams, Error> {
    Ok(BranchParams {
        scale,
        encoder_activation: activation(encoder_activation, "encoder_activation")?,
        decoder_activation: activation(decoder_activation, "decoder_activation")?,
        num_threads,
        check_finite,
    })
}

/// The fused kernel: `out += scale * act_d(decoder @ m @ act_e(encoder @ x_i))` for every row of
/// `x` (..., in), into `out` (..., out) in place.
/// bfloat16 arrays travel as uint16 bit patterns.
#[pyfunction]
#[pyo3(signature = (x, encoder, m, decoder, out, *, scale, encoder_activation, decoder_activation, num_threads, check_finite=false))]
#[allow(clippy::too_many_arguments)]
pub fn fused_branch<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyUntypedArray>,
    encoder: &Bound<'py, PyUntypedArray>,
    m: &Bound<'py, PyUntypedArray>,
    decoder: &Bound<'py, PyUntypedArray>,
    out: &Bound<'py, PyUntypedArray>,
    scale: f32,
    encoder_activation: &str,
    decoder_activation: &str,
    num_threads: usize,
    check_finite: bool,
) -> BindingResult<()> {
    let params = params(scale, encoder_activation, decoder_activation, num_threads, check_finite)?;
    let (es, et, eb) = view(encoder, "encoder")?;
    let (ms, mt, mb) = view(m, "m")?;
    let (ds, dt, db) = view(decoder, "decoder")?;
    let ((xs, xt, xb), (os, ot, ob)) = rows_and_out(x, out, &[("encoder", eb), ("m", mb), ("decoder", db)])?;
    let weights = [(et, eb, es.as_slice()), (mt, mb, &ms), (dt, db, &ds)];
    py.detach(|| run_kernel((xt, xb, &xs), weights, None, (ot, ob, &os), &params))?;
    Ok(())
}

/// The routed kernel: `out[i] += scale * act_d(decoder @ cores[row_core[i]] @ act_e(encoder @
/// x_i))` for every row of `x` (..., in) whose index is not -1, into `out` (..., out) in place;
/// `cores` is (T, r_d, r_e) and `row_core` int32 with `x`'s leading shape.
#[pyfunction]
#[pyo3(signature = (x, encoder, cores, decoder, row_core, out, *, scale, encoder_activation, decoder_activation, num_threads, check_finite=false))]
#[allow(clippy::too_many_arguments)]
pub fn fused_routed_branch<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyUntypedArray>,
    encoder: &Bound<'py, PyUntypedArray>,
    cores: &Bound<'py, PyUntypedArray>,
    decoder: &Bound<'py, PyUntypedArray>,
    row_core: &Bound<'py, PyUntypedArray>,
    out: &Bound<'py, PyUntypedArray>,
    scale: f32,
    encoder_activation: &str,
    decoder_activation: &str,
    num_threads: usize,
    check_finite: bool,
) -> BindingResult<()> {
    let params = params(scale, encoder_activation, decoder_activation, num_threads, check_finite)?;
    let (es, et, eb) = view(encoder, "encoder")?;
    let (cs, ct, cb) = view(cores, "cores")?;
    let (ds, dt, db) = view(decoder, "decoder")?;
    let index = row_indices(row_core)?;
    let inputs = [("encoder", eb), ("cores", cb), ("decoder", db), ("row_core", index_bytes(index))];
    let ((xs, xt, xb), (os, ot, ob)) = rows_and_out(x, out, &inputs)?;
    let leading = &x.shape()[..x.ndim() - 1];
    if row_core.shape() != leading {
        let message = format!("has shape {:?} but x has {:?} rows (its leading dimensions)", row_core.shape(), leading);
        return Err(Error::argument("row_core", ArgumentKind::Shape, message).into());
    }
    let weights = [(et, eb, es.as_slice()), (ct, cb, &cs), (dt, db, &ds)];
    py.detach(|| run_kernel((xt, xb, &xs), weights, Some(index), (ot, ob, &os), &params))?;
    Ok(())
}

/// The int32 indices of a C-contiguous numpy array, viewed in place.
fn row_indices<'py>(row_core: &Bound<'py, PyUntypedArray>) -> Result<&'py [i32], Error> {
    if !row_core.dtype().is_equiv_to(&numpy::dtype::<i32>(row_core.py())) {
        let message = format!("expected int32 core indices, got {}", row_core.dtype());
        return Err(Error::argument("row_core", ArgumentKind::DType, message));
    }
    if !row_core.is_c_contiguous() {
        return Err(Error::argument("row_core", ArgumentKind::Layout, "array must be C-contiguous"));
    }
    let len = row_core.len();
    // SAFETY: a C-contiguous int32 array owns `len` aligned i32 at `data`, alive as long as the
    // array, which the caller holds for `'py`.
    let ptr = unsafe { (*row_core.as_array_ptr()).fields.data } as *const i32;
    Ok(if len == 0 { &[] } else { unsafe { std::slice::from_raw_parts(ptr, len) } })
}

fn index_bytes(v: &[i32]) -> &[u8] {
    // SAFETY: any i32 is four initialised bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The kernel over raw buffers: `(dtype, bytes, shape)` of x, of the encoder, the core(s) and the
/// decoder, and of the output; with `row_core`, the routed kernel over a stack of cores (names in
/// the kernel's errors are the arguments').
fn run_kernel(
    x: (DType, &[u8], &[usize]),
    weights: [(DType, &[u8], &[usize]); 3],
    row_core: Option<&[i32]>,
    out: (DType, &mut [u8], &[usize]),
    params: &BranchParams,
) -> Result<(), Error> {
    let [(et, eb, es), (mt, mb, ms), (dt, db, ds)] = weights;
    let x_op = Operand { shape: x.2, data: Src::from_bytes(x.0, x.1, "x")? };
    let encoder = Operand { shape: es, data: Src::from_bytes(et, eb, "encoder")? };
    let decoder = Operand { shape: ds, data: Src::from_bytes(dt, db, "decoder")? };
    let out_dst = Dst::from_bytes(out.0, out.1, "out")?;
    match row_core {
        None => {
            let m = Operand { shape: ms, data: Src::from_bytes(mt, mb, "m")? };
            kernel::fused_branch(x_op, encoder, m, decoder, out_dst, out.2, params)
        }
        Some(index) => {
            let cores = Operand { shape: ms, data: Src::from_bytes(mt, mb, "cores")? };
            kernel::fused_routed_branch(x_op, encoder, cores, decoder, index, out_dst, out.2, params)
        }
    }
}

/// The kernel's vector backend in use: "avx512bf16", "avx512", "avx2" or "portable".
#[pyfunction]
pub fn kernel_isa() -> &'static str {
    kernel::isa()
}

/// The backends this CPU can run, widest first.
#[pyfunction]
pub fn kernel_available_isas() -> Vec<&'static str> {
    kernel::available_isas()
}

/// Use backend `name` from now on (process-wide); `None` restores the default.
#[pyfunction]
#[pyo3(signature = (name))]
pub fn kernel_set_isa(name: Option<&str>) -> BindingResult<()> {
    kernel::set_isa(name)?;
    Ok(())
}

/// Weights held for a prepared fast path: the arrays (kept alive, so their memory stays valid)
/// and their addresses, checked once; each call then passes only the addresses of `x` and `out`
/// (and of the row indices). The arrays are read when a call runs, so values written into them
/// in place between calls are seen.
struct Held {
    _arrays: [Py<PyUntypedArray>; 3],
    weights: [(usize, usize); 3],
    dtype: DType,
    shapes: [Vec<usize>; 3],
    params: BranchParams,
}

impl Held {
    /// `arrays` are the encoder (r_e, in), the core(s) (`middle` names them; 2-D, or 3-D for a
    /// stack) and the decoder (out, r_d).
    fn new(
        arrays: [&Bound<'_, PyUntypedArray>; 3],
        middle: (&str, usize),
        scale: f32,
        encoder_activation: &str,
        decoder_activation: &str,
    ) -> Result<Self, Error> {
        let params = params(scale, encoder_activation, decoder_activation, 1, false)?;
        let mut weights = [(0, 0); 3];
        let mut shapes: [Vec<usize>; 3] = Default::default();
        let mut dtype = None;
        let names = [("encoder", 2), middle, ("decoder", 2)];
        for (i, (a, (name, ndim))) in arrays.into_iter().zip(names).enumerate() {
            let (shape, dt, bytes) = view(a, name)?;
            if shape.len() != ndim {
                let message = format!("expected a {ndim}-D array, got shape {shape:?}");
                return Err(Error::argument(name, ArgumentKind::Shape, message));
            }
            // Views with the dtype and alignment checks the kernel applies.
            Src::from_bytes(dt, bytes, name)?;
            weights[i] = (bytes.as_ptr() as usize, bytes.len());
            shapes[i] = shape;
            dtype.get_or_insert(dt);
        }
        let [e, m, d] = &shapes;
        let core = &m[m.len() - 2..];
        if core[1] != e[0] || d[1] != core[0] {
            let message = format!("shapes {e:?}, {m:?}, {d:?} do not chain");
            return Err(Error::argument(middle.0, ArgumentKind::Shape, message));
        }
        Ok(Held {
            _arrays: arrays.map(|a| a.clone().unbind()),
            weights,
            dtype: dtype.unwrap_or(DType::F32),
            shapes,
            params,
        })
    }

    fn in_features(&self) -> usize {
        self.shapes[0][1]
    }

    fn out_features(&self) -> usize {
        self.shapes[2][0]
    }

    /// `out += branch(x)` for `rows` rows at raw addresses; the caller's contract is that of
    /// `add_unchecked`.
    #[allow(clippy::too_many_arguments)]
    fn add(
        &self,
        py: Python<'_>,
        x_ptr: usize,
        out_ptr: usize,
        row_core_ptr: Option<usize>,
        rows: usize,
        dtype: &str,
        num_threads: usize,
    ) -> Result<(), Error> {
        let act: DType = dtype.parse().map_err(|m| Error::argument("dtype", ArgumentKind::DType, m))?;
        let (d_in, d_out) = (self.in_features(), self.out_features());
        let size = act.size();
        if (x_ptr == 0 || out_ptr == 0 || row_core_ptr == Some(0)) && rows > 0 {
            let name = if x_ptr == 0 {
                "x"
            } else if out_ptr == 0 {
                "out"
            } else {
                "row_core"
            };
            return Err(Error::argument(name, ArgumentKind::Layout, "null address"));
        }
        if row_core_ptr.is_some_and(|p| p % std::mem::align_of::<i32>() != 0) {
            return Err(Error::argument("row_core", ArgumentKind::Layout, "address is not aligned to int32"));
        }
        // SAFETY: the caller's contract; the weight buffers are kept alive by `_arrays`.
        let (xb, ob, wb, index) = unsafe {
            let xb = std::slice::from_raw_parts(x_ptr.max(1) as *const u8, rows * d_in * size);
            let ob = std::slice::from_raw_parts_mut(out_ptr.max(1) as *mut u8, rows * d_out * size);
            let wb: [&[u8]; 3] = self.weights.map(|(p, len)| std::slice::from_raw_parts(p.max(1) as *const u8, len));
            let index = row_core_ptr.map(|p| std::slice::from_raw_parts(p.max(4) as *const i32, rows));
            (xb, ob, wb, index)
        };
        let params = BranchParams { num_threads, ..self.params };
        let (xs, os) = ([rows, d_in], [rows, d_out]);
        let (w, [e, m, d]) = (self.dtype, &self.shapes);
        let mut run = || {
            let weights = [(w, wb[0], e.as_slice()), (w, wb[1], m), (w, wb[2], d)];
            run_kernel((act, xb, &xs), weights, index, (act, ob, &os), &params)
        };
        // Releasing the GIL costs more than a tiny call takes.
        if rows * (d_in + d_out) < 1 << 16 {
            run()
        } else {
            py.detach(run)
        }
    }
}

/// The weights of one adapted layer, checked once, for the layer's inference fast path: each
/// call then passes only the addresses of `x` and `out`. The arrays are held (so their memory
/// stays valid) for the object's lifetime.
#[pyclass(frozen, module = "denselora._core")]
pub struct PreparedBranch(Held);

#[pymethods]
impl PreparedBranch {
    #[new]
    #[pyo3(signature = (encoder, m, decoder, *, scale, encoder_activation, decoder_activation))]
    fn new(
        encoder: &Bound<'_, PyUntypedArray>,
        m: &Bound<'_, PyUntypedArray>,
        decoder: &Bound<'_, PyUntypedArray>,
        scale: f32,
        encoder_activation: &str,
        decoder_activation: &str,
    ) -> BindingResult<Self> {
        let arrays = [encoder, m, decoder];
        Ok(PreparedBranch(Held::new(arrays, ("m", 2), scale, encoder_activation, decoder_activation)?))
    }

    #[getter]
    fn in_features(&self) -> usize {
        self.0.in_features()
    }

    #[getter]
    fn out_features(&self) -> usize {
        self.0.out_features()
    }

    /// `out += branch(x)` for `rows` rows at raw addresses. Unchecked: the caller guarantees that
    /// `x_ptr` and `out_ptr` address live, C-contiguous, non-overlapping buffers of
    /// `rows × in_features` and `rows × out_features` elements of `dtype` (`"f32"`, `"f16"` or
    /// `"bf16"`). Only `denselora.layer` calls it, on tensors it checked.
    fn add_unchecked(
        &self,
        py: Python<'_>,
        x_ptr: usize,
        out_ptr: usize,
        rows: usize,
        dtype: &str,
        num_threads: usize,
    ) -> BindingResult<()> {
        Ok(self.0.add(py, x_ptr, out_ptr, None, rows, dtype, num_threads)?)
    }
}

/// The shared weights of one adapted layer and a stack of cores (T, r_d, r_e), one per resident
/// adapter, for the routed fast path of mixed-adapter batches. The stack is a view of the
/// caller's array: cores written into a slot in place are used by the next call, without
/// preparing again (never while a call runs: it reads the stack without the GIL).
#[pyclass(frozen, module = "denselora._core")]
pub struct PreparedRoutedBranch(Held);

#[pymethods]
impl PreparedRoutedBranch {
    #[new]
    #[pyo3(signature = (encoder, cores, decoder, *, scale, encoder_activation, decoder_activation))]
    fn new(
        encoder: &Bound<'_, PyUntypedArray>,
        cores: &Bound<'_, PyUntypedArray>,
        decoder: &Bound<'_, PyUntypedArray>,
        scale: f32,
        encoder_activation: &str,
        decoder_activation: &str,
    ) -> BindingResult<Self> {
        let arrays = [encoder, cores, decoder];
        Ok(PreparedRoutedBranch(Held::new(arrays, ("cores", 3), scale, encoder_activation, decoder_activation)?))
    }

    #[getter]
    fn in_features(&self) -> usize {
        self.0.in_features()
    }

    #[getter]
    fn out_features(&self) -> usize {
        self.0.out_features()
    }

    /// T, the cores in the stack.
    #[getter]
    fn num_cores(&self) -> usize {
        self.0.shapes[1][0]
    }

    /// `out[i] += branch(x[i])` with core `row_core[i]` (-1: none) for `rows` rows at raw
    /// addresses. Unchecked as `PreparedBranch.add_unchecked`, and `row_core_ptr` addresses
    /// `rows` int32; the indices themselves are checked (an error names the row).
    #[allow(clippy::too_many_arguments)]
    fn add_unchecked(
        &self,
        py: Python<'_>,
        x_ptr: usize,
        out_ptr: usize,
        row_core_ptr: usize,
        rows: usize,
        dtype: &str,
        num_threads: usize,
    ) -> BindingResult<()> {
        Ok(self.0.add(py, x_ptr, out_ptr, Some(row_core_ptr), rows, dtype, num_threads)?)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fused_branch, m)?)?;
    m.add_function(wrap_pyfunction!(fused_routed_branch, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_isa, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_available_isas, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_set_isa, m)?)?;
    m.add_class::<PreparedBranch>()?;
    m.add_class::<PreparedRoutedBranch>()?;
    Ok(())
}
