//! Products with GGUF block-quantized weights, read in place (never dequantized to memory).
//!
//! Each input row is quantized to 8 bits per block of 32 values (one f32 scale per block, as
//! llama.cpp does for its integer dot products), then every 32-value slice of a weight row is
//! multiplied with it in integers: exact, so the only rounding is the float accumulation of the
//! per-slice sums, which happens in the same order whatever else is in the batch. The AVX2 path
//! (`maddubs`) and the AVX-512 VNNI path (`dpbusd`) compute the same integers, and the portable
//! path mirrors their eight-lane float accumulation, so all three give the same bits.
//!
//! Like the dense streaming matmul, a weight row is read once for a group of up to `GROUP` input
//! rows (its 32-value slices are unpacked once and multiplied with each input), so verifying k
//! drafted tokens costs little more than decoding one.
//!
//! A weight slice of 32 values is described by unsigned integers `u` (0..=63; Q8_0's are signed),
//! a scale per half (`s`: Q6_K scales each 16 values, all other formats the whole slice) and an
//! offset per half (`b`): w = s·u + b. With the input slice x ≈ dx·q, the slice's dot product is
//! Σ s·dx·(u·q) + b·dx·Σq; the second term uses each input half's precomputed dx·Σq.
use half::f16;
use rayon::prelude::*;

/// Values per input quantization block (and per weight slice).
pub const QK: usize = 32;
/// Input rows multiplied with a weight row per pass over it.
const GROUP: usize = 8;

/// Every format, in the order the SIMD kernels are instantiated.
const FORMATS: [QFormat; 8] = [
    QFormat::Q4_0,
    QFormat::Q4_1,
    QFormat::Q5_0,
    QFormat::Q5_1,
    QFormat::Q8_0,
    QFormat::Q4K,
    QFormat::Q5K,
    QFormat::Q6K,
];

/// The GGUF block formats with kernels here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QFormat {
    pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match t {
            G::Q4_0 => QFormat::Q4_0,
            G::Q4_1 => QFormat::Q4_1,
            G::Q5_0 => QFormat::Q5_0,
            G::Q5_1 => QFormat::Q5_1,
            G::Q8_0 => QFormat::Q8_0,
            G::Q4K => QFormat::Q4K,
            G::Q5K => QFormat::Q5K,
            G::Q6K => QFormat::Q6K,
            _ => return None,
        })
    }

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            QFormat::Q4K | QFormat::Q5K | QFormat::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per block (ggml's layouts).
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q5_0 => 22,
            QFormat::Q5_1 => 24,
            QFormat::Q8_0 => 34,
            QFormat::Q4K => 144,
            QFormat::Q5K => 176,
            QFormat::Q6K => 210,
        }
    }

    /// Q8_0 holds signed values; the others unsigned ones with an offset.
    fn signed(self) -> bool {
        self == QFormat::Q8_0
    }
}

/// A block-quantized weight matrix [rows, cols]: one or more stacked parts (projections of the
/// same input, such as q, k and v, each in its own format), rows stored in GGUF blocks.
pub struct QWeight {
    pub rows: usize,
    pub cols: usize,
    parts: Vec<Part>,
}

struct Part {
    format: QFormat,
    /// The first row of the matrix that this part holds.
    first: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

/// One weight row: its format and blocks.
#[derive(Clone, Copy)]
struct QRow<'a> {
    format: QFormat,
    data: &'a [u8],
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QWeight({:?}, {}x{})", self.formats(), self.rows, self.cols)
    }
}

impl QWeight {
    pub fn new(format: QFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if !cols.is_multiple_of(format.block_len()) {
            return Err(format!("{format:?} rows need a multiple of {} values, got {cols}", format.block_len()));
        }
        let row_bytes = cols / format.block_len() * format.block_bytes();
        if data.len() != rows * row_bytes {
            return Err(format!("{format:?} [{rows}, {cols}] needs {} bytes, got {}", rows * row_bytes, data.len()));
        }
        Ok(QWeight { rows, cols, parts: vec![Part { format, first: 0, row_bytes, data }] })
    }

    /// Matrices over the same input, one above the other: one product computes all of them.
    pub fn stack(matrices: Vec<QWeight>) -> Result<Self, String> {
        let cols = matrices.first().map_or(0, |m| m.cols);
        let mut out = QWeight { rows: 0, cols, parts: Vec::new() };
        for m in matrices {
            if m.cols != cols {
                return Err(format!("stacked weights take inputs of {cols} and {} values", m.cols));
            }
            for mut p in m.parts {
                p.first += out.rows;
                out.parts.push(p);
            }
            out.rows += m.rows;
        }
        Ok(out)
    }

    /// The parts' formats, top to bottom.
    pub fn formats(&self) -> Vec<QFormat> {
        self.parts.iter().map(|p| p.format).collect()
    }

    /// Bytes held (what a product streams).
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.data.len()).sum()
    }

    fn row(&self, r: usize) -> QRow<'_> {
        let p = self.parts.iter().rev().find(|p| p.first <= r).expect("row within the matrix");
        let at = (r - p.first) * p.row_bytes;
        QRow { format: p.format, data: &p.data[at..at + p.row_bytes] }
    }

    /// Row `r` as f32 (embedding lookups, unembedding rows, the generic path).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        let QRow { format: f, data } = self.row(r);
        for (b, block) in data.chunks_exact(f.block_bytes()).enumerate() {
            for sub in 0..f.block_len() / QK {
                let p = slice_params(f, block, sub);
                let u = values(f, block, sub);
                let o = &mut out[b * f.block_len() + sub * QK..][..QK];
                for (e, v) in o.iter_mut().enumerate() {
                    let (s, off) = (p.s[e / 16], p.b[e / 16]);
                    let q = if f.signed() { u[e] as i8 as f32 } else { u[e] as f32 };
                    *v = s * q + off;
                }
            }
        }
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, o);
        }
        out
    }
}

// ---------------------------------------------------------------- block layouts

/// Scale and offset of each half of slice `sub` of a block: w = s·u + b.
#[derive(Clone, Copy)]
struct SliceParams {
    s: [f32; 2],
    b: [f32; 2],
}

fn half_at(block: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([block[at], block[at + 1]])).to_f32()
}

/// Q4_K / Q5_K: the 6-bit scale and min of slice j from the 12 packed bytes.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn slice_params(f: QFormat, block: &[u8], sub: usize) -> SliceParams {
    slice_params_with(f, block, sub, |at| half_at(block, at))
}

/// `slice_params` with the half-float conversion given (the SIMD paths use the hardware's).
#[inline(always)]
fn slice_params_with(f: QFormat, block: &[u8], sub: usize, half_at: impl Fn(usize) -> f32) -> SliceParams {
    let both = |s: f32, b: f32| SliceParams { s: [s, s], b: [b, b] };
    match f {
        QFormat::Q4_0 | QFormat::Q5_0 | QFormat::Q8_0 => {
            let d = half_at(0);
            let zero = match f {
                QFormat::Q4_0 => 8.0,
                QFormat::Q5_0 => 16.0,
                _ => 0.0,
            };
            both(d, -zero * d)
        }
        QFormat::Q4_1 | QFormat::Q5_1 => both(half_at(0), half_at(2)),
        QFormat::Q4K | QFormat::Q5K => {
            let (sc, m) = scale_min_k4(sub, &block[4..16]);
            both(half_at(0) * sc as f32, -half_at(2) * m as f32)
        }
        QFormat::Q6K => {
            // Slice sub is quarter sub % 4 of 128-value chunk sub / 4; its halves have their own scales.
            let d = half_at(208);
            let first = 192 + 8 * (sub / 4) + 2 * (sub % 4);
            let (s0, s1) = (d * block[first] as i8 as f32, d * block[first + 1] as i8 as f32);
            SliceParams { s: [s0, s1], b: [-32.0 * s0, -32.0 * s1] }
        }
    }
}

/// The 32 unsigned (Q8_0: signed) integers of slice `sub`.
fn values(f: QFormat, block: &[u8], sub: usize) -> [u8; 32] {
    let mut u = [0u8; 32];
    match f {
        QFormat::Q4_0 | QFormat::Q4_1 => {
            let qs = &block[if f == QFormat::Q4_0 { 2 } else { 4 }..][..16];
            for j in 0..16 {
                u[j] = qs[j] & 0xF;
                u[j + 16] = qs[j] >> 4;
            }
        }
        QFormat::Q5_0 | QFormat::Q5_1 => {
            let at = if f == QFormat::Q5_0 { 2 } else { 4 };
            let qh = u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
            let qs = &block[at + 4..][..16];
            for j in 0..16 {
                u[j] = (qs[j] & 0xF) | (((qh >> j) & 1) << 4) as u8;
                u[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
            }
        }
        QFormat::Q8_0 => u.copy_from_slice(&block[2..34]),
        QFormat::Q4K => {
            let qs = &block[16 + 32 * (sub / 2)..][..32];
            let shift = 4 * (sub % 2);
            for j in 0..32 {
                u[j] = (qs[j] >> shift) & 0xF;
            }
        }
        QFormat::Q5K => {
            let qh = &block[16..48];
            let qs = &block[48 + 32 * (sub / 2)..][..32];
            let shift = 4 * (sub % 2);
            for j in 0..32 {
                u[j] = ((qs[j] >> shift) & 0xF) | (((qh[j] >> sub) & 1) << 4);
            }
        }
        QFormat::Q6K => {
            let (chunk, quarter) = (sub / 4, sub % 4);
            let ql = &block[64 * chunk + 32 * (quarter % 2)..][..32];
            let qh = &block[128 + 32 * chunk..][..32];
            let shift = 4 * (quarter / 2);
            for j in 0..32 {
                u[j] = ((ql[j] >> shift) & 0xF) | (((qh[j] >> (2 * quarter)) & 3) << 4);
            }
        }
    }
    u
}

// ---------------------------------------------------------------- inputs

/// Input rows quantized to 8 bits per 32 values: q = round(x / d), d = max|x| / 127.
pub struct QInput {
    k: usize,
    q: Vec<i8>,
    /// One scale per 32 values.
    d: Vec<f32>,
    /// d·Σq per 16 values (the offset terms' input sums).
    sums: Vec<f32>,
}

impl QInput {
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k);
        assert_eq!(k % QK, 0);
        let blocks = m * k / QK;
        let mut out = QInput { k, q: vec![0; m * k], d: vec![0.0; blocks], sums: vec![0.0; 2 * blocks] };
        for (b, xs) in x.chunks_exact(QK).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut out.q[b * QK..][..QK];
            for (qi, &v) in q.iter_mut().zip(xs) {
                *qi = (v * inv).round() as i8;
            }
            out.d[b] = d;
            for h in 0..2 {
                let s: i32 = q[16 * h..16 * h + 16].iter().map(|&v| v as i32).sum();
                out.sums[2 * b + h] = d * s as f32;
            }
        }
        out
    }
}

// ---------------------------------------------------------------- products

/// Raw pointer shared by workers writing disjoint columns of one output.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Which implementation runs: chosen once from the CPU's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Isa {
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &str| match f {
                "avx2" => std::is_x86_feature_detected!("avx2"),
                "fma" => std::is_x86_feature_detected!("fma"),
                "f16c" => std::is_x86_feature_detected!("f16c"),
                "avx512vnni" => std::is_x86_feature_detected!("avx512vnni"),
                "avx512vl" => std::is_x86_feature_detected!("avx512vl"),
                _ => false,
            };
            if ["avx2", "fma", "f16c"].iter().all(|f| has(f)) {
                if has("avx512vnni") && has("avx512vl") {
                    return Isa::Avx512Vnni;
                }
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every implementation this CPU can run (tests compare them).
    pub fn available() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            let best = Isa::detect();
            if best != Isa::Portable {
                out.push(Isa::Avx2);
            }
            if best == Isa::Avx512Vnni {
                out.push(Isa::Avx512Vnni);
            }
        }
        out
    }
}

/// y[i, j] = x[i, :] · w[j, :] for x: [m, k] f32, w: [n, k] quantized, y: [m, n].
pub fn matmul_xwt(x: &[f32], w: &QWeight, m: usize, y: &mut [f32]) {
    matmul_xwt_with(Isa::detect(), x, w, m, y)
}

/// As `matmul_xwt` on a chosen implementation.
pub fn matmul_xwt_with(isa: Isa, x: &[f32], w: &QWeight, m: usize, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(y.len(), m * n);
    let input = QInput::new(x, m, k);
    let threads = rayon::current_num_threads().max(1);
    let block = (n / (threads * 2)).clamp(16, 4096);
    let out = SharedMut(y.as_mut_ptr());
    (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
        #[allow(clippy::redundant_locals)]
        let out = out;
        for j in b * block..((b + 1) * block).min(n) {
            let mut i0 = 0;
            while i0 < m {
                // Groups of 8, 4, 2 or 1 input rows (each row's arithmetic is the same in any).
                let rows = [GROUP, 4, 2, 1].into_iter().find(|&g| g <= m - i0).unwrap_or(1);
                let mut sums = [0f32; GROUP];
                row_dot(isa, w.row(j), &input, i0, &mut sums[..rows]);
                for (c, s) in sums[..rows].iter().enumerate() {
                    // SAFETY: each worker writes only its own columns j.
                    unsafe { *out.0.add((i0 + c) * n + j) = *s };
                }
                i0 += rows;
            }
        }
    });
}

/// Weight row j against input rows first.. (one per entry of `out`).
fn row_dot(isa: Isa, w: QRow, x: &QInput, first: usize, out: &mut [f32]) {
    match isa {
        Isa::Portable => portable::row_dot(w, x, first, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` chose these only where the CPU has the features.
        Isa::Avx2 => unsafe { simd::row_dot_avx2(w, x, first, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { simd::row_dot_vnni(w, x, first, out) },
    }
}

/// The order the SIMD paths add eight lanes in: (i + i+4), then (0+2, 1+3), then 0+1.
fn hsum8(v: [f32; 8]) -> f32 {
    let s: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
    let (a, b) = (s[0] + s[2], s[1] + s[3]);
    a + b
}

/// Slices whose offsets are folded together: eight 16-value halves fill one vector of lanes.
const FOLD: usize = 4;

// The order every path adds in, per weight row and input row (so all give the same bits):
// - each slice's integer dot products in eight lanes of four values, each lane multiplied by its
//   half's scale times the input block's scale and added into lane accumulators (fused);
// - the offsets b times the input's half sums dx·Σq, FOLD slices (eight halves) at a time into
//   eight more lanes (fused), the remaining halves one at a time after those lanes' sum;
// - the result is (sum of the first lanes) + (the offsets' total); lanes are summed by `hsum8`.

mod portable {
    use super::*;

    pub fn row_dot(w: QRow, x: &QInput, first: usize, out: &mut [f32]) {
        let f = w.format;
        let (subs, slices, halves) = (f.block_len() / QK, x.k / QK, 2 * x.k / QK);
        let row = w.data;
        let slice_at = |slice: usize| {
            let block = &row[slice / subs * f.block_bytes()..][..f.block_bytes()];
            (slice_params(f, block, slice % subs), values(f, block, slice % subs))
        };
        let mut acc = vec![[0f32; 8]; out.len()];
        let mut off = vec![[0f32; 8]; out.len()];
        let mut tail = Vec::new();
        for slice in 0..slices {
            let (p, u) = slice_at(slice);
            for (c, lanes) in acc.iter_mut().enumerate() {
                let xb = (first + c) * slices + slice;
                let q = &x.q[xb * QK..][..QK];
                for (lane, a) in lanes.iter_mut().enumerate() {
                    let isum: i32 = (0..4)
                        .map(|e| {
                            let v = u[4 * lane + e];
                            (if f.signed() { v as i8 as i32 } else { v as i32 }) * q[4 * lane + e] as i32
                        })
                        .sum();
                    *a = (isum as f32).mul_add(p.s[lane / 4] * x.d[xb], *a);
                }
            }
            if slice < slices / FOLD * FOLD {
                let h0 = 2 * slice;
                for (c, lanes) in off.iter_mut().enumerate() {
                    let sums = &x.sums[(first + c) * halves..];
                    for h in 0..2 {
                        let l = (h0 + h) % 8;
                        lanes[l] = p.b[h].mul_add(sums[h0 + h], lanes[l]);
                    }
                }
            } else {
                tail.extend_from_slice(&p.b);
            }
        }
        let folded = halves - tail.len();
        for (c, o) in out.iter_mut().enumerate() {
            let sums = &x.sums[(first + c) * halves..][..halves];
            let mut offset = hsum8(off[c]);
            for (h, b) in tail.iter().enumerate() {
                offset = b.mul_add(sums[folded + h], offset);
            }
            *o = hsum8(acc[c]) + offset;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // fixed-size register arrays read best indexed
mod simd {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32)))
    }

    /// Slice `sub` of a block as 32 bytes (the same integers `values` gives).
    #[inline(always)]
    unsafe fn values_simd(f: QFormat, block: *const u8, sub: usize) -> __m256i {
        let low4 = _mm256_set1_epi8(0xF);
        // 16 bytes -> their low nibbles then their high nibbles.
        let nibbles = |p: *const u8| {
            let v = _mm_loadu_si128(p as *const __m128i);
            let lo = _mm_and_si128(v, _mm_set1_epi8(0xF));
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0xF));
            _mm256_set_m128i(hi, lo)
        };
        // 32 bits -> 0x10 in byte i where bit i is set.
        let bits_to_16 = |qh: u32| {
            let v = _mm256_set1_epi32(qh as i32);
            let spread = _mm256_shuffle_epi8(
                v,
                _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000),
            );
            let mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, mask), _mm256_set1_epi64x(-1));
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        };
        match f {
            QFormat::Q4_0 => nibbles(block.add(2)),
            QFormat::Q4_1 => nibbles(block.add(4)),
            QFormat::Q5_0 | QFormat::Q5_1 => {
                let at = if f == QFormat::Q5_0 { 2 } else { 4 };
                let qh = (block.add(at) as *const u32).read_unaligned();
                _mm256_or_si256(nibbles(block.add(at + 4)), bits_to_16(qh))
            }
            QFormat::Q8_0 => _mm256_loadu_si256(block.add(2) as *const __m256i),
            QFormat::Q4K => {
                let v = _mm256_loadu_si256(block.add(16 + 32 * (sub / 2)) as *const __m256i);
                _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * (sub % 2) as i32)), low4)
            }
            QFormat::Q5K => {
                let v = _mm256_loadu_si256(block.add(48 + 32 * (sub / 2)) as *const __m256i);
                let lo = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * (sub % 2) as i32)), low4);
                let qh = _mm256_loadu_si256(block.add(16) as *const __m256i);
                let hb = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(sub as i32)), _mm256_set1_epi8(1));
                _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4))
            }
            QFormat::Q6K => {
                let (chunk, quarter) = (sub / 4, sub % 4);
                let ql = _mm256_loadu_si256(block.add(64 * chunk + 32 * (quarter % 2)) as *const __m256i);
                let qh = _mm256_loadu_si256(block.add(128 + 32 * chunk) as *const __m256i);
                let lo = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (quarter / 2) as i32)), low4);
                let hi =
                    _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * quarter as i32)), _mm256_set1_epi8(3));
                _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4))
            }
        }
    }

    /// `slice_params` with the hardware half-float conversion.
    #[inline(always)]
    unsafe fn slice_params_simd(f: QFormat, block: *const u8, sub: usize) -> SliceParams {
        slice_params_with(f, std::slice::from_raw_parts(block, f.block_bytes()), sub, |at| f16_at(block.add(at)))
    }

    /// Eight i32 lanes, lane l = Σ of u·q over values 4l..4l+4 (Q8_0: signed u).
    #[inline(always)]
    unsafe fn dot_avx2(u: __m256i, q: __m256i, signed: bool) -> __m256i {
        let (u, q) = if signed { (_mm256_sign_epi8(u, u), _mm256_sign_epi8(q, u)) } else { (u, q) };
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn dot_vnni(u: __m256i, q: __m256i, signed: bool) -> __m256i {
        let (u, q) = if signed { (_mm256_sign_epi8(u, u), _mm256_sign_epi8(q, u)) } else { (u, q) };
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, q)
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The input rows a weight row is multiplied with: their 8-bit values and block scales.
    struct Rows<const C: usize> {
        q: [*const i8; C],
        d: [*const f32; C],
    }

    /// One slice of a weight row against every input row (added to `acc`); returns its offsets.
    /// (A function, not a closure: a closure would not inherit the caller's target features.)
    #[inline(always)]
    unsafe fn slice_dot<const VNNI: bool, const F: usize, const C: usize>(
        row: *const u8,
        rows: &Rows<C>,
        slice: usize,
        acc: &mut [__m256; C],
    ) -> [f32; 2] {
        let f = FORMATS[F];
        let subs = f.block_len() / QK;
        let block = row.add(slice / subs * f.block_bytes());
        let p = slice_params_simd(f, block, slice % subs);
        let u = values_simd(f, block, slice % subs);
        let s = if f == QFormat::Q6K {
            _mm256_set_m128(_mm_set1_ps(p.s[1]), _mm_set1_ps(p.s[0]))
        } else {
            _mm256_set1_ps(p.s[0])
        };
        for c in 0..C {
            let q = _mm256_loadu_si256(rows.q[c].add(slice * QK) as *const __m256i);
            let isum = if VNNI { dot_vnni(u, q, f.signed()) } else { dot_avx2(u, q, f.signed()) };
            let scale = _mm256_mul_ps(s, _mm256_set1_ps(*rows.d[c].add(slice)));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[c]);
        }
        p.b
    }

    /// One instance per format (`F` is its index in `FORMATS`) and count of input rows `C`, so
    /// the format's branches fold away and every accumulator stays in a register.
    #[inline(always)]
    unsafe fn row_dot_impl<const VNNI: bool, const F: usize, const C: usize>(
        w: QRow,
        x: &QInput,
        first: usize,
        out: &mut [f32],
    ) {
        let (slices, halves) = (x.k / QK, 2 * x.k / QK);
        let row = w.data.as_ptr();
        let q_rows: [*const i8; C] = std::array::from_fn(|c| x.q.as_ptr().add((first + c) * x.k));
        let d_rows: [*const f32; C] = std::array::from_fn(|c| x.d.as_ptr().add((first + c) * slices));
        let sum_rows: [*const f32; C] = std::array::from_fn(|c| x.sums.as_ptr().add((first + c) * halves));
        let mut acc = [_mm256_setzero_ps(); C];
        let mut off = [_mm256_setzero_ps(); C];
        let rows = Rows { q: q_rows, d: d_rows };
        let folded = slices / FOLD * FOLD;
        let mut slice = 0;
        while slice < folded {
            let mut pending = [0f32; 2 * FOLD];
            for t in 0..FOLD {
                let b = slice_dot::<VNNI, F, C>(row, &rows, slice + t, &mut acc);
                pending[2 * t] = b[0];
                pending[2 * t + 1] = b[1];
            }
            let pv = _mm256_loadu_ps(pending.as_ptr());
            for c in 0..C {
                off[c] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(sum_rows[c].add(2 * slice)), off[c]);
            }
            slice += FOLD;
        }
        let mut tail = [0f32; 2 * FOLD];
        for t in 0..slices - folded {
            let b = slice_dot::<VNNI, F, C>(row, &rows, folded + t, &mut acc);
            tail[2 * t] = b[0];
            tail[2 * t + 1] = b[1];
        }
        for c in 0..C {
            let mut offset = hsum(off[c]);
            for h in 0..2 * (slices - folded) {
                offset = tail[h].mul_add(*sum_rows[c].add(2 * folded + h), offset);
            }
            out[c] = hsum(acc[c]) + offset;
        }
    }

    macro_rules! by_format {
        ($vnni:literal, $c:literal, $w:expr, $($arg:expr),*) => {
            match $w.format {
                QFormat::Q4_0 => row_dot_impl::<$vnni, 0, $c>($w, $($arg),*),
                QFormat::Q4_1 => row_dot_impl::<$vnni, 1, $c>($w, $($arg),*),
                QFormat::Q5_0 => row_dot_impl::<$vnni, 2, $c>($w, $($arg),*),
                QFormat::Q5_1 => row_dot_impl::<$vnni, 3, $c>($w, $($arg),*),
                QFormat::Q8_0 => row_dot_impl::<$vnni, 4, $c>($w, $($arg),*),
                QFormat::Q4K => row_dot_impl::<$vnni, 5, $c>($w, $($arg),*),
                QFormat::Q5K => row_dot_impl::<$vnni, 6, $c>($w, $($arg),*),
                QFormat::Q6K => row_dot_impl::<$vnni, 7, $c>($w, $($arg),*),
            }
        };
    }

    macro_rules! by_rows {
        ($vnni:literal, $w:expr, $x:expr, $first:expr, $out:expr) => {
            match $out.len() {
                8 => by_format!($vnni, 8, $w, $x, $first, $out),
                4 => by_format!($vnni, 4, $w, $x, $first, $out),
                2 => by_format!($vnni, 2, $w, $x, $first, $out),
                1 => by_format!($vnni, 1, $w, $x, $first, $out),
                n => unreachable!("row groups are 8, 4, 2 or 1 rows, not {n}"),
            }
        };
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dot_avx2(w: QRow, x: &QInput, first: usize, out: &mut [f32]) {
        by_rows!(false, w, x, first, out)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn row_dot_vnni(w: QRow, x: &QInput, first: usize, out: &mut [f32]) {
        by_rows!(true, w, x, first, out)
    }
}
