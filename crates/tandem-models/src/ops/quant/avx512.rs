//! The AVX-512 VNNI kernel: one `dpbusd` per group of four values of all 16 rows of a tile.
#![allow(clippy::needless_range_loop)] // fixed-size register arrays read best indexed
use super::*;
use std::arch::x86_64::*;

/// The eight groups of four values of a tile slice, one 64-byte vector each (16 rows × 4).
#[inline(always)]
unsafe fn values(f: QFormat, q: *const u8) -> [__m512i; 8] {
    let load = |at: usize| _mm512_loadu_si512(q.add(at) as *const _);
    if f.bits() == 8 {
        // A loop, not std::array::from_fn: its closure is compiled without the kernel's target
        // features, and where it is not inlined each load becomes a call (see kernels/panels.rs).
        let mut u = [_mm512_setzero_si512(); 8];
        for g in 0..8 {
            u[g] = load(64 * g);
        }
        return u;
    }
    let low4 = _mm512_set1_epi8(0xF);
    let mut u = [_mm512_setzero_si512(); 8];
    for j in 0..4 {
        let v = load(64 * j);
        u[j] = _mm512_and_si512(v, low4);
        u[j + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
    }
    // High bits: a 32-bit rotation moves bit `from` of each byte to bit 4 of the same byte.
    for g in 0..8 {
        if let Some((plane, from, mask)) = f.high_bits(g) {
            let moved = _mm512_rolv_epi32(load(plane), _mm512_set1_epi32(((36 - from) % 32) as i32));
            // u | (moved & mask)
            u[g] = _mm512_ternarylogic_epi32::<0xF8>(u[g], moved, _mm512_set1_epi8(mask as i8));
        }
    }
    u
}

/// Sixteen f16 at p as f32.
#[inline(always)]
unsafe fn halves_at(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
}

/// Sixteen bytes at p as f32 (signed or not).
#[inline(always)]
unsafe fn bytes_at(p: *const u8, signed: bool) -> __m512 {
    let v = _mm_loadu_si128(p as *const __m128i);
    _mm512_cvtepi32_ps(if signed { _mm512_cvtepi8_epi32(v) } else { _mm512_cvtepu8_epi32(v) })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
pub unsafe fn tile_dot(f: QFormat, tile: &[u8], x: &QInput, first: usize, out: &mut [[f32; TILE]]) {
    by_format_and_rows!(kernel, f, out, tile.as_ptr(), x, first)
}

#[inline(always)]
unsafe fn kernel<const F: usize, const C: usize>(tile: *const u8, x: &QInput, first: usize, out: &mut [[f32; TILE]]) {
    let f = FORMATS[F];
    let inputs = Inputs::<C>::new(x, first);
    let mut acc = [_mm512_setzero_ps(); C];
    let (mut d, mut second) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for s in 0..x.k / QK {
        let (header, quants, params) = f.slice_at(s);
        if s % f.super_slices() == 0 {
            d = halves_at(tile.add(header));
            if f.zero().is_none() {
                second = halves_at(tile.add(header + 2 * TILE));
            }
        }
        prefetch_ahead(f, tile.add(quants));
        let u = values(f, tile.add(quants));
        // Per row: the scale of each half and the offset (as `lane_params`).
        let (s0, s1, b) = match f {
            QFormat::Q4K | QFormat::Q5K => {
                let sc = _mm512_mul_ps(d, bytes_at(tile.add(params), false));
                let neg_min = _mm512_mul_ps(second, _mm512_set1_ps(-1.0));
                (sc, sc, _mm512_mul_ps(neg_min, bytes_at(tile.add(params + TILE), false)))
            }
            QFormat::Q6K => (
                _mm512_mul_ps(d, bytes_at(tile.add(params), true)),
                _mm512_mul_ps(d, bytes_at(tile.add(params + TILE), true)),
                second,
            ),
            _ => (d, d, second),
        };
        // Integer sums, started with the zero point's −z·Σq (exact in any order), the inputs
        // interleaved so that consecutive dot products do not wait on each other. Q6_K's halves
        // are summed one after the other; other formats use one chain per input when enough
        // inputs hide its latency, two (added) otherwise. Four inputs do not: a chain is 8
        // dependent dpbusd (~5 cycles each), 40 cycles a slice for 32 instructions, and a 4-row
        // forward of SmolLM2 Q4_1 took longer than a 5-row one; with two chains at 4 rows, 8.55
        // -> 7.96 ms (mean of 8 alternated runs on a Xeon, docs/performance.md, 2026-12-07).
        let bcast =
            |c: usize, g: usize| _mm512_set1_epi32((inputs.q[c].add(s * QK) as *const i32).add(g).read_unaligned());
        let qs = |c: usize, h: usize| *inputs.qsum[c].add(2 * s + h);
        let dx = |c: usize| _mm512_set1_ps(*inputs.d[c].add(s));
        let mut lo = [_mm512_setzero_si512(); C];
        if f.halves() {
            let z = f.zero().unwrap_or(0);
            for (h, sh) in [(0, s0), (1, s1)] {
                unrolled!(c in C => { lo[c] = _mm512_set1_epi32(-z * qs(c, h)); });
                for g in 4 * h..4 * h + 4 {
                    unrolled!(c in C => { lo[c] = _mm512_dpbusd_epi32(lo[c], u[g], bcast(c, g)); });
                }
                unrolled!(c in C => {
                    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[c]), _mm512_mul_ps(sh, dx(c)), acc[c]);
                });
            }
            continue;
        }
        let z = f.zero().unwrap_or(0);
        unrolled!(c in C => { lo[c] = _mm512_set1_epi32(-z * (qs(c, 0) + qs(c, 1))); });
        if C < 5 {
            let mut hi = [_mm512_setzero_si512(); C];
            for g in 0..4 {
                unrolled!(c in C => {
                    lo[c] = _mm512_dpbusd_epi32(lo[c], u[g], bcast(c, g));
                    hi[c] = _mm512_dpbusd_epi32(hi[c], u[g + 4], bcast(c, g + 4));
                });
            }
            unrolled!(c in C => { lo[c] = _mm512_add_epi32(lo[c], hi[c]); });
        } else {
            for g in 0..8 {
                unrolled!(c in C => { lo[c] = _mm512_dpbusd_epi32(lo[c], u[g], bcast(c, g)); });
            }
        }
        unrolled!(c in C => {
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[c]), _mm512_mul_ps(s0, dx(c)), acc[c]);
            if f.zero().is_none() {
                acc[c] = _mm512_fmadd_ps(b, _mm512_set1_ps(*inputs.dsum[c].add(s)), acc[c]);
            }
        });
    }
    for c in 0..C {
        _mm512_storeu_ps(out[c].as_mut_ptr(), acc[c]);
    }
}
