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

/// One-sided (Hestenes) Jacobi on the columns of `w`: rotates them, and `v` along, until they are
/// mutually orthogonal. Then `w_in = w_out v^T` with orthogonal columns of norm sigma_i. Jacobi is
/// accurate for every singular value, including exactly rank-deficient inputs.
fn jacobi_columns(w: &mut Mat, v: &mut Mat) {
    let n = w.ncols();
    let (wr, vr) = (w.nrows(), v.nrows());
    // Column-major storage: column c is the contiguous slice [c * rows, (c + 1) * rows).
    let (ws, vs) = (w.as_mut_slice(), v.as_mut_slice());
    let mut norms: Vec<f64> = (0..n).map(|c| ws[c * wr..(c + 1) * wr].iter().map(|x| x * x).sum()).collect();
    for _sweep in 0..60 {
        let mut rotated = false;
        for i in 0..n {
            for j in (i + 1)..n {
                let (alpha, beta) = (norms[i], norms[j]);
                let (head, tail) = ws.split_at_mut(j * wr);
                let (ci, cj) = (&mut head[i * wr..(i + 1) * wr], &mut tail[..wr]);
                let gamma: f64 = ci.iter().zip(cj.iter()).map(|(a, b)| a * b).sum();
                if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(ci, cj, c, s);
                let (vhead, vtail) = vs.split_at_mut(j * vr);
                rotate(&mut vhead[i * vr..(i + 1) * vr], &mut vtail[..vr], c, s);
                // Exact updates of the two squared norms under this rotation.
                norms[i] = alpha - t * gamma;
                norms[j] = beta + t * gamma;
            }
        }
        if !rotated {
            break;
        }
        // Refresh the norms once a sweep so that rounding in the updates cannot accumulate.
        for (c, norm) in norms.iter_mut().enumerate() {
            *norm = ws[c * wr..(c + 1) * wr].iter().map(|x| x * x).sum();
        }
    }
}

fn rotate(a: &mut [f64], b: &mut [f64], c: f64, s: f64) {
    for (x, y) in a.iter_mut().zip(b.iter_mut()) {
        let (p, q) = (*x, *y);
        *x = c * p - s * q;
        *y = s * p + c * q;
    }
}

/// Singular values (descending) and left singular vectors of a square matrix `r`.
fn square_left_singular(r: &Mat) -> (Mat, Vec<f64>) {
    // r^T = W Sigma V^T by Jacobi on r^T's columns: r = V Sigma W^T, so V holds r's left vectors.
    let n = r.nrows();
    let mut w = r.transpose();
    let mut v = Mat::identity(n, n);
    jacobi_columns(&mut w, &mut v);
    let sigma: Vec<f64> = (0..n).map(|i| w.column(i).norm()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| sigma[b].total_cmp(&sigma[a]));
    let mut u = Mat::zeros(n, n);
    for (c, &i) in order.iter().enumerate() {
        u.set_column(c, &v.column(i));
    }
    (u, order.iter().map(|&i| sigma[i]).collect())
}

/// Singular values of `a`, descending.
pub fn singular_values(a: &Mat) -> Vec<f64> {
    left_singular(a, 0).1
}

/// The `k` leading left singular vectors of `a` (rows x k, orthonormal) and its singular values
/// in descending order. A QR step first reduces `a` to a small square factor; when `a` has fewer
/// than `k` directions the basis is completed with orthonormal columns (they carry nothing, so any
/// completion is optimal).
pub fn left_singular(a: &Mat, k: usize) -> (Mat, Vec<f64>) {
    let rows = a.nrows();
    assert!(k <= rows, "cannot take {k} directions in a {rows}-dimensional space");
    if a.ncols() == 0 || rows == 0 {
        return (complete_basis(&Mat::zeros(rows, 0), k), Vec::new());
    }
    let (basis, sigma) = if a.ncols() >= rows {
        // a^T = Q R, so a = R^T Q^T: a's left vectors are those of R^T (rows x rows).
        let (_, r) = thin_qr(&a.transpose());
        square_left_singular(&r.transpose())
    } else {
        // a = Q R with Q (rows x cols): a's left vectors are Q times R's.
        let (q, r) = thin_qr(a);
        let (u, sigma) = square_left_singular(&r);
        (q * u, sigma)
    };
    let take = k.min(basis.ncols());
    (complete_basis(&basis.columns(0, take).into_owned(), k), sigma)
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
/// `a^T b = u s v^T`. Directions with a zero singular value may be paired arbitrarily; any
/// orthonormal completion is optimal.
pub fn procrustes(a: &Mat, b: &Mat) -> Mat {
    let m = a.transpose() * b;
    let n = m.ncols();
    let mut w = m.clone();
    let mut v = Mat::identity(n, n);
    jacobi_columns(&mut w, &mut v);
    let sigma: Vec<f64> = (0..n).map(|i| w.column(i).norm()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| sigma[y].total_cmp(&sigma[x]));
    let top = sigma.iter().cloned().fold(0.0, f64::max);
    let live: Vec<usize> = order.iter().copied().filter(|&i| sigma[i] > top * 1e-12 && sigma[i] > 0.0).collect();
    let mut u = Mat::zeros(m.nrows(), live.len());
    for (c, &i) in live.iter().enumerate() {
        u.set_column(c, &(w.column(i) / sigma[i]));
    }
    let u = complete_basis(&u, n);
    let mut v_sorted = Mat::zeros(n, n);
    for (c, &i) in live.iter().chain(order.iter().filter(|i| !live.contains(i))).enumerate() {
        v_sorted.set_column(c, &v.column(i));
    }
    u * v_sorted.transpose()
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
    let sv = singular_values(t);
    let max = sv.iter().cloned().fold(0.0, f64::max);
    let min = sv.iter().cloned().fold(f64::INFINITY, f64::min);
    // `max` is NaN-free (finite inputs); a zero or tiny spread means no usable inverse.
    if max <= 0.0 || min < max * 1e-10 {
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
    fn left_singular_is_accurate_on_exactly_rank_deficient_input() {
        use crate::algebra::testutil::Rng;
        let mut rng = Rng::new(3);
        for (p, n) in [(8, 8), (8, 20), (20, 8), (30, 90)] {
            // Rank 4, plus rows that are tiny combinations of the others (as stacked cores are).
            let base = rng.matrix(4, n);
            let mix = Mat::from_fn(p, 4, |i, j| {
                if i < 4 {
                    if i == j {
                        1.0
                    } else {
                        0.0
                    }
                } else {
                    1e-8 * (i + j) as f64
                }
            });
            let a = mix * base;
            let (u, s) = left_singular(&a, 4);
            let resid = (&a - &u * (u.transpose() * &a)).norm() / a.norm();
            assert!(resid < 1e-13, "{p}x{n}: {resid:e}");
            assert!(s[4] < 1e-14 * s[0], "{s:?}");
            assert!((u.transpose() * &u - Mat::identity(4, 4)).norm() < 1e-13);
        }
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
