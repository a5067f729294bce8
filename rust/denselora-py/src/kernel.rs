//! Binding of the fused branch kernel: numpy arrays are viewed in place (no copy) and the GIL is
//! released while the kernel runs.

use denselora_core::kernel::{self, Activation, BranchParams, Dst, Operand, Src};
use denselora_core::{ArgumentKind, Error};
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

type View<'py> = (Vec<usize>, denselora_core::DType, &'py [u8]);

fn view<'py>(a: &Bound<'py, PyUntypedArray>, name: &str) -> Result<View<'py>, Error> {
    let dtype = array_dtype(a, name, true)?;
    Ok((a.shape().to_vec(), dtype, array_bytes(a, name, dtype)?))
}

/// `out += scale * act_d(decoder @ m @ act_e(encoder @ x_i))` for every row of `x` (..., in),
/// into `out` (..., out) in place.
/// bfloat16 arrays travel as uint16 bit patterns.
#[pyfunction]
#[pyo3(signature = (x, encoder, m, decoder, out, *, scale, encoder_activation, decoder_activation, num_threads, check_finite=false))]
#[allow(clippy::too_many_arguments)]
pub fn dense_branch<'py>(
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
    let xv = Src::from_bytes(xt, xb, "x")?;
    let ev = Src::from_bytes(et, eb, "encoder")?;
    let mv = Src::from_bytes(mt, mb, "m")?;
    let dv = Src::from_bytes(dt, db, "decoder")?;
    let ov = Dst::from_bytes(ot, ob_mut, "out")?;
    py.detach(|| {
        kernel::dense_branch(
            Operand { shape: &xs, data: xv },
            Operand { shape: &es, data: ev },
            Operand { shape: &ms, data: mv },
            Operand { shape: &ds, data: dv },
            ov,
            &os,
            &params,
        )
    })?;
    Ok(())
}

/// The kernel's vector backend on this CPU: "avx2" or "portable".
#[pyfunction]
pub fn kernel_isa() -> &'static str {
    kernel::isa()
}
