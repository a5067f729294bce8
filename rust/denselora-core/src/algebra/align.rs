//! Alignment of one run's latent coordinates to the reference run's, and how far apart the runs
//! are before and after: a Hungarian assignment on the cosine similarity of encoder rows finds the
//! permutation (a signed one for an odd encoder activation), applied to `E` (rows) and each `M_l`
//! (columns).

use super::assignment;
use super::linalg::{hstack, relative_distance, relative_from_squares, vstack, Mat};
use super::GroupFactors;
use crate::dtype;
use crate::tensor::TensorRef;

/// The (signed) permutation matching the rows of `other` to those of `reference`:
/// row i of the aligned encoder is `sign[i] * other[perm[i]]`.
pub fn match_rows(reference: &Mat, other: &Mat, odd: bool) -> (Vec<usize>, Vec<f64>) {
    let n = reference.nrows();
    // Row norms in one pass over the (column-major) storage.
    let norms = |m: &Mat| {
        let mut sums = vec![0.0f64; m.nrows()];
        for j in 0..m.ncols() {
            sums.iter_mut().zip(m.col_as_slice(j)).for_each(|(s, v)| *s += v * v);
        }
        sums.into_iter().map(f64::sqrt).collect::<Vec<_>>()
    };
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

/// `encoder_residuals` of the encoders as stored (tensors of any dtype), decoded a block at a time
/// rather than converted to matrices: what linear averaging reports.
pub(crate) fn stored_encoder_residuals(encoders: &[TensorRef<'_>]) -> Vec<f64> {
    const BLOCK: usize = 1024;
    let reference = encoders[0];
    let n = reference.numel();
    let (mut x, mut y) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
    encoders
        .iter()
        .map(|run| {
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for start in (0..n).step_by(BLOCK) {
                let len = BLOCK.min(n - start);
                let (size_x, size_y) = (run.dtype.size(), reference.dtype.size());
                dtype::decode_into(run.dtype, &run.data[start * size_x..(start + len) * size_x], &mut x[..len]);
                let ref_bytes = &reference.data[start * size_y..(start + len) * size_y];
                dtype::decode_into(reference.dtype, ref_bytes, &mut y[..len]);
                for (a, b) in x[..len].iter().zip(&y[..len]) {
                    let (a, b) = (f64::from(*a), f64::from(*b));
                    num += (a - b) * (a - b);
                    den += b * b;
                }
            }
            relative_from_squares(num, den)
        })
        .collect()
}

/// Relative distance of each run's products to the reference's (`D M_l`, or `D M_l E` with a
/// linear encoder), from r x r Gram matrices: `||X_k - X_0||^2 = <X_k, X_k> + <X_0, X_0> - 2 <X_k, X_0>`
/// with `<D_a M_a, D_b M_b> = <M_a, (D_a^T D_b) M_b>` (and `<M_a E_a E_b^T, (D_a^T D_b) M_b>` with a
/// linear encoder). The layers of a run are stacked, so that a pair of runs costs a few products,
/// not a few per layer. Exact to about 1e-8 relative, which is what a report needs; out x in is
/// never formed.
pub(crate) fn product_residuals(set: &[GroupFactors], linear_encoder: bool) -> Vec<f64> {
    // [M_1 | ... | M_L] of each run (r_d x L r_e), and with a linear encoder [M_1; ...; M_L] too.
    let wide: Vec<Mat> = set.iter().map(|r| hstack(&r.ms)).collect();
    let tall: Vec<Mat> = if linear_encoder { set.iter().map(|r| vstack(&r.ms)).collect() } else { Vec::new() };
    let inner = |a: usize, b: usize| -> f64 {
        let right = (set[a].decoder.transpose() * &set[b].decoder) * &wide[b];
        if !linear_encoder {
            return frobenius(&wide[a], &right);
        }
        // Block l of `left` is M_a,l E_a E_b^T; block l of `right` is D_a^T D_b M_b,l.
        let left = &tall[a] * (&set[a].encoder * set[b].encoder.transpose());
        let (rows, cols) = (set[a].ms[0].nrows(), set[a].ms[0].ncols());
        (0..set[a].ms.len())
            .map(|l| {
                let block = left.subrows(l * rows, rows);
                let other = right.subcols(l * cols, cols);
                (0..cols).map(|j| (0..rows).map(|i| block[(i, j)] * other[(i, j)]).sum::<f64>()).sum::<f64>()
            })
            .sum()
    };
    let own = inner(0, 0);
    (0..set.len())
        .map(|k| {
            if k == 0 {
                return 0.0;
            }
            let dist = (inner(k, k) + own - 2.0 * inner(k, 0)).max(0.0);
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

/// `<a, b>`: the sum of the products of corresponding entries.
fn frobenius(a: &Mat, b: &Mat) -> f64 {
    (0..a.ncols()).map(|j| a.col_as_slice(j).iter().zip(b.col_as_slice(j)).map(|(x, y)| x * y).sum::<f64>()).sum()
}
