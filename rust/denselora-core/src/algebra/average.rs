//! Averaging adapters: a weighted mean of every tensor (`linear`, for runs that share their initial
//! adapter, including an exponential moving average of checkpoints along one run), or the same
//! mean after aligning every run's latent coordinates to the first run's (`aligned`).
//!
//! Alignment, per group, of run k to the reference run (the first input):
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

use super::hungarian;
use super::linalg::{
    cols, gauge_inverse, hstack, left_singular, procrustes, relative_distance, sq, thin_qr, tucker2, vstack, Mat,
};
use super::{check_finite, group_factors, put_group, GroupFactors};
use crate::activation::Activation;
use crate::adapter::{config_activations, config_groups, Adapter, GroupLayout};
use crate::error::{ArgumentKind, Error, Result};
use crate::tensor::Tensor;

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

fn string_key<'a>(adapter: &'a Adapter, key: &str) -> Option<&'a str> {
    adapter.config.get(key).and_then(Value::as_str)
}

/// Everything that must agree before tensors are combined; returns the reference's layout.
pub fn check_compatible(inputs: &[(String, &Adapter)]) -> Result<Vec<GroupLayout>> {
    let (ref_name, reference) =
        inputs.first().ok_or_else(|| Error::argument("inputs", ArgumentKind::Value, "no adapter given"))?;
    let ref_layout = reference.layout(ref_name)?;
    let ref_groups = config_groups(&reference.config, ref_name)?;
    let ref_acts = config_activations(&reference.config, ref_name)?;
    for (name, adapter) in inputs {
        let layout = adapter.layout(name)?;
        check_finite(adapter, name)?;
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
        let groups = config_groups(&adapter.config, name)?;
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
        let acts = config_activations(&adapter.config, name)?;
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
    Ok(ref_layout)
}

fn auto_mode(inputs: &[(String, &Adapter)]) -> (Mode, String) {
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

/// Weighted mean of every tensor, rounded to the reference's dtype.
fn linear_mean(inputs: &[(String, &Adapter)], weights: &[f64]) -> Adapter {
    let reference = inputs[0].1;
    let mut out = reference.clone();
    for (key, tensor) in &reference.tensors {
        let mut acc = vec![0.0f64; tensor.view().numel()];
        for ((_, adapter), w) in inputs.iter().zip(weights) {
            for (a, v) in acc.iter_mut().zip(adapter.tensors[key].to_f32()) {
                *a += w * f64::from(v);
            }
        }
        let values: Vec<f32> = acc.into_iter().map(|v| v as f32).collect();
        out.tensors.insert(key.clone(), Tensor::from_f32(tensor.dtype, tensor.shape.clone(), &values));
    }
    out
}

/// The (signed) permutation matching the rows of `other` to those of `reference`:
/// row i of the aligned encoder is `sign[i] * other[perm[i]]`.
pub fn match_rows(reference: &Mat, other: &Mat, odd: bool) -> (Vec<usize>, Vec<f64>) {
    let n = reference.nrows();
    let norms = |m: &Mat| (0..m.nrows()).map(|i| m.row(i).norm()).collect::<Vec<_>>();
    let (na, nb) = (norms(reference), norms(other));
    let sim = reference * other.transpose();
    let cosine = |i: usize, j: usize| if na[i] > 0.0 && nb[j] > 0.0 { sim[(i, j)] / (na[i] * nb[j]) } else { 0.0 };
    let cost: Vec<f64> = (0..n * n)
        .map(|k| {
            let c = cosine(k / n, k % n);
            -(if odd { c.abs() } else { c })
        })
        .collect();
    let perm = hungarian::assign(&cost, n);
    let sign = perm.iter().enumerate().map(|(i, &j)| if odd && cosine(i, j) < 0.0 { -1.0 } else { 1.0 }).collect();
    (perm, sign)
}

fn permute(run: &GroupFactors, perm: &[usize], sign: &[f64]) -> GroupFactors {
    let mut encoder = run.encoder.clone();
    for (i, (&j, &s)) in perm.iter().zip(sign).enumerate() {
        encoder.set_row(i, &(run.encoder.row(j) * s));
    }
    let ms = run
        .ms
        .iter()
        .map(|m| {
            let mut out = m.clone();
            for (i, (&j, &s)) in perm.iter().zip(sign).enumerate() {
                out.set_column(i, &(m.column(j) * s));
            }
            out
        })
        .collect();
    GroupFactors { encoder, decoder: run.decoder.clone(), ms }
}

fn weighted_sum<'a>(items: impl Iterator<Item = &'a Mat>, weights: &[f64]) -> Mat {
    let mut acc: Option<Mat> = None;
    for (m, w) in items.zip(weights) {
        acc = Some(match acc {
            None => m * *w,
            Some(a) => a + m * *w,
        });
    }
    acc.expect("at least one input")
}

fn plain_mean(runs: &[GroupFactors], weights: &[f64]) -> GroupFactors {
    GroupFactors {
        encoder: weighted_sum(runs.iter().map(|r| &r.encoder), weights),
        decoder: weighted_sum(runs.iter().map(|r| &r.decoder), weights),
        ms: (0..runs[0].ms.len()).map(|l| weighted_sum(runs.iter().map(|r| &r.ms[l]), weights)).collect(),
    }
}

/// A square gauge `t`, or `scale * I` when `t` is (nearly) singular; with its inverse.
fn gauge(t: Mat, reference: &Mat) -> (Mat, Mat) {
    if let Some(inv) = gauge_inverse(&t) {
        return (t, inv);
    }
    let n = t.nrows();
    let scale = (sq(reference) / n as f64).sqrt();
    let scale = if scale > 0.0 { scale } else { 1.0 };
    (Mat::identity(n, n) * scale, Mat::identity(n, n) / scale)
}

/// Products that fix the function, in the small coordinates of the QR factors: `R_d,k M_l`
/// (out-side basis `Q_d`), times `R_e,k^T` with a linear encoder.
struct Cores {
    qd: Mat,
    rd: Mat,
    /// `(Q_e, R_e)` of `[E_1; ...; E_K]^T` for a linear encoder.
    qe_re: Option<(Mat, Mat)>,
}

impl Cores {
    fn new(runs: &[GroupFactors], linear_encoder: bool) -> Self {
        let (qd, rd) = thin_qr(&hstack(&runs.iter().map(|r| r.decoder.clone()).collect::<Vec<_>>()));
        let qe_re = linear_encoder
            .then(|| thin_qr(&vstack(&runs.iter().map(|r| r.encoder.clone()).collect::<Vec<_>>()).transpose()));
        Cores { qd, rd, qe_re }
    }

    fn core(&self, k: usize, rank_d: usize, rank_e: usize, m: &Mat) -> Mat {
        let left = cols(&self.rd, k * rank_d, rank_d) * m;
        match &self.qe_re {
            Some((_, re)) => left * cols(re, k * rank_e, rank_e).transpose(),
            None => left,
        }
    }

    fn run_cores(&self, k: usize, run: &GroupFactors) -> Vec<Mat> {
        let (rank_d, rank_e) = (run.decoder.ncols(), run.encoder.nrows());
        run.ms.iter().map(|m| self.core(k, rank_d, rank_e, m)).collect()
    }
}

/// Relative distance of each run's products to the reference's (`D M_l`, or `D M_l E` with a
/// linear encoder), from r x r Gram matrices: `||X_k - X_0||^2 = <X_k, X_k> + <X_0, X_0> - 2 <X_k, X_0>`
/// with `<D_a M_a, D_b M_b> = tr(M_a^T (D_a^T D_b) M_b)` (times `E_b E_a^T` for a linear encoder).
/// Exact to about 1e-8 relative, which is what a report needs; out x in is never formed.
fn product_residuals(set: &[GroupFactors], linear_encoder: bool) -> Vec<f64> {
    let reference = &set[0];
    let inner = |a: &GroupFactors, b: &GroupFactors| -> f64 {
        let gd = a.decoder.transpose() * &b.decoder;
        let ge = linear_encoder.then(|| &b.encoder * a.encoder.transpose());
        a.ms.iter()
            .zip(&b.ms)
            .map(|(ma, mb)| {
                let left = ma.transpose() * &gd * mb;
                match &ge {
                    Some(ge) => (left * ge).trace(),
                    None => left.trace(),
                }
            })
            .sum()
    };
    let own = inner(reference, reference);
    set.iter()
        .enumerate()
        .map(|(k, run)| {
            if k == 0 {
                return 0.0;
            }
            let dist = (inner(run, run) + own - 2.0 * inner(run, reference)).max(0.0);
            if dist == 0.0 {
                0.0
            } else if own == 0.0 {
                dist.sqrt()
            } else {
                (dist / own).sqrt()
            }
        })
        .collect()
}

struct GroupResult {
    /// None in linear mode, where every tensor is averaged as it is.
    factors: Option<GroupFactors>,
    report: GroupAlignment,
}

fn average_group(
    layout: &GroupLayout,
    runs: &[GroupFactors],
    weights: &[f64],
    encoder_activation: Activation,
    aligned: bool,
    method: DecoderAlignment,
) -> GroupResult {
    let linear_encoder = encoder_activation.is_linear();
    let reference = &runs[0];
    // Linear mode needs no matching: its report compares the runs as stored.
    let matched: Vec<GroupFactors> = if aligned {
        runs.iter()
            .map(|run| {
                let (perm, sign) = match_rows(&reference.encoder, &run.encoder, encoder_activation.is_odd());
                permute(run, &perm, &sign)
            })
            .collect()
    } else {
        runs.iter().map(GroupFactors::clone).collect()
    };
    let enc_res = |set: &[GroupFactors]| -> Vec<f64> {
        set.iter()
            .map(|r| relative_distance(std::slice::from_ref(&r.encoder), std::slice::from_ref(&reference.encoder)))
            .collect()
    };
    let prod_res = |set: &[GroupFactors]| product_residuals(set, linear_encoder);
    let before_set = if linear_encoder { &matched } else { runs };
    let mut report = GroupAlignment {
        group: layout.name.clone(),
        layers: layout.modules.len(),
        encoder_activation,
        encoder_residual_before: enc_res(runs),
        encoder_residual_after: None,
        product_residual_before: prod_res(before_set),
        product_residual_after: None,
        refactor_error: None,
    };
    if !aligned {
        return GroupResult { factors: None, report };
    }
    report.encoder_residual_after = Some(enc_res(&matched));
    report.product_residual_after = Some(prod_res(&matched));

    let (rank_d, rank_e) = (reference.decoder.ncols(), reference.encoder.nrows());
    // Products in the small coordinates of one QR basis for all runs (with a linear encoder the
    // products D M E do not change under the encoder permutation).
    let cores = Cores::new(&matched, linear_encoder);
    let fits = cores.qd.ncols() >= rank_d && cores.qe_re.as_ref().is_none_or(|(qe, _)| qe.ncols() >= rank_e);
    let procrustes_mean = |matched: &[GroupFactors]| {
        let rotated: Vec<GroupFactors> = matched
            .iter()
            .map(|r| {
                let q = procrustes(&r.decoder, &reference.decoder);
                GroupFactors {
                    encoder: r.encoder.clone(),
                    decoder: &r.decoder * &q,
                    ms: r.ms.iter().map(|m| q.transpose() * m).collect(),
                }
            })
            .collect();
        plain_mean(&rotated, weights)
    };
    if method == DecoderAlignment::Procrustes || !fits {
        return GroupResult { factors: Some(procrustes_mean(&matched)), report };
    }

    let layers = layout.modules.len();
    let per_run: Vec<Vec<Mat>> = matched.iter().enumerate().map(|(k, r)| cores.run_cores(k, r)).collect();
    let avg: Vec<Mat> = (0..layers).map(|l| weighted_sum(per_run.iter().map(|c| &c[l]), weights)).collect();
    let total: f64 = avg.iter().map(sq).sum();
    if total == 0.0 {
        // Every product is zero (e.g. untrained decoders): nothing to refactor.
        report.refactor_error = Some(0.0);
        return GroupResult { factors: Some(procrustes_mean(&matched)), report };
    }
    let ref_d = cols(&cores.rd, 0, rank_d);
    let factors = match &cores.qe_re {
        None => {
            let (u, _) = left_singular(&hstack(&avg), rank_d);
            let (t, t_inv) = gauge(u.transpose() * &ref_d, &reference.decoder);
            let kept: f64 = avg.iter().map(|c| sq(&(u.transpose() * c))).sum();
            report.refactor_error = Some(((total - kept).max(0.0) / total).sqrt());
            GroupFactors {
                encoder: weighted_sum(matched.iter().map(|r| &r.encoder), weights),
                decoder: &cores.qd * &u * &t,
                ms: avg.iter().map(|c| &t_inv * u.transpose() * c).collect(),
            }
        }
        Some((qe, re)) => {
            let tk = tucker2(&avg, rank_d, rank_e);
            let (u, v) = (&tk.u, &tk.v);
            let (td, td_inv) = gauge(u.transpose() * &ref_d, &reference.decoder);
            let (te, te_inv) = gauge(cols(re, 0, rank_e).transpose() * v, &reference.encoder);
            let kept: f64 = avg.iter().map(|c| sq(&(u.transpose() * c * v))).sum();
            report.refactor_error = Some(((total - kept).max(0.0) / total).sqrt());
            GroupFactors {
                encoder: &te * v.transpose() * qe.transpose(),
                decoder: &cores.qd * u * &td,
                ms: avg.iter().map(|c| &td_inv * u.transpose() * c * v * &te_inv).collect(),
            }
        }
    };
    GroupResult { factors: Some(factors), report }
}

/// Average `inputs` (name, adapter), the first being the reference that others are aligned to.
/// The result keeps the reference's config and dtypes.
pub fn average(inputs: &[(String, &Adapter)], options: &AverageOptions) -> Result<(Adapter, AverageReport)> {
    let layouts = check_compatible(inputs)?;
    let weights = resolve_weights(inputs.len(), options)?;
    let (mode, reason) = match options.mode {
        Mode::Auto => auto_mode(inputs),
        m => (m, "requested".to_string()),
    };
    let aligned = mode == Mode::Aligned;
    let (ref_name, reference) = &inputs[0];
    let encoder_activation = config_activations(&reference.config, ref_name)?.0;
    let mut out = if aligned { (*reference).clone() } else { linear_mean(inputs, &weights) };
    // Groups are independent: one task each.
    let results: Vec<GroupResult> = layouts
        .par_iter()
        .map(|layout| {
            let runs: Vec<GroupFactors> = inputs.iter().map(|(_, a)| group_factors(a, layout)).collect();
            average_group(layout, &runs, &weights, encoder_activation, aligned, options.decoder)
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
mod tests {
    use super::super::testutil::{factors, random_adapter, set_factors, Rng};
    use super::*;

    /// The branch's pre-activation products for a given input batch `x` (in x n):
    /// `D M_l act(E x)` with GELU replaced by a fixed non-odd elementwise function (softplus).
    fn outputs(adapter: &Adapter, x: &Mat, linear: bool) -> Vec<Mat> {
        let f = factors(adapter);
        let mut h = &f.encoder * x;
        if !linear {
            h.apply(|v| *v = (1.0 + v.exp()).ln());
        }
        f.ms.iter().map(|m| &f.decoder * m * &h).collect()
    }

    /// A copy with permuted (and, for `linear`, re-based on the encoder side), re-based latents.
    fn symmetric_copy(adapter: &Adapter, seed: u64, linear: bool) -> Adapter {
        let mut rng = Rng::new(seed);
        let f = factors(adapter);
        let r = f.encoder.nrows();
        let mut p = Mat::zeros(r, r);
        for i in 0..r {
            p[(i, (i * 3 + 1) % r)] = 1.0;
        }
        let a = if linear { rng.matrix(r, r) + Mat::identity(r, r) * 3.0 } else { p.clone() };
        let b = rng.matrix(r, r) + Mat::identity(r, r) * 3.0;
        let b_inv = b.clone().try_inverse().unwrap();
        let a_inv = a.clone().try_inverse().unwrap();
        let g = GroupFactors {
            encoder: &a * &f.encoder,
            decoder: &f.decoder * &b_inv,
            ms: f.ms.iter().map(|m| &b * m * &a_inv).collect(),
        };
        let mut out = adapter.clone();
        set_factors(&mut out, &g);
        out
    }

    fn max_rel(a: &[Mat], b: &[Mat]) -> f64 {
        relative_distance(a, b)
    }

    #[test]
    fn aligned_average_of_a_symmetric_copy_is_the_same_function() {
        for (act, linear) in [("gelu", false), ("identity", true), ("silu", false)] {
            let a = random_adapter(1, 5, 3, act);
            let b = symmetric_copy(&a, 9, linear);
            let x = Rng::new(4).matrix(6, 10);
            let inputs = [("a".to_string(), &a), ("b".to_string(), &b)];
            for method in [DecoderAlignment::Product, DecoderAlignment::Procrustes] {
                let opts = AverageOptions { mode: Mode::Aligned, decoder: method, ..Default::default() };
                let (avg, report) = average(&inputs, &opts).unwrap();
                let err = max_rel(&outputs(&avg, &x, linear), &outputs(&a, &x, linear));
                // Procrustes can only undo an orthogonal decoder map, and this one is not orthogonal.
                if method == DecoderAlignment::Product {
                    assert!(err < 1e-5, "{act} {method:?}: {err}");
                    assert!(report.groups[0].refactor_error.unwrap() < 1e-6);
                }
                if !linear {
                    assert!(report.groups[0].encoder_residual_after.as_ref().unwrap()[1] < 1e-6);
                }
            }
            let opts = AverageOptions { mode: Mode::Linear, ..Default::default() };
            let (avg, _) = average(&inputs, &opts).unwrap();
            let err = max_rel(&outputs(&avg, &x, linear), &outputs(&a, &x, linear));
            assert!(err > 0.1, "{act}: linear averaging of misaligned runs should not be exact ({err})");
        }
    }

    #[test]
    fn weights_and_ema_are_exact() {
        let adapters: Vec<Adapter> = (0..3).map(|s| random_adapter(s, 3, 2, "gelu")).collect();
        let inputs: Vec<(String, &Adapter)> = adapters.iter().enumerate().map(|(i, a)| (format!("a{i}"), a)).collect();
        let opts = AverageOptions { mode: Mode::Linear, weights: Some(vec![1.0, 2.0, 1.0]), ..Default::default() };
        let (avg, report) = average(&inputs, &opts).unwrap();
        assert_eq!(report.weights, vec![0.25, 0.5, 0.25]);
        let fs: Vec<GroupFactors> = adapters.iter().map(factors).collect();
        let want = (&fs[0].encoder * 0.25) + (&fs[1].encoder * 0.5) + (&fs[2].encoder * 0.25);
        assert!((factors(&avg).encoder - want).norm() < 1e-5);

        let opts = AverageOptions { mode: Mode::Linear, ema: Some(0.5), ..Default::default() };
        let (avg, _) = average(&inputs, &opts).unwrap();
        let mut ema = fs[0].decoder.clone();
        for f in &fs[1..] {
            ema = ema * 0.5 + &f.decoder * 0.5;
        }
        assert!((factors(&avg).decoder - ema).norm() < 1e-5);
    }

    #[test]
    fn auto_mode_follows_fingerprints() {
        let mut a = random_adapter(1, 3, 1, "gelu");
        let mut b = random_adapter(2, 3, 1, "gelu");
        a.config.insert("init_fingerprint".into(), "x".into());
        b.config.insert("init_fingerprint".into(), "x".into());
        let run = |a: &Adapter, b: &Adapter| {
            average(&[("a".into(), a), ("b".into(), b)], &AverageOptions::default()).unwrap().1.mode
        };
        assert_eq!(run(&a, &b), "linear");
        b.config.insert("init_fingerprint".into(), "y".into());
        assert_eq!(run(&a, &b), "aligned");
    }

    #[test]
    fn incompatible_inputs_name_the_module() {
        let a = random_adapter(1, 3, 2, "gelu");
        let b = random_adapter(2, 4, 2, "gelu");
        let err = average(&[("a".into(), &a), ("b".into(), &b)], &AverageOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Incompatible { .. }));
        assert!(err.to_string().contains("layers.0.q"), "{err}");
        let c = random_adapter(2, 3, 2, "identity");
        let err = average(&[("a".into(), &a), ("c".into(), &c)], &AverageOptions::default()).unwrap_err();
        assert!(err.to_string().contains("activations"), "{err}");
        let mut d = random_adapter(3, 3, 2, "gelu");
        let key = crate::adapter::m_key("layers.1.q");
        let mut values = d.tensors[&key].to_f32();
        values[2] = f32::NAN;
        d.tensors.insert(key.clone(), Tensor::from_f32(crate::DType::F32, vec![3, 3], &values));
        let err = average(&[("a".into(), &a), ("d".into(), &d)], &AverageOptions::default()).unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }));
        assert!(err.to_string().contains(&key) && err.to_string().starts_with("d:"), "{err}");
    }
}

#[cfg(test)]
mod residual_tests {
    use super::super::testutil::{factors, random_adapter};
    use super::*;

    #[test]
    fn gram_residuals_match_the_explicit_products() {
        for (act, linear) in [("gelu", false), ("identity", true)] {
            let set: Vec<GroupFactors> = (0..3).map(|s| factors(&random_adapter(s, 4, 2, act))).collect();
            let explicit = |f: &GroupFactors| -> Vec<Mat> {
                f.ms.iter().map(|m| if linear { &f.decoder * m * &f.encoder } else { &f.decoder * m }).collect()
            };
            let got = product_residuals(&set, linear);
            assert_eq!(got[0], 0.0);
            for k in 1..3 {
                let want = relative_distance(&explicit(&set[k]), &explicit(&set[0]));
                assert!((got[k] - want).abs() < 1e-9 * want, "{act}: {} vs {want}", got[k]);
            }
        }
    }
}
