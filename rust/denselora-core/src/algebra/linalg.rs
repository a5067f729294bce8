//! Small dense linear algebra in f64 on top of faer: conversions from and to tensors, thin QR,
//! leading singular subspaces, orthogonal Procrustes and the joint (Tucker-2) factorization used by
//! both averaging and truncation. Matrices here are at most (K·r) wide; out x in is never formed.
//!
//! faer's SVD is backward stable: singular values are exact to about 1e-16 of the largest, which is
//! what the algebra needs (exactly rank-deficient cores included; see the tests).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::householder;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Conj, Par};

use super::OutTensor;
use crate::dtype::DType;
use crate::tensor::{Tensor, TensorRef};

pub type Mat = faer::Mat<f64>;

/// A 2-D tensor as an f64 matrix (tensors are row-major).
pub fn to_matrix(tensor: TensorRef<'_>) -> Mat {
    let (rows, cols) = (tensor.shape[0], tensor.shape[1]);
    let row_bytes = cols * tensor.dtype.size();
    let mut m = Mat::zeros(rows, cols);
    // One row decoded at a time: no copy of the whole tensor.
    let mut row = vec![0.0f32; cols];
    for i in 0..rows {
        crate::dtype::decode_into(tensor.dtype, &tensor.data[i * row_bytes..(i + 1) * row_bytes], &mut row);
        for (j, v) in row.iter().enumerate() {
            m[(i, j)] = f64::from(*v);
        }
    }
    m
}

/// An f64 matrix stored as a row-major tensor of `dtype` (rounded once, at the end).
pub fn to_tensor(m: &Mat, dtype: DType) -> Tensor {
    let values: Vec<f32> = (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)] as f32)).collect();
    Tensor::from_f32(dtype, vec![m.nrows(), m.ncols()], &values)
}

/// An f64 matrix as a row-major result tensor of `dtype` (rounded once, at the end).
pub fn to_out(m: &Mat, dtype: DType) -> OutTensor {
    let values = (0..m.nrows()).flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]));
    OutTensor::from_f64(dtype, vec![m.nrows(), m.ncols()], values)
}

/// Thin QR: `a = q r` with `q` (rows x k) orthonormal, `r` (k x cols), k = min(rows, cols).
pub fn thin_qr(a: &Mat) -> (Mat, Mat) {
    let qr = a.qr();
    (qr.compute_thin_Q(), qr.thin_R().to_owned())
}

/// A thin QR whose `Q` stays in Householder form: `Q x` is a few products with the reflectors,
/// a fraction of the cost of forming the rows x k factor when `x` is narrow.
pub struct HouseholderQr {
    qr: faer::linalg::solvers::Qr<f64>,
}

impl HouseholderQr {
    pub fn new(a: &Mat) -> Self {
        HouseholderQr { qr: a.qr() }
    }

    /// Columns of the thin `Q` (and rows of the thin `R`): min(rows, cols).
    pub fn ncols(&self) -> usize {
        self.qr.Q_basis().nrows().min(self.qr.R().ncols())
    }

    /// The thin `R` (k x cols).
    pub fn thin_r(&self) -> Mat {
        self.qr.thin_R().to_owned()
    }

    /// `Q x` for the thin `Q` and `x` with `ncols()` rows.
    pub fn apply(&self, x: &Mat) -> Mat {
        let (basis, coeff) = (self.qr.Q_basis(), self.qr.Q_coeff());
        let rows = basis.nrows();
        let mut y = Mat::zeros(rows, x.ncols());
        y.subrows_mut(0, self.ncols()).copy_from(x);
        let scratch = householder::apply_block_householder_sequence_on_the_left_in_place_scratch::<f64>(
            rows,
            coeff.nrows(),
            x.ncols(),
        );
        householder::apply_block_householder_sequence_on_the_left_in_place_with_conj(
            basis,
            coeff,
            Conj::No,
            y.as_mut(),
            Par::Seq,
            MemStack::new(&mut MemBuffer::new(scratch)),
        );
        y
    }
}

/// Columns `start .. start + len` of `a`.
pub fn cols(a: &Mat, start: usize, len: usize) -> Mat {
    a.subcols(start, len).to_owned()
}

/// `[a_1 | a_2 | ...]`; all blocks share their row count.
pub fn hstack(blocks: &[Mat]) -> Mat {
    let rows = blocks.first().map_or(0, Mat::nrows);
    let mut out = Mat::zeros(rows, blocks.iter().map(Mat::ncols).sum());
    let mut at = 0;
    for b in blocks {
        out.subcols_mut(at, b.ncols()).copy_from(b);
        at += b.ncols();
    }
    out
}

/// `a` cut into `n` blocks of equal width: the inverse of `hstack`.
pub fn split_cols(a: &Mat, n: usize) -> Vec<Mat> {
    let width = a.ncols() / n.max(1);
    (0..n).map(|i| cols(a, i * width, width)).collect()
}

/// `[a_1; a_2; ...]`; all blocks share their column count.
pub fn vstack(blocks: &[Mat]) -> Mat {
    let width = blocks.first().map_or(0, Mat::ncols);
    let mut out = Mat::zeros(blocks.iter().map(Mat::nrows).sum(), width);
    let mut at = 0;
    for b in blocks {
        out.subrows_mut(at, b.nrows()).copy_from(b);
        at += b.nrows();
    }
    out
}

/// Singular values of `a`, descending.
pub fn singular_values(a: &Mat) -> Vec<f64> {
    if a.nrows() == 0 || a.ncols() == 0 {
        return Vec::new();
    }
    a.singular_values().expect("the SVD of a finite matrix converges")
}

/// The `k` leading left singular vectors of `a` (rows x k, orthonormal) and its singular values
/// in descending order. When `a` has fewer than `k` directions the basis is completed with
/// orthonormal columns (they carry nothing, so any completion is optimal).
pub fn left_singular(a: &Mat, k: usize) -> (Mat, Vec<f64>) {
    let rows = a.nrows();
    assert!(k <= rows, "cannot take {k} directions in a {rows}-dimensional space");
    if a.ncols() == 0 || rows == 0 {
        return (Mat::identity(rows, k), Vec::new());
    }
    // The thin SVD has min(rows, cols) left vectors; the full one completes them.
    let svd = if k <= a.ncols() { a.thin_svd() } else { a.svd() };
    let svd = svd.expect("the SVD of a finite matrix converges");
    let sigma = svd.S().column_vector().iter().copied().collect();
    (svd.U().subcols(0, k).to_owned(), sigma)
}

/// The orthogonal `q` minimising `||a q - b||_F` (orthogonal Procrustes): `q = u v^T` for
/// `a^T b = u s v^T`. Directions with a zero singular value may be paired arbitrarily; the full
/// SVD's orthonormal bases give one optimal pairing.
pub fn procrustes(a: &Mat, b: &Mat) -> Mat {
    let m = a.transpose() * b;
    let svd = m.svd().expect("the SVD of a finite matrix converges");
    svd.U() * svd.V().transpose()
}

/// Sum of squares of all entries.
pub fn sq(a: &Mat) -> f64 {
    a.squared_norm_l2()
}

/// `sqrt(sum_l ||a_l - b_l||^2 / sum_l ||b_l||^2)`: 0 when both are zero.
pub fn relative_distance(a: &[Mat], b: &[Mat]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| sq(&(x - y))).sum();
    let den: f64 = b.iter().map(sq).sum();
    relative_from_squares(num, den)
}

/// `sqrt(num / den)` for a squared distance `num` and a squared reference norm `den`: 0 when both
/// are zero, the absolute distance when only the reference is.
pub fn relative_from_squares(num: f64, den: f64) -> f64 {
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
    let transposed: Vec<Mat> = cores.iter().map(|c| c.transpose().to_owned()).collect();
    let (mut u, left_sigma) = left_singular(&hstack(cores), rd);
    let (mut v, right_sigma) = left_singular(&hstack(&transposed), re);
    let captured = |u: &Mat, v: &Mat| cores.iter().map(|c| sq(&(u.transpose() * c * v))).sum::<f64>();
    let full: f64 = cores.iter().map(sq).sum();
    let mut energy = captured(&u, &v);
    for _ in 0..50 {
        if full == 0.0 || energy >= full * (1.0 - 1e-15) {
            break;
        }
        u = left_singular(&hstack(&cores.iter().map(|c| c * &v).collect::<Vec<_>>()), rd).0;
        v = left_singular(&hstack(&transposed.iter().map(|c| c * &u).collect::<Vec<_>>()), re).0;
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
    Some(t.partial_piv_lu().inverse())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(n: usize) -> Mat {
        Mat::identity(n, n)
    }

    #[test]
    fn left_singular_is_sorted_and_completes_the_basis() {
        let a = Mat::from_fn(3, 1, |i, _| [3.0, 0.0, 4.0][i]);
        let (u, sigma) = left_singular(&a, 3);
        assert_eq!(sigma.len(), 1);
        assert!((sigma[0] - 5.0).abs() < 1e-12);
        assert!((u.transpose() * &u - identity(3)).norm_l2() < 1e-12);
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
            let resid = (&a - &u * (u.transpose() * &a)).norm_l2() / a.norm_l2();
            assert!(resid < 1e-13, "{p}x{n}: {resid:e}");
            assert!(s[4] < 1e-14 * s[0], "{s:?}");
            assert!((u.transpose() * &u - identity(4)).norm_l2() < 1e-13);
            let alone = singular_values(&a);
            assert!(alone.iter().zip(&s).all(|(x, y)| (x - y).abs() <= 1e-14 * s[0]), "{alone:?} vs {s:?}");
        }
    }

    #[test]
    fn procrustes_recovers_a_rotation() {
        let a = Mat::from_fn(4, 2, |i, j| [1.0, 2.0, -1.0, 0.5, 0.3, 3.0, 2.0, -2.0][i * 2 + j]);
        let (c, s) = (0.6f64, 0.8f64);
        let q = Mat::from_fn(2, 2, |i, j| [c, -s, s, c][i * 2 + j]);
        let got = procrustes(&a, &(&a * &q));
        assert!((got - q).norm_l2() < 1e-12);
    }

    #[test]
    fn procrustes_of_a_rank_deficient_fit_is_orthogonal() {
        // Only the first column of `a` carries anything: the second direction may pair either way,
        // but the result must stay orthogonal and fit the first.
        let a = Mat::from_fn(3, 2, |i, j| if j == 0 { (i + 1) as f64 } else { 0.0 });
        let q = procrustes(&a, &a);
        assert!((q.transpose() * &q - identity(2)).norm_l2() < 1e-12);
        assert!((&a * &q - &a).norm_l2() < 1e-12);
    }

    #[test]
    fn thin_qr_reconstructs_wide_and_tall_inputs() {
        use crate::algebra::testutil::Rng;
        let mut rng = Rng::new(5);
        for (r, c) in [(6, 3), (3, 6), (4, 4)] {
            let a = rng.matrix(r, c);
            let (q, rr) = thin_qr(&a);
            let k = r.min(c);
            assert_eq!((q.nrows(), q.ncols(), rr.nrows(), rr.ncols()), (r, k, k, c));
            assert!((&q * &rr - &a).norm_l2() < 1e-12 * a.norm_l2());
            assert!((q.transpose() * &q - identity(k)).norm_l2() < 1e-12);
        }
    }

    #[test]
    fn householder_qr_applies_the_thin_q() {
        use crate::algebra::testutil::Rng;
        let mut rng = Rng::new(6);
        for (r, c) in [(40, 12), (12, 40), (9, 9)] {
            let a = rng.matrix(r, c);
            let (q, rr) = thin_qr(&a);
            let h = HouseholderQr::new(&a);
            assert_eq!(h.ncols(), q.ncols());
            assert!((h.thin_r() - &rr).norm_l2() < 1e-12 * a.norm_l2());
            let x = rng.matrix(q.ncols(), 3);
            assert!((h.apply(&x) - &q * &x).norm_l2() < 1e-12 * x.norm_l2());
        }
    }

    #[test]
    fn energy_rank() {
        assert_eq!(rank_for_energy(&[3.0, 4.0, 0.0], 1.0), 2);
        assert_eq!(rank_for_energy(&[4.0, 3.0], 0.5), 1);
        assert_eq!(rank_for_energy(&[4.0, 3.0], 0.7), 2);
    }
}
