//! Per-layer ranks for an average rank r̄ over L layers (r̄·L in all, per K and per V).
use crate::factor::Spectrum;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// r̄ in every layer (CARE-U).
    Uniform,
    /// CARE-E: every layer starts at r̄/2; each further rank goes to the layer whose next singular
    /// value removes the largest share of its remaining energy (σ²_{r+1} / Σ_{i>r} σ²_i), within
    /// [r̄/2, 2r̄] (and the layer's full rank), until r̄·L are handed out. The paper's rule; its
    /// reference code also weighs early layers more, which the paper does not describe.
    Energy,
    /// `Energy` with the reference code's two weights: each score divided by √(r/r_min) (a
    /// layer's share grows as its tail shrinks, so without it a layer that got ranks tends to
    /// take every rank up to its cap) and multiplied by √((L−l)/((L+1)/2)) (earlier layers first).
    EnergyWeighted,
}

impl Allocation {
    pub fn name(self) -> &'static str {
        match self {
            Allocation::Uniform => "uniform",
            Allocation::Energy => "energy",
            Allocation::EnergyWeighted => "energy-weighted",
        }
    }
}

/// Ranks per layer for average `rank` (clamped to each layer's full rank).
pub fn ranks(spectra: &[&Spectrum], rank: usize, allocation: Allocation) -> Vec<usize> {
    match allocation {
        Allocation::Uniform => spectra.iter().map(|s| rank.min(s.full_rank())).collect(),
        Allocation::Energy => energy(spectra, rank, false),
        Allocation::EnergyWeighted => energy(spectra, rank, true),
    }
}

fn energy(spectra: &[&Spectrum], rank: usize, weighted: bool) -> Vec<usize> {
    let floor = (rank / 2).max(1);
    let mut r: Vec<usize> = spectra.iter().map(|s| floor.min(s.full_rank())).collect();
    let cap = |s: &Spectrum| (2 * rank).min(s.full_rank());
    let budget = rank * spectra.len();
    let layers = spectra.len() as f64;
    let score = |l: usize, r: usize| {
        let s = spectra[l];
        let rest = s.tail_energy(r);
        let share = if rest <= 0.0 { 0.0 } else { s.sigma[r] * s.sigma[r] / rest };
        match weighted {
            false => share,
            true => share / (r as f64 / floor as f64).sqrt() * ((layers - l as f64) / ((layers + 1.0) / 2.0)).sqrt(),
        }
    };
    while r.iter().sum::<usize>() < budget {
        let best = (0..spectra.len())
            .filter(|&l| r[l] < cap(spectra[l]))
            .max_by(|&i, &j| score(i, r[i]).total_cmp(&score(j, r[j])).then(j.cmp(&i)));
        match best {
            Some(l) => r[l] += 1,
            None => break, // every layer at its cap
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::DMatrix;

    fn spectrum(sigma: &[f64]) -> Spectrum {
        let m = sigma.len();
        Spectrum { sigma: sigma.to_vec(), a: DMatrix::zeros(1, m), b: DMatrix::zeros(m, 1) }
    }

    #[test]
    fn energy_gives_ranks_where_they_remove_most_and_keeps_the_total_and_bounds() {
        // Layer 0's energy is in a few components; layer 1's is spread evenly.
        let steep: Vec<f64> = (0..16).map(|i| 0.5f64.powi(i)).collect();
        let flat = vec![1.0; 16];
        let (a, b) = (spectrum(&steep), spectrum(&flat));
        let r = ranks(&[&a, &b], 4, Allocation::Energy);
        assert_eq!(r.iter().sum::<usize>(), 8);
        assert!(r.iter().all(|&x| (2..=8).contains(&x)), "{r:?}");
        // A steep layer's next component removes ~3/4 of what is left; a flat one's 1/(16-r).
        assert_eq!(r, vec![6, 2]);
        assert_eq!(ranks(&[&a, &b], 4, Allocation::Uniform), vec![4, 4]);
    }
}
