//! Input rows quantized to 8 bits per 32 values, the form every kernel multiplies.
use super::QK;
use std::sync::Mutex;

/// Input rows quantized to 8 bits per 32 values: q = round(x / d) (ties to even), d = max|x| / 127.
pub struct QInput {
    pub(super) k: usize,
    pub(super) q: Vec<i8>,
    /// One scale per 32 values.
    pub(super) d: Vec<f32>,
    /// d·Σq per 32 values (the offset terms' input sums).
    pub(super) dsum: Vec<f32>,
    /// Σq per 16 values (the zero points' integer terms).
    pub(super) qsum: Vec<i32>,
}

impl QInput {
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k);
        assert_eq!(k % QK, 0);
        let blocks = m * k / QK;
        let mut out =
            QInput { k, q: vec![0; m * k], d: vec![0.0; blocks], dsum: vec![0.0; blocks], qsum: vec![0; 2 * blocks] };
        // Blocks are independent: a prefill's rows are quantized by the team in runs of 16
        // (serially they were ~5% of a 100-token prefill, the other thread waiting); fewer rows
        // are one run, quantized here.
        const ROWS: usize = 16;
        let per = if m < 2 * ROWS { blocks } else { ROWS * k / QK }.max(1);
        let parts: Vec<Mutex<(&[f32], Blocks<'_>)>> =
            out.split(per).into_iter().zip(x.chunks(per * QK)).map(|(b, x)| Mutex::new((x, b))).collect();
        crate::ops::team::for_each(parts.len(), &|i| {
            let mut part = parts[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let (x, blocks) = &mut *part;
            quantize_blocks(x, blocks.reborrow());
        });
        drop(parts);
        out
    }

    /// Every field cut into runs of `per` blocks.
    fn split(&mut self, per: usize) -> Vec<Blocks<'_>> {
        let q = self.q.chunks_mut(per * QK);
        let d = self.d.chunks_mut(per);
        let dsum = self.dsum.chunks_mut(per);
        let qsum = self.qsum.chunks_mut(2 * per);
        q.zip(d).zip(dsum).zip(qsum).map(|(((q, d), dsum), qsum)| Blocks { q, d, dsum, qsum }).collect()
    }
}

/// Some consecutive blocks of a [`QInput`], being written.
struct Blocks<'a> {
    q: &'a mut [i8],
    d: &'a mut [f32],
    dsum: &'a mut [f32],
    qsum: &'a mut [i32],
}

impl Blocks<'_> {
    fn reborrow(&mut self) -> Blocks<'_> {
        Blocks { q: self.q, d: self.d, dsum: self.dsum, qsum: self.qsum }
    }
}

/// Quantizes x into `out` (as many blocks as x has), with the AVX2 build where the CPU has it.
fn quantize_blocks(x: &[f32], out: Blocks<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { quantize_avx2(x, out) };
    }
    quantize(x, out)
}

/// The same code compiled for AVX2 (IEEE operations without contraction: the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(x: &[f32], out: Blocks<'_>) {
    quantize(x, out)
}

/// Quantizes x block by block into `out`, written so that it vectorizes.
#[inline(always)]
fn quantize(x: &[f32], out: Blocks<'_>) {
    // Rounding by adding 1.5·2²³: the sum's low mantissa bits are then the integer, rounded half
    // to even (exact for |v| < 2²²; no float-to-int conversion, which does not vectorize).
    const MAGIC: f32 = 12_582_912.0;
    for (b, xs) in x.chunks_exact(QK).enumerate() {
        let xs: &[f32; QK] = xs.try_into().expect("32 values");
        // max |x| in eight lanes, then across them (max is exact: any order gives the same value;
        // NaN never compares greater, so it is skipped in every order).
        let mut lanes = [0f32; 8];
        for c in xs.chunks_exact(8) {
            for j in 0..8 {
                let a = c[j].abs();
                lanes[j] = if a > lanes[j] { a } else { lanes[j] };
            }
        }
        let amax = lanes.iter().fold(0f32, |m, &a| if a > m { a } else { m });
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut r = [0i32; QK];
        for (ri, &v) in r.iter_mut().zip(xs) {
            *ri = (v * inv + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32;
        }
        for (qi, &ri) in out.q[b * QK..][..QK].iter_mut().zip(&r) {
            *qi = ri as i8;
        }
        let sums = [r[..16].iter().sum::<i32>(), r[16..].iter().sum::<i32>()];
        out.d[b] = d;
        out.qsum[2 * b..2 * b + 2].copy_from_slice(&sums);
        out.dsum[b] = d * (sums[0] + sums[1]) as f32;
    }
}

/// Pointers to the input rows a tile is multiplied with.
#[cfg(target_arch = "x86_64")]
pub(super) struct Inputs<const C: usize> {
    pub(super) q: [*const i8; C],
    pub(super) d: [*const f32; C],
    pub(super) dsum: [*const f32; C],
    pub(super) qsum: [*const i32; C],
}

#[cfg(target_arch = "x86_64")]
impl<const C: usize> Inputs<C> {
    pub(super) fn new(x: &QInput, first: usize) -> Self {
        let slices = x.k / QK;
        // SAFETY (of the reads through these): rows first..first + C exist in x.
        Inputs {
            q: std::array::from_fn(|c| x.q[(first + c) * x.k..].as_ptr()),
            d: std::array::from_fn(|c| x.d[(first + c) * slices..].as_ptr()),
            dsum: std::array::from_fn(|c| x.dsum[(first + c) * slices..].as_ptr()),
            qsum: std::array::from_fn(|c| x.qsum[2 * (first + c) * slices..].as_ptr()),
        }
    }
}
