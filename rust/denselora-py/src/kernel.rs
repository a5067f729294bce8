//! Binding of the fused branch kernel: numpy arrays are viewed in place (no copy) and the GIL is
//! released while the kernel runs.

use denselora_core::kernel::{self, BranchParams, Dst, Operand, Src};
use denselora_core::{Activation, ArgumentKind, DType, Error};
use numpy::npyffi::flags::NPY_ARRAY_WRITEABLE;
use numpy::{PyUntypedArray, PyUntypedArrayMethods};
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

fn view<'py>(a: &Bound<'py, PyUntypedArray>, name: &str) -> Result<View<'py>, Error> {
    let dtype = array_dtype(a, name, true)?;
    Ok((a.shape().to_vec(), dtype, array_bytes(a, name, dtype)?))
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
    let params = BranchParams {
        scale,
        encoder_activation: activation(encoder_activation, "encoder_activation")?,
        decoder_activation: activation(decoder_activation, "decoder_activation")?,
        num_threads,
        check_finite,
    };
    let (xs, xt, xb) = view(x, "x")?;
    let (es, et, eb) = view(encoder, "encoder")?;
    let (ms, mt, mb) = view(m, "m")?;
    let (ds, dt, db) = view(decoder, "decoder")?;
    let (os, ot, ob) = view(out, "out")?;
    // Leading dimensions of `x` and `out` are rows: (..., features) is viewed as (rows, features).
    if xs.is_empty() || os.is_empty() {
        let name = if xs.is_empty() { "x" } else { "out" };
        return Err(Error::argument(name, ArgumentKind::Shape, "expected at least 1 dimension, got a scalar").into());
    }
    if xs[..xs.len() - 1] != os[..os.len() - 1] {
        let message = format!("leading dimensions {:?} differ from x's {:?}", &os[..os.len() - 1], &xs[..xs.len() - 1]);
        return Err(Error::argument("out", ArgumentKind::Shape, message).into());
    }
    let rows = |s: &[usize]| vec![s[..s.len() - 1].iter().product::<usize>(), s[s.len() - 1]];
    let (xs, os) = (rows(&xs), rows(&os));
    // SAFETY: reading the flags word of a live array.
    let writeable = unsafe { (*out.as_array_ptr()).fields.flags } & NPY_ARRAY_WRITEABLE != 0;
    if !writeable {
        return Err(Error::argument("out", ArgumentKind::Layout, "array is read-only").into());
    }
    let out_range = byte_range(ob);
    for (name, bytes) in [("x", xb), ("encoder", eb), ("m", mb), ("decoder", db)] {
        let r = byte_range(bytes);
        if !bytes.is_empty() && !ob.is_empty() && r.start < out_range.end && out_range.start < r.end {
            return Err(Error::argument("out", ArgumentKind::Layout, format!("shares memory with {name}")).into());
        }
    }
    // SAFETY: `out` is a writeable, C-contiguous array alive for the call, and overlaps no input;
    // nothing else touches it while the GIL is released (the caller owns it for the call).
    let ob_mut = unsafe { std::slice::from_raw_parts_mut(ob.as_ptr() as *mut u8, ob.len()) };
    py.detach(|| run_kernel((xt, xb, &xs), [(et, eb, &es), (mt, mb, &ms), (dt, db, &ds)], (ot, ob_mut, &os), &params))?;
    Ok(())
}

/// The kernel's vector backend in use: "avx512bf16", "avx512", "avx2" or "portable".
/// The kernel over raw buffers: `(dtype, bytes, shape)` of x, of the encoder, `M` and decoder, and
/// of the output (names in the kernel's errors are the arguments').
fn run_kernel(
    x: (DType, &[u8], &[usize]),
    weights: [(DType, &[u8], &[usize]); 3],
    out: (DType, &mut [u8], &[usize]),
    params: &BranchParams,
) -> Result<(), Error> {
    let [(et, eb, es), (mt, mb, ms), (dt, db, ds)] = weights;
    kernel::fused_branch(
        Operand { shape: x.2, data: Src::from_bytes(x.0, x.1, "x")? },
        Operand { shape: es, data: Src::from_bytes(et, eb, "encoder")? },
        Operand { shape: ms, data: Src::from_bytes(mt, mb, "m")? },
        Operand { shape: ds, data: Src::from_bytes(dt, db, "decoder")? },
        Dst::from_bytes(out.0, out.1, "out")?,
        out.2,
        params,
    )
}

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

/// The weights of one adapted layer, checked once, for the layer's inference fast path: each
/// call then passes only the addresses of `x` and `out`. The arrays are held (so their memory
/// stays valid) for the object's lifetime.
#[pyclass(frozen, module = "denselora._core")]
pub struct PreparedBranch {
    _arrays: [Py<PyUntypedArray>; 3],
    weights: [(usize, usize); 3],
    dtype: DType,
    shapes: [[usize; 2]; 3],
    params: BranchParams,
}

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
        let params = BranchParams {
            scale,
            encoder_activation: activation(encoder_activation, "encoder_activation")?,
            decoder_activation: activation(decoder_activation, "decoder_activation")?,
            num_threads: 1,
            check_finite: false,
        };
        let mut weights = [(0, 0); 3];
        let mut shapes = [[0; 2]; 3];
        let mut dtype = None;
        for (i, (a, name)) in [(encoder, "encoder"), (m, "m"), (decoder, "decoder")].into_iter().enumerate() {
            let (shape, dt, bytes) = view(a, name)?;
            if shape.len() != 2 {
                return Err(Error::argument(
                    name,
                    ArgumentKind::Shape,
                    format!("expected a 2-D array, got shape {shape:?}"),
                )
                .into());
            }
            // Views with the dtype and alignment checks the kernel applies.
            Src::from_bytes(dt, bytes, name)?;
            weights[i] = (bytes.as_ptr() as usize, bytes.len());
            shapes[i] = [shape[0], shape[1]];
            dtype.get_or_insert(dt);
        }
        let [e, mm, d] = shapes;
        if mm[1] != e[0] || d[1] != mm[0] {
            return Err(
                Error::argument("m", ArgumentKind::Shape, format!("shapes {e:?}, {mm:?}, {d:?} do not chain")).into()
            );
        }
        Ok(PreparedBranch {
            _arrays: [encoder.clone().unbind(), m.clone().unbind(), decoder.clone().unbind()],
            weights,
            dtype: dtype.unwrap_or(DType::F32),
            shapes,
            params,
        })
    }

    #[getter]
    fn in_features(&self) -> usize {
        self.shapes[0][1]
    }

    #[getter]
    fn out_features(&self) -> usize {
        self.shapes[2][0]
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
        let act: DType = dtype.parse().map_err(|m| Error::argument("dtype", ArgumentKind::DType, m))?;
        let [e, m, d] = self.shapes;
        let (d_in, d_out) = (e[1], d[0]);
        let size = act.size();
        if (x_ptr == 0 || out_ptr == 0) && rows > 0 {
            return Err(Error::argument("x", ArgumentKind::Layout, "null address").into());
        }
        // SAFETY: the caller's contract above; the weight buffers are kept alive by `_arrays`.
        let (xb, ob, wb) = unsafe {
            let xb = std::slice::from_raw_parts(x_ptr.max(1) as *const u8, rows * d_in * size);
            let ob = std::slice::from_raw_parts_mut(out_ptr.max(1) as *mut u8, rows * d_out * size);
            let wb: [&[u8]; 3] = self.weights.map(|(p, len)| std::slice::from_raw_parts(p.max(1) as *const u8, len));
            (xb, ob, wb)
        };
        let params = BranchParams { num_threads, ..self.params };
        let (xs, os) = ([rows, d_in], [rows, d_out]);
        let w = self.dtype;
        let mut run =
            || run_kernel((act, xb, &xs), [(w, wb[0], &e), (w, wb[1], &m), (w, wb[2], &d)], (act, ob, &os), &params);
        // Releasing the GIL costs more than a tiny call takes.
        if rows * (d_in + d_out) < 1 << 16 {
            run()?;
        } else {
            py.detach(run)?;
        }
        Ok(())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fused_branch, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_isa, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_available_isas, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_set_isa, m)?)?;
    m.add_class::<PreparedBranch>()?;
    Ok(())
}
