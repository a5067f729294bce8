//! Minimum-cost assignment on a square cost matrix (the Hungarian method with row/column
//! potentials, O(n^3)). Used to match the encoder rows of one run to those of another.

/// `cost` is row-major `n x n`. Returns `assignment[row] = column` minimising the total cost.
/// Costs must be finite.
pub fn assign(cost: &[f64], n: usize) -> Vec<usize> {
    assert_eq!(cost.len(), n * n, "cost matrix must be n x n");
    if n == 0 {
        return Vec::new();
    }
    // 1-based arrays with a virtual column 0, as in the classic shortest-augmenting-path form:
    // u/v are the potentials, way[] the alternating path, matched[col] the row matched to col.
    let inf = f64::INFINITY;
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; n + 1];
    let mut matched = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    for row in 1..=n {
        matched[0] = row;
        let mut col0 = 0usize;
        let mut min_to = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[col0] = true;
            let i0 = matched[col0];
            let mut delta = inf;
            let mut col1 = 0usize;
            for j in 1..=n {
                if used[j] {
                    continue;
                }
                let reduced = cost[(i0 - 1) * n + (j - 1)] - u[i0] - v[j];
                if reduced < min_to[j] {
                    min_to[j] = reduced;
                    way[j] = col0;
                }
                if min_to[j] < delta {
                    delta = min_to[j];
                    col1 = j;
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[matched[j]] += delta;
                    v[j] -= delta;
                } else {
                    min_to[j] -= delta;
                }
            }
            col0 = col1;
            if matched[col0] == 0 {
                break;
            }
        }
        // Flip the alternating path back to the root.
        loop {
            let prev = way[col0];
            matched[col0] = matched[prev];
            col0 = prev;
            if col0 == 0 {
                break;
            }
        }
    }
    let mut assignment = vec![0usize; n];
    for j in 1..=n {
        assignment[matched[j] - 1] = j - 1;
    }
    assignment
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

    #[test]
    fn matches_brute_force_on_random_matrices() {
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f64) / (1u64 << 31) as f64 - 0.5
        };
        for n in 1..=7 {
            for _ in 0..20 {
                let cost: Vec<f64> = (0..n * n).map(|_| next()).collect();
                let a = assign(&cost, n);
                let mut seen = a.clone();
                seen.sort();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "not a permutation");
                assert!((total(&cost, n, &a) - brute_force(&cost, n)).abs() < 1e-12);
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
