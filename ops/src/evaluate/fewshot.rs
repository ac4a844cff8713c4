//! Few-shot contexts as lm-evaluation-harness 0.4 builds them: examples drawn by its
//! `ContextSampler` (Python's `random.Random(seed).sample`, reproduced draw for draw so that the
//! same seed picks the same examples) or its `first_n` sampler, joined as its `fewshot_context`
//! joins them in plain text:
//!
//! ```text
//! description + Σ (example + target_delimiter + answer + fewshot_delimiter) + question
//! ```

use rand_mt::Mt;

/// How examples are chosen: the harness's `default` (random, seeded) or `first_n` sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    Default,
    FirstN,
}

impl Sampler {
    pub const NAMES: [&'static str; 2] = ["default", "first_n"];

    pub fn from_name(name: &str) -> Option<Sampler> {
        match name {
            "default" => Some(Sampler::Default),
            "first_n" => Some(Sampler::FirstN),
            _ => None,
        }
    }
}

/// CPython's `random.Random` for the two calls the harness makes: MT19937 (the `rand_mt` crate)
/// seeded as `random.seed(int)` seeds it (`init_by_array` over the integer's 32-bit words,
/// least significant first), `getrandbits`, `_randbelow` and `sample`.
pub struct PythonRandom(Mt);

impl PythonRandom {
    /// `random.Random(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> PythonRandom {
        let key: Vec<u32> = if seed >> 32 == 0 {
            vec![seed as u32]
        } else {
            vec![seed as u32, (seed >> 32) as u32]
        };
        PythonRandom(Mt::new_with_key(key))
    }

    /// `getrandbits(k)` for `k ≤ 32`.
    fn getrandbits(&mut self, k: u32) -> u32 {
        if k == 0 {
            return 0;
        }
        self.0.next_u32() >> (32 - k)
    }

    /// `_randbelow_with_getrandbits(n)`: uniform in `[0, n)` by rejection, `n < 2^32`.
    fn randbelow(&mut self, n: usize) -> usize {
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `sample(range(n), k)`: `k` distinct indices below `n`, in draw order (CPython's two
    /// strategies: a shrinking pool for small populations, rejection from a set for large).
    ///
    /// # Panics
    /// When `k > n` (Python raises `ValueError`); callers check first.
    pub fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "sample larger than population");
        let mut setsize = 21usize;
        if k > 5 {
            let exponent = ((k * 3) as f64).ln() / 4f64.ln();
            setsize += 4usize.pow(exponent.ceil() as u32);
        }
        let mut result = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow(n - i);
                result.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::new();
            for _ in 0..k {
                let mut j = self.randbelow(n);
                while selected.contains(&j) {
                    j = self.randbelow(n);
                }
                selected.insert(j);
                result.push(j);
            }
        }
        result
    }
}

/// Draws the examples for each evaluated document, in the order documents are evaluated (one
/// sampler per task, seeded once, as the harness's `set_fewshot_seed` does).
pub struct FewshotDraw {
    sampler: Sampler,
    rng: PythonRandom,
    num_fewshot: usize,
}

impl FewshotDraw {
    pub fn new(sampler: Sampler, seed: u64, num_fewshot: usize) -> FewshotDraw {
        FewshotDraw {
            sampler,
            rng: PythonRandom::new(seed),
            num_fewshot,
        }
    }

    /// Indices into a pool of `pool` examples for one document. When the pool is the evaluated
    /// split itself (`same_split`), as the harness does, `n + 1` are drawn and every example
    /// equal to the document (`equal_to_doc(j)`) is dropped, with a second draw from the pool
    /// without it when duplicates leave fewer than `n`. Errors name what is short.
    pub fn examples(
        &mut self,
        pool: usize,
        same_split: bool,
        equal_to_doc: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<usize>, String> {
        let n = self.num_fewshot;
        if n == 0 {
            return Ok(Vec::new());
        }
        let short = |have: usize| {
            format!(
                "num_fewshot = {n} but only {have} example(s) are available{}",
                if same_split {
                    " besides the document itself"
                } else {
                    ""
                }
            )
        };
        match self.sampler {
            Sampler::FirstN => {
                let kept: Vec<usize> = (0..pool)
                    .filter(|&j| !(same_split && equal_to_doc(j)))
                    .collect();
                if kept.len() < n {
                    return Err(short(kept.len()));
                }
                Ok(kept[..n].to_vec())
            }
            Sampler::Default if !same_split => {
                if pool < n {
                    return Err(short(pool));
                }
                Ok(self.rng.sample(pool, n))
            }
            Sampler::Default => {
                if pool < n + 1 {
                    return Err(short(pool.saturating_sub(1)));
                }
                let mut res: Vec<usize> = self
                    .rng
                    .sample(pool, n + 1)
                    .into_iter()
                    .filter(|&j| !equal_to_doc(j))
                    .take(n)
                    .collect();
                if res.len() < n {
                    let others: Vec<usize> = (0..pool).filter(|&j| !equal_to_doc(j)).collect();
                    if others.len() < n {
                        return Err(short(others.len()));
                    }
                    res = self
                        .rng
                        .sample(others.len(), n)
                        .into_iter()
                        .map(|i| others[i])
                        .collect();
                }
                Ok(res)
            }
        }
    }
}

/// The harness's plain-text context: `description`, then each `(question, answer)` example
/// followed by `target_delimiter`/`fewshot_delimiter`, then the question asked. An example with an
/// empty answer is its question alone, with neither delimiter (the harness's `build_qa_turn`).
pub fn fewshot_context(
    description: &str,
    examples: &[(&str, &str)],
    question: &str,
    target_delimiter: &str,
    fewshot_delimiter: &str,
) -> String {
    let mut out = description.to_string();
    for (q, a) in examples {
        out.push_str(q);
        if !a.is_empty() {
            out.push_str(target_delimiter);
            out.push_str(a);
            out.push_str(fewshot_delimiter);
        }
    }
    out.push_str(question);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws CPython 3.11 made (`/work/refpy/bin/python -c "import random; r = random.Random(1234);
    /// print([r.sample(range(10), 3) for _ in range(3)])"`, and likewise for the others): the
    /// small-pool strategy, the set strategy (8 draws from 100: 100 > 21 + 4³), and a seed wider
    /// than 32 bits.
    #[test]
    fn samples_as_cpython_samples() {
        let mut r = PythonRandom::new(1234);
        let draws: Vec<Vec<usize>> = (0..3).map(|_| r.sample(10, 3)).collect();
        assert_eq!(draws, vec![vec![7, 1, 0], vec![1, 0, 9], vec![1, 5, 3]]);
        assert_eq!(
            PythonRandom::new(7).sample(100, 8),
            vec![41, 19, 50, 83, 6, 9, 68, 12]
        );
        assert_eq!(
            PythonRandom::new((1 << 40) + 5).sample(1000, 4),
            vec![516, 529, 275, 679]
        );
    }

    #[test]
    fn the_document_itself_is_never_its_own_example() {
        let mut d = FewshotDraw::new(Sampler::Default, 1234, 2);
        for doc in 0..5 {
            let ex = d.examples(5, true, &|j| j == doc).unwrap();
            assert_eq!(ex.len(), 2);
            assert!(!ex.contains(&doc));
        }
        let mut d = FewshotDraw::new(Sampler::FirstN, 0, 2);
        assert_eq!(d.examples(5, true, &|j| j == 0).unwrap(), vec![1, 2]);
        let err = FewshotDraw::new(Sampler::Default, 1, 3)
            .examples(3, true, &|j| j == 0)
            .unwrap_err();
        assert!(err.contains("only 2"), "{err}");
    }

    #[test]
    fn contexts_join_as_the_harness_joins_them() {
        let c = fewshot_context("D\n\n", &[("Q1", "A1"), ("Q2", "A2")], "Q3", " ", "\n\n");
        assert_eq!(c, "D\n\nQ1 A1\n\nQ2 A2\n\nQ3");
        let c = fewshot_context("", &[("Q1", ""), ("Q2", "A2")], "Q3", " ", "\n\n");
        assert_eq!(c, "Q1Q2 A2\n\nQ3");
    }
}
