//! Bindings of the adapter algebra: averaging and truncation. Adapters travel as
//! `(name, config_json, {tensor: array})`; results come back the same way with a JSON report.

use std::collections::BTreeMap;
use std::path::Path;

use denselora_core::algebra::{self, AverageOptions, DecoderAlignment, Mode, RankTarget};
use denselora_core::{adapter, Adapter, ArgumentKind, Error};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::arrays::tensor_to_py;
use crate::arrays::BorrowedTensors;
use crate::errors::BindingResult;

fn to_adapter(name: &str, config_json: &str, tensors: &Bound<'_, PyDict>) -> BindingResult<Adapter> {
    let config = adapter::parse_config_object(config_json, Path::new(name))?;
    let borrowed = BorrowedTensors::from_dict(tensors)?;
    let tensors: BTreeMap<_, _> = borrowed.views().into_iter().map(|(k, t)| (k, t.to_owned())).collect();
    Ok(Adapter { config, tensors })
}

fn result_to_py<'py>(py: Python<'py>, out: Adapter, report: String) -> BindingResult<Bound<'py, PyTuple>> {
    let config = adapter::config_to_string(&out.config);
    let dict = PyDict::new(py);
    for (name, tensor) in out.tensors {
        dict.set_item(name, tensor_to_py(py, tensor)?)?;
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
    let adapters: Vec<Adapter> =
        inputs.iter().map(|(name, config, tensors)| to_adapter(name, config, tensors)).collect::<BindingResult<_>>()?;
    let named: Vec<(String, &Adapter)> = inputs.iter().map(|(n, _, _)| n.clone()).zip(adapters.iter()).collect();
    let (out, report) = py.detach(|| algebra::average(&named, &options))?;
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
    let input = to_adapter(name, config_json, tensors)?;
    let (out, report) = py.detach(|| algebra::truncate(&input, name, target))?;
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
