//! Rank truncation of a trained adapter, group by group.
//!
//! Decoder side: the best joint rank-R approximation of all products `D M_l` of the group: QR of
//! `D` (`D = Q R`), then an SVD of the small stacked core `[R M_1 | ... | R M_L]`; out x in is
//! never formed. Encoder side with a GELU/SiLU encoder (no change of basis passes through it): keep
//! the R latent dims that carry most of `sum_l ||D M_l e_j||^2 * ||E_j||^2`, which is exact when the
//! dropped dims contribute nothing. With the `identity` encoder the pre-activation map `D M_l E` is
//! linear in both factors and both sides are reduced jointly (a Tucker-2 factorization of the
//! stacked cores, HOSVD refined by alternating updates). The result may have a rectangular `M`
//! (`r_d x r_e`), which the adapter format and the layer support.
//!
//! `r` and `alpha` in the config are kept, so the branch keeps the scale `alpha / r` it was trained
//! with. A group whose ranks do not change is copied bit for bit.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

use super::linalg::{hstack, left_singular, rank_for_energy, singular_values, sq, thin_qr, tucker2, Mat};
use super::refactor::{gauge, latent_rms};
use super::{check_finite, group_factors, put_group, AdapterRef, GroupFactors, OutTensor, Output};
use crate::adapter::{config_activations, decoder_key, encoder_key, m_key, validate_layout, Adapter};
use crate::error::{ArgumentKind, Error, Result};
use crate::tensor::TensorRef;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankTarget {
    /// At most this rank on each side of every group.
    Rank(usize),
    /// The smallest rank per side keeping this fraction (0, 1] of the squared spectrum.
    Energy(f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerError {
    pub module: String,
    /// Relative Frobenius error of the layer's product (`D M_l`, or `D M_l E` with a linear encoder).
    pub relative_error: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupTruncation {
    pub group: String,
    pub encoder_rank_before: usize,
    pub decoder_rank_before: usize,
    pub encoder_rank: usize,
    pub decoder_rank: usize,
    /// Singular values of the stacked decoder-side core, descending.
    pub decoder_singular_values: Vec<f64>,
    /// Encoder side: singular values of the stacked cores (linear encoder), or the square root of
    /// each latent dim's importance, descending.
    pub encoder_spectrum: Vec<f64>,
    /// Latent dims kept on the encoder side (GELU/SiLU encoders), in their original order.
    pub encoder_dims_kept: Option<Vec<usize>>,
    /// Relative error over all layers of the group together.
    pub relative_error: f64,
    pub layers: Vec<LayerError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TruncateReport {
    pub input: String,
    pub groups: Vec<GroupTruncation>,
}

fn pick(target: RankTarget, current: usize, spectrum: &[f64]) -> usize {
    match target {
        RankTarget::Rank(r) => r.min(current),
        RankTarget::Energy(e) => rank_for_energy(spectrum, e).min(current),
    }
}

fn rel(err_sq: f64, total_sq: f64) -> f64 {
    if total_sq > 0.0 {
        (err_sq.max(0.0) / total_sq).sqrt()
    } else {
        0.0
    }
}

fn desc(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| b.total_cmp(a));
    v
}

struct Truncated {
    factors: Option<GroupFactors>,
    report: GroupTruncation,
}

fn truncate_linear_encoder(name: &str, modules: &[String], f: &GroupFactors, target: RankTarget) -> Truncated {
    let (r_e, r_d) = (f.encoder.nrows(), f.decoder.ncols());
    let (qd, rd) = thin_qr(&f.decoder);
    let (qe, re) = thin_qr(&f.encoder.transpose().to_owned());
    let cores: Vec<Mat> = f.ms.iter().map(|m| &rd * m * re.transpose()).collect();
    // The HOSVD spectra choose the ranks; the factorization itself is then refined.
    let left_sigma = singular_values(&hstack(&cores));
    let right_sigma = singular_values(&hstack(&cores.iter().map(|c| c.transpose().to_owned()).collect::<Vec<_>>()));
    let new_d = pick(target, r_d, &left_sigma).min(qd.ncols());
    let new_e = pick(target, r_e, &right_sigma).min(qe.ncols());
    let mut report = GroupTruncation {
        group: name.to_string(),
        encoder_rank_before: r_e,
        decoder_rank_before: r_d,
        encoder_rank: new_e,
        decoder_rank: new_d,
        decoder_singular_values: left_sigma,
        encoder_spectrum: right_sigma,
        encoder_dims_kept: None,
        relative_error: 0.0,
        layers: modules.iter().map(|m| LayerError { module: m.clone(), relative_error: 0.0 }).collect(),
    };
    if (new_d, new_e) == (r_d, r_e) {
        return Truncated { factors: None, report };
    }
    let tk = tucker2(&cores, new_d, new_e);
    let (u, v) = (&tk.u, &tk.v);
    let (td, td_inv) = gauge((new_d == r_d).then(|| u.transpose() * &rd), new_d, latent_rms(&f.decoder, r_d));
    let (te, te_inv) = gauge((new_e == r_e).then(|| re.transpose() * v), new_e, latent_rms(&f.encoder, r_e));
    let mut err_total = 0.0;
    let mut total = 0.0;
    let mut ms = Vec::with_capacity(cores.len());
    for (c, layer) in cores.iter().zip(&mut report.layers) {
        let small = u.transpose() * c * v;
        let (all, kept) = (sq(c), sq(&small));
        layer.relative_error = rel(all - kept, all);
        err_total += all - kept;
        total += all;
        ms.push(&td_inv * small * &te_inv);
    }
    report.relative_error = rel(err_total, total);
    let factors = GroupFactors { encoder: &te * v.transpose() * qe.transpose(), decoder: &qd * u * &td, ms };
    Truncated { factors: Some(factors), report }
}

fn truncate_nonlinear_encoder(name: &str, modules: &[String], f: &GroupFactors, target: RankTarget) -> Truncated {
    let (r_e, r_d) = (f.encoder.nrows(), f.decoder.ncols());
    let (qd, rd) = thin_qr(&f.decoder);
    let products: Vec<Mat> = f.ms.iter().map(|m| &rd * m).collect();
    let importance: Vec<f64> = (0..r_e)
        .map(|j| f.encoder.row(j).squared_norm_l2() * products.iter().map(|p| p.col(j).squared_norm_l2()).sum::<f64>())
        .collect();
    let mut order: Vec<usize> = (0..r_e).collect();
    order.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]).then(a.cmp(&b)));
    let spectrum: Vec<f64> = order.iter().map(|&j| importance[j].sqrt()).collect();
    let new_e = pick(target, r_e, &spectrum);
    let mut kept: Vec<usize> = order[..new_e].to_vec();
    kept.sort();
    let selected: Vec<Mat> = products.iter().map(|p| Mat::from_fn(p.nrows(), new_e, |i, c| p[(i, kept[c])])).collect();
    let sigma = singular_values(&hstack(&selected));
    let new_d = pick(target, r_d, &sigma).min(qd.ncols());
    let mut report = GroupTruncation {
        group: name.to_string(),
        encoder_rank_before: r_e,
        decoder_rank_before: r_d,
        encoder_rank: new_e,
        decoder_rank: new_d,
        decoder_singular_values: desc(sigma),
        encoder_spectrum: spectrum,
        encoder_dims_kept: Some(kept.clone()),
        relative_error: 0.0,
        layers: modules.iter().map(|m| LayerError { module: m.clone(), relative_error: 0.0 }).collect(),
    };
    if (new_d, new_e) == (r_d, r_e) {
        return Truncated { factors: None, report };
    }
    let (u, _) = left_singular(&hstack(&selected), new_d);
    let (td, td_inv) = gauge((new_d == r_d).then(|| u.transpose() * &rd), new_d, latent_rms(&f.decoder, r_d));
    let mut err_total = 0.0;
    let mut total = 0.0;
    let mut ms = Vec::with_capacity(selected.len());
    for ((p, s), layer) in products.iter().zip(&selected).zip(&mut report.layers) {
        let small = u.transpose() * s;
        let (all, kept_sq) = (sq(p), sq(&small));
        layer.relative_error = rel(all - kept_sq, all);
        err_total += all - kept_sq;
        total += all;
        ms.push(&td_inv * small);
    }
    report.relative_error = rel(err_total, total);
    let encoder = Mat::from_fn(new_e, f.encoder.ncols(), |i, c| f.encoder[(kept[i], c)]);
    Truncated { factors: Some(GroupFactors { encoder, decoder: &qd * &u * &td, ms }), report }
}

/// Truncate every group of `adapter` (named `name` in errors) to `target`.
pub fn truncate(adapter: &Adapter, name: &str, target: RankTarget) -> Result<(Adapter, TruncateReport)> {
    let (out, report) = truncate_view(&AdapterRef::of(adapter), name, target)?;
    Ok((out.into_adapter(), report))
}

/// `truncate` of a borrowed adapter, with typed result tensors.
pub fn truncate_view(adapter: &AdapterRef<'_>, name: &str, target: RankTarget) -> Result<(Output, TruncateReport)> {
    let layouts = adapter.layout(name)?;
    check_finite(adapter, name)?;
    match target {
        RankTarget::Rank(0) => return Err(Error::argument("rank", ArgumentKind::Value, "rank must be at least 1")),
        RankTarget::Rank(r) => {
            let largest = layouts.iter().map(|g| g.encoder_rank.max(g.decoder_rank)).max().unwrap_or(0);
            if r > largest {
                return Err(Error::argument(
                    "rank",
                    ArgumentKind::Value,
                    format!("rank {r} is above every group's current rank (largest: {largest}) in {name}; nothing to truncate"),
                ));
            }
        }
        RankTarget::Energy(e) if !(e > 0.0 && e <= 1.0) => {
            return Err(Error::argument("energy", ArgumentKind::Value, format!("energy {e} is not in (0, 1]")))
        }
        RankTarget::Energy(_) => {}
    }
    let encoder_activation = config_activations(adapter.config, name)?.0;
    let mut out = Output { config: adapter.config.clone(), tensors: Default::default() };
    // Groups are independent: one task each.
    let done_all: Vec<Truncated> = layouts
        .par_iter()
        .map(|layout| {
            let f = group_factors(adapter, layout);
            if encoder_activation.is_linear() {
                truncate_linear_encoder(&layout.name, &layout.modules, &f, target)
            } else {
                truncate_nonlinear_encoder(&layout.name, &layout.modules, &f, target)
            }
        })
        .collect();
    let mut groups = Vec::with_capacity(layouts.len());
    for (layout, done) in layouts.iter().zip(done_all) {
        if let Some(factors) = &done.factors {
            // put_group keeps each tensor's dtype; shapes come from the new factors.
            put_group(&mut out, adapter, layout, factors);
        } else {
            // Every tensor belongs to a group (the layout check): unchanged groups are copied.
            let keys = [encoder_key(&layout.name), decoder_key(&layout.name)];
            for key in keys.into_iter().chain(layout.modules.iter().map(|m| m_key(m))) {
                let tensor = OutTensor::copy_of(adapter.tensors[&key]);
                out.tensors.insert(key, tensor);
            }
        }
        groups.push(done.report);
    }
    // The layout of the result (shapes only: the check reads no values).
    let shapes: BTreeMap<String, TensorRef<'_>> = out
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), TensorRef { dtype: t.dtype(), shape: &t.shape, data: &[] }))
        .collect();
    validate_layout(&out.config, &shapes, name)?;
    Ok((out, TruncateReport { input: name.to_string(), groups }))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{factors, random_adapter, set_factors};
    use super::*;
    use crate::algebra::linalg::relative_distance;
    use crate::dtype::DType;
    use crate::tensor::Tensor;

    #[test]
    fn truncating_to_the_current_rank_is_bit_exact() {
        for act in ["gelu", "identity"] {
            let a = random_adapter(3, 4, 2, act);
            let (b, report) = truncate(&a, "a", RankTarget::Rank(4)).unwrap();
            assert_eq!(a, b);
            assert_eq!(report.groups[0].relative_error, 0.0);
            let (c, _) = truncate(&a, "a", RankTarget::Energy(1.0)).unwrap();
            assert_eq!(a, c);
        }
    }

    #[test]
    fn decoder_error_matches_dropped_singular_values() {
        let a = random_adapter(5, 5, 3, "gelu");
        // Kill two encoder dims so that the encoder side drops them exactly.
        let mut f = factors(&a);
        for m in &mut f.ms {
            m.col_mut(1).fill(0.0);
            m.col_mut(3).fill(0.0);
        }
        let mut a = a;
        set_factors(&mut a, &f);
        let (b, report) = truncate(&a, "a", RankTarget::Rank(3)).unwrap();
        let g = &report.groups[0];
        assert_eq!(g.encoder_dims_kept.as_deref(), Some(&[0usize, 2, 4][..]));
        let dropped: f64 = g.decoder_singular_values[3..].iter().map(|s| s * s).sum();
        let total: f64 = g.decoder_singular_values.iter().map(|s| s * s).sum();
        assert!((g.relative_error - (dropped / total).sqrt()).abs() < 1e-9);
        // The stored adapter realises that error.
        let fb = factors(&b);
        let before: Vec<Mat> = f.ms.iter().map(|m| &f.decoder * m).collect();
        let after: Vec<Mat> = fb
            .ms
            .iter()
            .map(|m| {
                let small = &fb.decoder * m;
                Mat::from_fn(7, 5, |i, j| match j {
                    0 => small[(i, 0)],
                    2 => small[(i, 1)],
                    4 => small[(i, 2)],
                    _ => 0.0,
                })
            })
            .collect();
        assert!((relative_distance(&after, &before) - g.relative_error).abs() < 1e-5);
    }

    #[test]
    fn identity_truncation_is_exact_at_the_true_rank() {
        let a = random_adapter(7, 5, 2, "identity");
        let mut f = factors(&a);
        // Rank-2 decoder and encoder: D M E has Tucker rank (2, 2).
        let c2 = f.decoder.col(0) * 2.0 - f.decoder.col(1);
        f.decoder.col_mut(2).copy_from(&c2);
        f.decoder.subcols_mut(3, 2).fill(0.0);
        f.encoder.row_mut(2).fill(0.0);
        let r3 = f.encoder.row(0) + f.encoder.row(1);
        f.encoder.row_mut(3).copy_from(&r3);
        f.encoder.row_mut(4).fill(0.0);
        let mut a = a;
        set_factors(&mut a, &f);
        let (b, report) = truncate(&a, "a", RankTarget::Rank(2)).unwrap();
        assert!(report.groups[0].relative_error < 1e-6);
        let fb = factors(&b);
        assert_eq!((fb.encoder.nrows(), fb.decoder.ncols()), (2, 2));
        let w = |g: &GroupFactors| g.ms.iter().map(|m| &g.decoder * m * &g.encoder).collect::<Vec<_>>();
        assert!(relative_distance(&w(&fb), &w(&f)) < 1e-5);
    }

    #[test]
    fn unchanged_half_precision_groups_are_bit_exact() {
        for dtype in [DType::F16, DType::BF16] {
            let mut a = random_adapter(4, 4, 2, "gelu");
            for t in a.tensors.values_mut() {
                *t = Tensor::from_f32(dtype, t.shape.clone(), &t.to_f32());
            }
            let (b, _) = truncate(&a, "a", RankTarget::Rank(4)).unwrap();
            assert_eq!(a, b);
            let (c, _) = truncate(&a, "a", RankTarget::Rank(2)).unwrap();
            assert!(c.tensors.values().all(|t| t.dtype == dtype));
        }
    }

    #[test]
    fn bad_targets_are_argument_errors() {
        let a = random_adapter(1, 4, 1, "gelu");
        for t in [RankTarget::Rank(0), RankTarget::Rank(9), RankTarget::Energy(0.0), RankTarget::Energy(1.5)] {
            assert!(matches!(truncate(&a, "a", t), Err(Error::InvalidArgument { .. })), "{t:?}");
        }
    }
}
