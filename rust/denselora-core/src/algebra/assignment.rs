//! Minimum-cost assignment on a square cost matrix, by pathfinding's Kuhn-Munkres (Hungarian)
//! algorithm. Used to match the encoder rows of one run to those of another.
//!
//! Kuhn-Munkres needs a totally ordered weight; finite f64 costs get one from `OrderedFloat`. The
//! algorithm only compares and subtracts costs and labels, so on floats it returns an optimal
//! assignment up to rounding in the labels (ties may resolve either way); the tests check it
//! against brute force.

use ordered_float::OrderedFloat;
use pathfinding::prelude::{kuhn_munkres_min, Matrix};

/// `cost` is row-major `n x n`. Returns `assignment[row] = column` minimising the total cost.
/// Costs must be finite (NaN or infinity can make Kuhn-Munkres loop forever).
pub fn assign(cost: &[f64], n: usize) -> Vec<usize> {
    assert_eq!(cost.len(), n * n, "cost matrix must be n x n");
    assert!(cost.iter().all(|c| c.is_finite()), "costs must be finite");
    if n == 0 {
        return Vec::new();
    }
    let weights = Matrix::from_vec(n, n, cost.iter().copied().map(OrderedFloat).collect()).expect("n x n costs");
    kuhn_munkres_min(&weights).1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(cost: &[f64], n: usize, a: &[usize]) -> f64 {
        a.iter().enumerate().map(|(i, &j)| cost[i * n + j]).sum()
    }

    fn brute_force(cost: &[f64], n: usize) -> f64 {
        fn go(cost: &[f64], n: usize, row: usize, used: &mut Vec<bool>) -> f64 {
            if row == n {
                return 0.0;
            }
            let mut best = f64::INFINITY;
            for j in 0..n {
                if !used[j] {
                    used[j] = true;
                    best = best.min(cost[row * n + j] + go(cost, n, row + 1, used));
                    used[j] = false;
                }
            }
            best
        }
        go(cost, n, 0, &mut vec![false; n])
    }

    fn random_costs(seed: u64) -> impl FnMut() -> f64 {
        let mut state = seed;
        move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f64) / (1u64 << 31) as f64 - 0.5
        }
    }

    #[test]
    fn matches_brute_force_on_random_matrices() {
        let mut next = random_costs(12345);
        for n in 1..=7 {
            for case in 0..30 {
                // Plain random costs, costs on a coarse grid (many exact ties), and costs that
                // differ only in the last digits (cosines of nearly parallel rows).
                let cost: Vec<f64> = (0..n * n)
                    .map(|_| match case % 3 {
                        0 => next(),
                        1 => (next() * 8.0).round() / 8.0,
                        _ => -1.0 + next() * 1e-12,
                    })
                    .collect();
                let a = assign(&cost, n);
                let mut seen = a.clone();
                seen.sort();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "not a permutation");
                let best = brute_force(&cost, n);
                assert!((total(&cost, n, &a) - best).abs() <= 1e-12 * best.abs().max(1e-12), "n={n} case {case}");
            }
        }
    }

    #[test]
    fn recovers_a_hidden_permutation() {
        let perm = [3usize, 0, 4, 1, 2];
        let n = perm.len();
        let cost: Vec<f64> = (0..n * n).map(|k| if perm[k / n] == k % n { -1.0 } else { 0.0 }).collect();
        assert_eq!(assign(&cost, n), perm.to_vec());
    }
}
