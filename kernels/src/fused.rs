//! Forward-only fused host loops for the CPU decoder. Each reads its inputs once and writes one
//! output where the tensor-op chain makes a temporary (and a pass over memory) per step; rows run
//! in parallel with rayon. They round like transformers' f32 ops, so the tensor-op path in ops
//! (also the autodiff path) is their reference.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Runs `f` inside a function compiled for AVX-512 (x86-64-v4) or AVX2 with FMA (v3) when this
/// CPU has them, so that the loops inlined into `f` vectorize 16 or 8 wide: the crate itself is
/// built for baseline x86-64 (SSE2), where they ran 4 wide. The bits are the same on every path:
/// there is no fast-math, so vector lanes round exactly as scalar code does, and `mul_add` is
/// the same fused operation everywhere.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi1,bmi2,lzcnt")]
        unsafe fn v4<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt")]
        unsafe fn v3<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("bmi1")
            && std::is_x86_feature_detected!("bmi2")
            && std::is_x86_feature_detected!("lzcnt")
        {
            // SAFETY: every feature v4 is compiled for was detected on this CPU.
            return unsafe { v4(f) };
        }
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("bmi1")
            && std::is_x86_feature_detected!("bmi2")
            && std::is_x86_feature_detected!("lzcnt")
        {
            // SAFETY: as above, for v3's features.
            return unsafe { v3(f) };
        }
    }
    f()
}

/// A vector of `len` f32 that `fill` writes, not zeroed first: zeroing was a memset per call in
/// one thread's cache before the pool's threads overwrote it from theirs, which made these loops
/// slower on two threads than on one (SmolLM2's residual-add norm: 106 vs 70 µs).
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn filled(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    fill(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: the caller's fill wrote all `len` elements.
    unsafe { out.set_len(len) };
    out
}

/// `s` zeroed, as the f32 it now holds: the rows of a [`filled`] output zeroed by the task that
/// then writes them, in its own cache, instead of the whole buffer by one thread up front.
pub(crate) fn zeroed(s: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    s.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just written; MaybeUninit<f32> has f32's layout.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
}

/// `s` as the f32 it holds.
///
/// # Safety
/// Every element of `s` must be written.
pub(crate) unsafe fn assume_init(s: &[MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller vouches each is written.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
}

/// Rows handed to one rayon task: enough work to amortize the task, few enough to balance.
const ROWS_PER_TASK: usize = 16;

/// Partial sums per lane group: a fixed order (so results are deterministic) that the compiler
/// vectorizes, where one running f64 sum waits on each add's latency.
const LANES: usize = 8;

/// `Σ f(x)` in f64 over `LANES` interleaved partial sums.
#[inline(always)]
pub(crate) fn sum_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v as f64);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Lanes of the per-lane partial sums in the row kernels that use [`lane_blocks_2x2`] and
/// [`lane_blocks_1x1`].
pub(crate) const ROW_LANES: usize = 16;

/// Calls `f(lane, a_i, b_i, c_i, d_i)` for every index `i` of four rows of equal length, with
/// `lane = i % ROW_LANES`, in index order: whole blocks of [`ROW_LANES`] through fixed-size arrays,
/// then the tail. The blocks' constant trip count is what lets the compiler vectorize the body,
/// exponential included: the same body in a `chunks(16)` loop bounded by each chunk's length
/// compiled to scalar code, and the KL rows ran about 3× slower. The order of calls, and so every
/// per-lane sum, is a plain loop's.
#[inline(always)]
pub(crate) fn lane_blocks_2x2(
    a: &mut [f32],
    b: &mut [f32],
    c: &[f32],
    d: &[f32],
    mut f: impl FnMut(usize, &mut f32, &mut f32, f32, f32),
) {
    let n = a.len();
    assert!(b.len() == n && c.len() == n && d.len() == n, "rows of {n}");
    let (ab, at) = a.as_chunks_mut::<ROW_LANES>();
    let (bb, bt) = b.as_chunks_mut::<ROW_LANES>();
    let (cb, ct) = c.as_chunks::<ROW_LANES>();
    let (db, dt) = d.as_chunks::<ROW_LANES>();
    for (((a, b), c), d) in ab.iter_mut().zip(bb).zip(cb).zip(db) {
        for l in 0..ROW_LANES {
            f(l, &mut a[l], &mut b[l], c[l], d[l]);
        }
    }
    for (l, (((a, b), c), d)) in at.iter_mut().zip(bt).zip(ct).zip(dt).enumerate() {
        f(l, a, b, *c, *d);
    }
}

/// [`lane_blocks_2x2`] for one row written and one read: `f(lane, a_i, c_i)`.
#[inline(always)]
pub(crate) fn lane_blocks_1x1(a: &mut [f32], c: &[f32], mut f: impl FnMut(usize, &mut f32, f32)) {
    let n = a.len();
    assert!(c.len() == n, "rows of {n}");
    let (ab, at) = a.as_chunks_mut::<ROW_LANES>();
    let (cb, ct) = c.as_chunks::<ROW_LANES>();
    for (a, c) in ab.iter_mut().zip(cb) {
        for l in 0..ROW_LANES {
            f(l, &mut a[l], c[l]);
        }
    }
    for (l, (a, c)) in at.iter_mut().zip(ct).enumerate() {
        f(l, a, *c);
    }
}

/// The largest of `x` (`-inf` when empty), over 16 lanes.
#[inline(always)]
pub(crate) fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// Softmax of one row in place: `e^(x - max)` normalized by its sum, accumulated in f64.
#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    softmax_row_lse(row);
}

/// [`softmax_row`], returning the row's log-sum-exp `max + ln Σ e^(x - max)`.
#[inline(always)]
pub(crate) fn softmax_row_lse(row: &mut [f32]) -> f32 {
    let max = max_f32(row);
    for o in row.iter_mut() {
        *o = exp_f32(*o - max);
    }
    let sum = sum_f64(row, |v| v);
    let inv = (1.0 / sum) as f32;
    for o in row.iter_mut() {
        *o *= inv;
    }
    max + sum.ln() as f32
}

/// RMSNorm over rows of `w.len()`: `(x * rsqrt(mean(x²) + eps)) * w`. The mean of squares is
/// summed in f64 (one row of SmolLM2's residual stream can hold 1e4 beside values near 1, where an
/// f32 running sum drops the small squares), then rounded to f32 as transformers keeps it.
/// `x [rows, d]`, `w [d]` → `[rows, d]`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d), "whole rows of {d}");
    // SAFETY: the tasks' chunks cover `out` in whole rows, and normalize_row writes each.
    unsafe {
        filled(x.len(), |out| {
            out.par_chunks_mut(d * ROWS_PER_TASK)
                .zip(x.par_chunks(d * ROWS_PER_TASK))
                .for_each(|(out, x)| {
                    wide(
                        #[inline(always)]
                        || {
                            for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                                normalize_row(x, w, eps, o);
                            }
                        },
                    )
                })
        })
    }
}

/// One row of [`rms_norm`]: `out = (x * rsqrt(mean(x²) + eps)) * w`.
#[inline(always)]
fn normalize_row(x: &[f32], w: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let sq = sum_f64(x, |v| v * v);
    let var = (sq / w.len() as f64) as f32;
    let r = 1.0 / (var + eps).sqrt();
    for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
        o.write((x * r) * w);
    }
}

/// The residual add and the RMSNorm after it in one pass: `h = x + delta` (rounded as the
/// tensor add) and [`rms_norm`]`(h)`. `x`, `delta` `[rows, d]`, `w [d]` → `(h, normed)`.
pub fn add_rms_norm(x: &[f32], delta: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), delta.len(), "residual and update lengths");
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d), "whole rows of {d}");
    let mut out = Vec::new();
    // SAFETY: the tasks' chunks cover `h` and `out` in whole rows; each row of `h` is written
    // (the add) before it is read, and normalize_row writes each row of `out`.
    let h = unsafe {
        filled(x.len(), |h| {
            out = filled(x.len(), |out| {
                h.par_chunks_mut(d * ROWS_PER_TASK)
                    .zip(out.par_chunks_mut(d * ROWS_PER_TASK))
                    .zip(
                        x.par_chunks(d * ROWS_PER_TASK)
                            .zip(delta.par_chunks(d * ROWS_PER_TASK)),
                    )
                    .for_each(|((h, out), (x, delta))| {
                        wide(
                            #[inline(always)]
                            || {
                                for ((h, o), (x, delta)) in h
                                    .chunks_exact_mut(d)
                                    .zip(out.chunks_exact_mut(d))
                                    .zip(x.chunks_exact(d).zip(delta.chunks_exact(d)))
                                {
                                    for ((h, &x), &dx) in h.iter_mut().zip(x).zip(delta) {
                                        h.write(x + dx);
                                    }
                                    normalize_row(assume_init(h), w, eps, o);
                                }
                            },
                        )
                    })
            })
        })
    };
    (h, out)
}

/// `e^x` in f32 within 2 ulp of libm where `e^x` is a normal f32, branch-free so that the
/// compiler vectorizes a loop of it (libm's `expf` is a scalar call per element). Below
/// `ln(f32::MIN_POSITIVE)` it returns 0 (libm returns subnormals there), above `ln(f32::MAX)`
/// infinity. Cody-Waite reduction `x = n ln2 + r`, `|r| <= ln2 / 2`, and a degree-7 polynomial.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.722_83;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let c = x.clamp(LO, HI);
    let shifted = c * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    // Taylor coefficients of e^r to r^7 (|r| <= 0.347: the remainder is below f32's ulp).
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // 2^n through the exponent bits, in two halves: n is within [-126, 128] after the clamp, and
    // 2^128 or 2^-126 alone would overflow or leave the normal range. n as an integer comes from
    // `shifted`'s low mantissa bits (its ulp is 1), not `n as i32`: that saturating conversion
    // stays scalar, one instruction per element, in an otherwise vectorized loop.
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let pow2 = |k: i32| f32::from_bits((k.wrapping_add(127) as u32) << 23);
    let e = p * pow2(n >> 1) * pow2(n - (n >> 1));
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        e
    }
}

/// `softmax(x * scale + bias)` over rows of `cols`, the form attention takes. `x [rows, cols]`;
/// `bias` holds a whole number of rows and repeats over `x`'s (a causal mask shared by every
/// batch and head); `-inf` in it gives exactly 0. The row sum is accumulated in f64.
pub fn softmax_scaled_biased(x: &[f32], scale: f32, bias: &[f32], cols: usize) -> Vec<f32> {
    let bias_rows = bias.len() / cols;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(cols * ROWS_PER_TASK)
        .zip(x.par_chunks(cols * ROWS_PER_TASK))
        .enumerate()
        .for_each(|(task, (out, x))| {
            wide(
                #[inline(always)]
                || {
                    for (i, (o, x)) in out
                        .chunks_exact_mut(cols)
                        .zip(x.chunks_exact(cols))
                        .enumerate()
                    {
                        let row = (task * ROWS_PER_TASK + i) % bias_rows;
                        let b = &bias[row * cols..(row + 1) * cols];
                        for ((o, &x), &b) in o.iter_mut().zip(x).zip(b) {
                            *o = x * scale + b;
                        }
                        softmax_row(o);
                    }
                },
            )
        });
    out
}

/// The activation of a gated MLP, `act(gate) ⊙ up` (the GLU variants of Shazeer 2020, "GLU
/// Variants Improve Transformer"): SwiGLU (Llama, Qwen, Phi-3) or GeGLU with the tanh GELU
/// (Gemma). Both are `a · σ(z(a))`: `z(a) = a` for SiLU, and for the tanh GELU
/// `0.5 a (1 + tanh(u)) = a σ(2u)` with `u = √(2/π) (a + 0.044715 a³)` (PyTorch's
/// `gelu(approximate="tanh")`), written through `σ` so no `1 + tanh` cancels for negative `a`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GluActivation {
    /// `silu(a) = a σ(a)`.
    Silu,
    /// `gelu_pytorch_tanh(a) = a σ(2 √(2/π) (a + 0.044715 a³))`.
    GeluTanh,
}

/// `z(a)` of the tanh GELU's `a σ(z(a))`: `2 √(2/π) (a + 0.044715 a³)`.
#[inline(always)]
pub(crate) fn gelu_tanh_z(a: f32) -> f32 {
    const TWO_C: f32 = 2.0 * 0.797_884_6;
    a * (TWO_C + TWO_C * 0.044_715 * a * a)
}

/// `dz/da` of [`gelu_tanh_z`]: `2 √(2/π) (1 + 3 · 0.044715 a²)`.
#[inline(always)]
pub(crate) fn gelu_tanh_dz(a: f32) -> f32 {
    const TWO_C: f32 = 2.0 * 0.797_884_6;
    TWO_C + TWO_C * 3.0 * 0.044_715 * a * a
}

/// The gated activation `act(gate) ⊙ up`, element by element: `g / (1 + e^-z(g)) · u`.
pub fn glu(gate: &[f32], up: &[f32], act: GluActivation) -> Vec<f32> {
    // One loop per activation, so each vectorizes with its `z` inlined.
    match act {
        GluActivation::Silu => glu_with(gate, up, |a| a),
        GluActivation::GeluTanh => glu_with(gate, up, gelu_tanh_z),
    }
}

fn glu_with(gate: &[f32], up: &[f32], z: impl Fn(f32) -> f32 + Copy + Sync) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
    assert_eq!(gate.len(), up.len(), "gate and up lengths");
    // SAFETY: the chunks cover `out`, each element written from its gate and up.
    unsafe {
        filled(gate.len(), |out| {
            out.par_chunks_mut(CHUNK)
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
                .for_each(|(o, (g, u))| {
                    wide(
                        #[inline(always)]
                        || {
                            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                                o.write(g / (1.0 + exp_f32(-z(g))) * u);
                            }
                        },
                    )
                })
        })
    }
}

/// Rotary embedding in Hugging Face's `rotate_half` convention on rows of `d` values:
/// `out[i] = x[i] cos[i] - x[i + d/2] sin[i]`, `out[i + d/2] = x[i + d/2] cos[i + d/2] + x[i] sin[i + d/2]`.
/// `x [positions, heads, d]` row-major, `cos`/`sin` `[positions, d]`.
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, d: usize) -> Vec<f32> {
    let half = d / 2;
    assert!(
        d.is_multiple_of(2) && heads > 0 && x.len().is_multiple_of(heads * d),
        "whole rows of heads × {d}, d even"
    );
    // SAFETY: the chunks cover `out` in whole positions; each head's two halves are written.
    unsafe {
        filled(x.len(), |out| {
            out.par_chunks_mut(heads * d)
                .zip(x.par_chunks(heads * d))
                .enumerate()
                .for_each(|(pos, (out, x))| {
                    let positions = cos.len() / d;
                    let p = pos % positions;
                    let (c, s) = (&cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
                    wide(
                        #[inline(always)]
                        || {
                            let ((c1, c2), (s1, s2)) = (c.split_at(half), s.split_at(half));
                            for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                                // Halves as separate slices, so the loops carry no bounds checks and
                                // vectorize.
                                let ((o1, o2), (x1, x2)) = (o.split_at_mut(half), x.split_at(half));
                                for ((o, (&x1, &x2)), (&c, &s)) in
                                    o1.iter_mut().zip(x1.iter().zip(x2)).zip(c1.iter().zip(s1))
                                {
                                    o.write(x1 * c - x2 * s);
                                }
                                for ((o, (&x1, &x2)), (&c, &s)) in
                                    o2.iter_mut().zip(x1.iter().zip(x2)).zip(c2.iter().zip(s2))
                                {
                                    o.write(x2 * c + x1 * s);
                                }
                            }
                        },
                    )
                })
        })
    }
}

/// `src [rows, cols]` with row stride `src_rs` → `dst [cols, rows]` row-major, in tiles that
/// stay in cache. `dst` is written in full.
pub fn transpose_into(
    src: &[f32],
    [rows, cols]: [usize; 2],
    src_rs: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    const TILE: usize = 32;
    assert_eq!(dst.len(), rows * cols, "dst holds cols × rows");
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r].write(src[r * src_rs + c]);
                }
            }
        }
    }
}

/// `x [rows, cols]` row-major → `[cols, rows]` row-major.
pub fn transposed(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * cols, "x holds rows × cols");
    // SAFETY: transpose_into writes all of its destination.
    unsafe { filled(x.len(), |dst| transpose_into(x, [rows, cols], cols, dst)) }
}

/// The shapes of one causal attention: `batch × seq` positions, `heads` query heads sharing
/// `kv_heads` key/value heads, `head_dim` values per head, and Mistral's sliding `window` (each
/// position sees itself and the `window - 1` before it) where set.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
}

/// Raw pointers handed to parallel tasks, for tasks that write disjoint parts of one output
/// (each use says which) and only read the rest.
#[derive(Clone, Copy)]
pub(crate) struct Shared<P>(pub(crate) P);
// SAFETY: at each use, the tasks write disjoint elements and nothing reads them until all finish.
unsafe impl<P> Send for Shared<P> {}
unsafe impl<P> Sync for Shared<P> {}

impl<P: Copy> Shared<P> {
    /// Through a method, so closures capture the whole (Sync) wrapper, not its raw field.
    pub(crate) fn get(&self) -> P {
        self.0
    }
}

/// Causal grouped-query attention, `softmax(q kᵀ · scale + mask) v`, for the forward alone:
/// [`crate::attention::forward_host`] without the log-sum-exp a backward needs.
///
/// `q [batch, seq, heads, head_dim]`, `k`/`v` `[batch, seq, kv_heads, head_dim]` row-major (query
/// head `h` reads KV head `h / (heads / kv_heads)`) → context `[batch, seq, heads, head_dim]`.
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    scale: f32,
) -> Vec<f32> {
    let spec = crate::attention::AttentionSpec {
        shape,
        scale,
        softcap: None,
    };
    crate::attention::forward_host(q, k, v, spec, false).0
}

/// Below this many multiply-adds a product runs on one thread (Flex's own threshold).
const PARALLEL_MACS: usize = 192 * 192 * 192;

/// `dst [m, n] = a [m, k] · b [k, n]` by the `gemm` crate (the kernel under Flex's matmul), for
/// raw f32 views given as `(pointer, row stride)` for `dst` (columns contiguous) and `(pointer,
/// row stride, column stride)` for `a` and `b`. Every element of `dst` is written (zeros when
/// `k = 0`), none is read, so it may start uninitialized. With `parallel`, products past Flex's
/// threshold split over the rayon pool; otherwise it runs on this thread.
///
/// # Safety
/// Every element of the three views must lie inside live allocations, and `dst` must not overlap
/// `a` or `b` or be written by anyone else meanwhile.
pub unsafe fn gemm_f32(
    [m, n, k]: [usize; 3],
    (dst, dst_rs): (*mut f32, isize),
    (a, a_rs, a_cs): (*const f32, isize, isize),
    (b, b_rs, b_cs): (*const f32, isize, isize),
    parallel: bool,
) {
    let threaded = parallel && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MACS;
    let threads = rayon::current_num_threads().max(1);
    // SAFETY (both branches): forwarded from the caller.
    if threaded
        && threads > 1
        && n >= COLUMN_ALIGN
        && a_rs == 1
        && a_cs != 1
        && m > n
        && m >= TRANSPOSED_ROWS_MIN
    {
        return unsafe {
            gemm_by_transposed_rows([m, n, k], (dst, dst_rs), (a, a_cs), (b, b_rs, b_cs))
        };
    }
    if threaded && threads > 1 && n >= COLUMN_ALIGN && m > n && m / threads >= ROW_BLOCK_MIN {
        return unsafe {
            gemm_by_row_blocks([m, n, k], (dst, dst_rs), (a, a_rs, a_cs), (b, b_rs, b_cs))
        };
    }
    // Threaded, one block of output columns per thread, each a serial product. The crate's own
    // threading splits the rows (tokens), and every thread then packs all of `b` (the weights)
    // for itself: with a few hundred tokens that packing, more than the arithmetic, is what
    // grows. By columns, each thread packs only its part of `b`: a SmolLM2 forward on 256 tokens
    // ran 20% faster. (Where `a` is the larger operand, `m > n`, the row split above is the
    // same argument turned around.)
    //
    // The blocks give the same bits as one product: past 64 rows and 4 columns the crate takes
    // its general path, whose summation blocks depend on `k` alone. The last block takes the
    // remainder, so none is narrower than `width`. Below 64 rows the crate's threading stays.
    let width = (n / threads / COLUMN_ALIGN * COLUMN_ALIGN).max(COLUMN_ALIGN);
    let blocks = threads.min(n / width);
    if !threaded || m <= 64 || blocks < 2 {
        let parallelism = if threaded {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: forwarded from the caller.
        return unsafe {
            gemm_on(
                [m, n, k],
                (dst, dst_rs),
                (a, a_rs, a_cs),
                (b, b_rs, b_cs),
                parallelism,
                false,
            )
        };
    }
    // Blocks write disjoint columns of `dst` and only read `a` and `b`.
    let views = Shared((dst, a, b));
    (0..blocks).into_par_iter().for_each(|block| {
        let j0 = block * width;
        let j1 = if block + 1 == blocks { n } else { j0 + width };
        // SAFETY: columns j0..j1 of the caller's views (so inside them); blocks write disjoint
        // columns of `dst`.
        let (dst, a, b) = views.get();
        unsafe {
            gemm_on(
                [m, j1 - j0, k],
                (dst.add(j0), dst_rs),
                (a, a_rs, a_cs),
                (b.offset(j0 as isize * b_cs), b_rs, b_cs),
                gemm::Parallelism::None,
                false,
            )
        }
    });
}

/// Row blocks of a threaded [`gemm_f32`] have at least this many rows (past the 64 where the
/// crate's general path, and so the serial product's bits, start) and start at multiples of 16.
const ROW_BLOCK_MIN: usize = 128;

/// A column-major `a` with at least this many rows (a vocabulary's: the tied embedding's
/// gradient `dlogitsᵀ · h`) goes through [`gemm_by_transposed_rows`].
const TRANSPOSED_ROWS_MIN: usize = 4096;

/// [`gemm_f32`] threaded by blocks of output rows, one per thread, each a serial product: each
/// thread packs its part of `a` and all of `b`, the cheaper split where `a` is the larger.
///
/// # Safety
/// As for [`gemm_f32`].
unsafe fn gemm_by_row_blocks(
    [m, n, k]: [usize; 3],
    (dst, dst_rs): (*mut f32, isize),
    (a, a_rs, a_cs): (*const f32, isize, isize),
    (b, b_rs, b_cs): (*const f32, isize, isize),
) {
    let threads = rayon::current_num_threads().max(1);
    let height = (m / threads / 16 * 16).max(ROW_BLOCK_MIN);
    let blocks = threads.min(m / height).max(1);
    // Blocks write disjoint rows of `dst` and only read `a` and `b`.
    let views = Shared((dst, a, b));
    (0..blocks).into_par_iter().for_each(|block| {
        let i0 = block * height;
        let i1 = if block + 1 == blocks { m } else { i0 + height };
        let (dst, a, b) = views.get();
        // SAFETY: rows i0..i1 of the caller's views; blocks write disjoint rows of `dst`.
        unsafe {
            gemm_on(
                [i1 - i0, n, k],
                (dst.offset(i0 as isize * dst_rs), dst_rs),
                (a.offset(i0 as isize * a_rs), a_rs, a_cs),
                (b, b_rs, b_cs),
                gemm::Parallelism::None,
                false,
            )
        }
    });
}

/// [`gemm_f32`] for a column-major `a` (`a [m, k]` stored `[k, m]`, row stride 1, column stride
/// `a_cs`) with many rows: the rows are cut into chunks of about 256 K elements of `a` each (1 MiB,
/// half the L2 of a recent x86 core, for `k` up to 2048), and each chunk is copied row-major into a
/// buffer its task reuses and multiplied there, serially. Reading the vocabulary-sized `dlogitsᵀ`
/// in place, the crate packs it at a stride of a whole logits row: the tied embedding's gradient
/// (49152 × 576 × 512, 2 threads) ran at about 120 GFLOP/s, through these chunks at about 190
/// (`cargo bench -p distillery-kernels --bench gemm`), and inside a distillation step at 77 where
/// it now runs at 122. The chunks are even, so none is under 64 rows (past the crate's small-`m`
/// paths), and the bits are those of one serial product: the crate's summation depends on `k`
/// alone, not on the operands' layouts.
///
/// # Safety
/// As for [`gemm_f32`], with `a`'s row stride 1.
unsafe fn gemm_by_transposed_rows(
    [m, n, k]: [usize; 3],
    (dst, dst_rs): (*mut f32, isize),
    (a, a_cs): (*const f32, isize),
    (b, b_rs, b_cs): (*const f32, isize, isize),
) {
    let rows = (CHUNK_ELEMENTS / k.max(1)).clamp(ROW_BLOCK_MIN, 2048);
    let chunks = m.div_ceil(rows);
    let views = Shared((dst, a, b));
    (0..chunks)
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, chunk| {
            // Even chunks: the first `m % chunks` take one row more.
            let (base, extra) = (m / chunks, m % chunks);
            let i0 = chunk * base + chunk.min(extra);
            let len = base + usize::from(chunk < extra);
            let (dst, a, b) = views.get();
            buf.clear();
            buf.resize(len * k, 0.0);
            // buf[i, l] = a[i0 + i, l], read along `a`'s contiguous rows (its columns) in tiles of
            // 16 so that the writes stay in a few cache lines.
            for l0 in (0..k).step_by(16) {
                for i_0 in (0..len).step_by(16) {
                    for l in l0..(l0 + 16).min(k) {
                        for i in i_0..(i_0 + 16).min(len) {
                            // SAFETY: element (i0 + i, l) of the caller's `a` view.
                            buf[i * k + l] =
                                unsafe { *a.offset((i0 + i) as isize + l as isize * a_cs) };
                        }
                    }
                }
            }
            // SAFETY: rows i0..i0+len of `dst`, disjoint between chunks; `buf` is len × k.
            unsafe {
                gemm_on(
                    [len, n, k],
                    (dst.offset(i0 as isize * dst_rs), dst_rs),
                    (buf.as_ptr(), k as isize, 1),
                    (b, b_rs, b_cs),
                    gemm::Parallelism::None,
                    false,
                )
            }
        });
}

/// Elements of `a` per chunk of [`gemm_by_transposed_rows`] (1 MiB of f32).
const CHUNK_ELEMENTS: usize = 1 << 18;

/// Column blocks of a threaded [`gemm_f32`] start at multiples of this (a vector of f32 lanes).
const COLUMN_ALIGN: usize = 16;

/// `dst [m, n] += a [m, k] · b [k, n]` on this thread, views as for [`gemm_f32`].
///
/// # Safety
/// As for [`gemm_f32`], and every element of `dst` must be initialized.
pub unsafe fn gemm_f32_add(
    [m, n, k]: [usize; 3],
    dst: (*mut f32, isize),
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
) {
    // SAFETY: forwarded from the caller.
    unsafe { gemm_on([m, n, k], dst, a, b, gemm::Parallelism::None, true) }
}

/// One `gemm` crate call for [`gemm_f32`] (`dst = a · b`) or, with `accumulate`, `dst += a · b`.
///
/// # Safety
/// As for [`gemm_f32`]; with `accumulate`, `dst` is read and must be initialized.
unsafe fn gemm_on(
    [m, n, k]: [usize; 3],
    (dst, dst_rs): (*mut f32, isize),
    (a, a_rs, a_cs): (*const f32, isize, isize),
    (b, b_rs, b_cs): (*const f32, isize, isize),
    parallelism: gemm::Parallelism,
    accumulate: bool,
) {
    // SAFETY: forwarded from the caller; `read_dst` false with alpha 0 never reads `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            a,
            a_cs,
            a_rs,
            b,
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threaded_gemm_gives_the_serial_bits_and_the_product() {
        // Past the threading threshold and over one 512-deep summation block where it matters:
        // 70 × 1000 × 600, column blocks (the last one wider); 600 × 40 × 530, row blocks;
        // 5000 × 40 × 600 with a column-major `a`, transposed chunks (the last ones a row
        // shorter). `n` under 64 and `k` over 512, where blocks under 64 rows would take the
        // crate's small path or split the summation differently. `a` row-major and read through
        // a transposed view, `b` row-major.
        for (m, n, k) in [
            (70usize, 1000usize, 600usize),
            (600, 40, 530),
            (5000, 40, 600),
        ] {
            let a: Vec<f32> = (0..k * m)
                .map(|i| ((i * 7919 % 1013) as f32) / 1013.0 - 0.5)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104_729 % 997) as f32) / 997.0 - 0.5)
                .collect();
            for a_transposed in [false, true] {
                // a [m, k] row-major, or stored [k, m] and read with strides (1, m).
                let (a_rs, a_cs) = if a_transposed {
                    (1, m as isize)
                } else {
                    (k as isize, 1)
                };
                let product = |parallel: bool| {
                    let mut out = vec![f32::NAN; m * n];
                    // SAFETY: a holds m × k through its strides, b is k × n, out is m × n.
                    unsafe {
                        gemm_f32(
                            [m, n, k],
                            (out.as_mut_ptr(), n as isize),
                            (a.as_ptr(), a_rs, a_cs),
                            (b.as_ptr(), n as isize, 1),
                            parallel,
                        )
                    };
                    out
                };
                let serial = product(false);
                for i in (0..m).step_by(7) {
                    for j in (0..n).step_by(13) {
                        let want: f64 = (0..k)
                            .map(|l| {
                                a[i * a_rs as usize + l * a_cs as usize] as f64
                                    * b[l * n + j] as f64
                            })
                            .sum();
                        let got = serial[i * n + j] as f64;
                        assert!((got - want).abs() <= 1e-4, "({i}, {j}): {got} vs {want}");
                    }
                }
                for threads in [2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let threaded = pool.install(|| product(true));
                    let same = threaded
                        .iter()
                        .zip(&serial)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{m} × {n} × {k} (a transposed: {a_transposed}): {threads} threads \
                         differ from one serial product"
                    );
                }
            }
        }
    }

    #[test]
    fn lane_blocks_visit_every_index_in_order_with_its_lane() {
        for n in [0, 5, ROW_LANES, 2 * ROW_LANES + 5] {
            let mut a: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let mut b = vec![0f32; n];
            let c: Vec<f32> = (0..n).map(|i| (i + 1000) as f32).collect();
            let d: Vec<f32> = (0..n).map(|i| (i + 2000) as f32).collect();
            let mut seen = Vec::new();
            lane_blocks_2x2(&mut a, &mut b, &c, &d, |l, a, b, c, d| {
                seen.push((l, *a as usize, c as usize - 1000, d as usize - 2000));
                *a = -*a;
                *b = c;
            });
            let want: Vec<_> = (0..n).map(|i| (i % ROW_LANES, i, i, i)).collect();
            assert_eq!(seen, want, "2x2, {n} elements");
            assert!(a.iter().enumerate().all(|(i, &v)| v == -(i as f32)));
            assert_eq!(b, c);
            let mut seen = Vec::new();
            lane_blocks_1x1(&mut b, &d, |l, b, d| {
                seen.push((l, *b as usize - 1000, d as usize - 2000));
                *b = d;
            });
            let want: Vec<_> = (0..n).map(|i| (i % ROW_LANES, i, i)).collect();
            assert_eq!(seen, want, "1x1, {n} elements");
            assert_eq!(b, d);
        }
    }

    #[test]
    fn exp_f32_is_within_2_ulp_of_libm() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (a, b) = (exp_f32(x), x.exp());
            worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
            x += 0.000_731;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
    }

    #[test]
    fn softmax_matches_the_definition_and_masks_exactly() {
        let (rows, cols) = (6, 5);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.7)
            .collect();
        // Two bias rows repeating: causal-style -inf above a diagonal.
        let bias: Vec<f32> = (0..2 * cols)
            .map(|i| {
                if i % cols > i / cols + 2 {
                    f32::NEG_INFINITY
                } else {
                    0.25
                }
            })
            .collect();
        let got = softmax_scaled_biased(&x, 0.5, &bias, cols);
        for r in 0..rows {
            let b = &bias[(r % 2) * cols..][..cols];
            let z: Vec<f64> = (0..cols)
                .map(|c| x[r * cols + c] as f64 * 0.5 + b[c] as f64)
                .collect();
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
            for c in 0..cols {
                let want = (z[c] - max).exp() / sum;
                let g = got[r * cols + c];
                if b[c] == f32::NEG_INFINITY {
                    assert_eq!(g, 0.0);
                } else {
                    assert!(
                        (g as f64 - want).abs() <= 1e-6 * want,
                        "{r},{c}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn rms_norm_matches_the_formula_on_a_row_with_a_massive_value() {
        let x = [1.0e4f32, 0.5, -2.0, 3.0];
        let w = [1.0f32, 2.0, 0.5, -1.0];
        let got = rms_norm(&x, &w, 1e-5);
        let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 4.0;
        for i in 0..4 {
            let want = x[i] as f64 / (ms + 1e-5).sqrt() * w[i] as f64;
            assert!(
                (got[i] as f64 - want).abs() <= 2e-7 * want.abs().max(1e-3),
                "{i}"
            );
        }
    }

    #[test]
    fn glu_and_rope_match_their_definitions() {
        let g: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.37).collect();
        let u: Vec<f32> = (0..100).map(|i| (i as f32) * 0.01 - 0.3).collect();
        let silu = |a: f64| a / (1.0 + (-a).exp());
        // PyTorch's `gelu(approximate="tanh")` as written there, in f64.
        let gelu_tanh = |a: f64| {
            0.5 * a
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (a + 0.044715 * a.powi(3))).tanh())
        };
        for (act, f) in [
            (GluActivation::Silu, &silu as &dyn Fn(f64) -> f64),
            (GluActivation::GeluTanh, &gelu_tanh),
        ] {
            for ((o, g), u) in glu(&g, &u, act).iter().zip(&g).zip(&u) {
                let want = f(*g as f64) * *u as f64;
                assert!(
                    (*o as f64 - want).abs() <= 1e-6 * want.abs().max(1e-6),
                    "{act:?}({g}) * {u}: {o} against {want}"
                );
            }
        }
        // Two positions, two heads of d = 4.
        let x: Vec<f32> = (0..16).map(|i| i as f32 + 1.0).collect();
        let (cos, sin): (Vec<f32>, Vec<f32>) =
            (0..8).map(|i| ((i as f32).cos(), (i as f32).sin())).unzip();
        let got = rope(&x, &cos, &sin, 2, 4);
        for p in 0..2 {
            for h in 0..2 {
                let row = &x[(p * 2 + h) * 4..][..4];
                let rotated = [-row[2], -row[3], row[0], row[1]];
                for i in 0..4 {
                    let want = row[i] * cos[p * 4 + i] + rotated[i] * sin[p * 4 + i];
                    assert_eq!(got[(p * 2 + h) * 4 + i], want);
                }
            }
        }
    }

    /// Attention from its definition in f64, one query at a time.
    fn attention_reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        a: AttentionShape,
        scale: f32,
    ) -> Vec<f32> {
        let (d, rep) = (a.head_dim, a.heads / a.kv_heads);
        let mut out = vec![0f32; q.len()];
        for b in 0..a.batch {
            for h in 0..a.heads {
                let g = h / rep;
                for p in 0..a.seq {
                    let qi = ((b * a.seq + p) * a.heads + h) * d;
                    let kv = |c: usize| ((b * a.seq + c) * a.kv_heads + g) * d;
                    let visible: Vec<usize> = (0..=p)
                        .filter(|&c| a.window.is_none_or(|w| p < c + w))
                        .collect();
                    let logits: Vec<f64> = visible
                        .iter()
                        .map(|&c| {
                            (0..d)
                                .map(|i| q[qi + i] as f64 * k[kv(c) + i] as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                    for i in 0..d {
                        let ctx: f64 = visible
                            .iter()
                            .zip(&logits)
                            .map(|(&c, l)| (l - max).exp() / z * v[kv(c) + i] as f64)
                            .sum();
                        out[qi + i] = ctx as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn causal_attention_matches_its_definition_across_row_blocks_groups_and_windows() {
        let values = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 500.0
                        - 2.0
                })
                .collect()
        };
        // Several row blocks of 32 (the attention's; seq not a multiple of it), GQA, batch 2, with and
        // without a window shorter than the sequence.
        for window in [None, Some(7), Some(40)] {
            let a = AttentionShape {
                batch: 2,
                seq: 2 * 32 + 5,
                heads: 6,
                kv_heads: 2,
                head_dim: 8,
                window,
            };
            let q = values(a.batch * a.seq * a.heads * a.head_dim, 1);
            let k = values(a.batch * a.seq * a.kv_heads * a.head_dim, 2);
            let v = values(k.len(), 3);
            let got = causal_attention(&q, &k, &v, a, 0.35);
            let want = attention_reference(&q, &k, &v, a, 0.35);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 2e-5, "window {window:?} at {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn add_rms_norm_is_the_add_then_rms_norm() {
        let (rows, d) = (37, 24);
        let x: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 37) % 101) as f32 / 7.0 - 6.0)
            .collect();
        let delta: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 13) % 53) as f32 / 3.0 - 8.0)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / 10.0).collect();
        let (h, normed) = add_rms_norm(&x, &delta, &w, 1e-5);
        let want_h: Vec<f32> = x.iter().zip(&delta).map(|(a, b)| a + b).collect();
        assert_eq!(h, want_h);
        assert_eq!(normed, rms_norm(&want_h, &w, 1e-5));
    }
}
