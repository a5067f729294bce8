//! Re-expressing averaged runs in one basis at the adapter's rank. The products that fix the
//! function (`D M_l`, or `D M_l E` with a linear encoder) are written in the small coordinates of
//! one QR basis for all runs (`Cores`), averaged, and refactored by a joint SVD (or a Tucker-2
//! factorization on both sides); the gauge then expresses the new basis in the reference's
//! coordinates where that is well conditioned, so that the result stays close to the inputs.

use super::linalg::{cols, gauge_inverse, hstack, procrustes, sq, thin_qr, vstack, HouseholderQr, Mat};
use super::GroupFactors;

pub(crate) fn weighted_sum<'a>(items: impl Iterator<Item = &'a Mat>, weights: &[f64]) -> Mat {
    let mut acc: Option<Mat> = None;
    for (m, w) in items.zip(weights) {
        acc = Some(match acc {
            None => m * *w,
            Some(a) => a + m * *w,
        });
    }
    acc.expect("at least one input")
}

pub(crate) fn plain_mean(runs: &[GroupFactors], weights: &[f64]) -> GroupFactors {
    GroupFactors {
        encoder: weighted_sum(runs.iter().map(|r| &r.encoder), weights),
        decoder: weighted_sum(runs.iter().map(|r| &r.decoder), weights),
        ms: (0..runs[0].ms.len()).map(|l| weighted_sum(runs.iter().map(|r| &r.ms[l]), weights)).collect(),
    }
}

/// The RMS norm of one latent direction of `factor` (`latents` of them), the scale of a plain
/// gauge; 1 for an all-zero factor.
pub(crate) fn latent_rms(factor: &Mat, latents: usize) -> f64 {
    let scale = (sq(factor) / latents.max(1) as f64).sqrt();
    if scale > 0.0 {
        scale
    } else {
        1.0
    }
}

/// A square gauge `t` (n x n) with its inverse, or `scale · I` when `t` is absent or (nearly)
/// singular.
pub(crate) fn gauge(t: Option<Mat>, n: usize, scale: f64) -> (Mat, Mat) {
    if let Some(t) = t {
        if let Some(inv) = gauge_inverse(&t) {
            return (t, inv);
        }
    }
    (Mat::identity(n, n) * scale, Mat::identity(n, n) / scale)
}

/// The plain mean after rotating each run's decoder onto the reference's by orthogonal Procrustes.
pub(crate) fn procrustes_mean(matched: &[GroupFactors], reference: &GroupFactors, weights: &[f64]) -> GroupFactors {
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
}

/// Products that fix the function, in the small coordinates of the QR factors: `R_d,k M_l`
/// (out-side basis `Q_d`), times `R_e,k^T` with a linear encoder.
pub(crate) struct Cores {
    /// `[D_1 | ... | D_K] = Q_d R_d`, with `Q_d` applied rather than formed.
    pub qd: HouseholderQr,
    pub rd: Mat,
    /// `(Q_e, R_e)` of `[E_1; ...; E_K]^T` for a linear encoder.
    pub qe_re: Option<(Mat, Mat)>,
}

impl Cores {
    pub fn new(runs: &[GroupFactors], linear_encoder: bool) -> Self {
        let qd = HouseholderQr::new(&hstack(&runs.iter().map(|r| r.decoder.clone()).collect::<Vec<_>>()));
        let rd = qd.thin_r();
        let qe_re = linear_encoder.then(|| {
            thin_qr(&vstack(&runs.iter().map(|r| r.encoder.clone()).collect::<Vec<_>>()).transpose().to_owned())
        });
        Cores { qd, rd, qe_re }
    }

    /// The weighted mean of the runs' cores with the layers side by side, `[C_1 | ... | C_L]`
    /// (p x L q), where `C_l = sum_k w_k R_d,k M_l,k` (times `R_e,k^T` with a linear encoder).
    /// A few large products rather than two small ones per run and layer.
    pub fn averaged(&self, runs: &[GroupFactors], weights: &[f64]) -> Mat {
        let (rank_d, rank_e) = (runs[0].decoder.ncols(), runs[0].encoder.nrows());
        let layers = runs[0].ms.len();
        // [w_1 R_d,1 | ... | w_K R_d,K].
        let mut weighted = self.rd.clone();
        for j in 0..weighted.ncols() {
            let w = weights[j / rank_d];
            weighted.col_as_slice_mut(j).iter_mut().for_each(|x| *x *= w);
        }
        match &self.qe_re {
            // sum_k (w_k R_d,k) [M_1,k | ... | M_L,k], as one product over the stacked runs.
            None => weighted * vstack(&runs.iter().map(|r| hstack(&r.ms)).collect::<Vec<_>>()),
            Some((_, re)) => {
                // Per run, w_k R_d,k [M_1,k | ... | M_L,k]; per layer, its blocks side by side
                // times [R_e,1^T; ...; R_e,K^T] = R_e^T.
                let left: Vec<Mat> = runs
                    .iter()
                    .enumerate()
                    .map(|(k, r)| weighted.subcols(k * rank_d, rank_d) * hstack(&r.ms))
                    .collect();
                let per_layer: Vec<Mat> = (0..layers)
                    .map(|l| {
                        hstack(&left.iter().map(|x| cols(x, l * rank_e, rank_e)).collect::<Vec<_>>()) * re.transpose()
                    })
                    .collect();
                hstack(&per_layer)
            }
        }
    }
}
