//! The kernels in plain Rust: the order every vectorised implementation reproduces.
use super::*;

pub fn tile_dot(f: QFormat, tile: &[u8], x: &QInput, first: usize, out: &mut [[f32; TILE]]) {
    let slices = x.k / QK;
    for o in out.iter_mut() {
        *o = [0.0; TILE];
    }
    for s in 0..slices {
        let (header, quants, params) = f.slice_at(s);
        for lane in 0..TILE {
            let p = lane_params(f, tile, header, params, lane);
            let u = lane_values(f, &tile[quants..], lane);
            for (c, o) in out.iter_mut().enumerate() {
                let xb = (first + c) * slices + s;
                let q = &x.q[xb * QK..][..QK];
                let half = |h: usize| -> i32 { (16 * h..16 * h + 16).map(|i| u[i] as i32 * q[i] as i32).sum() };
                let (h0, h1) = (half(0), half(1));
                let (dx, qs) = (x.d[xb], [x.qsum[2 * xb], x.qsum[2 * xb + 1]]);
                let acc = &mut o[lane];
                match f.zero() {
                    Some(z) if f.halves() => {
                        *acc = ((h0 - z * qs[0]) as f32).mul_add(p.s[0] * dx, *acc);
                        *acc = ((h1 - z * qs[1]) as f32).mul_add(p.s[1] * dx, *acc);
                    }
                    Some(z) => *acc = ((h0 + h1 - z * (qs[0] + qs[1])) as f32).mul_add(p.s[0] * dx, *acc),
                    None => {
                        *acc = ((h0 + h1) as f32).mul_add(p.s[0] * dx, *acc);
                        *acc = p.b.mul_add(x.dsum[xb], *acc);
                    }
                }
            }
        }
    }
}
