//! Products with GGUF block-quantized weights, read in place (never dequantized to memory).
//!
//! Each input row is quantized to 8 bits per block of 32 values (one f32 scale per block, as
//! llama.cpp does for its integer dot products). At load, a weight's rows are regrouped into
//! tiles of `TILE` = 16 rows: for each 32-value slice, the 16 rows' values are interleaved four at
//! a time, so one 64-byte vector holds four consecutive values of all 16 rows. An integer dot
//! instruction (`dpbusd` on AVX-512 VNNI, `maddubs` on AVX2) then multiplies them with four input
//! values broadcast to every row and accumulates one exact integer per row: no horizontal sums,
//! and each slice's float work (convert, scale, add) is one vector operation for 16 rows. Scales
//! and offsets keep the file's precision (f16 and 6-bit integers), so a tile holds the same bytes
//! as the GGUF blocks, reordered.
//!
//! Per weight row and input row the arithmetic is a fixed sequence: per slice an exact integer
//! sum, converted and multiplied by (weight scale · input scale), added into one f32 accumulator
//! (fused), then the format's offset term. The SIMD paths hold 16 rows in lanes and the portable
//! path runs the same sequence per row, so every implementation gives the same bits for any batch
//! size. A tile is read once for a group of up to `GROUP` input rows, so verifying k drafted
//! tokens costs little more than decoding one.
//!
//! A slice's weights are w = s·(u − z) for the zero-point formats (Q4_0, Q5_0, Q8_0, Q6_K; the
//! zero is subtracted in integers, z·Σq) and w = s·u + b for the formats with a minimum (Q4_1,
//! Q5_1, Q4_K, Q5_K: b times the input block's d·Σq). Q6_K scales each 16-value half separately.
//!
//! Over 600 lines because the formats' layout rules (tiles, slices, scales), the encoding at load,
//! input quantization and the dispatch are one contract that every kernel (portable here, AVX2
//! and AVX-512 in `quant/`) must follow bit for bit.
use half::f16;
use rayon::prelude::*;

/// Values per input quantization block (and per weight slice).
pub const QK: usize = 32;
/// Weight rows interleaved in a tile.
pub const TILE: usize = 16;
/// Input rows multiplied with a tile per pass over it.
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

    /// Values per GGUF block.
    pub fn block_len(self) -> usize {
        match self {
            QFormat::Q4K | QFormat::Q5K | QFormat::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes per GGUF block (ggml's layouts).
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

    /// Bits per stored value (Q8_0's are stored as u = v + 128).
    const fn bits(self) -> usize {
        match self {
            QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q4K => 4,
            QFormat::Q5_0 | QFormat::Q5_1 | QFormat::Q5K => 5,
            QFormat::Q6K => 6,
            QFormat::Q8_0 => 8,
        }
    }

    /// The zero point z of w = s·(u − z); None for the formats with a minimum (w = s·u + b).
    const fn zero(self) -> Option<i32> {
        match self {
            QFormat::Q4_0 => Some(8),
            QFormat::Q5_0 => Some(16),
            QFormat::Q8_0 => Some(128),
            QFormat::Q6K => Some(32),
            _ => None,
        }
    }

    /// Q6_K scales each 16-value half of a slice separately.
    const fn halves(self) -> bool {
        matches!(self, QFormat::Q6K)
    }

    // Tile layout: per group of `super_slices` slices (a K-quant super-block, or one slice) a
    // header (f16 per row: d, then m or dmin where the format has them), then per slice its
    // interleaved values and (K-quants) 8-bit scales per row.

    /// Slices sharing a header.
    const fn super_slices(self) -> usize {
        match self {
            QFormat::Q4K | QFormat::Q5K | QFormat::Q6K => 8,
            _ => 1,
        }
    }

    const fn header_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 | QFormat::Q5_0 | QFormat::Q8_0 | QFormat::Q6K => 2 * TILE,
            _ => 4 * TILE,
        }
    }

    /// Value bytes per tile slice: a nibble plane (4 x 64 bytes) plus 1 or 2 planes of high bits
    /// (64 bytes each); 8-bit values are stored whole.
    const fn quant_bytes(self) -> usize {
        match self.bits() {
            8 => 8 * 4 * TILE,
            b => 4 * 4 * TILE + (b - 4) * 4 * TILE,
        }
    }

    /// Where the bits above the nibble of group g (values 4g..4g+4) are stored: the offset of
    /// their plane within the slice's values, the bit they start at in each byte, and their mask
    /// once moved to bit 4.
    const fn high_bits(self, g: usize) -> Option<(usize, u32, u8)> {
        match self.bits() {
            5 => Some((4 * 4 * TILE, g as u32, 0x10)),
            6 => Some((4 * 4 * TILE + 4 * TILE * (g / 4), 2 * (g % 4) as u32, 0x30)),
            _ => None,
        }
    }

    /// Per-slice scale bytes: Q4_K / Q5_K a scale and a min per row, Q6_K a scale per row and half.
    const fn param_bytes(self) -> usize {
        match self {
            QFormat::Q4K | QFormat::Q5K | QFormat::Q6K => 2 * TILE,
            _ => 0,
        }
    }

    const fn slice_bytes(self) -> usize {
        self.quant_bytes() + self.param_bytes()
    }

    const fn super_bytes(self) -> usize {
        self.header_bytes() + self.super_slices() * self.slice_bytes()
    }

    /// Bytes of one tile of a matrix with `slices` slices per row.
    fn tile_bytes(self, slices: usize) -> usize {
        slices / self.super_slices() * self.super_bytes()
    }

    /// Offsets of slice `s` within a tile: its header, values and scales.
    #[inline(always)]
    fn slice_at(self, s: usize) -> (usize, usize, usize) {
        let header = s / self.super_slices() * self.super_bytes();
        let quants = header + self.header_bytes() + s % self.super_slices() * self.slice_bytes();
        (header, quants, quants + self.quant_bytes())
    }
}

/// A block-quantized weight matrix [rows, cols]: one or more stacked parts (projections of the
/// same input, such as q, k and v, each in its own format), each stored as tiles of `TILE` rows.
pub struct QWeight {
    pub rows: usize,
    pub cols: usize,
    parts: Vec<Part>,
}

struct Part {
    format: QFormat,
    /// The first row of the matrix that this part holds, and how many.
    first: usize,
    rows: usize,
    /// Tiles of `TILE` rows (the last padded with zero rows), `tile_bytes` each.
    tile_bytes: usize,
    data: Vec<u8>,
}

impl Part {
    fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE)
    }

    fn tile(&self, t: usize) -> &[u8] {
        &self.data[t * self.tile_bytes..][..self.tile_bytes]
    }
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QWeight({:?}, {}x{})", self.formats(), self.rows, self.cols)
    }
}

impl QWeight {
    /// A matrix from its GGUF blocks (row-major, `cols` values per row), regrouped into tiles.
    pub fn new(format: QFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        if !cols.is_multiple_of(format.block_len()) {
            return Err(format!("{format:?} rows need a multiple of {} values, got {cols}", format.block_len()));
        }
        let row_bytes = cols / format.block_len() * format.block_bytes();
        if data.len() != rows * row_bytes {
            return Err(format!("{format:?} [{rows}, {cols}] needs {} bytes, got {}", rows * row_bytes, data.len()));
        }
        let tile_bytes = format.tile_bytes(cols / QK);
        let mut tiled = vec![0u8; rows.div_ceil(TILE) * tile_bytes];
        tiled.par_chunks_exact_mut(tile_bytes).enumerate().for_each(|(t, tile)| {
            let rows_here = (rows - t * TILE).min(TILE);
            let gguf_rows: Vec<&[u8]> =
                (0..rows_here).map(|r| &data[(t * TILE + r) * row_bytes..][..row_bytes]).collect();
            encode_tile(format, &gguf_rows, cols / QK, tile);
        });
        Ok(QWeight { rows, cols, parts: vec![Part { format, first: 0, rows, tile_bytes, data: tiled }] })
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

    /// Row `r` as f32 (embedding lookups, the generic path).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols);
        let p = self.parts.iter().rev().find(|p| p.first <= r).expect("row within the matrix");
        let (tile, lane) = ((r - p.first) / TILE, (r - p.first) % TILE);
        dequantize_lane(p.format, p.tile(tile), lane, out);
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_exact_mut(self.cols).enumerate().for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }
}

// ---------------------------------------------------------------- GGUF blocks -> tiles

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Q4_K / Q5_K: the 6-bit scale and min of slice j from the 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The 32 stored integers of slice `sub` of a GGUF block (Q8_0's as v + 128).
fn gguf_values(f: QFormat, block: &[u8], sub: usize) -> [u8; 32] {
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
        QFormat::Q8_0 => {
            for (o, &v) in u.iter_mut().zip(&block[2..34]) {
                *o = v ^ 0x80;
            }
        }
        QFormat::Q4K => {
            let qs = &block[16 + 32 * (sub / 2)..][..32];
            for j in 0..32 {
                u[j] = (qs[j] >> (4 * (sub % 2))) & 0xF;
            }
        }
        QFormat::Q5K => {
            let (qh, qs) = (&block[16..48], &block[48 + 32 * (sub / 2)..][..32]);
            for j in 0..32 {
                u[j] = ((qs[j] >> (4 * (sub % 2))) & 0xF) | (((qh[j] >> sub) & 1) << 4);
            }
        }
        QFormat::Q6K => {
            let (chunk, quarter) = (sub / 4, sub % 4);
            let ql = &block[64 * chunk + 32 * (quarter % 2)..][..32];
            let qh = &block[128 + 32 * chunk..][..32];
            for j in 0..32 {
                u[j] = ((ql[j] >> (4 * (quarter / 2))) & 0xF) | (((qh[j] >> (2 * quarter)) & 3) << 4);
            }
        }
    }
    u
}

/// One tile from up to `TILE` GGUF rows (missing rows stay zero).
fn encode_tile(f: QFormat, rows: &[&[u8]], slices: usize, tile: &mut [u8]) {
    let subs = f.block_len() / QK;
    for (lane, row) in rows.iter().enumerate() {
        for s in 0..slices {
            let block = &row[s / subs * f.block_bytes()..][..f.block_bytes()];
            let (header, quants, params) = f.slice_at(s);
            // The header: d, then m / dmin, as the file's f16 bits.
            let (d_at, m_at) = match f {
                QFormat::Q4_0 | QFormat::Q5_0 | QFormat::Q8_0 => (0, None),
                QFormat::Q4_1 | QFormat::Q5_1 | QFormat::Q4K | QFormat::Q5K => (0, Some(2)),
                QFormat::Q6K => (208, None),
            };
            tile[header + 2 * lane..][..2].copy_from_slice(&block[d_at..d_at + 2]);
            if let Some(m) = m_at {
                tile[header + 2 * TILE + 2 * lane..][..2].copy_from_slice(&block[m..m + 2]);
            }
            match f {
                QFormat::Q4K | QFormat::Q5K => {
                    let (sc, m) = scale_min_k4(s % subs, &block[4..16]);
                    tile[params + lane] = sc;
                    tile[params + TILE + lane] = m;
                }
                QFormat::Q6K => {
                    let sub = s % subs;
                    let first = 192 + 8 * (sub / 4) + 2 * (sub % 4);
                    tile[params + lane] = block[first];
                    tile[params + TILE + lane] = block[first + 1];
                }
                _ => {}
            }
            let u = gguf_values(f, block, s % subs);
            let q = &mut tile[quants..][..f.quant_bytes()];
            for (i, &v) in u.iter().enumerate() {
                let (g, at) = (i / 4, 4 * lane + i % 4);
                if f.bits() == 8 {
                    q[64 * g + at] = v;
                    continue;
                }
                q[64 * (g % 4) + at] |= (v & 0xF) << (4 * (g / 4));
                if let Some((plane, from, mask)) = f.high_bits(g) {
                    q[plane + at] |= ((v & mask) >> 4) << from;
                }
            }
        }
    }
}

/// The 32 stored integers of one row (`lane`) of a tile slice's values.
fn lane_values(f: QFormat, q: &[u8], lane: usize) -> [u8; 32] {
    std::array::from_fn(|i| {
        let (g, at) = (i / 4, 4 * lane + i % 4);
        match f.bits() {
            8 => q[64 * g + at],
            _ => {
                let low = (q[64 * (g % 4) + at] >> (4 * (g / 4))) & 0xF;
                let high = f.high_bits(g).map_or(0, |(plane, from, mask)| ((q[plane + at] >> from) << 4) & mask);
                low | high
            }
        }
    })
}

/// One row's scales (per half) and offset in a tile slice: w = s·(u − z), or s·u + b.
#[derive(Clone, Copy)]
struct LaneParams {
    s: [f32; 2],
    b: f32,
}

fn lane_params(f: QFormat, tile: &[u8], header: usize, params: usize, lane: usize) -> LaneParams {
    let d = f16_at(tile, header + 2 * lane);
    let second = || f16_at(tile, header + 2 * TILE + 2 * lane);
    match f {
        QFormat::Q4_0 | QFormat::Q5_0 | QFormat::Q8_0 => LaneParams { s: [d, d], b: 0.0 },
        QFormat::Q4_1 | QFormat::Q5_1 => LaneParams { s: [d, d], b: second() },
        QFormat::Q4K | QFormat::Q5K => {
            let s = d * tile[params + lane] as f32;
            LaneParams { s: [s, s], b: -second() * tile[params + TILE + lane] as f32 }
        }
        QFormat::Q6K => {
            let half = |h: usize| d * tile[params + h * TILE + lane] as i8 as f32;
            LaneParams { s: [half(0), half(1)], b: 0.0 }
        }
    }
}

fn dequantize_lane(f: QFormat, tile: &[u8], lane: usize, out: &mut [f32]) {
    for (s, o) in out.chunks_exact_mut(QK).enumerate() {
        let (header, quants, params) = f.slice_at(s);
        let p = lane_params(f, tile, header, params, lane);
        let u = lane_values(f, &tile[quants..], lane);
        for (i, v) in o.iter_mut().enumerate() {
            *v = match f.zero() {
                Some(z) => p.s[i / 16] * (u[i] as i32 - z) as f32,
                None => p.s[i / 16] * u[i] as f32 + p.b,
            };
        }
    }
}

// ---------------------------------------------------------------- inputs

mod input;
#[cfg(target_arch = "x86_64")]
use input::Inputs;
pub use input::QInput;

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
            use std::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
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

    /// Input rows per pass over a tile (AVX2 has half the registers).
    fn group(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => 4,
            _ => GROUP,
        }
    }
}

/// y[i, j] = x[i, :] · w[j, :] for x: [m, k] f32, w: [n, k] quantized, y: [m, n].
pub fn matmul_xwt(x: &[f32], w: &QWeight, m: usize, y: &mut [f32]) {
    matmul_xwt_with(Isa::detect(), x, w, m, y)
}

/// `matmul_xwt` into a new [m, rows] vector, which it writes without zeroing it first (zeroing
/// a prefill's outputs was ~2% of it, the other thread waiting).
pub fn matmul_xwt_new(x: &[f32], w: &QWeight, m: usize) -> Vec<f32> {
    let len = m * w.rows;
    let mut y = Vec::with_capacity(len);
    // SAFETY: the product writes every element of the spare capacity (each tile its columns of
    // every row; the tiles cover every row of the weight) before the length is set.
    unsafe {
        product(Isa::detect(), x, w, m, SharedMut(y.spare_capacity_mut().as_mut_ptr().cast::<f32>()));
        y.set_len(len);
    }
    y
}

/// As `matmul_xwt` on a chosen implementation.
pub fn matmul_xwt_with(isa: Isa, x: &[f32], w: &QWeight, m: usize, y: &mut [f32]) {
    assert_eq!(y.len(), m * w.rows);
    // SAFETY: y holds m × rows values.
    unsafe { product(isa, x, w, m, SharedMut(y.as_mut_ptr())) }
}

/// x times w transposed into `out`, which must have room for m × rows values; writes them all.
unsafe fn product(isa: Isa, x: &[f32], w: &QWeight, m: usize, out: SharedMut) {
    let (n, k) = (w.rows, w.cols);
    let input = QInput::new(x, m, k);
    let tiles: Vec<(&Part, usize)> = w.parts.iter().flat_map(|p| (0..p.tiles()).map(move |t| (p, t))).collect();
    let threads = super::team::threads();
    // Two items per thread: on a layer's few dozen tiles each claimed item is a shared-counter
    // round trip and a cold start of its stream; interleaved over SmolLM2-shaped products, two
    // per thread ran 1-8% faster than four, one per thread no better than two and exposed to a
    // descheduled thread (docs/performance.md).
    let chunk = (tiles.len() / (threads * 2)).clamp(1, 64);
    super::team::for_each(tiles.len().div_ceil(chunk), &|c| {
        let chunk = &tiles[c * chunk..((c + 1) * chunk).min(tiles.len())];
        #[allow(clippy::redundant_locals)]
        let out = out;
        for &(part, t) in chunk {
            let (first_col, lanes) = (part.first + t * TILE, (part.rows - t * TILE).min(TILE));
            let mut i0 = 0;
            while i0 < m {
                // As many input rows as the kernel takes at once: a tile is read once per group,
                // and each row's arithmetic is the same in any group.
                let rows = (m - i0).min(isa.group());
                let mut sums = [[0f32; TILE]; GROUP];
                tile_dot(isa, part.format, part.tile(t), &input, i0, &mut sums[..rows]);
                for (c, s) in sums[..rows].iter().enumerate() {
                    // SAFETY: each worker writes only its own tiles' columns.
                    unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), out.0.add((i0 + c) * n + first_col), lanes) };
                }
                i0 += rows;
            }
        }
    });
}

/// A tile's 16 rows against input rows first.. (one per entry of `out`).
fn tile_dot(isa: Isa, f: QFormat, tile: &[u8], x: &QInput, first: usize, out: &mut [[f32; TILE]]) {
    match isa {
        Isa::Portable => portable::tile_dot(f, tile, x, first, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` chose these only where the CPU has the features.
        Isa::Avx2 => unsafe { avx2::tile_dot(f, tile, x, first, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { avx512::tile_dot(f, tile, x, first, out) },
    }
}

// The order every path computes in, per weight row and input row (so all give the same bits),
// for each slice in turn, with dx the input block's scale and acc the row's f32 accumulator:
// - zero-point formats: i = Σu·q − z·Σq (exact), acc = fma(i, s·dx, acc); Q6_K does this for
//   each 16-value half with its own s, first half first;
// - formats with a minimum: i = Σu·q, acc = fma(i, s·dx, acc), then acc = fma(b, dx·Σq, acc).

mod portable;

/// Dispatch to `$kernel::<F, C>` by format (its index in `FORMATS`) and input rows, so the
/// format's branches fold away and every accumulator stays in a register.
#[cfg(target_arch = "x86_64")]
macro_rules! by_format_and_rows {
    ($kernel:ident, $f:expr, $out:expr, $($arg:expr),*) => {{
        macro_rules! rows {
            ($fi:literal) => {
                match $out.len() {
                    1 => $kernel::<$fi, 1>($($arg),*, $out),
                    2 => $kernel::<$fi, 2>($($arg),*, $out),
                    3 => $kernel::<$fi, 3>($($arg),*, $out),
                    4 => $kernel::<$fi, 4>($($arg),*, $out),
                    5 => $kernel::<$fi, 5>($($arg),*, $out),
                    6 => $kernel::<$fi, 6>($($arg),*, $out),
                    7 => $kernel::<$fi, 7>($($arg),*, $out),
                    8 => $kernel::<$fi, 8>($($arg),*, $out),
                    n => unreachable!("input groups are 1 to 8 rows, not {n}"),
                }
            };
        }
        match $f {
            QFormat::Q4_0 => rows!(0),
            QFormat::Q4_1 => rows!(1),
            QFormat::Q5_0 => rows!(2),
            QFormat::Q5_1 => rows!(3),
            QFormat::Q8_0 => rows!(4),
            QFormat::Q4K => rows!(5),
            QFormat::Q5K => rows!(6),
            QFormat::Q6K => rows!(7),
        }
    }};
}

/// Runs `$body` for `$c` = 0..$n (a constant up to `GROUP`) written out, so that per-input
/// accumulators are indexed by constants and stay in registers (LLVM does not unroll the loop).
#[cfg(target_arch = "x86_64")]
macro_rules! unrolled {
    ($c:ident in $n:expr => $body:block) => {{
        seq_unrolled!($c, $n, $body, 0 1 2 3 4 5 6 7)
    }};
}

#[cfg(target_arch = "x86_64")]
macro_rules! seq_unrolled {
    ($c:ident, $n:expr, $body:block, $($i:literal)*) => {{
        $(if $i < $n {
            let $c: usize = $i;
            $body
        })*
    }};
}

/// How far ahead of the slice being computed a kernel asks for the weights' bytes. One core's
/// bandwidth is bounded by the lines it has in flight (latency × bandwidth: ~16 GB/s a core on
/// the Xeon of docs/performance.md, 2026-12-05), so the distance must cover a memory latency at
/// full speed: 8 KB decoded SmolLM2 Q4_1 ~10-13% faster there than 2 KB (4 KB between them,
/// 16 KB and prefetching into L2 no better); it still fits well inside any L1 data cache.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 8192;

/// Asks for one slice's worth of bytes `PREFETCH_AHEAD` past `at` (near a tile's end, the start of
/// the next ones, which the same thread computes next). A layer's products stream a few hundred
/// KB each, too little for the hardware prefetcher to get going: on the development machine the
/// 17 MB head product went from 58 to 77 GB/s with this (docs/performance.md).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_ahead(f: QFormat, at: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let ahead = at.wrapping_add(PREFETCH_AHEAD);
    // A prefetch never faults, so addresses past the weights' end are harmless.
    for line in (0..f.super_bytes() / f.super_slices()).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
mod avx2;
