//! Small dense linear algebra in f64 on top of nalgebra: conversions from and to tensors, thin QR,
//! leading singular subspaces, orthogonal Procrustes and the joint (Tucker-2) factorization used by
//! both averaging and truncation. Matrices here are at most (K·r) wide; out x in is never formed.

use nalgebra::DMatrix;

use crate::dtype::DType;
use crate::tensor::Tensor;

pub type Mat = DMatrix<f64>;

/// A 2-D tensor as an f64 matrix (tensors are row-major).
pub fn to_matrix(tensor: &Tensor) -> Mat {
    let values: Vec<f64> = tensor.to_f32().into_iter().map(f64::from).collect();
    Mat::from_row_slice(tensor.shape[0], tensor.shape[1], &values)
}

/// An f64 matrix stored as a row-major tensor of `dtype` (rounded once, at the end).
pub fn to_tensor(m: &Mat, dtype: DType) -> Tensor {
    let values: Vec<f32> = m.transpose().iter().map(|&v| v as f32).collect();
    Tensor::from_f32(dtype, vec![m.nrows(), m.ncols()], &values)
}

/// Thin QR: `a = q r` with `q` (rows x k) orthonormal, `r` (k x cols), k = min(rows, cols).
pub fn thin_qr(a: &Mat) -> (Mat, Mat) {
    let qr = a.clone().qr();
    (qr.q(), qr.r())
}

/// Columns `start .. start + len` of `a`.
pub fn cols(a: &Mat, start: usize, len: usize) -> Mat {
    a.columns(start, len).into_owned()
}

/// `[a_1 | a_2 | ...]`; all blocks share their row count.
pub fn hstack(blocks: &[Mat]) -> Mat {
    let rows = blocks.first().map_or(0, Mat::nrows);
    let width = blocks.iter().map(Mat::ncols).sum();
    let mut out = Mat::zeros(rows, width);
    let mut at = 0;
    for b in blocks {
        out.columns_mut(at, b.ncols()).copy_from(b);
        at += b.ncols();
    }
    out
}

/// `[a_1; a_2; ...]`; all blocks share their column count.
pub fn vstack(blocks: &[Mat]) -> Mat {
    let width = blocks.first().map_or(0, Mat::ncols);
    let rows = blocks.iter().map(Mat::nrows).sum();
    let mut out = Mat::zeros(rows, width);
    let mut at = 0;
    for b in blocks {
        out.rows_mut(at, b.nrows()).copy_from(b);
        at += b.nrows();
    }
    out
}

/// The `k` leading left singular vectors of `a` (rows x k, orthonormal) and all singular values in
/// descending order. When `a` has fewer than `k` non-trivial directions the basis is completed with
/// orthonormal columns (they carry nothing, so any completion is optimal).
pub fn left_singular(a: &Mat, k: usize) -> (Mat, Vec<f64>) {
    let rows = a.nrows();
    assert!(k <= rows, "cannot take {k} directions in a {rows}-dimensional space");
    if a.ncols() == 0 || rows == 0 {
        return (complete_basis(&Mat::zeros(rows, 0), k), Vec::new());
    }
    let svd = a.clone().svd(true, false);
    let u = svd.u.expect("u requested");
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let sigma: Vec<f64> = order.iter().map(|&i| svd.singular_values[i]).collect();
    let take = k.min(order.len());
    let mut basis = Mat::zeros(rows, take);
    for (c, &i) in order.iter().take(take).enumerate() {
        basis.set_column(c, &u.column(i));
    }
    (complete_basis(&basis, k), sigma)
}

/// Extend orthonormal columns `b` (rows x m) to `k >= m` orthonormal columns.
pub fn complete_basis(b: &Mat, k: usize) -> Mat {
    if b.ncols() >= k {
        return b.columns(0, k).into_owned();
    }
    let rows = b.nrows();
    let mut out = Mat::zeros(rows, k);
    out.columns_mut(0, b.ncols()).copy_from(b);
    let mut filled = b.ncols();
    for e in 0..rows {
        if filled == k {
            break;
        }
        // Gram-Schmidt of the unit vector e against what we have (twice, for stability).
        let mut v = nalgebra::DVector::<f64>::zeros(rows);
        v[e] = 1.0;
        for _ in 0..2 {
            for c in 0..filled {
                let proj = out.column(c).dot(&v);
                v -= out.column(c) * proj;
            }
        }
        let norm = v.norm();
        if norm > 1e-8 {
            out.set_column(filled, &(v / norm));
            filled += 1;
        }
    }
    out
}

/// The orthogonal `q` minimising `||a q - b||_F` (orthogonal Procrustes): `q = u v^T` for
/// `a^T b = u s v^T`.
pub fn procrustes(a: &Mat, b: &Mat) -> Mat {
    let svd = (a.transpose() * b).svd(true, true);
    svd.u.expect("u") * svd.v_t.expect("v_t")
}

/// Sum of squares of all entries.
pub fn sq(a: &Mat) -> f64 {
    a.iter().map(|v| v * v).sum()
}

/// `sqrt(sum_l ||a_l - b_l||^2 / sum_l ||b_l||^2)`: 0 when both are zero.
pub fn relative_distance(a: &[Mat], b: &[Mat]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| sq(&(x - y))).sum();
    let den: f64 = b.iter().map(sq).sum();
    if num == 0.0 {
        0.0
    } else if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Smallest number of leading singular values whose squares hold `energy` of the total (at least 1).
pub fn rank_for_energy(sigma: &[f64], energy: f64) -> usize {
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    if total == 0.0 {
        return 1;
    }
    let mut acc = 0.0;
    for (i, s) in sigma.iter().enumerate() {
        acc += s * s;
        // A relative slack absorbs rounding when `energy` is exactly reachable (e.g. 1.0).
        if acc >= energy * total * (1.0 - 1e-12) {
            return i + 1;
        }
    }
    sigma.len().max(1)
}

/// A joint two-sided factorization of cores `c_l` (p x q): orthonormal `u` (p x rd) and `v`
/// (q x re) maximising `sum_l ||u^T c_l v||^2` (Tucker-2), by HOSVD then alternating refinement
/// (HOOI), which never lowers the captured energy.
pub struct Tucker {
    pub u: Mat,
    pub v: Mat,
    /// Singular values of the left unfolding `[c_1 | ... | c_L]` and of the right one.
    pub left_sigma: Vec<f64>,
    pub right_sigma: Vec<f64>,
}

pub fn tucker2(cores: &[Mat], rd: usize, re: usize) -> Tucker {
    let left = hstack(cores);
    let right = hstack(&cores.iter().map(Mat::transpose).collect::<Vec<_>>());
    let (mut u, left_sigma) = left_singular(&left, rd);
    let (mut v, right_sigma) = left_singular(&right, re);
    let captured = |u: &Mat, v: &Mat| cores.iter().map(|c| sq(&(u.transpose() * c * v))).sum::<f64>();
    let full: f64 = cores.iter().map(sq).sum();
    let mut energy = captured(&u, &v);
    for _ in 0..50 {
        if full == 0.0 || energy >= full * (1.0 - 1e-15) {
            break;
        }
        u = left_singular(&hstack(&cores.iter().map(|c| c * &v).collect::<Vec<_>>()), rd).0;
        v = left_singular(&hstack(&cores.iter().map(|c| c.transpose() * &u).collect::<Vec<_>>()), re).0;
        let next = captured(&u, &v);
        let gain = next - energy;
        energy = next;
        if gain <= full * 1e-13 {
            break;
        }
    }
    Tucker { u, v, left_sigma, right_sigma }
}

/// A well-conditioned inverse of the square gauge `t`, or `None` when `t` is (close to) singular.
pub fn gauge_inverse(t: &Mat) -> Option<Mat> {
    if t.nrows() != t.ncols() || t.nrows() == 0 {
        return None;
    }
    let sv = t.clone().singular_values();
    let max = sv.iter().cloned().fold(0.0, f64::max);
    let min = sv.iter().cloned().fold(f64::INFINITY, f64::min);
    if !(max > 0.0) || min < max * 1e-10 {
        return None;
    }
    t.clone().try_inverse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_singular_is_sorted_and_completes_the_basis() {
        let a = Mat::from_row_slice(3, 1, &[3.0, 0.0, 4.0]);
        let (u, sigma) = left_singular(&a, 3);
        assert_eq!(sigma.len(), 1);
        assert!((sigma[0] - 5.0).abs() < 1e-12);
        assert!((u.transpose() * &u - Mat::identity(3, 3)).norm() < 1e-12);
    }

    #[test]
    fn procrustes_recovers_a_rotation() {
        let a = Mat::from_row_slice(4, 2, &[1.0, 2.0, -1.0, 0.5, 0.3, 3.0, 2.0, -2.0]);
        let (c, s) = (0.6f64, 0.8f64);
        let q = Mat::from_row_slice(2, 2, &[c, -s, s, c]);
        let got = procrustes(&a, &(&a * &q));
        assert!((got - q).norm() < 1e-12);
    }

    #[test]
    fn energy_rank() {
        assert_eq!(rank_for_energy(&[3.0, 4.0, 0.0], 1.0), 2);
        assert_eq!(rank_for_energy(&[4.0, 3.0], 0.5), 1);
        assert_eq!(rank_for_energy(&[4.0, 3.0], 0.7), 2);
    }
}
