//! ggml tensor types: block layouts, dequantization of every type llama.cpp writes for model
//! weights, and quantization to the types `export --format gguf` writes.
//!
//! Dequantization follows the `gguf` Python package's reference dequantizers (gguf/quants.py,
//! the same layouts as llama.cpp's ggml-quants.c `dequantize_row_*`), operation for operation in
//! f32, so the results are equal bit for bit (tests/golden/make_gguf_quant_goldens.py, checked by
//! ops/tests/gguf.rs). Quantization follows llama.cpp's reference quantizers
//! (`quantize_row_*_ref`): what it writes, llama.cpp and transformers read back with our values.

use half::f16;

use super::grids::{
    IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KSIGNS_IQ2XS,
    KVALUES_IQ4NL,
};

macro_rules! ggml_types {
    ($($variant:ident = $id:literal, $name:literal, $block:literal, $bytes:literal;)*) => {
        /// A ggml tensor type (ggml.h `ggml_type`), by llama.cpp's name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum GgmlType {
            $($variant,)*
        }

        impl GgmlType {
            pub const ALL: &'static [GgmlType] = &[$(GgmlType::$variant,)*];

            /// From the id stored in a GGUF tensor header; `None` for ids that are not weight types.
            pub fn from_id(id: u32) -> Option<GgmlType> {
                match id {
                    $($id => Some(GgmlType::$variant),)*
                    _ => None,
                }
            }

            pub fn id(self) -> u32 {
                match self {
                    $(GgmlType::$variant => $id,)*
                }
            }

            /// llama.cpp's name (`Q4_K`, `IQ2_XXS`).
            pub fn name(self) -> &'static str {
                match self {
                    $(GgmlType::$variant => $name,)*
                }
            }

            /// `(elements per block, bytes per block)`, as gguf-py's `GGML_QUANT_SIZES`.
            pub fn block(self) -> (usize, usize) {
                match self {
                    $(GgmlType::$variant => ($block, $bytes),)*
                }
            }
        }
    };
}

ggml_types! {
    F32 = 0, "F32", 1, 4;
    F16 = 1, "F16", 1, 2;
    Q4_0 = 2, "Q4_0", 32, 18;
    Q4_1 = 3, "Q4_1", 32, 20;
    Q5_0 = 6, "Q5_0", 32, 22;
    Q5_1 = 7, "Q5_1", 32, 24;
    Q8_0 = 8, "Q8_0", 32, 34;
    Q2_K = 10, "Q2_K", 256, 84;
    Q3_K = 11, "Q3_K", 256, 110;
    Q4_K = 12, "Q4_K", 256, 144;
    Q5_K = 13, "Q5_K", 256, 176;
    Q6_K = 14, "Q6_K", 256, 210;
    IQ2_XXS = 16, "IQ2_XXS", 256, 66;
    IQ2_XS = 17, "IQ2_XS", 256, 74;
    IQ3_XXS = 18, "IQ3_XXS", 256, 98;
    IQ1_S = 19, "IQ1_S", 256, 50;
    IQ4_NL = 20, "IQ4_NL", 32, 18;
    IQ3_S = 21, "IQ3_S", 256, 110;
    IQ2_S = 22, "IQ2_S", 256, 82;
    IQ4_XS = 23, "IQ4_XS", 256, 136;
    IQ1_M = 29, "IQ1_M", 256, 56;
    BF16 = 30, "BF16", 1, 2;
    TQ1_0 = 34, "TQ1_0", 256, 54;
    TQ2_0 = 35, "TQ2_0", 256, 66;
    MXFP4 = 39, "MXFP4", 32, 17;
    NVFP4 = 40, "NVFP4", 64, 36;
}

impl GgmlType {
    pub fn from_name(name: &str) -> Option<GgmlType> {
        GgmlType::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Bytes of `numel` values; `None` when `numel` is not a whole number of blocks.
    pub fn bytes_for(self, numel: usize) -> Option<usize> {
        let (per, bytes) = self.block();
        (numel % per == 0).then_some(numel / per * bytes)
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Element `j` of a codebook row (byte `j` of the little-endian row).
fn grid_byte(row: u64, j: usize) -> u8 {
    (row >> (8 * j)) as u8
}

/// Dequantizes `raw` (whole blocks of type `ty`) to f32, `[blocks * elements per block]`.
/// Panics if `raw` is not a whole number of blocks (callers size it with [`GgmlType::bytes_for`]).
pub fn dequantize(ty: GgmlType, raw: &[u8]) -> Vec<f32> {
    let (per, bytes) = ty.block();
    assert_eq!(
        raw.len() % bytes,
        0,
        "{} data is not whole blocks",
        ty.name()
    );
    let mut out = vec![0f32; raw.len() / bytes * per];
    for (b, y) in raw.chunks_exact(bytes).zip(out.chunks_exact_mut(per)) {
        dequantize_block(ty, b, y);
    }
    out
}

/// One block `b` into `y` (`block().0` values).
fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = f16_at(b, 0),
        GgmlType::BF16 => y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for (l, &q) in b[2..18].iter().enumerate() {
                y[l] = d * ((q & 0xF) as i8 - 8) as f32;
                y[l + 16] = d * ((q >> 4) as i8 - 8) as f32;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (l, &q) in b[4..20].iter().enumerate() {
                y[l] = d * (q & 0xF) as f32 + m;
                y[l + 16] = d * (q >> 4) as f32 + m;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (d, m, at) = if ty == GgmlType::Q5_0 {
                (f16_at(b, 0), None, 2)
            } else {
                (f16_at(b, 0), Some(f16_at(b, 2)), 4)
            };
            let qh = u32_at(b, at);
            for (l, &q) in b[at + 4..at + 20].iter().enumerate() {
                for (k, nibble) in [(l, q & 0xF), (l + 16, q >> 4)] {
                    let v = nibble | ((((qh >> k) & 1) as u8) << 4);
                    y[k] = match m {
                        None => d * (v as i8 - 16) as f32,
                        Some(m) => d * v as f32 + m,
                    };
                }
            }
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for (l, &q) in b[2..34].iter().enumerate() {
                y[l] = (q as i8) as f32 * d;
            }
        }
        GgmlType::Q2_K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for (e, v) in y.iter_mut().enumerate() {
                let (h, j, l) = (e / 128, (e / 32) % 4, e % 32);
                let s = scales[e / 16];
                let q = ((qs[h * 32 + l] >> (2 * j)) & 3) as f32;
                *v = d * (s & 0xF) as f32 * q - dmin * (s >> 4) as f32;
            }
        }
        GgmlType::Q3_K => {
            let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
            let d = f16_at(b, 108);
            let scale = |i: usize| -> f32 {
                let low = (sc[i % 8] >> (4 * (i / 8))) & 0xF;
                let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
                ((low | (high << 4)) as i8 - 32) as f32
            };
            for (e, v) in y.iter_mut().enumerate() {
                let (h, j, l) = (e / 128, (e / 32) % 4, e % 32);
                let low = ((qs[h * 32 + l] >> (2 * j)) & 3) as i8;
                let high = ((hmask[l] >> (e / 32)) & 1) ^ 1;
                *v = d * scale(e / 16) * (low - ((high << 2) as i8)) as f32;
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if ty == GgmlType::Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for (e, v) in y.iter_mut().enumerate() {
                let (sub, l) = (e / 32, e % 32);
                let (sc, m) = k_scale_min(scales, sub);
                let mut q = (qs[(sub / 2) * 32 + l] >> (4 * (sub % 2))) & 0xF;
                if let Some(qh) = qh {
                    q |= ((qh[l] >> sub) & 1) << 4;
                }
                *v = d * sc as f32 * q as f32 - dmin * m as f32;
            }
        }
        GgmlType::Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for (e, v) in y.iter_mut().enumerate() {
                let (h, r) = (e / 128, e % 128);
                let low = (ql[h * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
                let high = (qh[h * 32 + r % 32] >> (2 * (r / 32))) & 3;
                let q = (low | (high << 4)) as i8 - 32;
                *v = d * (sc[e / 16] as i8) as f32 * q as f32;
            }
        }
        GgmlType::IQ2_XXS | GgmlType::IQ3_XXS => {
            let d = f16_at(b, 0);
            let iq3 = ty == GgmlType::IQ3_XXS;
            for ib in 0..8 {
                // IQ2_XXS: per 32 values, 4 grid bytes then the scale/sign word. IQ3_XXS: the
                // 64 grid bytes first, then the 8 scale/sign words.
                let (aux, grid_at) = if iq3 {
                    (u32_at(b, 2 + 64 + 4 * ib), 2 + 8 * ib)
                } else {
                    (u32_at(b, 2 + 8 * ib + 4), 2 + 8 * ib)
                };
                let db = if iq3 {
                    d * (0.5 + (aux >> 28) as f32) * 0.5
                } else {
                    d * (0.5 + (aux >> 28) as f32) * 0.25
                };
                for k in 0..4 {
                    let signs = KSIGNS_IQ2XS[((aux >> (7 * k)) & 0x7F) as usize];
                    for j in 0..8 {
                        let g = if iq3 {
                            let row = IQ3XXS_GRID[b[grid_at + 2 * k + j / 4] as usize];
                            (row >> (8 * (j % 4))) as u8
                        } else {
                            grid_byte(IQ2XXS_GRID[b[grid_at + k] as usize], j)
                        };
                        let sign = if (signs >> j) & 1 == 0 { 1.0 } else { -1.0 };
                        y[ib * 32 + k * 8 + j] = db * g as f32 * sign;
                    }
                }
            }
        }
        GgmlType::IQ2_XS => {
            let d = f16_at(b, 0);
            for i in 0..32 {
                let q = u16_at(b, 2 + 2 * i);
                let s = (b[66 + i / 4] >> (4 * ((i / 2) % 2))) & 0xF;
                let db = d * (0.5 + s as f32) * 0.25;
                let signs = KSIGNS_IQ2XS[(q >> 9) as usize];
                let row = IQ2XS_GRID[(q & 511) as usize];
                for j in 0..8 {
                    let sign = if (signs >> j) & 1 == 0 { 1.0 } else { -1.0 };
                    y[i * 8 + j] = db * grid_byte(row, j) as f32 * sign;
                }
            }
        }
        GgmlType::IQ2_S => {
            let d = f16_at(b, 0);
            let (qs, signs, qh, scales) = (&b[2..34], &b[34..66], &b[66..74], &b[74..82]);
            for g in 0..32 {
                let s = (scales[g / 4] >> (4 * ((g / 2) % 2))) & 0xF;
                let db = d * (0.5 + s as f32) * 0.25;
                let index = qs[g] as usize | ((((qh[g / 4] >> (2 * (g % 4))) & 3) as usize) << 8);
                let row = IQ2S_GRID[index];
                for j in 0..8 {
                    let sign = if (signs[g] >> j) & 1 == 0 { 1.0 } else { -1.0 };
                    y[g * 8 + j] = db * grid_byte(row, j) as f32 * sign;
                }
            }
        }
        GgmlType::IQ3_S => {
            let d = f16_at(b, 0);
            let (qs, qh, signs, scales) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
            for g in 0..64 {
                let ib = g / 8; // 32 values per scale
                let s = (scales[ib / 2] >> (4 * (ib % 2))) & 0xF;
                let db = d * (1 + 2 * s) as f32;
                let index = qs[g] as usize | ((((qh[g / 8] >> (g % 8)) & 1) as usize) << 8);
                let row = IQ3S_GRID[index];
                for j in 0..4 {
                    let e = g * 4 + j;
                    let sign = if (signs[e / 8] >> (e % 8)) & 1 == 0 {
                        1.0
                    } else {
                        -1.0
                    };
                    y[e] = db * ((row >> (8 * j)) as u8) as f32 * sign;
                }
            }
        }
        GgmlType::IQ1_S => {
            let d = f16_at(b, 0);
            let qs = &b[2..34];
            for ib in 0..8 {
                let qh = u16_at(b, 34 + 2 * ib);
                let dl = d * (2 * ((qh >> 12) & 7) + 1) as f32;
                let delta: f32 = if qh & 0x8000 == 0 { 0.125 } else { -0.125 };
                for k in 0..4 {
                    let g = ib * 4 + k;
                    let index = qs[g] as usize | ((((qh >> (3 * k)) & 7) as usize) << 8);
                    let row = IQ1S_GRID[index];
                    for j in 0..8 {
                        y[g * 8 + j] = dl * (grid_byte(row, j) as i8 as f32 + delta);
                    }
                }
            }
        }
        GgmlType::IQ1_M => {
            let (qs, qh) = (&b[0..32], &b[32..48]);
            let sc: [u16; 4] = std::array::from_fn(|k| u16_at(b, 48 + 2 * k));
            // The f16 scale is the top nibble of each of the four scale words.
            let d = f16::from_bits(
                (sc[0] >> 12) | ((sc[1] >> 8) & 0xF0) | ((sc[2] >> 4) & 0xF00) | (sc[3] & 0xF000),
            )
            .to_f32();
            for g in 0..32 {
                let s = (sc[g / 8] >> (3 * ((g / 2) % 4))) & 7;
                let dl = d * (2 * s + 1) as f32;
                let h = (qh[g / 2] >> (4 * (g % 2))) & 0xF;
                let index = qs[g] as usize | (((h & 7) as usize) << 8);
                let delta: f32 = if h & 8 == 0 { 0.125 } else { -0.125 };
                let row = IQ1S_GRID[index];
                for j in 0..8 {
                    y[g * 8 + j] = dl * (grid_byte(row, j) as i8 as f32 + delta);
                }
            }
        }
        GgmlType::IQ4_NL => {
            let d = f16_at(b, 0);
            for (l, &q) in b[2..18].iter().enumerate() {
                y[l] = d * KVALUES_IQ4NL[(q & 0xF) as usize] as f32;
                y[l + 16] = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
            }
        }
        GgmlType::IQ4_XS => {
            let d = f16_at(b, 0);
            let scales_h = u16_at(b, 2);
            let (scales_l, qs) = (&b[4..8], &b[8..136]);
            for ib in 0..8 {
                let low = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
                let high = ((scales_h >> (2 * ib)) & 3) as u8;
                let dl = d * ((low | (high << 4)) as i8 - 32) as f32;
                for (l, &q) in qs[ib * 16..ib * 16 + 16].iter().enumerate() {
                    y[ib * 32 + l] = dl * KVALUES_IQ4NL[(q & 0xF) as usize] as f32;
                    y[ib * 32 + l + 16] = dl * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
                }
            }
        }
        GgmlType::TQ1_0 => {
            let d = f16_at(b, 52);
            let ternary = |q: u8, pow: u8| -> f32 {
                let q = q.wrapping_mul(pow);
                (((q as u16 * 3) >> 8) as i8 - 1) as f32
            };
            const POW: [u8; 5] = [1, 3, 9, 27, 81];
            for (k, &p) in POW.iter().enumerate() {
                for l in 0..32 {
                    y[k * 32 + l] = d * ternary(b[l], p);
                }
                for l in 0..16 {
                    y[160 + k * 16 + l] = d * ternary(b[32 + l], p);
                }
            }
            for (k, &p) in POW[..4].iter().enumerate() {
                for l in 0..4 {
                    y[240 + k * 4 + l] = d * ternary(b[48 + l], p);
                }
            }
        }
        GgmlType::TQ2_0 => {
            let d = f16_at(b, 64);
            for (e, v) in y.iter_mut().enumerate() {
                let (h, j, l) = (e / 128, (e / 32) % 4, e % 32);
                let q = ((b[h * 32 + l] >> (2 * j)) & 3) as i8 - 1;
                *v = d * q as f32;
            }
        }
        GgmlType::MXFP4 => {
            let e = b[0] as u32;
            // ggml_e8m0_to_fp32_half: 2^(e - 127) / 2, kept exact for the two smallest exponents.
            let d = f32::from_bits(if e < 2 {
                0x0020_0000 << e
            } else {
                (e - 1) << 23
            });
            for (l, &q) in b[1..17].iter().enumerate() {
                y[l] = d * KVALUES_MXFP4[(q & 0xF) as usize] as f32;
                y[l + 16] = d * KVALUES_MXFP4[(q >> 4) as usize] as f32;
            }
        }
        GgmlType::NVFP4 => {
            for s in 0..4 {
                let d = ue4m3_to_f32(b[s]);
                for (l, &q) in b[4 + 8 * s..12 + 8 * s].iter().enumerate() {
                    y[s * 16 + l] = d * KVALUES_MXFP4[(q & 0xF) as usize] as f32;
                    y[s * 16 + l + 8] = d * KVALUES_MXFP4[(q >> 4) as usize] as f32;
                }
            }
        }
    }
}

/// E2M1 levels, doubled (llama.cpp's `kvalues_mxfp4`; the block scale carries the half).
const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// NVFP4's unsigned E4M3 sub-block scale, halved (gguf-py `NVFP4.ue4m3_to_fp32`).
fn ue4m3_to_f32(x: u8) -> f32 {
    if x == 0 || x == 0x7F {
        return 0.0;
    }
    let exp = ((x >> 3) & 0xF) as i32;
    let man = (x & 7) as f32;
    let raw = if exp == 0 {
        man * (2f32).powi(-9)
    } else {
        (1.0 + man / 8.0) * (2f32).powi(exp - 7)
    };
    raw * 0.5
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block's 12 packed bytes.
fn k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Quantizes `x` (whole blocks of `ty`) for a GGUF file. Writes F32, F16, BF16, Q8_0, Q5_0, Q5_1,
/// Q4_K, Q5_K and Q6_K, the types of the `--quant` mixes and their fallbacks; `None` for others.
///
/// Q8_0, Q5_0 and Q5_1 are llama.cpp's `quantize_row_*_ref` exactly (bit for bit against gguf-py's
/// quantizers, ops/tests/golden.rs). The K-quants use one pass of min/max
/// scales per sub-block (Q4_K/Q5_K: `x ≈ d·sc·q − dmin·m`, Q6_K: `x ≈ d·sc·q`), then round every
/// value against the stored (6- or 8-bit) scales, so what is written is what decodes; llama.cpp's
/// `make_qkx2_quants` search would lower the error a little further.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Option<Vec<u8>> {
    let (per, bytes) = ty.block();
    assert_eq!(x.len() % per, 0, "{} needs whole blocks", ty.name());
    let mut out = Vec::with_capacity(x.len() / per * bytes);
    for b in x.chunks_exact(per) {
        match ty {
            GgmlType::F32 => out.extend(b[0].to_le_bytes()),
            GgmlType::F16 => out.extend(f16::from_f32(b[0]).to_le_bytes()),
            GgmlType::BF16 => out.extend(half::bf16::from_f32(b[0]).to_le_bytes()),
            GgmlType::Q8_0 => quantize_q8_0(b, &mut out),
            GgmlType::Q5_0 => quantize_q5(b, false, &mut out),
            GgmlType::Q5_1 => quantize_q5(b, true, &mut out),
            GgmlType::Q4_K => quantize_q45_k(b, 15, &mut out),
            GgmlType::Q5_K => quantize_q45_k(b, 31, &mut out),
            GgmlType::Q6_K => quantize_q6_k(b, &mut out),
            _ => return None,
        }
    }
    Some(out)
}

fn quantize_q8_0(b: &[f32], out: &mut Vec<u8>) {
    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(b.iter().map(|v| ((v * id).round() as i8) as u8));
}

/// Q5_0 (`d·(q − 16)`, `d = max / −16` of the largest magnitude) and Q5_1 (`d·q + min`), with the
/// fifth bits in a u32.
fn quantize_q5(b: &[f32], with_min: bool, out: &mut Vec<u8>) {
    let (d, min) = if with_min {
        let lo = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let hi = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        ((hi - lo) / 31.0, lo)
    } else {
        let max = b
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        (max / -16.0, 0.0)
    };
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: Vec<u8> = b
        .iter()
        .map(|&v| {
            let x = if with_min {
                (v - min) * id + 0.5
            } else {
                v * id + 16.5
            };
            (x.trunc() as i32).clamp(0, 31) as u8
        })
        .collect();
    out.extend(f16::from_f32(d).to_le_bytes());
    if with_min {
        out.extend(f16::from_f32(min).to_le_bytes());
    }
    let qh = q
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &v)| h | (((v >> 4) as u32) << j));
    out.extend(qh.to_le_bytes());
    for l in 0..16 {
        out.push((q[l] & 0xF) | ((q[l + 16] & 0xF) << 4));
    }
}

/// Q4_K (`levels` 15) and Q5_K (31): 8 sub-blocks of 32, each `d·sc·q − dmin·m` with 6-bit `sc`
/// and `m` under the super-block's f16 `d` and `dmin`.
fn quantize_q45_k(b: &[f32], levels: u8, out: &mut Vec<u8>) {
    let mut scale = [0f32; 8];
    let mut min = [0f32; 8];
    for (j, s) in b.chunks_exact(32).enumerate() {
        let lo = s.iter().fold(0f32, |m, &v| m.min(v));
        let hi = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        scale[j] = (hi - lo).max(0.0) / levels as f32;
        min[j] = -lo;
    }
    let d = f16::from_f32(scale.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    let dmin = f16::from_f32(min.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    let (df, dminf) = (d.to_f32(), dmin.to_f32());
    let six = |v: f32, unit: f32| -> u8 {
        if unit > 0.0 {
            (v / unit).round().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let sc: [u8; 8] = std::array::from_fn(|j| six(scale[j], df));
    let m: [u8; 8] = std::array::from_fn(|j| six(min[j], dminf));
    let mut packed = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            packed[j] = sc[j];
            packed[j + 4] = m[j];
        } else {
            packed[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
            packed[j - 4] |= (sc[j] >> 4) << 6;
            packed[j] |= (m[j] >> 4) << 6;
        }
    }
    let mut q = [0u8; 256];
    for (e, &v) in b.iter().enumerate() {
        let j = e / 32;
        debug_assert_eq!(k_scale_min(&packed, j), (sc[j], m[j]));
        let step = df * sc[j] as f32;
        let offset = dminf * m[j] as f32;
        q[e] = if step > 0.0 {
            ((v + offset) / step).round().clamp(0.0, levels as f32) as u8
        } else {
            0
        };
    }
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
    out.extend(packed);
    if levels == 31 {
        let mut qh = [0u8; 32];
        for (e, &v) in q.iter().enumerate() {
            qh[e % 32] |= (v >> 4) << (e / 32);
        }
        out.extend(qh);
    }
    // 32 bytes per pair of sub-blocks: low nibbles the first, high nibbles the second.
    for c in 0..4 {
        for l in 0..32 {
            out.push((q[c * 64 + l] & 0xF) | ((q[c * 64 + 32 + l] & 0xF) << 4));
        }
    }
}

/// Q6_K: 16 sub-blocks of 16, each `d·sc·q` with `q` in −32..31 and 8-bit `sc`.
fn quantize_q6_k(b: &[f32], out: &mut Vec<u8>) {
    let scale: [f32; 16] = std::array::from_fn(|j| {
        b[j * 16..j * 16 + 16]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            / 31.0
    });
    let d = f16::from_f32(scale.iter().fold(0f32, |m, &v| m.max(v)) / 127.0);
    let df = d.to_f32();
    let sc: [i8; 16] = std::array::from_fn(|j| {
        if df > 0.0 {
            (scale[j] / df).round().clamp(0.0, 127.0) as i8
        } else {
            0
        }
    });
    let mut q = [0u8; 256];
    for (e, &v) in b.iter().enumerate() {
        let step = df * sc[e / 16] as f32;
        let qi = if step > 0.0 {
            (v / step).round().clamp(-32.0, 31.0) as i8
        } else {
            0
        };
        q[e] = (qi + 32) as u8;
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (e, &v) in q.iter().enumerate() {
        let (h, r) = (e / 128, e % 128);
        ql[h * 64 + r % 64] |= (v & 0xF) << (4 * (r / 64));
        qh[h * 32 + r % 32] |= (v >> 4) << (2 * (r / 32));
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend(d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(n: usize) -> Vec<f32> {
        let mut rng = crate::data::SplitMix(7);
        let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (0..n)
            .map(|_| {
                let (u, v) = (uniform().max(1e-12), uniform());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32 * 0.02
            })
            .collect()
    }

    /// What the writer quantizes decodes (through the dequantizers checked bit for bit against
    /// gguf-py) to within each type's usual error on Gaussian weights, relative RMS.
    #[test]
    fn quantized_blocks_decode_near_the_input() {
        let x = gaussian(256 * 64);
        let rms = |a: &[f32]| (a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
        for (ty, bound) in [
            (GgmlType::F16, 1e-3),
            (GgmlType::Q8_0, 0.01),
            (GgmlType::Q6_K, 0.03),
            (GgmlType::Q5_K, 0.06),
            (GgmlType::Q4_K, 0.12),
        ] {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(Some(q.len()), ty.bytes_for(x.len()), "{}", ty.name());
            let back = dequantize(ty, &q);
            let err: Vec<f32> = back.iter().zip(&x).map(|(a, b)| a - b).collect();
            let rel = rms(&err) / rms(&x);
            eprintln!("{}: relative RMS error {rel:.4}", ty.name());
            assert!(rel < bound, "{}: relative RMS error {rel}", ty.name());
        }
        // Q8_0 is llama.cpp's reference quantizer: a block of ±127 steps of its own scale.
        let q = quantize(GgmlType::Q8_0, &x[..32]).unwrap();
        let amax = x[..32].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(f16_at(&q, 0), f16::from_f32(amax / 127.0).to_f32());
        assert!(q[2..].iter().any(|&b| b as i8 == 127 || b as i8 == -127));
    }
}
