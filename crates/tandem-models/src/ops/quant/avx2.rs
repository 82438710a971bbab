//! The AVX2 kernel: `maddubs` + `madd` on 8 rows of a tile at a time (the two halves in turn).
#![allow(clippy::needless_range_loop)] // fixed-size register arrays read best indexed
use super::*;
use std::arch::x86_64::*;

/// Rows 8h..8h+8 of the eight groups of a tile slice, one 32-byte vector each (8 rows × 4).
#[inline(always)]
unsafe fn values(f: QFormat, q: *const u8, h: usize) -> [__m256i; 8] {
    let load = |at: usize| _mm256_loadu_si256(q.add(at + 32 * h) as *const __m256i);
    if f.bits() == 8 {
        // A loop, not std::array::from_fn: its closure is compiled without the kernel's target
        // features, and where it is not inlined each load becomes a call (see kernels/panels.rs).
        let mut u = [_mm256_setzero_si256(); 8];
        for g in 0..8 {
            u[g] = load(64 * g);
        }
        return u;
    }
    let low4 = _mm256_set1_epi8(0xF);
    let mut u = [_mm256_setzero_si256(); 8];
    for j in 0..4 {
        let v = load(64 * j);
        u[j] = _mm256_and_si256(v, low4);
        u[j + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4);
    }
    // High bits: a shift within 32-bit lanes moves bit `from` of each byte to bit 4.
    for g in 0..8 {
        if let Some((plane, from, mask)) = f.high_bits(g) {
            let (plane, from) = (load(plane), from as i32);
            let moved = if from <= 4 {
                _mm256_sllv_epi32(plane, _mm256_set1_epi32(4 - from))
            } else {
                _mm256_srlv_epi32(plane, _mm256_set1_epi32(from - 4))
            };
            u[g] = _mm256_or_si256(u[g], _mm256_and_si256(moved, _mm256_set1_epi8(mask as i8)));
        }
    }
    u
}

#[inline(always)]
unsafe fn halves_at(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

#[inline(always)]
unsafe fn bytes_at(p: *const u8, signed: bool) -> __m256 {
    let v = _mm_loadl_epi64(p as *const __m128i);
    _mm256_cvtepi32_ps(if signed { _mm256_cvtepi8_epi32(v) } else { _mm256_cvtepu8_epi32(v) })
}

/// Σ over groups `gs` of u·q per row (exact). `maddubs` sums two products into 16 bits, so
/// groups are added in 16 bits only as far as they cannot overflow: four groups of values
/// below 32 (|q| ≤ 127: 4·2·31·127 < 2¹⁵), two of 6-bit values; Q8_0 goes through signs.
#[inline(always)]
unsafe fn dot(f: QFormat, u: &[__m256i; 8], q: *const i32, gs: std::ops::Range<usize>) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let bcast = |g: usize| _mm256_set1_epi32(q.add(g).read_unaligned());
    let mut total = _mm256_setzero_si256();
    if f.bits() == 8 {
        for g in gs {
            // v = u − 128 as i8; |v|·sign(q, v) keeps each pair's sum within 16 bits.
            let v = _mm256_xor_si256(u[g], _mm256_set1_epi8(-128));
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(bcast(g), v));
            total = _mm256_add_epi32(total, _mm256_madd_epi16(p, ones));
        }
        return total;
    }
    let run = if f.bits() <= 5 { 4 } else { 2 };
    let mut g = gs.start;
    while g < gs.end {
        let mut p = _mm256_maddubs_epi16(u[g], bcast(g));
        for h in g + 1..(g + run).min(gs.end) {
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(u[h], bcast(h)));
        }
        total = _mm256_add_epi32(total, _mm256_madd_epi16(p, ones));
        g += run;
    }
    total
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_dot(f: QFormat, tile: &[u8], x: &QInput, first: usize, out: &mut [[f32; TILE]]) {
    by_format_and_rows!(kernel, f, out, tile.as_ptr(), x, first)
}

#[inline(always)]
unsafe fn kernel<const F: usize, const C: usize>(tile: *const u8, x: &QInput, first: usize, out: &mut [[f32; TILE]]) {
    let f = FORMATS[F];
    let inputs = Inputs::<C>::new(x, first);
    // The tile's two halves of eight rows, one after the other.
    for h in 0..2 {
        let mut acc = [_mm256_setzero_ps(); C];
        let (mut d, mut second) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for s in 0..x.k / QK {
            let (header, quants, params) = f.slice_at(s);
            if s % f.super_slices() == 0 {
                d = halves_at(tile.add(header + 16 * h));
                if f.zero().is_none() {
                    second = halves_at(tile.add(header + 2 * TILE + 16 * h));
                }
            }
            if h == 0 {
                prefetch_ahead(f, tile.add(quants));
            }
            let u = values(f, tile.add(quants), h);
            let (s0, s1, b) = match f {
                QFormat::Q4K | QFormat::Q5K => {
                    let sc = _mm256_mul_ps(d, bytes_at(tile.add(params + 8 * h), false));
                    let neg_min = _mm256_mul_ps(second, _mm256_set1_ps(-1.0));
                    (sc, sc, _mm256_mul_ps(neg_min, bytes_at(tile.add(params + TILE + 8 * h), false)))
                }
                QFormat::Q6K => (
                    _mm256_mul_ps(d, bytes_at(tile.add(params + 8 * h), true)),
                    _mm256_mul_ps(d, bytes_at(tile.add(params + TILE + 8 * h), true)),
                    second,
                ),
                _ => (d, d, second),
            };
            unrolled!(c in C => {
                let q = inputs.q[c].add(s * QK) as *const i32;
                let dx = _mm256_set1_ps(*inputs.d[c].add(s));
                let qs = [*inputs.qsum[c].add(2 * s), *inputs.qsum[c].add(2 * s + 1)];
                // Q8_0's products are Σv·q = Σu·q − 128·Σq already.
                let z = |z: i32| if f.bits() == 8 { 0 } else { z };
                match f.zero() {
                    Some(zp) if f.halves() => {
                        let i0 = _mm256_sub_epi32(dot(f, &u, q, 0..4), _mm256_set1_epi32(z(zp) * qs[0]));
                        let i1 = _mm256_sub_epi32(dot(f, &u, q, 4..8), _mm256_set1_epi32(z(zp) * qs[1]));
                        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(s0, dx), acc[c]);
                        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(s1, dx), acc[c]);
                    }
                    Some(zp) => {
                        let i = _mm256_sub_epi32(dot(f, &u, q, 0..8), _mm256_set1_epi32(z(zp) * (qs[0] + qs[1])));
                        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(s0, dx), acc[c]);
                    }
                    None => {
                        let i = dot(f, &u, q, 0..8);
                        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(s0, dx), acc[c]);
                        acc[c] = _mm256_fmadd_ps(b, _mm256_set1_ps(*inputs.dsum[c].add(s)), acc[c]);
                    }
                }
            });
        }
        for c in 0..C {
            _mm256_storeu_ps(out[c].as_mut_ptr().add(8 * h), acc[c]);
        }
    }
}
