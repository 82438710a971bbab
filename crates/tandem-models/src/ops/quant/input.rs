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

/// Rounding by adding 1.5·2²³: the sum's low mantissa bits are then the integer, rounded half to
/// even (exact for |v| < 2²²; no float-to-int conversion, which does not vectorize).
const MAGIC: f32 = 12_582_912.0;

/// Quantizes x into `out` (as many blocks as x has), with AVX-512 or the AVX2 build where the
/// CPU has them (the same bits on every path).
fn quantize_blocks(x: &[f32], out: Blocks<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { quantize_avx512(x, out) };
    }
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

/// `quantize` with a block in two 16-lane registers: the compiled loop above kept its maximum
/// and sums in scalar compare chains and shuffles (~3% of a decode step on the engine thread,
/// the other thread waiting). The same operations on every value: |x| folded with
/// `max(a, m)` = `a > m ? a : m` from zero (NaN skipped, as above), one IEEE division each for d
/// and 1 / d, a multiply then an add (no fused form) for the rounding, the low byte of each
/// integer (`vpmovdb`, as `as i8`), and wrapping integer sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_avx512(x: &[f32], out: Blocks<'_>) {
    use std::arch::x86_64::*;
    let abs = |v: __m512| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MAX)));
    for (b, xs) in x.chunks_exact(QK).enumerate() {
        let (x0, x1) = (_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xs.as_ptr().add(16)));
        // vmaxps returns its second operand unless the first is greater: NaN never wins.
        let m = _mm512_max_ps(abs(x1), _mm512_max_ps(abs(x0), _mm512_setzero_ps()));
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let round = |v: __m512| {
            let t = _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(inv)), _mm512_set1_ps(MAGIC));
            _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(MAGIC.to_bits() as i32))
        };
        let (r0, r1) = (round(x0), round(x1));
        let q = out.q[b * QK..][..QK].as_mut_ptr();
        _mm_storeu_si128(q as *mut __m128i, _mm512_cvtepi32_epi8(r0));
        _mm_storeu_si128(q.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(r1));
        let sums = [_mm512_reduce_add_epi32(r0), _mm512_reduce_add_epi32(r1)];
        out.d[b] = d;
        out.qsum[2 * b..2 * b + 2].copy_from_slice(&sums);
        out.dsum[b] = d * sums[0].wrapping_add(sums[1]) as f32;
    }
}

/// Quantizes x block by block into `out`, written so that it vectorizes.
#[inline(always)]
fn quantize(x: &[f32], out: Blocks<'_>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field `f` writes for x (as `QInput` holds them), floats as bits.
    fn quantized(x: &[f32], f: unsafe fn(&[f32], Blocks<'_>)) -> (Vec<i8>, Vec<u32>, Vec<u32>, Vec<i32>) {
        let blocks = x.len() / QK;
        let (mut q, mut d, mut dsum, mut qsum) =
            (vec![0; x.len()], vec![0.0; blocks], vec![0.0; blocks], vec![0; 2 * blocks]);
        // SAFETY: called only where the CPU has what `f` needs.
        unsafe { f(x, Blocks { q: &mut q, d: &mut d, dsum: &mut dsum, qsum: &mut qsum }) };
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        (q, bits(&d), bits(&dsum), qsum)
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_avx512_quantizer_gives_the_portable_bits() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: nothing to compare");
            return;
        }
        // Blocks of many magnitudes and signs, ties of the rounding, zeros, -0.0, subnormals, a
        // NaN (skipped by the maximum) and an infinity (d = inf, inverse 0).
        let mut x = Vec::new();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for block in 0..64 {
            let scale = 10f32.powi(block % 13 - 6);
            for i in 0..QK {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                x.push(match block {
                    0 => 0.0,
                    1 => -0.0,
                    2 => (i as f32 - 16.0) * 0.5,
                    3 => f32::from_bits(1 + i as u32),
                    4 if i == 5 => f32::NAN,
                    5 if i == 9 => f32::INFINITY,
                    _ => u * scale,
                });
            }
        }
        let portable: unsafe fn(&[f32], Blocks<'_>) = |x, b| quantize(x, b);
        assert_eq!(quantized(&x, quantize_avx512), quantized(&x, portable));
    }
}
