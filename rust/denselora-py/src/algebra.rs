//! Bindings of the adapter algebra: averaging and truncation. Adapters travel as
//! `(name, config_json, {tensor: array})`; results come back the same way with a JSON report.
//! The core reads the arrays in place (the input dicts, held by the caller, keep them alive) and
//! its result buffers become the returned arrays without another copy.

use std::path::Path;

use denselora_core::adapter::{self, ConfigMap};
use denselora_core::algebra::{
    self, AdapterRef, AverageOptions, DecoderAlignment, Mode, OutTensor, Output, RankTarget, Values,
};
use denselora_core::{ArgumentKind, Error};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::PyArray;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::arrays::BorrowedTensors;
use crate::errors::BindingResult;

fn parse_config(name: &str, config_json: &str) -> BindingResult<ConfigMap> {
    Ok(adapter::parse_config_object(config_json, Path::new(name))?)
}

fn array<'py, T: numpy::Element>(py: Python<'py>, shape: Vec<usize>, values: Vec<T>) -> Bound<'py, PyAny> {
    let array = ArrayD::from_shape_vec(IxDyn(&shape), values).expect("a result holds as many values as its shape");
    PyArray::from_owned_array(py, array).into_any()
}

/// A result tensor as `(dtype name, numpy array)`, the array owning the result's buffer; bfloat16
/// comes back as uint16 bits.
fn out_tensor_to_py<'py>(py: Python<'py>, tensor: OutTensor) -> PyResult<Bound<'py, PyTuple>> {
    let dtype = tensor.dtype();
    let array = match tensor.values {
        Values::F32(v) => array(py, tensor.shape, v),
        Values::F16(v) => array(py, tensor.shape, v),
        Values::BF16(v) => array(py, tensor.shape, v),
    };
    PyTuple::new(py, [dtype.name().into_pyobject(py)?.into_any(), array])
}

fn result_to_py<'py>(py: Python<'py>, out: Output, report: String) -> BindingResult<Bound<'py, PyTuple>> {
    let config = adapter::config_to_string(&out.config);
    let dict = PyDict::new(py);
    for (name, tensor) in out.tensors {
        dict.set_item(name, out_tensor_to_py(py, tensor)?)?;
    }
    let items = [
        config.into_pyobject(py).map_err(PyErr::from)?.into_any(),
        dict.into_any(),
        report.into_pyobject(py).map_err(PyErr::from)?.into_any(),
    ];
    Ok(PyTuple::new(py, items)?)
}

fn parse_mode(mode: &str) -> Result<Mode, Error> {
    match mode {
        "auto" => Ok(Mode::Auto),
        "linear" => Ok(Mode::Linear),
        "aligned" => Ok(Mode::Aligned),
        other => {
            Err(Error::argument("mode", ArgumentKind::Value, format!("{other:?} is not one of auto, linear, aligned")))
        }
    }
}

fn parse_decoder(decoder: &str) -> Result<DecoderAlignment, Error> {
    match decoder {
        "product" => Ok(DecoderAlignment::Product),
        "procrustes" => Ok(DecoderAlignment::Procrustes),
        other => Err(Error::argument(
            "decoder_alignment",
            ArgumentKind::Value,
            format!("{other:?} is not one of product, procrustes"),
        )),
    }
}

/// Average adapters given as `[(name, config_json, {tensor: array})]` (the first is the reference):
/// `(config_json, {tensor: (dtype, array)}, report_json)`.
#[pyfunction]
#[pyo3(signature = (inputs, mode="auto", weights=None, ema=None, decoder_alignment="product"))]
pub fn average_adapters<'py>(
    py: Python<'py>,
    inputs: Vec<(String, String, Bound<'py, PyDict>)>,
    mode: &str,
    weights: Option<Vec<f64>>,
    ema: Option<f64>,
    decoder_alignment: &str,
) -> BindingResult<Bound<'py, PyTuple>> {
    let options = AverageOptions { mode: parse_mode(mode)?, weights, ema, decoder: parse_decoder(decoder_alignment)? };
    let configs: Vec<ConfigMap> =
        inputs.iter().map(|(name, config, _)| parse_config(name, config)).collect::<BindingResult<_>>()?;
    let borrowed: Vec<BorrowedTensors<'py>> =
        inputs.iter().map(|(_, _, tensors)| BorrowedTensors::from_dict(tensors)).collect::<BindingResult<_>>()?;
    let views: Vec<(String, AdapterRef<'_>)> = inputs
        .iter()
        .zip(&configs)
        .zip(&borrowed)
        .map(|(((name, _, _), config), tensors)| (name.clone(), AdapterRef { config, tensors: tensors.views() }))
        .collect();
    let (out, report) = py.detach(|| algebra::average_views(&views, &options))?;
    let report = serde_json::to_string(&report).expect("report serializes");
    result_to_py(py, out, report)
}

/// Truncate one adapter to `rank` or to an `energy` fraction:
/// `(config_json, {tensor: (dtype, array)}, report_json)`.
#[pyfunction]
#[pyo3(signature = (name, config_json, tensors, rank=None, energy=None))]
pub fn truncate_adapter<'py>(
    py: Python<'py>,
    name: &str,
    config_json: &str,
    tensors: &Bound<'py, PyDict>,
    rank: Option<usize>,
    energy: Option<f64>,
) -> BindingResult<Bound<'py, PyTuple>> {
    let target = match (rank, energy) {
        (Some(r), None) => RankTarget::Rank(r),
        (None, Some(e)) => RankTarget::Energy(e),
        _ => return Err(Error::argument("rank", ArgumentKind::Value, "give exactly one of rank and energy").into()),
    };
    let config = parse_config(name, config_json)?;
    let borrowed = BorrowedTensors::from_dict(tensors)?;
    let input = AdapterRef { config: &config, tensors: borrowed.views() };
    let (out, report) = py.detach(|| algebra::truncate_view(&input, name, target))?;
    let report = serde_json::to_string(&report).expect("report serializes");
    result_to_py(py, out, report)
}

/// Minimum-cost assignment of a square cost matrix (rows of lists): `assignment[row] = column`.
/// The same routine matches encoder rows when runs are aligned.
#[pyfunction]
pub fn linear_assignment(cost: Vec<Vec<f64>>) -> BindingResult<Vec<usize>> {
    let n = cost.len();
    if cost.iter().any(|row| row.len() != n) {
        return Err(Error::argument("cost", ArgumentKind::Shape, "cost matrix must be square").into());
    }
    let flat: Vec<f64> = cost.into_iter().flatten().collect();
    if flat.iter().any(|v| !v.is_finite()) {
        return Err(Error::non_finite("cost", "cost matrix holds NaN or infinity").into());
    }
    Ok(algebra::assignment::assign(&flat, n))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(average_adapters, m)?)?;
    m.add_function(wrap_pyfunction!(truncate_adapter, m)?)?;
    m.add_function(wrap_pyfunction!(linear_assignment, m)?)?;
    Ok(())
}
