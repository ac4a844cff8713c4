//! Causal grouped-query attention with its own backward, the FlashAttention way (Dao et al.
//! 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", Alg. 1
//! and 4; the key-block backward of FlashAttention-2, Dao 2023, Alg. 2): the forward keeps the
//! context and each row's log-sum-exp, never a `[seq, seq]` score matrix; the backward rebuilds
//! the probabilities block by block from Q, K and that log-sum-exp (on the host, once for both
//! of its passes where they fit in `STORED_PROBS_BYTES`, twice otherwise).
//!
//! Four implementations of one contract ([`AttentionSpec`]):
//! - [`forward_host`] / [`backward_host`]: host loops over blocks of positions for the CPU (Flex);
//! - `crate::cube::attention`: CubeCL kernels, what CUDA and wgpu train with;
//! - [`forward_reference`] / [`backward_reference`]: Burn tensor ops over blocks of queries, the
//!   default of a backend without kernels of its own, and on the Cube backends with
//!   `DISTILLERY_CUBE_ATTENTION=blocks` (bounded attention memory either way);
//! - [`causal_attention`]: the autodiff op over the backend's pair, what training calls.
//!
//! Tests hold all of them to autodiff through [`naive_reference`], the whole-matrix tensor-op
//! attention.
//!
//! Per row `i` of a head: `z_ij = (q_i · k_j) · scale`, `s_ij = cap · tanh(z_ij / cap)` with
//! Gemma 2's soft-capping (else `s = z`), `p_ij = softmax_j(s_ij)` over the keys row `i` sees,
//! `o_i = Σ_j p_ij v_j`, `lse_i = log Σ_j e^(s_ij)`. Backward, with `D_i = do_i · o_i`:
//! `dv_j = Σ_i p_ij do_i`, `dp_ij = do_i · v_j`, `ds_ij = p_ij (dp_ij − D_i)`,
//! `dz_ij = ds_ij (1 − (s_ij / cap)²)` (or `ds_ij`), `dq_i = scale Σ_j dz_ij k_j`,
//! `dk_j = scale Σ_i dz_ij q_i`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive, s};
use rayon::prelude::*;

use crate::KernelBackend;
use crate::fused::{
    AttentionShape, Shared, exp_f32, gemm_f32, gemm_f32_add, softmax_row_lse, wide,
};

/// One attention: its shapes, the factor on `q · k` (transformers' `scaling`, usually
/// `head_dim ** -0.5`), and Gemma 2's `attn_logit_softcapping` where the family caps.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSpec {
    pub shape: AttentionShape,
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl AttentionSpec {
    /// The first key position `p` sees (Mistral's sliding window: itself and `window - 1` before).
    fn first_visible(&self, p: usize) -> usize {
        self.shape.window.map_or(0, |w| (p + 1).saturating_sub(w))
    }

    /// The score `s` of a raw product `q · k`, capped where the family caps.
    #[inline(always)]
    fn score(&self, dot: f32) -> f32 {
        match self.softcap {
            None => dot * self.scale,
            Some(cap) => cap * (dot * self.scale / cap).tanh(),
        }
    }

    /// `d loss / d (q · k)` from `d loss / d s` at the score `s`.
    #[inline(always)]
    fn dot_grad(&self, ds: f32, s: f32) -> f32 {
        match self.softcap {
            None => ds * self.scale,
            Some(cap) => {
                let t = s / cap;
                ds * (1.0 - t * t) * self.scale
            }
        }
    }

    fn check(&self, q: usize, k: usize, v: usize) {
        let AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            ..
        } = self.shape;
        assert_eq!(q, batch * seq * heads * head_dim, "q's length");
        assert_eq!(k, batch * seq * kv_heads * head_dim, "k's length");
        assert_eq!(v, k, "v's length");
        assert!(kv_heads > 0 && heads % kv_heads == 0, "heads per KV head");
    }
}

/// Query positions per task of the forward and the query gradient; keys per task of the key
/// and value gradients.
const ROW_BLOCK: usize = 32;
const KEY_BLOCK: usize = 64;
/// Query positions per product of the key and value gradients: 512 × the group's heads rows.
const QUERIES_PER_KEY_BLOCK: usize = 512;
/// The most bytes of probabilities and score gradients (`batch · heads · seq²` of each) the
/// backward keeps from its query pass for its key pass, which otherwise recomputes them (two of
/// its seven products, and the exponentials): SmolLM2's backward ran about 14% faster with them
/// kept, at 1 × 512 (19 MB) and 4 × 128.
const STORED_PROBS_BYTES: usize = 64 << 20;

/// A task's buffers, kept across the tasks a thread runs.
#[derive(Default)]
struct Scratch {
    /// A group's queries `[rep · rows, head_dim]`, rows (head r of the group, position i) at
    /// `r · rows + i`.
    q_rows: Vec<f32>,
    /// The same rows of the output's gradient.
    do_rows: Vec<f32>,
    /// `[rep · rows, cols]`: the scores, then the probabilities.
    scores: Vec<f32>,
    /// `[rep · rows, cols]`: `dp`, then `d loss / d (q · k)`.
    grads: Vec<f32>,
    /// `[rep · rows, head_dim]` products before they are scattered.
    rows_out: Vec<f32>,
    /// `[KEY_BLOCK, head_dim]` key and value gradients of one key block.
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Row offsets into `[batch, seq, heads, head_dim]` and `[batch, seq, kv_heads, head_dim]`.
#[derive(Clone, Copy)]
struct Layout {
    seq: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    rep: usize,
}

impl Layout {
    fn of(shape: AttentionShape) -> Layout {
        Layout {
            seq: shape.seq,
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            d: shape.head_dim,
            rep: shape.heads / shape.kv_heads,
        }
    }
    /// Query head `g · rep + r` at position `p` of batch `b`: its first element.
    fn q(&self, b: usize, g: usize, r: usize, p: usize) -> usize {
        ((b * self.seq + p) * self.heads + g * self.rep + r) * self.d
    }
    /// KV head `g` at position `p` of batch `b`.
    fn kv(&self, b: usize, g: usize, p: usize) -> usize {
        ((b * self.seq + p) * self.kv_heads + g) * self.d
    }
    /// `[batch, heads, seq]` statistics (log-sum-exp, `D`) of query head `g · rep + r` at `p`.
    fn stat(&self, b: usize, g: usize, r: usize, p: usize) -> usize {
        (b * self.heads + g * self.rep + r) * self.seq + p
    }
    /// Gathers positions `p0..p1` of the group's query heads from `x` (q's layout) into `rows`.
    fn gather(&self, x: &[f32], b: usize, g: usize, (p0, p1): (usize, usize), rows: &mut Vec<f32>) {
        rows.clear();
        for r in 0..self.rep {
            for p in p0..p1 {
                rows.extend_from_slice(&x[self.q(b, g, r, p)..][..self.d]);
            }
        }
    }
}

/// `x [batch, seq, kv_heads, d]` transposed per (batch, KV head) to `[batch, kv_heads, d, seq]`:
/// as a product's right operand with unit stride along positions, gemm reads it in place. Read
/// as is, it regathered the visible keys for every task, element by element (about 5% of a
/// SmolLM2 forward in a profile).
fn transposed(l: Layout, x: &[f32]) -> Vec<f32> {
    let (seq, d) = (l.seq, l.d);
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(d * seq)
        .enumerate()
        .for_each(|(bg, dst)| {
            let (b, g) = (bg / l.kv_heads, bg % l.kv_heads);
            for p in 0..seq {
                let src = &x[l.kv(b, g, p)..][..d];
                for (i, &value) in src.iter().enumerate() {
                    dst[i * seq + p] = value;
                }
            }
        });
    out
}

/// `out [rep · rows, cols] = rows · X[c0..c0 + cols]ᵀ` of batch `b`, group `g`, where `x_t` is
/// keys or values as [`transposed`] lays them out.
fn scores_against(
    l: Layout,
    out: &mut Vec<f32>,
    rows: &[f32],
    x_t: &[f32],
    (b, g, c0, cols): (usize, usize, usize, usize),
) {
    let m = rows.len() / l.d;
    out.resize(m * cols, 0.0);
    let at = (b * l.kv_heads + g) * l.d * l.seq + c0;
    assert!(c0 + cols <= l.seq && at + (l.d - 1) * l.seq + cols <= x_t.len());
    // SAFETY: `rows` is m × d; the d × cols view lies inside x_t (checked above); `out` is
    // m × cols and private.
    unsafe {
        gemm_f32(
            [m, cols, l.d],
            (out.as_mut_ptr(), cols as isize),
            (rows.as_ptr(), l.d as isize, 1),
            (x_t.as_ptr().add(at), l.seq as isize, 1),
            false,
        )
    }
}

/// The forward: `q [batch, seq, heads, head_dim]`, `k`/`v` `[batch, seq, kv_heads, head_dim]`
/// row-major (query head `h` reads KV head `h / (heads / kv_heads)`) → the context `[batch,
/// seq, heads, head_dim]` and, with `with_lse`, each row's log-sum-exp `[batch, heads, seq]`
/// (empty otherwise). Per (batch, KV group, block of positions) one product of the group's
/// query heads against the visible keys only, the row softmax, one product by the values.
pub fn forward_host(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    spec: AttentionSpec,
    with_lse: bool,
) -> (Vec<f32>, Vec<f32>) {
    spec.check(q.len(), k.len(), v.len());
    let AttentionShape {
        batch,
        seq,
        kv_heads,
        ..
    } = spec.shape;
    let l = Layout::of(spec.shape);
    let stats = batch * l.heads * seq;
    if k.is_empty() {
        return (
            vec![0f32; q.len()],
            vec![f32::NEG_INFINITY; stats * with_lse as usize],
        );
    }
    let k_t = transposed(l, k);
    let mut out: Vec<f32> = vec![0f32; q.len()];
    let mut lse: Vec<f32> = vec![0f32; if with_lse { stats } else { 0 }];
    let shared = Shared((out.as_mut_ptr(), lse.as_mut_ptr()));
    let blocks = seq.div_ceil(ROW_BLOCK);
    (0..batch * kv_heads * blocks)
        .into_par_iter()
        .for_each_init(Scratch::default, |scratch, task| {
            let (b, g, (p0, p1)) = block_task(task, kv_heads, seq, ROW_BLOCK);
            let (c0, cols, rows) = (spec.first_visible(p0), p1 - spec.first_visible(p0), p1 - p0);
            l.gather(q, b, g, (p0, p1), &mut scratch.q_rows);
            scores_against(
                l,
                &mut scratch.scores,
                &scratch.q_rows,
                &k_t,
                (b, g, c0, cols),
            );
            let scores = &mut scratch.scores;
            wide(
                #[inline(always)]
                || {
                    for (index, row) in scores.chunks_exact_mut(cols).enumerate() {
                        let (r, p) = (index / rows, p0 + index % rows);
                        let (lo, hi) = (spec.first_visible(p) - c0, p + 1 - c0);
                        let visible = &mut row[lo..hi];
                        for o in visible.iter_mut() {
                            *o = spec.score(*o);
                        }
                        let row_lse = softmax_row_lse(visible);
                        row[..lo].fill(0.0);
                        row[hi..].fill(0.0);
                        if with_lse {
                            // SAFETY: this task alone writes the statistics of its positions.
                            unsafe { *shared.get().1.add(l.stat(b, g, r, p)) = row_lse };
                        }
                    }
                },
            );
            let m = l.rep * rows;
            scratch.rows_out.resize(m * l.d, 0.0);
            // SAFETY: probabilities (rep · rows) × cols by values c0..p1 of the group.
            unsafe {
                gemm_f32(
                    [m, l.d, cols],
                    (scratch.rows_out.as_mut_ptr(), l.d as isize),
                    (scores.as_ptr(), cols as isize, 1),
                    (v.as_ptr().add(l.kv(b, g, c0)), (kv_heads * l.d) as isize, 1),
                    false,
                );
            }
            scatter(l, &scratch.rows_out, shared.get().0, b, g, (p0, p1));
        });
    (out, lse)
}

/// Writes `rows` (gathered as [`Layout::gather`] does) back to positions `p0..p1` of `dst`.
fn scatter(l: Layout, rows: &[f32], dst: *mut f32, b: usize, g: usize, (p0, p1): (usize, usize)) {
    let n = p1 - p0;
    for r in 0..l.rep {
        for i in 0..n {
            let src = &rows[(r * n + i) * l.d..][..l.d];
            // SAFETY: callers give each task disjoint positions of its group's heads in `dst`
            // (q's layout), so these d values are this task's alone.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(l.q(b, g, r, p0 + i)), l.d)
            };
        }
    }
}

/// `D = rowsum(dout ⊙ out)` per query row, `[batch, heads, seq]`, summed in f64.
fn row_dots(l: Layout, out: &[f32], dout: &[f32], batch: usize) -> Vec<f32> {
    let mut delta = vec![0f32; batch * l.heads * l.seq];
    delta
        .par_chunks_mut(l.seq)
        .enumerate()
        .for_each(|(bh, row)| {
            let (b, h) = (bh / l.heads, bh % l.heads);
            for (p, x) in row.iter_mut().enumerate() {
                let at = ((b * l.seq + p) * l.heads + h) * l.d;
                let (o, g) = (&out[at..at + l.d], &dout[at..at + l.d]);
                *x = o
                    .iter()
                    .zip(g)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>() as f32;
            }
        });
    delta
}

/// Turns `scores` (raw products) into probabilities and `grads` (`dp`) into `d loss / d (q·k)`
/// for query rows of positions `p0..p1` against keys `c0..c0 + cols`; masked pairs get zeros.
#[allow(clippy::too_many_arguments)]
fn probs_and_grads(
    spec: &AttentionSpec,
    l: Layout,
    scores: &mut [f32],
    grads: &mut [f32],
    lse: &[f32],
    delta: &[f32],
    (b, g, p0, p1, c0): (usize, usize, usize, usize, usize),
) {
    let (rows, cols) = (p1 - p0, scores.len() / (l.rep * (p1 - p0)));
    wide(
        #[inline(always)]
        || {
            for (index, (srow, grow)) in scores
                .chunks_exact_mut(cols)
                .zip(grads.chunks_exact_mut(cols))
                .enumerate()
            {
                let (r, p) = (index / rows, p0 + index % rows);
                let at = l.stat(b, g, r, p);
                let (row_lse, d) = (lse[at], delta[at]);
                // Keys c0 + lo .. c0 + hi are visible from p.
                let lo = spec.first_visible(p).saturating_sub(c0).min(cols);
                let hi = (p + 1).saturating_sub(c0).min(cols);
                let (srow_v, grow_v) = (&mut srow[lo..hi.max(lo)], &mut grow[lo..hi.max(lo)]);
                match spec.softcap {
                    // Without a cap, a loop the compiler vectorizes (with the cap's branch inside,
                    // its libm `tanh` kept the whole loop scalar): the same expressions as
                    // `score` and `dot_grad`, so the same bits.
                    None => {
                        let scale = spec.scale;
                        for (sv, gv) in srow_v.iter_mut().zip(grow_v.iter_mut()) {
                            let s = *sv * scale;
                            let prob = exp_f32(s - row_lse);
                            *sv = prob;
                            *gv = (prob * (*gv - d)) * scale;
                        }
                    }
                    Some(_) => {
                        for (sv, gv) in srow_v.iter_mut().zip(grow_v.iter_mut()) {
                            let s = spec.score(*sv);
                            let prob = exp_f32(s - row_lse);
                            *sv = prob;
                            *gv = spec.dot_grad(prob * (*gv - d), s);
                        }
                    }
                }
                srow[..lo].fill(0.0);
                grow[..lo].fill(0.0);
                srow[hi.max(lo)..].fill(0.0);
                grow[hi.max(lo)..].fill(0.0);
            }
        },
    );
}

/// Task `task` of `batch · kv_heads · ⌈seq / size⌉`, in that order: its batch, KV group and
/// positions `[start, end)`, a block of `size`.
fn block_task(
    task: usize,
    kv_heads: usize,
    seq: usize,
    size: usize,
) -> (usize, usize, (usize, usize)) {
    let blocks = seq.div_ceil(size);
    let (b, g, blk) = (
        task / (kv_heads * blocks),
        task / blocks % kv_heads,
        task % blocks,
    );
    (b, g, (blk * size, ((blk + 1) * size).min(seq)))
}

/// What every block of the backward reads: q and the output's gradient (q's layout), the
/// transposed keys and values, and the forward's per-row statistics.
struct BackwardBlock<'a> {
    spec: &'a AttentionSpec,
    l: Layout,
    q: &'a [f32],
    dout: &'a [f32],
    k_t: &'a [f32],
    v_t: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
}

impl BackwardBlock<'_> {
    /// Query positions `p0..p1` of group `(b, g)` against keys `c0..c0 + cols`: their rows into
    /// `sc.q_rows` and `sc.do_rows`, the probabilities into `sc.scores` and `d loss / d (q · k)`
    /// into `sc.grads` (`[rep · (p1 − p0), cols]` each).
    fn probs_and_grads(
        &self,
        sc: &mut Scratch,
        (b, g, p0, p1, c0, cols): (usize, usize, usize, usize, usize, usize),
    ) {
        let l = self.l;
        l.gather(self.q, b, g, (p0, p1), &mut sc.q_rows);
        l.gather(self.dout, b, g, (p0, p1), &mut sc.do_rows);
        scores_against(l, &mut sc.scores, &sc.q_rows, self.k_t, (b, g, c0, cols));
        scores_against(l, &mut sc.grads, &sc.do_rows, self.v_t, (b, g, c0, cols));
        probs_and_grads(
            self.spec,
            l,
            &mut sc.scores,
            &mut sc.grads,
            self.lse,
            self.delta,
            (b, g, p0, p1, c0),
        );
    }
}

/// The probabilities and `d loss / d (q · k)` of every query row against the keys its query
/// block computed (`[batch, kv_heads, rep, seq, seq]` each, rows (head r of the group, position
/// p), written by the query pass only in the columns it computes and read by the key pass only
/// there: the rest of each row is masked, zero). Not zeroed first: nothing reads the rest, and
/// zeroing would be one more pass over the whole store per layer.
struct StoredProbs {
    probs: Vec<std::mem::MaybeUninit<f32>>,
    grads: Vec<std::mem::MaybeUninit<f32>>,
}

impl StoredProbs {
    /// A store for `spec`'s backward where it fits in `budget` bytes.
    fn new(spec: &AttentionSpec, budget: usize) -> Option<StoredProbs> {
        let AttentionShape {
            batch, seq, heads, ..
        } = spec.shape;
        let n = batch
            .checked_mul(heads)?
            .checked_mul(seq)?
            .checked_mul(seq)?;
        (n.checked_mul(2 * size_of::<f32>())? <= budget).then(|| {
            let uninit = || {
                let mut v = Vec::with_capacity(n);
                // SAFETY: MaybeUninit needs no initialization.
                unsafe { v.set_len(n) };
                v
            };
            StoredProbs {
                probs: uninit(),
                grads: uninit(),
            }
        })
    }

    /// Row `(r, p)` of group `(b, g)`: its first element.
    fn row(l: Layout, b: usize, g: usize, r: usize, p: usize) -> usize {
        (((b * l.kv_heads + g) * l.rep + r) * l.seq + p) * l.seq
    }

    /// The columns the query pass writes for position `p`'s block `[p0, p1)`:
    /// `first_visible(p0)..p1` ([`backward_host`]).
    fn written(spec: &AttentionSpec, p: usize) -> (usize, usize) {
        let p0 = p / ROW_BLOCK * ROW_BLOCK;
        let p1 = (p0 + ROW_BLOCK).min(spec.shape.seq);
        (spec.first_visible(p0), p1)
    }
}

/// Raw pointers to a [`StoredProbs`]' two buffers, for the query pass's tasks (each writes the
/// rows of its own block).
type StoredAt = Shared<(*mut f32, *mut f32)>;

impl BackwardBlock<'_> {
    /// After [`BackwardBlock::probs_and_grads`] for query block `(b, g, p0, p1)` against keys
    /// `c0..c0 + cols`: its rows into the store.
    ///
    /// # Safety
    /// `at` points into a live store for this shape, and no other task writes these rows.
    unsafe fn store(
        &self,
        sc: &Scratch,
        at: StoredAt,
        (b, g, p0, p1, c0, cols): (usize, usize, usize, usize, usize, usize),
    ) {
        let (l, rows) = (self.l, p1 - p0);
        debug_assert_eq!(StoredProbs::written(self.spec, p0), (c0, c0 + cols));
        let (probs, grads) = at.get();
        for r in 0..self.l.rep {
            for i in 0..rows {
                let src = (r * rows + i) * cols;
                let dst = StoredProbs::row(l, b, g, r, p0 + i) + c0;
                // SAFETY: the caller's; the row holds seq ≥ c0 + cols elements.
                unsafe {
                    std::ptr::copy_nonoverlapping(sc.scores[src..].as_ptr(), probs.add(dst), cols);
                    std::ptr::copy_nonoverlapping(sc.grads[src..].as_ptr(), grads.add(dst), cols);
                }
            }
        }
    }

    /// [`BackwardBlock::probs_and_grads`] for queries `p0..p1` against keys `k0..k0 + cols`,
    /// from the store: the same values (the query pass computed every visible pair with the
    /// same products and expressions), zeros outside what it computed.
    fn probs_and_grads_stored(
        &self,
        sc: &mut Scratch,
        stored: &StoredProbs,
        (b, g, p0, p1, k0, cols): (usize, usize, usize, usize, usize, usize),
    ) {
        let l = self.l;
        l.gather(self.q, b, g, (p0, p1), &mut sc.q_rows);
        l.gather(self.dout, b, g, (p0, p1), &mut sc.do_rows);
        let rows = p1 - p0;
        sc.scores.clear();
        sc.scores.resize(l.rep * rows * cols, 0.0);
        sc.grads.clear();
        sc.grads.resize(l.rep * rows * cols, 0.0);
        for r in 0..l.rep {
            for i in 0..rows {
                let p = p0 + i;
                let (w0, w1) = StoredProbs::written(self.spec, p);
                let (lo, hi) = (w0.max(k0), w1.min(k0 + cols));
                if lo >= hi {
                    continue;
                }
                let src = StoredProbs::row(l, b, g, r, p);
                let dst = (r * rows + i) * cols;
                let n = hi - lo;
                // SAFETY: the query pass wrote columns w0..w1 of this row, and lo..hi lies in it.
                let (sp, sg) = unsafe {
                    (
                        crate::fused::assume_init(&stored.probs[src + lo..src + hi]),
                        crate::fused::assume_init(&stored.grads[src + lo..src + hi]),
                    )
                };
                sc.scores[dst + lo - k0..][..n].copy_from_slice(sp);
                sc.grads[dst + lo - k0..][..n].copy_from_slice(sg);
            }
        }
    }
}

/// The backward: from the forward's inputs, its context `out` and log-sum-exp `lse`, and the
/// context's gradient `dout` (q's layout), the gradients of q, k and v (their layouts).
/// Queries' gradients by blocks of positions, keys' and values' by blocks of keys, each task
/// writing only its own rows: no atomics, the same bits on every run and thread count.
#[allow(clippy::too_many_arguments)]
pub fn backward_host(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    spec: AttentionSpec,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    backward_host_storing(q, k, v, out, lse, dout, spec, STORED_PROBS_BYTES)
}

/// [`backward_host`], keeping the query pass's probabilities for the key pass where they fit
/// in `stored_bytes` (the same bits either way).
#[allow(clippy::too_many_arguments)]
fn backward_host_storing(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    spec: AttentionSpec,
    stored_bytes: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    spec.check(q.len(), k.len(), v.len());
    let AttentionShape {
        batch,
        seq,
        kv_heads,
        ..
    } = spec.shape;
    let l = Layout::of(spec.shape);
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    if k.is_empty() {
        return (dq, dk, dv);
    }
    let delta = row_dots(l, out, dout, batch);
    let (k_t, v_t) = (transposed(l, k), transposed(l, v));
    let kv_stride = (kv_heads * l.d) as isize;
    let block = BackwardBlock {
        spec: &spec,
        l,
        q,
        dout,
        k_t: &k_t,
        v_t: &v_t,
        lse,
        delta: &delta,
    };

    let mut stored = StoredProbs::new(&spec, stored_bytes);
    let stored_at = stored
        .as_mut()
        .map(|s| Shared((s.probs.as_mut_ptr().cast(), s.grads.as_mut_ptr().cast())));

    // dq, by blocks of query positions against the keys they see.
    let blocks = seq.div_ceil(ROW_BLOCK);
    let dq_at = Shared(dq.as_mut_ptr());
    (0..batch * kv_heads * blocks)
        .into_par_iter()
        .for_each_init(Scratch::default, |sc, task| {
            let (b, g, (p0, p1)) = block_task(task, kv_heads, seq, ROW_BLOCK);
            let (c0, cols) = (spec.first_visible(p0), p1 - spec.first_visible(p0));
            let m = l.rep * (p1 - p0);
            block.probs_and_grads(sc, (b, g, p0, p1, c0, cols));
            if let Some(at) = stored_at {
                // SAFETY: the store is alive until both passes end; this task alone writes the
                // rows of block (b, g, p0..p1).
                unsafe { block.store(sc, at, (b, g, p0, p1, c0, cols)) };
            }
            sc.rows_out.resize(m * l.d, 0.0);
            // SAFETY: dz (m × cols) by keys c0..p1 of the group.
            unsafe {
                gemm_f32(
                    [m, l.d, cols],
                    (sc.rows_out.as_mut_ptr(), l.d as isize),
                    (sc.grads.as_ptr(), cols as isize, 1),
                    (k.as_ptr().add(l.kv(b, g, c0)), kv_stride, 1),
                    false,
                );
            }
            scatter(l, &sc.rows_out, dq_at.get(), b, g, (p0, p1));
        });

    // dk and dv, by blocks of keys against the queries that see them.
    let key_blocks = seq.div_ceil(KEY_BLOCK);
    let kv_at = Shared((dk.as_mut_ptr(), dv.as_mut_ptr()));
    (0..batch * kv_heads * key_blocks)
        .into_par_iter()
        .for_each_init(Scratch::default, |sc, task| {
            let (b, g, (k0, k1)) = block_task(task, kv_heads, seq, KEY_BLOCK);
            let cols = k1 - k0;
            // The last query that sees key k1 - 1.
            let q_end = spec.shape.window.map_or(seq, |w| (k1 - 1 + w).min(seq));
            sc.dk.clear();
            sc.dk.resize(cols * l.d, 0.0);
            sc.dv.clear();
            sc.dv.resize(cols * l.d, 0.0);
            // The queries that see these keys by blocks of QUERIES_PER_KEY_BLOCK: a few products
            // of many rows, where blocks of ROW_BLOCK queries made many small ones (each packing
            // its operands), with scratch bounded at any sequence length.
            let mut p0 = k0;
            while p0 < q_end {
                let p1 = (p0 + QUERIES_PER_KEY_BLOCK).min(q_end);
                let m = l.rep * (p1 - p0);
                match &stored {
                    Some(stored) => {
                        block.probs_and_grads_stored(sc, stored, (b, g, p0, p1, k0, cols))
                    }
                    None => block.probs_and_grads(sc, (b, g, p0, p1, k0, cols)),
                }
                // SAFETY: pᵀ and dzᵀ are cols × m views of the m × cols buffers; the rows are
                // m × d; the accumulators cols × d.
                unsafe {
                    gemm_f32_add(
                        [cols, l.d, m],
                        (sc.dv.as_mut_ptr(), l.d as isize),
                        (sc.scores.as_ptr(), 1, cols as isize),
                        (sc.do_rows.as_ptr(), l.d as isize, 1),
                    );
                    gemm_f32_add(
                        [cols, l.d, m],
                        (sc.dk.as_mut_ptr(), l.d as isize),
                        (sc.grads.as_ptr(), 1, cols as isize),
                        (sc.q_rows.as_ptr(), l.d as isize, 1),
                    );
                }
                p0 = p1;
            }
            let (dk_at, dv_at) = kv_at.get();
            for c in 0..cols {
                let at = l.kv(b, g, k0 + c);
                // SAFETY: this task alone writes keys k0..k1 of group g in batch b.
                unsafe {
                    std::ptr::copy_nonoverlapping(sc.dk[c * l.d..].as_ptr(), dk_at.add(at), l.d);
                    std::ptr::copy_nonoverlapping(sc.dv[c * l.d..].as_ptr(), dv_at.add(at), l.d);
                }
            }
        });
    (dq, dk, dv)
}

/// Query positions per block of the tensor-op version: its scores are `[batch, kv_heads, rep ·
/// QUERY_CHUNK, seq]` at most.
const QUERY_CHUNK: usize = 256;

/// The group's query heads stacked with positions: `x [batch, rows, heads, d]` → `[batch,
/// kv_heads, rep · rows, d]`, rows (head r of the group, position i) at `r · rows + i`.
fn stack<B: Backend>(x: Tensor<B, 4>, kv_heads: usize) -> Tensor<B, 4> {
    let [b, n, h, d] = x.dims();
    let rep = h / kv_heads;
    x.reshape([b, n, kv_heads, rep, d])
        .permute([0, 2, 3, 1, 4])
        .reshape([b, kv_heads, rep * n, d])
}

/// The inverse of [`stack`].
fn unstack<B: Backend>(x: Tensor<B, 4>, rows: usize) -> Tensor<B, 4> {
    let [b, kvh, m, d] = x.dims();
    let rep = m / rows;
    x.reshape([b, kvh, rep, rows, d])
        .permute([0, 3, 1, 2, 4])
        .reshape([b, rows, kvh * rep, d])
}

/// The mask of query positions `p0..p1` over keys `0..keys` stacked per group, `[1, 1, rep ·
/// (p1 - p0), keys]`: 0 where visible, -inf elsewhere.
fn mask<B: Backend>(
    spec: &AttentionSpec,
    (p0, p1): (usize, usize),
    keys: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let rep = spec.shape.heads / spec.shape.kv_heads;
    let mut m = Vec::with_capacity(rep * (p1 - p0) * keys);
    for _ in 0..rep {
        for p in p0..p1 {
            m.extend((0..keys).map(|c| {
                if c <= p && c >= spec.first_visible(p) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            }));
        }
    }
    Tensor::from_data(TensorData::new(m, [1, 1, rep * (p1 - p0), keys]), device)
}

/// The scores of query positions `p0..p1` over keys `0..p1`: `(s, z / cap)` stacked per group
/// (`[batch, kv_heads, rep · rows, p1]`), `z / cap` only where the family caps.
fn chunk_scores<B: Backend>(
    spec: &AttentionSpec,
    q: &Tensor<B, 4>,
    k_t: &Tensor<B, 4>,
    (p0, p1): (usize, usize),
) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
    let kvh = spec.shape.kv_heads;
    let q = stack(q.clone().slice(s![.., p0..p1]), kvh);
    let z = q.matmul(k_t.clone().slice(s![.., .., .., 0..p1])) * spec.scale as f64;
    let device = z.device();
    let bias = mask::<B>(spec, (p0, p1), p1, &device);
    match spec.softcap {
        None => (z + bias, None),
        Some(cap) => {
            let t = (z / cap as f64).tanh();
            (t.clone() * cap as f64 + bias, Some(t))
        }
    }
}

/// The forward in Burn tensor ops, by blocks of [`QUERY_CHUNK`] queries: tensors as in
/// [`forward_host`] (`[batch, seq, heads, head_dim]`…) → `(context, lse [batch, heads, seq])`.
pub fn forward_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    spec: AttentionSpec,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let [b, seq, h, _] = q.dims();
    let k_t = k.swap_dims(1, 2).swap_dims(2, 3); // [b, kvh, d, seq]
    let v = v.swap_dims(1, 2); // [b, kvh, seq, d]
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for p0 in (0..seq).step_by(QUERY_CHUNK) {
        let p1 = (p0 + QUERY_CHUNK).min(seq);
        let rows = p1 - p0;
        let (scores, _) = chunk_scores(&spec, &q, &k_t, (p0, p1));
        let max = scores.clone().max_dim(3).detach();
        let e = (scores - max.clone()).exp();
        let sum = e.clone().sum_dim(3);
        let context = (e / sum.clone()).matmul(v.clone().slice(s![.., .., 0..p1]));
        outs.push(unstack(context, rows));
        // [b, kvh, rep · rows, 1] → [b, heads, rows]
        lses.push((max + sum.log()).reshape([b, h, rows]));
    }
    (Tensor::cat(outs, 1), Tensor::cat(lses, 2))
}

/// The backward in Burn tensor ops, by blocks of [`QUERY_CHUNK`] queries, as [`backward_host`].
pub fn backward_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    out: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    dout: Tensor<B, 4>,
    spec: AttentionSpec,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, seq, h, d] = q.dims();
    let kvh = spec.shape.kv_heads;
    let k_rows = k.clone().swap_dims(1, 2); // [b, kvh, seq, d]
    let k_t = k_rows.clone().swap_dims(2, 3);
    let v_rows = v.swap_dims(1, 2);
    let delta = (out * dout.clone()).sum_dim(3); // [b, seq, h, 1]
    let device = q.device();
    let mut dk = Tensor::<B, 4>::zeros([b, kvh, seq, d], &device);
    let mut dv = Tensor::<B, 4>::zeros([b, kvh, seq, d], &device);
    let mut dqs = Vec::new();
    for p0 in (0..seq).step_by(QUERY_CHUNK) {
        let p1 = (p0 + QUERY_CHUNK).min(seq);
        let rows = p1 - p0;
        let (scores, t) = chunk_scores(&spec, &q, &k_t, (p0, p1));
        let row_lse = lse
            .clone()
            .slice(s![.., .., p0..p1])
            .reshape([b, kvh, h / kvh * rows, 1]);
        let p = (scores - row_lse).exp(); // [b, kvh, m, p1]
        let do_rows = stack(dout.clone().slice(s![.., p0..p1]), kvh);
        let d_rows = stack(delta.clone().slice(s![.., p0..p1]), kvh); // [b, kvh, m, 1]
        let dp = do_rows
            .clone()
            .matmul(v_rows.clone().slice(s![.., .., 0..p1]).swap_dims(2, 3));
        let mut dz = p.clone() * (dp - d_rows);
        if let Some(t) = t {
            dz = dz * (t.clone() * t).neg().add_scalar(1.0);
        }
        let dz = dz * spec.scale as f64;
        dqs.push(unstack(
            dz.clone().matmul(k_rows.clone().slice(s![.., .., 0..p1])),
            rows,
        ));
        let q_rows = stack(q.clone().slice(s![.., p0..p1]), kvh);
        let dv_seen = dv.clone().slice(s![.., .., 0..p1]) + p.swap_dims(2, 3).matmul(do_rows);
        dv = dv.slice_assign(s![.., .., 0..p1], dv_seen);
        let dk_seen = dk.clone().slice(s![.., .., 0..p1]) + dz.swap_dims(2, 3).matmul(q_rows);
        dk = dk.slice_assign(s![.., .., 0..p1], dk_seen);
    }
    (Tensor::cat(dqs, 1), dk.swap_dims(1, 2), dv.swap_dims(1, 2))
}

/// Whole-matrix causal attention in plain tensor ops, differentiable under autodiff: the
/// independent reference of the tests (`[batch, seq, heads, head_dim]` in and out).
pub fn naive_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    spec: AttentionSpec,
) -> Tensor<B, 4> {
    let [b, seq, h, d] = q.dims();
    let kvh = spec.shape.kv_heads;
    let rep = h / kvh;
    // K and V repeated per query head, as transformers' `repeat_kv`.
    let repeat = |x: Tensor<B, 4>| {
        x.reshape([b, seq, kvh, 1, d])
            .repeat_dim(3, rep)
            .reshape([b, seq, h, d])
            .swap_dims(1, 2)
    };
    let (q, k, v) = (q.swap_dims(1, 2), repeat(k), repeat(v));
    let mut z = q.matmul(k.swap_dims(2, 3)) * spec.scale as f64;
    if let Some(cap) = spec.softcap {
        z = (z / cap as f64).tanh() * cap as f64;
    }
    let mut m = Vec::with_capacity(seq * seq);
    for p in 0..seq {
        m.extend((0..seq).map(|c| {
            if c <= p && c >= spec.first_visible(p) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        }));
    }
    let bias = Tensor::<B, 4>::from_data(TensorData::new(m, [1, 1, seq, seq]), &z.device());
    burn::tensor::activation::softmax(z + bias, 3)
        .matmul(v)
        .swap_dims(1, 2)
}

/// Causal attention differentiable with respect to `q`, `k` and `v` (`[batch, seq, heads or
/// kv_heads, head_dim]`) through the backend's forward and backward: what the graph keeps for
/// the backward is q, k, v, the context and the log-sum-exp, never a `[seq, seq]` tensor.
pub fn causal_attention<B: KernelBackend>(
    q: Tensor<Autodiff<B>, 4>,
    k: Tensor<Autodiff<B>, 4>,
    v: Tensor<Autodiff<B>, 4>,
    spec: AttentionSpec,
) -> Tensor<Autodiff<B>, 4> {
    #[derive(Debug)]
    struct AttentionBackward;

    #[derive(Clone, Debug)]
    struct Saved<B: Backend> {
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        out: FloatTensor<B>,
        lse: FloatTensor<B>,
        spec: AttentionSpec,
    }

    impl<B: KernelBackend> Backward<B, 3> for AttentionBackward {
        type State = Saved<B>;

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let dout = grads.consume::<B>(&ops.node);
            let Saved {
                q,
                k,
                v,
                out,
                lse,
                spec,
            } = ops.state;
            let (dq, dk, dv) = B::attention_backward(q, k, v, out, lse, dout, spec);
            for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
                if let Some(node) = parent {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
    let out = match AttentionBackward
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, lse) = B::attention_forward(
                q.primitive.clone(),
                k.primitive.clone(),
                v.primitive.clone(),
                spec,
                true,
            );
            let saved = Saved {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                out: out.clone(),
                lse,
                spec,
            };
            prep.finish(saved, out)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(B::attention_forward(q.primitive, k.primitive, v.primitive, spec, false).0)
        }
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type A = Autodiff<Flex>;

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// Odd sizes: head_dim 24, seq 37, GQA 3:1, with and without a window and a cap; and a
    /// longer sequence.
    fn specs() -> Vec<AttentionSpec> {
        let mut out = Vec::new();
        for window in [None, Some(5), Some(40)] {
            for softcap in [None, Some(2.5f32)] {
                out.push(AttentionSpec {
                    shape: AttentionShape {
                        batch: 2,
                        seq: 37,
                        heads: 6,
                        kv_heads: 2,
                        head_dim: 24,
                        window,
                    },
                    scale: 24f32.powf(-0.5),
                    softcap,
                });
            }
        }
        // Past every block size: 32-position and 64-key host blocks, 256-query tensor-op chunks.
        for window in [None, Some(100)] {
            out.push(AttentionSpec {
                shape: AttentionShape {
                    batch: 1,
                    seq: 300,
                    heads: 3,
                    kv_heads: 1,
                    head_dim: 8,
                    window,
                },
                scale: 0.3,
                softcap: None,
            });
        }
        out
    }

    /// The inputs, a random upstream gradient, and the reference's output and gradients.
    #[allow(clippy::type_complexity)]
    fn case(spec: AttentionSpec) -> ([Tensor<Flex, 4>; 4], Vec<f32>, [Vec<f32>; 3]) {
        let AttentionShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            ..
        } = spec.shape;
        let device = Default::default();
        let n = Distribution::Normal(0.0, 1.5);
        let q = Tensor::<Flex, 4>::random([batch, seq, heads, head_dim], n, &device);
        let k = Tensor::<Flex, 4>::random([batch, seq, kv_heads, head_dim], n, &device);
        let v = Tensor::<Flex, 4>::random([batch, seq, kv_heads, head_dim], n, &device);
        let dout = Tensor::<Flex, 4>::random([batch, seq, heads, head_dim], n, &device);
        let (qa, ka, va) = (
            Tensor::<A, 4>::from_inner(q.clone()).require_grad(),
            Tensor::<A, 4>::from_inner(k.clone()).require_grad(),
            Tensor::<A, 4>::from_inner(v.clone()).require_grad(),
        );
        let out = naive_reference(qa.clone(), ka.clone(), va.clone(), spec);
        let grads = (out.clone() * Tensor::from_inner(dout.clone()))
            .sum()
            .backward();
        let g = |t: &Tensor<A, 4>| values(t.grad(&grads).unwrap());
        (
            [q, k, v, dout],
            values(out.inner()),
            [g(&qa), g(&ka), g(&va)],
        )
    }

    #[test]
    fn host_forward_and_gradients_match_the_whole_matrix_reference() {
        for spec in specs() {
            let ([q, k, v, dout], want_out, want) = case(spec);
            let (q, k, v, dout) = (values(q), values(k), values(v), values(dout));
            let (out, lse) = forward_host(&q, &k, &v, spec, true);
            assert!(
                max_rel(&out, &want_out) < 1e-5,
                "{spec:?}: out {}",
                max_rel(&out, &want_out)
            );
            let (dq, dk, dv) = backward_host(&q, &k, &v, &out, &lse, &dout, spec);
            for (name, got, want) in [
                ("dq", dq, &want[0]),
                ("dk", dk, &want[1]),
                ("dv", dv, &want[2]),
            ] {
                let err = max_rel(&got, want);
                assert!(err < 1e-5, "{spec:?}: {name} off by {err}");
            }
        }
    }

    #[test]
    fn tensor_op_blocks_match_the_whole_matrix_reference() {
        for spec in specs() {
            let ([q, k, v, dout], want_out, want) = case(spec);
            let (out, lse) = forward_reference(q.clone(), k.clone(), v.clone(), spec);
            let err = max_rel(&values(out.clone()), &want_out);
            assert!(err < 1e-5, "{spec:?}: out {err}");
            let (dq, dk, dv) = backward_reference(q, k, v, out, lse, dout, spec);
            for (name, got, want) in [
                ("dq", dq, &want[0]),
                ("dk", dk, &want[1]),
                ("dv", dv, &want[2]),
            ] {
                let err = max_rel(&values(got), want);
                assert!(err < 1e-5, "{spec:?}: {name} off by {err}");
            }
        }
    }

    #[test]
    fn the_autodiff_op_gives_the_reference_gradients() {
        let spec = specs()[3];
        let ([q, k, v, dout], want_out, want) = case(spec);
        let (qa, ka, va) = (
            Tensor::<A, 4>::from_inner(q).require_grad(),
            Tensor::<A, 4>::from_inner(k).require_grad(),
            Tensor::<A, 4>::from_inner(v).require_grad(),
        );
        let out = causal_attention(qa.clone(), ka.clone(), va.clone(), spec);
        assert!(max_rel(&values(out.clone().inner()), &want_out) < 1e-5);
        let grads = (out * Tensor::from_inner(dout)).sum().backward();
        for (t, want) in [(qa, &want[0]), (ka, &want[1]), (va, &want[2])] {
            assert!(max_rel(&values(t.grad(&grads).unwrap()), want) < 1e-5);
        }
    }

    #[test]
    fn stored_probabilities_give_the_recomputed_bits() {
        // The odd shapes; SmolLM2's heads (9 sharing 3, head_dim 64) past several blocks; and
        // one KV head per query head with a last block of one row, where gemm's one-row
        // products take another path.
        let mut specs = specs();
        for (seq, heads, kv_heads, head_dim) in [(130, 9, 3, 64), (65, 2, 2, 16)] {
            specs.push(AttentionSpec {
                shape: AttentionShape {
                    batch: 2,
                    seq,
                    heads,
                    kv_heads,
                    head_dim,
                    window: None,
                },
                scale: 0.125,
                softcap: None,
            });
        }
        for spec in specs {
            assert!(StoredProbs::new(&spec, 0).is_none());
            assert!(StoredProbs::new(&spec, usize::MAX).is_some());
            let ([q, k, v, dout], _, _) = case(spec);
            let (q, k, v, dout) = (values(q), values(k), values(v), values(dout));
            let (out, lse) = forward_host(&q, &k, &v, spec, true);
            let bits = |stored_bytes| {
                let (dq, dk, dv) =
                    backward_host_storing(&q, &k, &v, &out, &lse, &dout, spec, stored_bytes);
                [dq, dk, dv].map(|x| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
            };
            assert!(bits(usize::MAX) == bits(0), "{spec:?}");
        }
    }

    #[test]
    fn the_bits_do_not_depend_on_the_thread_count() {
        let spec = specs()[2];
        let ([q, k, v, dout], _, _) = case(spec);
        let (q, k, v, dout) = (values(q), values(k), values(v), values(dout));
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let (out, lse) = forward_host(&q, &k, &v, spec, true);
                    let grads = backward_host(&q, &k, &v, &out, &lse, &dout, spec);
                    (out, grads)
                })
        };
        assert_eq!(run(1), run(3));
    }
}
