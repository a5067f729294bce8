//! Averaging checked against its defining properties: a symmetric copy of a run averages to the
//! same function, weights and EMA are exact, and the Gram-matrix residuals match explicit products.

use super::super::align::product_residuals;
use super::super::linalg::{relative_distance, Mat};
use super::super::testutil::{factors, random_adapter, set_factors, Rng};
use super::*;
use crate::tensor::Tensor;
use faer::linalg::solvers::DenseSolveCore;

/// The branch's pre-activation products for a given input batch `x` (in x n):
/// `D M_l act(E x)` with GELU replaced by a fixed non-odd elementwise function (softplus).
fn outputs(adapter: &Adapter, x: &Mat, linear: bool) -> Vec<Mat> {
    let f = factors(adapter);
    let mut h = &f.encoder * x;
    if !linear {
        h = Mat::from_fn(h.nrows(), h.ncols(), |i, j| (1.0 + h[(i, j)].exp()).ln());
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
    let (b_inv, a_inv) = (b.partial_piv_lu().inverse(), a.partial_piv_lu().inverse());
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
    assert!((factors(&avg).encoder - want).norm_l2() < 1e-5);

    let opts = AverageOptions { mode: Mode::Linear, ema: Some(0.5), ..Default::default() };
    let (avg, _) = average(&inputs, &opts).unwrap();
    let mut ema = fs[0].decoder.clone();
    for f in &fs[1..] {
        ema = ema * 0.5 + &f.decoder * 0.5;
    }
    assert!((factors(&avg).decoder - ema).norm_l2() < 1e-5);
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
