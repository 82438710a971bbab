//! Low-rank factors of one projection W [hidden, width] (the math convention y = x·W) that keep
//! the projection of real activations: with a whitening S of the activations, SVD of S·W =
//! UΣVᵀ, W_a = S⁻¹U_rΣ_r and W_b = V_rᵀ minimise ‖S(W − W_aW_b)‖_F, and that error is exactly
//! the tail energy Σ_{i>r} σ_i². With S = C^½ (C = XᵀX) it is the activation error ‖X(W − W_aW_b)‖.
use nalgebra::{DMatrix, SymmetricEigen};

/// How activations weigh the decomposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Plain SVD of W (Palu-like): activations ignored.
    Svd,
    /// Activation-aware SVD (ASVD): W's rows scaled by each input channel's magnitude to the
    /// power α = 0.5 (the magnitude is the channel's RMS, from the same covariance).
    Asvd,
    /// CARE: S = C^½ of the damped uncentred covariance (C + 0.1·mean(diag C)·I).
    Care,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Svd => "svd",
            Method::Asvd => "asvd",
            Method::Care => "care",
        }
    }
}

/// ASVD's exponent on the channel magnitude (its paper's default).
const ASVD_ALPHA: f64 = 0.5;
/// CARE's damping: C + DAMPING·mean(diag C)·I (the paper's and reference code's value).
pub const DAMPING: f64 = 0.1;

/// A whitening S and its inverse.
pub struct Whitening {
    pub s: DMatrix<f64>,
    pub s_inv: DMatrix<f64>,
}

impl Whitening {
    /// The whitening `method` uses for inputs with uncentred covariance `c` over `tokens` tokens.
    pub fn new(method: Method, c: &DMatrix<f64>, tokens: usize) -> Whitening {
        let n = c.nrows();
        match method {
            Method::Svd => Whitening { s: DMatrix::identity(n, n), s_inv: DMatrix::identity(n, n) },
            Method::Asvd => {
                let scale: Vec<f64> =
                    (0..n).map(|i| (c[(i, i)] / tokens.max(1) as f64).sqrt().max(1e-6).powf(ASVD_ALPHA)).collect();
                Whitening {
                    s: DMatrix::from_diagonal(&nalgebra::DVector::from_iterator(n, scale.iter().copied())),
                    s_inv: DMatrix::from_diagonal(&nalgebra::DVector::from_iterator(n, scale.iter().map(|s| 1.0 / s))),
                }
            }
            Method::Care => {
                let damped = damped(c);
                let eig = SymmetricEigen::new(damped);
                let floor = eig.eigenvalues.max() * 1e-12;
                let root = eig.eigenvalues.map(|l| l.max(floor).sqrt());
                let q = &eig.eigenvectors;
                let s = q * DMatrix::from_diagonal(&root) * q.transpose();
                let s_inv = q * DMatrix::from_diagonal(&root.map(|r| 1.0 / r)) * q.transpose();
                Whitening { s, s_inv }
            }
        }
    }
}

/// C + DAMPING·mean(diag C)·I.
pub fn damped(c: &DMatrix<f64>) -> DMatrix<f64> {
    let n = c.nrows();
    let mean = c.diagonal().sum() / n as f64;
    c + DMatrix::identity(n, n) * (DAMPING * mean)
}

/// Every component of W's decomposition under a whitening, strongest first: truncating to the
/// first r gives the rank-r factors.
pub struct Spectrum {
    /// σ_1 ≥ σ_2 ≥ ...
    pub sigma: Vec<f64>,
    /// [hidden, m]: column i is S⁻¹·u_i·σ_i.
    pub a: DMatrix<f64>,
    /// [m, width]: row i is v_iᵀ.
    pub b: DMatrix<f64>,
}

impl Spectrum {
    pub fn new(w: &DMatrix<f64>, white: &Whitening) -> Spectrum {
        let svd = (&white.s * w).svd(true, true);
        let (u, vt) = (svd.u.expect("u asked for"), svd.v_t.expect("vᵀ asked for"));
        let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
        order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
        let sigma: Vec<f64> = order.iter().map(|&i| svd.singular_values[i]).collect();
        let us = DMatrix::from_fn(u.nrows(), order.len(), |r, c| u[(r, order[c])] * sigma[c]);
        let a = &white.s_inv * us;
        let b = DMatrix::from_fn(order.len(), vt.ncols(), |r, c| vt[(order[r], c)]);
        Spectrum { sigma, a, b }
    }

    /// Most rank this projection can have.
    pub fn full_rank(&self) -> usize {
        self.sigma.len()
    }

    /// The rank-r factors (W_a [hidden, r], W_b [r, width]).
    pub fn factors(&self, r: usize) -> (DMatrix<f64>, DMatrix<f64>) {
        (self.a.columns(0, r).into_owned(), self.b.rows(0, r).into_owned())
    }

    /// Σ_{i>r} σ_i²: the whitened error of the rank-r factors.
    pub fn tail_energy(&self, r: usize) -> f64 {
        self.sigma[r.min(self.sigma.len())..].iter().map(|s| s * s).sum()
    }

    pub fn energy(&self) -> f64 {
        self.tail_energy(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, cols: usize, rng: &mut rand::rngs::StdRng) -> DMatrix<f64> {
        DMatrix::from_fn(rows, cols, |_, _| rng.random_range(-1.0..1.0))
    }

    /// The error of real activations through the rank-r factors equals the predicted tail
    /// energy, measured directly as ‖S(W − W_aW_b)‖² = tr(Eᵀ·C_damped·E) for CARE.
    #[test]
    fn activation_error_equals_tail_energy() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (hidden, width, tokens) = (24, 12, 200);
        // Correlated activations: a random mixing of independent channels.
        let x = random(tokens, hidden, &mut rng) * random(hidden, hidden, &mut rng);
        let c = x.transpose() * &x;
        let w = random(hidden, width, &mut rng);
        let white = Whitening::new(Method::Care, &c, tokens);
        let spec = Spectrum::new(&w, &white);
        let cd = damped(&c);
        for r in [1, 4, 8, 12] {
            let (a, b) = spec.factors(r);
            let e = &w - a * b;
            let measured = (e.transpose() * &cd * &e).trace();
            let predicted = spec.tail_energy(r);
            assert!(
                (measured - predicted).abs() <= 1e-8 * spec.energy().max(1.0),
                "rank {r}: measured {measured}, predicted {predicted}"
            );
        }
        // Full rank reproduces W.
        let (a, b) = spec.factors(width);
        assert!((&w - a * b).abs().max() < 1e-10);
    }

    /// CARE's rank-r factors beat plain SVD's on the activations they were fitted to (what the
    /// method is for), and plain SVD beats CARE on the unweighted error (what it optimises).
    #[test]
    fn each_method_wins_its_own_objective() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (hidden, width, tokens) = (32, 16, 400);
        let mut x = random(tokens, hidden, &mut rng);
        for i in 0..hidden {
            x.column_mut(i).scale_mut(1.0 + 4.0 * (i % 5) as f64); // uneven channel scales
        }
        let c = x.transpose() * &x;
        let w = random(hidden, width, &mut rng);
        let err = |m: Method| {
            let (a, b) = Spectrum::new(&w, &Whitening::new(m, &c, tokens)).factors(6);
            let e = &w - a * b;
            ((&x * &e).norm_squared(), e.norm_squared())
        };
        let (care_x, care_w) = err(Method::Care);
        let (svd_x, svd_w) = err(Method::Svd);
        assert!(care_x < svd_x, "activation error: care {care_x} vs svd {svd_x}");
        assert!(svd_w < care_w, "weight error: svd {svd_w} vs care {care_w}");
    }
}
