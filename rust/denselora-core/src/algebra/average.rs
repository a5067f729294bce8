//! Averaging adapters: a weighted mean of every tensor (`linear`, for runs that share their initial
//! adapter, including an exponential moving average of checkpoints along one run), or the same
//! mean after aligning every run's latent coordinates to the first run's (`aligned`).
//!
//! Alignment, per group, of run k to the reference run (the first input; `align`, then
//! `refactor`):
//! 1. Encoder side: a Hungarian assignment on the cosine similarity of encoder rows finds the
//!    permutation (for an odd, i.e. `identity`, encoder activation a signed one, on |cosine|).
//! 2. Decoder side, two methods:
//!    - `product` (default): `D M_l` (or `D M_l E` with a linear encoder) does not depend on the
//!      decoder basis at all, so the products are averaged and refactored at the adapter's rank by a
//!      joint SVD of the small stacked core (QR of `[D_1 | ... | D_K]`, never out x in). The new
//!      basis is expressed in the reference's coordinates where that is well conditioned.
//!    - `procrustes`: an orthogonal map fitted by orthogonal Procrustes on `D`, then a plain mean.
//!
//! The report gives, per group and per run, how far the run is from the reference before and after
//! alignment (relative Frobenius distance of the encoder rows, and of the products that define the
//! function), and for `product` the relative error of the rank-r refactorization.

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::align::{encoder_residuals, match_rows, permute, product_residuals, stored_encoder_residuals};
use super::linalg::{cols, left_singular, split_cols, sq, tucker2};
use super::refactor::{gauge, latent_rms, procrustes_mean, weighted_sum, Cores};
use super::{check_finite, decoder_side, group_factors, put_group, AdapterRef, GroupFactors, OutTensor, Output};
use crate::activation::Activation;
use crate::adapter::{config_activations, config_groups, encoder_key, Adapter, GroupLayout};
use crate::dtype;
use crate::error::{ArgumentKind, Error, Result};
use crate::tensor::TensorRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `linear` when every input records the same initial-adapter fingerprint, else `aligned`.
    Auto,
    Linear,
    Aligned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderAlignment {
    Product,
    Procrustes,
}

impl DecoderAlignment {
    fn name(self) -> &'static str {
        match self {
            DecoderAlignment::Product => "product",
            DecoderAlignment::Procrustes => "procrustes",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AverageOptions {
    pub mode: Mode,
    /// One non-negative weight per input (normalised to sum 1); uniform when absent.
    pub weights: Option<Vec<f64>>,
    /// Exponential moving average of inputs given oldest first: `avg <- ema * avg + (1 - ema) * x`.
    pub ema: Option<f64>,
    pub decoder: DecoderAlignment,
}

impl Default for AverageOptions {
    fn default() -> Self {
        AverageOptions { mode: Mode::Auto, weights: None, ema: None, decoder: DecoderAlignment::Product }
    }
}

/// How well the runs of one group lined up with the reference (the first input, always 0).
#[derive(Debug, Clone, Serialize)]
pub struct GroupAlignment {
    pub group: String,
    pub layers: usize,
    pub encoder_activation: Activation,
    /// Relative distance of each run's encoder rows to the reference's, as stored.
    pub encoder_residual_before: Vec<f64>,
    /// The same after the (signed) permutation found by the assignment (aligned mode only).
    pub encoder_residual_after: Option<Vec<f64>>,
    /// Relative distance of the products that fix the function (`D M_l`, or `D M_l E` with a linear
    /// encoder) stacked over layers, as stored.
    pub product_residual_before: Vec<f64>,
    /// The same after the encoder permutation (aligned mode only).
    pub product_residual_after: Option<Vec<f64>>,
    /// Relative error of refactoring the averaged products at the adapter's rank (product method).
    pub refactor_error: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AverageReport {
    pub mode: &'static str,
    /// Why `auto` chose the mode (or "requested").
    pub reason: String,
    pub decoder_alignment: Option<&'static str>,
    pub inputs: Vec<String>,
    pub weights: Vec<f64>,
    pub groups: Vec<GroupAlignment>,
}

fn resolve_weights(n: usize, options: &AverageOptions) -> Result<Vec<f64>> {
    match (&options.weights, options.ema) {
        (Some(_), Some(_)) => Err(Error::argument("ema", ArgumentKind::Value, "give weights or ema, not both")),
        (Some(w), None) => {
            if w.len() != n {
                return Err(Error::argument(
                    "weights",
                    ArgumentKind::Value,
                    format!("{} weights for {n} adapters", w.len()),
                ));
            }
            if let Some(bad) = w.iter().find(|v| !v.is_finite() || **v < 0.0) {
                return Err(Error::argument(
                    "weights",
                    ArgumentKind::Value,
                    format!("weight {bad} is not a finite non-negative number"),
                ));
            }
            let total: f64 = w.iter().sum();
            if total <= 0.0 {
                return Err(Error::argument("weights", ArgumentKind::Value, "weights sum to zero"));
            }
            Ok(w.iter().map(|v| v / total).collect())
        }
        (None, Some(beta)) => {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::argument("ema", ArgumentKind::Value, format!("decay {beta} is not in [0, 1)")));
            }
            // avg_1 = x_1; avg_k = beta avg_(k-1) + (1 - beta) x_k, unrolled into weights.
            Ok((0..n)
                .map(|k| if k == 0 { beta.powi(n as i32 - 1) } else { (1.0 - beta) * beta.powi((n - 1 - k) as i32) })
                .collect())
        }
        (None, None) => Ok(vec![1.0 / n as f64; n]),
    }
}

fn string_key<'a>(adapter: &AdapterRef<'a>, key: &str) -> Option<&'a str> {
    adapter.config.get(key).and_then(Value::as_str)
}

/// Everything that must agree before tensors are combined; returns the reference's layout.
pub fn check_compatible(inputs: &[(String, AdapterRef<'_>)]) -> Result<Vec<GroupLayout>> {
    let (ref_name, reference) =
        inputs.first().ok_or_else(|| Error::argument("inputs", ArgumentKind::Value, "no adapter given"))?;
    let ref_layout = reference.layout(ref_name)?;
    let ref_groups = config_groups(reference.config, ref_name)?;
    let ref_acts = config_activations(reference.config, ref_name)?;
    for (name, adapter) in inputs {
        let layout = adapter.layout(name)?;
        if let (Some(a), Some(b)) =
            (string_key(reference, "base_model_name_or_path"), string_key(adapter, "base_model_name_or_path"))
        {
            if a != b {
                return Err(Error::incompatible(
                    name.as_str(),
                    format!("trained on base model {b:?}, but {ref_name} on {a:?}"),
                ));
            }
        }
        let groups = config_groups(adapter.config, name)?;
        for module in ref_groups.keys().chain(groups.keys()) {
            let (a, b) = (ref_groups.get(module), groups.get(module));
            if a != b {
                let say = |g: Option<&String>| g.map_or("not adapted".to_string(), |g| format!("in group {g:?}"));
                return Err(Error::incompatible(
                    format!("{name}: module {module}"),
                    format!("{} here, but {} in {ref_name}", say(b), say(a)),
                ));
            }
        }
        for (a, b) in ref_layout.iter().zip(&layout) {
            let dims = |g: &GroupLayout| (g.in_features, g.out_features, g.encoder_rank, g.decoder_rank);
            if dims(a) != dims(b) {
                let (i, o, re, rd) = dims(b);
                let (i0, o0, re0, rd0) = dims(a);
                return Err(Error::incompatible(
                    format!("{name}: group {:?} (module {})", b.name, b.modules[0]),
                    format!(
                        "in {i}, out {o}, encoder rank {re}, decoder rank {rd}; {ref_name} has in {i0}, out {o0}, \
                         encoder rank {re0}, decoder rank {rd0}"
                    ),
                ));
            }
        }
        let acts = config_activations(adapter.config, name)?;
        if acts != ref_acts {
            return Err(Error::incompatible(
                name.as_str(),
                format!("activations (encoder, decoder) {acts:?} differ from {ref_name}'s {ref_acts:?}"),
            ));
        }
        for key in ["r", "alpha"] {
            let (a, b) =
                (reference.config.get(key).and_then(Value::as_f64), adapter.config.get(key).and_then(Value::as_f64));
            if a != b {
                return Err(Error::incompatible(
                    name.as_str(),
                    format!("{key} = {b:?} differs from {ref_name}'s {a:?} (the branch scale alpha/r must agree)"),
                ));
            }
        }
    }
    // NaN or infinity: every input in parallel, the first offending one (in input order) reported.
    let finite: Vec<Result<()>> = inputs.par_iter().map(|(name, adapter)| check_finite(adapter, name)).collect();
    finite.into_iter().collect::<Result<()>>()?;
    Ok(ref_layout)
}

fn auto_mode(inputs: &[(String, AdapterRef<'_>)]) -> (Mode, String) {
    let prints: Vec<Option<&str>> = inputs.iter().map(|(_, a)| string_key(a, "init_fingerprint")).collect();
    match prints[0] {
        Some(first) if prints.iter().all(|p| *p == Some(first)) => {
            (Mode::Linear, "every input starts from the same initial adapter (equal init_fingerprint)".into())
        }
        _ if prints.iter().any(Option::is_none) => {
            (Mode::Aligned, "an input records no init_fingerprint, so a shared start is not known".into())
        }
        _ => (Mode::Aligned, "the inputs start from different initial adapters (init_fingerprint differs)".into()),
    }
}

/// Weighted mean of every tensor, rounded to the reference's dtype; one task per tensor.
fn linear_mean(inputs: &[(String, AdapterRef<'_>)], weights: &[f64]) -> Output {
    let reference = &inputs[0].1;
    let tensors = reference
        .tensors
        .par_iter()
        .map(|(key, tensor)| {
            let mut acc = vec![0.0f64; tensor.numel()];
            for ((_, adapter), &w) in inputs.iter().zip(weights) {
                let t = &adapter.tensors[key];
                dtype::accumulate_f64(t.dtype, t.data, w, &mut acc);
            }
            (key.clone(), OutTensor::from_f64(tensor.dtype, tensor.shape.to_vec(), acc.into_iter()))
        })
        .collect();
    Output { config: reference.config.clone(), tensors }
}

struct GroupResult {
    /// None in linear mode, where every tensor is averaged as it is.
    factors: Option<GroupFactors>,
    report: GroupAlignment,
}

/// One group of every run: its factors in f64 (with an empty encoder when only the decoder side is
/// read, see `decoder_side`) and its encoder residuals as stored.
fn average_group(
    layout: &GroupLayout,
    runs: &[GroupFactors],
    encoder_residual_before: Vec<f64>,
    weights: &[f64],
    encoder_activation: Activation,
    aligned: bool,
    method: DecoderAlignment,
) -> GroupResult {
    let linear_encoder = encoder_activation.is_linear();
    let reference = &runs[0];
    let prod_res = |set: &[GroupFactors]| product_residuals(set, linear_encoder);
    let mut report = GroupAlignment {
        group: layout.name.clone(),
        layers: layout.modules.len(),
        encoder_activation,
        encoder_residual_before,
        encoder_residual_after: None,
        // With a linear encoder D M E does not change under the permutation: the runs as stored.
        product_residual_before: prod_res(runs),
        product_residual_after: None,
        refactor_error: None,
    };
    // Linear mode needs no matching: its report compares the runs as stored.
    if !aligned {
        return GroupResult { factors: None, report };
    }
    let matched: Vec<GroupFactors> = runs
        .iter()
        .map(|run| {
            let (perm, sign) = match_rows(&reference.encoder, &run.encoder, encoder_activation.is_odd());
            permute(run, &perm, &sign)
        })
        .collect();
    report.encoder_residual_after = Some(encoder_residuals(&matched, reference));
    report.product_residual_after = Some(prod_res(&matched));

    let (rank_d, rank_e) = (reference.decoder.ncols(), reference.encoder.nrows());
    // Products in the small coordinates of one QR basis for all runs (with a linear encoder the
    // products D M E do not change under the encoder permutation).
    let cores = Cores::new(&matched, linear_encoder);
    let fits = cores.qd.ncols() >= rank_d && cores.qe_re.as_ref().is_none_or(|(qe, _)| qe.ncols() >= rank_e);

    if method == DecoderAlignment::Procrustes || !fits {
        return GroupResult { factors: Some(procrustes_mean(&matched, reference, weights)), report };
    }

    let layers = layout.modules.len();
    // [C_1 | ... | C_L]: the averaged cores, layers side by side.
    let avg = cores.averaged(&matched, weights);
    let total = sq(&avg);
    if total == 0.0 {
        // Every product is zero (e.g. untrained decoders): nothing to refactor.
        report.refactor_error = Some(0.0);
        return GroupResult { factors: Some(procrustes_mean(&matched, reference, weights)), report };
    }
    let ref_d = cols(&cores.rd, 0, rank_d);
    let factors = match &cores.qe_re {
        None => {
            let (u, _) = left_singular(&avg, rank_d);
            let (t, t_inv) = gauge(Some(u.transpose() * &ref_d), rank_d, latent_rms(&reference.decoder, rank_d));
            let projected = u.transpose() * &avg;
            report.refactor_error = Some(((total - sq(&projected)).max(0.0) / total).sqrt());
            GroupFactors {
                encoder: weighted_sum(matched.iter().map(|r| &r.encoder), weights),
                decoder: cores.qd.apply(&(&u * &t)),
                ms: split_cols(&(&t_inv * projected), layers),
            }
        }
        Some((qe, re)) => {
            let avg = split_cols(&avg, layers);
            let tk = tucker2(&avg, rank_d, rank_e);
            let (u, v) = (&tk.u, &tk.v);
            let (td, td_inv) = gauge(Some(u.transpose() * &ref_d), rank_d, latent_rms(&reference.decoder, rank_d));
            let (te, te_inv) =
                gauge(Some(cols(re, 0, rank_e).transpose() * v), rank_e, latent_rms(&reference.encoder, rank_e));
            let kept: f64 = avg.iter().map(|c| sq(&(u.transpose() * c * v))).sum();
            report.refactor_error = Some(((total - kept).max(0.0) / total).sqrt());
            GroupFactors {
                encoder: &te * v.transpose() * qe.transpose(),
                decoder: cores.qd.apply(&(u * &td)),
                ms: avg.iter().map(|c| &td_inv * u.transpose() * c * v * &te_inv).collect(),
            }
        }
    };
    GroupResult { factors: Some(factors), report }
}

/// Average `inputs` (name, adapter), the first being the reference that others are aligned to.
/// The result keeps the reference's config and dtypes.
pub fn average(inputs: &[(String, &Adapter)], options: &AverageOptions) -> Result<(Adapter, AverageReport)> {
    let views: Vec<(String, AdapterRef<'_>)> = inputs.iter().map(|(n, a)| (n.clone(), AdapterRef::of(a))).collect();
    let (out, report) = average_views(&views, options)?;
    Ok((out.into_adapter(), report))
}

/// `average` of borrowed adapters, with typed result tensors.
pub fn average_views(inputs: &[(String, AdapterRef<'_>)], options: &AverageOptions) -> Result<(Output, AverageReport)> {
    let layouts = check_compatible(inputs)?;
    let weights = resolve_weights(inputs.len(), options)?;
    let (mode, reason) = match options.mode {
        Mode::Auto => auto_mode(inputs),
        m => (m, "requested".to_string()),
    };
    let aligned = mode == Mode::Aligned;
    let (ref_name, reference) = &inputs[0];
    let encoder_activation = config_activations(reference.config, ref_name)?.0;
    // Aligned mode rewrites every tensor (each belongs to a group): only the config is copied.
    let mut out = if aligned {
        Output { config: reference.config.clone(), tensors: Default::default() }
    } else {
        linear_mean(inputs, &weights)
    };
    // The report of linear averaging with a non-linear encoder reads only the decoder side.
    let encoders_needed = aligned || encoder_activation.is_linear();
    // Groups are independent: one task each.
    let results: Vec<GroupResult> = layouts
        .par_iter()
        .map(|layout| {
            let factors =
                |a: &AdapterRef<'_>| if encoders_needed { group_factors(a, layout) } else { decoder_side(a, layout) };
            let runs: Vec<GroupFactors> = inputs.iter().map(|(_, a)| factors(a)).collect();
            let key = encoder_key(&layout.name);
            let encoders: Vec<TensorRef<'_>> = inputs.iter().map(|(_, a)| a.tensors[&key]).collect();
            let encoder_residuals = stored_encoder_residuals(&encoders);
            average_group(layout, &runs, encoder_residuals, &weights, encoder_activation, aligned, options.decoder)
        })
        .collect();
    let mut groups = Vec::with_capacity(layouts.len());
    for (layout, result) in layouts.iter().zip(results) {
        if let Some(factors) = &result.factors {
            put_group(&mut out, reference, layout, factors);
        }
        groups.push(result.report);
    }
    let shared_init = inputs.iter().all(|(_, a)| {
        string_key(a, "init_fingerprint").is_some()
            && string_key(a, "init_fingerprint") == string_key(reference, "init_fingerprint")
    });
    if aligned || !shared_init {
        // The result descends from several initial adapters (or from ones not known to be one).
        out.config.insert("init_fingerprint".into(), Value::Null);
    }
    let report = AverageReport {
        mode: if aligned { "aligned" } else { "linear" },
        reason,
        decoder_alignment: aligned.then(|| options.decoder.name()),
        inputs: inputs.iter().map(|(n, _)| n.clone()).collect(),
        weights,
        groups,
    };
    Ok((out, report))
}

#[cfg(test)]
mod tests;
