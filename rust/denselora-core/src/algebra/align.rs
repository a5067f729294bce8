//! Alignment of one run's latent coordinates to the reference run's, and how far apart the runs
//! are before and after: a Hungarian assignment on the cosine similarity of encoder rows finds the
//! permutation (a signed one for an odd encoder activation), applied to `E` (rows) and each `M_l`
//! (columns).

use super::assignment;
use super::linalg::{relative_distance, Mat};
use super::GroupFactors;

/// The (signed) permutation matching the rows of `other` to those of `reference`:
/// row i of the aligned encoder is `sign[i] * other[perm[i]]`.
pub fn match_rows(reference: &Mat, other: &Mat, odd: bool) -> (Vec<usize>, Vec<f64>) {
    let n = reference.nrows();
    let norms = |m: &Mat| (0..m.nrows()).map(|i| m.row(i).norm_l2()).collect::<Vec<_>>();
    let (na, nb) = (norms(reference), norms(other));
    let sim = reference * other.transpose();
    let cosine = |i: usize, j: usize| if na[i] > 0.0 && nb[j] > 0.0 { sim[(i, j)] / (na[i] * nb[j]) } else { 0.0 };
    let cost: Vec<f64> = (0..n * n)
        .map(|k| {
            let c = cosine(k / n, k % n);
            -(if odd { c.abs() } else { c })
        })
        .collect();
    let perm = assignment::assign(&cost, n);
    let sign = perm.iter().enumerate().map(|(i, &j)| if odd && cosine(i, j) < 0.0 { -1.0 } else { 1.0 }).collect();
    (perm, sign)
}

pub(crate) fn permute(run: &GroupFactors, perm: &[usize], sign: &[f64]) -> GroupFactors {
    let encoder = Mat::from_fn(run.encoder.nrows(), run.encoder.ncols(), |i, c| sign[i] * run.encoder[(perm[i], c)]);
    let ms = run.ms.iter().map(|m| Mat::from_fn(m.nrows(), m.ncols(), |r, i| sign[i] * m[(r, perm[i])])).collect();
    GroupFactors { encoder, decoder: run.decoder.clone(), ms }
}

/// Relative distance of each run's encoder rows to the reference's (the first run).
pub(crate) fn encoder_residuals(set: &[GroupFactors], reference: &GroupFactors) -> Vec<f64> {
    set.iter()
        .map(|r| relative_distance(std::slice::from_ref(&r.encoder), std::slice::from_ref(&reference.encoder)))
        .collect()
}

/// Relative distance of each run's products to the reference's (`D M_l`, or `D M_l E` with a
/// linear encoder), from r x r Gram matrices: `||X_k - X_0||^2 = <X_k, X_k> + <X_0, X_0> - 2 <X_k, X_0>`
/// with `<D_a M_a, D_b M_b> = tr(M_a^T (D_a^T D_b) M_b)` (times `E_b E_a^T` for a linear encoder).
/// Exact to about 1e-8 relative, which is what a report needs; out x in is never formed.
pub(crate) fn product_residuals(set: &[GroupFactors], linear_encoder: bool) -> Vec<f64> {
    let reference = &set[0];
    let inner = |a: &GroupFactors, b: &GroupFactors| -> f64 {
        let gd = a.decoder.transpose() * &b.decoder;
        let ge = linear_encoder.then(|| &b.encoder * a.encoder.transpose());
        a.ms.iter()
            .zip(&b.ms)
            .map(|(ma, mb)| {
                let left = ma.transpose() * &gd * mb;
                match &ge {
                    Some(ge) => trace(&(left * ge)),
                    None => trace(&left),
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

fn trace(m: &Mat) -> f64 {
    (0..m.nrows().min(m.ncols())).map(|i| m[(i, i)]).sum()
}
