//! Datasets to token sequences: documents from text files or JSONL, or conversations rendered by
//! the model's chat template (with a loss mask on the assistant's tokens), tokenized once (the
//! `tokenize` op caches the result as a dataset artifact), packed into fixed-length sequences with
//! EOS between documents, shuffled deterministically from the recipe seed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::model::tokenizer::Tokenizer;
use crate::op::{Artifact, OpError};

/// Name of the token file in a tokenized dataset artifact: u32 little-endian, documents back to back.
pub const TOKENS_FILE: &str = "tokens.u32";
/// Document boundaries of a tokenized dataset: JSON `{"docs": [[start, len], ...], "words": n}`.
pub const INDEX_FILE: &str = "index.json";
/// Chat data's loss mask beside the tokens: one byte per token, 1 where the loss counts it.
pub const MASK_FILE: &str = "trained.u8";

/// One document's text.
pub struct Document {
    pub source: PathBuf,
    pub text: String,
}

/// Reads every document of a dataset source: each text file is one document; each JSONL line's
/// `field` is one.
pub fn read_documents(artifact: &Artifact) -> Result<Vec<Document>, OpError> {
    let format = artifact
        .options
        .get("format")
        .map(String::as_str)
        .unwrap_or("text");
    let mut docs = Vec::new();
    for path in &artifact.files {
        match format {
            "jsonl" => {
                let field = artifact
                    .options
                    .get("field")
                    .map(String::as_str)
                    .unwrap_or("text");
                let file = std::fs::File::open(path).map_err(|e| OpError::io(path, "open", e))?;
                for (i, line) in BufReader::new(file).lines().enumerate() {
                    let line = line.map_err(|e| OpError::io(path, "read", e))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
                        OpError::Invalid(format!(
                            "{}:{}: not valid JSON: {e}",
                            path.display(),
                            i + 1
                        ))
                    })?;
                    let text = v.get(field).and_then(|t| t.as_str()).ok_or_else(|| {
                        OpError::Invalid(format!(
                            "{}:{}: no string field `{field}`; set `field` in the dataset source to the name holding the text",
                            path.display(),
                            i + 1
                        ))
                    })?;
                    docs.push(Document {
                        source: path.clone(),
                        text: text.to_string(),
                    });
                }
            }
            _ => {
                let bytes = std::fs::read(path).map_err(|e| OpError::io(path, "read", e))?;
                // Gutenberg texts are UTF-8 with the odd stray byte; keep going with replacements.
                let text = String::from_utf8_lossy(&bytes).replace("\r\n", "\n");
                docs.push(Document {
                    source: path.clone(),
                    text,
                });
            }
        }
    }
    Ok(docs)
}

/// A dataset as token ids, documents kept apart.
pub struct TokenizedDataset {
    pub docs: Vec<Vec<u32>>,
    /// Words of the original text (for word perplexity), counted as lm-evaluation-harness
    /// does ([`harness_word_count`]).
    pub words: usize,
    /// UTF-8 bytes of the original text (for byte perplexity and bits per byte); 0 when read
    /// from a tokenized dataset written before bytes were recorded.
    pub bytes: usize,
    /// Chat data: per document, per token, whether the loss counts it (the assistant's tokens);
    /// `None`: every token counts.
    pub trained: Option<Vec<Vec<bool>>>,
}

/// Words of a document as lm-evaluation-harness 0.4 counts them for word perplexity:
/// `len(re.split(r"\s+", doc))`, so one more than the runs of whitespace (a trailing newline
/// counts as a word boundary before an empty word).
pub fn harness_word_count(doc: &str) -> usize {
    let mut runs = 0;
    let mut in_space = false;
    for c in doc.chars() {
        let space = c.is_whitespace();
        if space && !in_space {
            runs += 1;
        }
        in_space = space;
    }
    runs + 1
}

impl TokenizedDataset {
    pub fn total_tokens(&self) -> usize {
        self.docs.iter().map(Vec::len).sum()
    }

    pub fn write(&self, dir: &Path) -> Result<(), OpError> {
        let mut bytes = Vec::with_capacity(self.total_tokens() * 4);
        let mut index = Vec::new();
        let mut start = 0usize;
        for d in &self.docs {
            bytes.extend(d.iter().flat_map(|t| t.to_le_bytes()));
            index.push([start, d.len()]);
            start += d.len();
        }
        let p = dir.join(TOKENS_FILE);
        std::fs::write(&p, bytes).map_err(|e| OpError::io(&p, "write", e))?;
        if let Some(trained) = &self.trained {
            let mask: Vec<u8> = trained.iter().flatten().map(|&t| t as u8).collect();
            let p = dir.join(MASK_FILE);
            std::fs::write(&p, mask).map_err(|e| OpError::io(&p, "write", e))?;
        }
        let p = dir.join(INDEX_FILE);
        let json = serde_json::json!({"docs": index, "words": self.words, "bytes": self.bytes, "tokens": start});
        std::fs::write(&p, json.to_string()).map_err(|e| OpError::io(&p, "write", e))
    }

    pub fn read(dir: &Path) -> Result<TokenizedDataset, OpError> {
        let p = dir.join(TOKENS_FILE);
        let bytes = std::fs::read(&p).map_err(|e| OpError::io(&p, "read", e))?;
        let tokens: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let p = dir.join(INDEX_FILE);
        let text = std::fs::read_to_string(&p).map_err(|e| OpError::io(&p, "read", e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| OpError::Invalid(format!("{}: {e}", p.display())))?;
        let mut docs = Vec::new();
        for d in v["docs"].as_array().into_iter().flatten() {
            let s = d[0].as_u64().unwrap_or(0) as usize;
            let n = d[1].as_u64().unwrap_or(0) as usize;
            if s + n > tokens.len() {
                return Err(OpError::Invalid(format!(
                    "{}: document runs past the token file",
                    p.display()
                )));
            }
            docs.push(tokens[s..s + n].to_vec());
        }
        let p = dir.join(MASK_FILE);
        let trained = if p.is_file() {
            let mask = std::fs::read(&p).map_err(|e| OpError::io(&p, "read", e))?;
            if mask.len() != tokens.len() {
                return Err(OpError::Invalid(format!(
                    "{}: {} mask bytes for {} tokens",
                    p.display(),
                    mask.len(),
                    tokens.len()
                )));
            }
            let mut at = 0;
            Some(
                docs.iter()
                    .map(|d| {
                        let m = mask[at..at + d.len()].iter().map(|&b| b != 0).collect();
                        at += d.len();
                        m
                    })
                    .collect(),
            )
        } else {
            None
        };
        Ok(TokenizedDataset {
            docs,
            words: v["words"].as_u64().unwrap_or(0) as usize,
            bytes: v["bytes"].as_u64().unwrap_or(0) as usize,
            trained,
        })
    }
}

/// Tokenizes a dataset input: a tokenized dataset artifact is read as is; raw files are tokenized
/// with `tokenizer`.
pub fn tokenized(artifact: &Artifact, tokenizer: &Tokenizer) -> Result<TokenizedDataset, OpError> {
    Ok(tokenized_with_counts(artifact, tokenizer)?.0)
}

/// [`tokenized`], with each raw-text document's `(words, bytes)` as [`harness_word_count`] and
/// UTF-8 count them; `None` for a tokenized dataset artifact, which keeps only totals.
pub fn tokenized_with_counts(
    artifact: &Artifact,
    tokenizer: &Tokenizer,
) -> Result<(TokenizedDataset, Option<Vec<(usize, usize)>>), OpError> {
    if artifact.path.join(TOKENS_FILE).is_file() && artifact.files.is_empty() {
        return Ok((TokenizedDataset::read(&artifact.path)?, None));
    }
    if artifact.options.get("format").map(String::as_str) == Some("chat") {
        return Ok((chat_tokenized(artifact, tokenizer)?, None));
    }
    let docs = read_documents(artifact)?;
    if docs.is_empty() {
        return Err(OpError::Invalid("the dataset has no documents".into()));
    }
    let counts: Vec<(usize, usize)> = docs
        .iter()
        .map(|d| (harness_word_count(&d.text), d.text.len()))
        .collect();
    let words = counts.iter().map(|c| c.0).sum();
    let bytes = counts.iter().map(|c| c.1).sum();
    let docs = docs
        .iter()
        .map(|d| tokenizer.encode(&d.text))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        TokenizedDataset {
            docs,
            words,
            bytes,
            trained: None,
        },
        Some(counts),
    ))
}

/// Conversations (JSONL, each line's `field` a list of `{role, content}` messages) rendered by
/// the model's chat template and tokenized without added special tokens (the template writes its
/// own, as `apply_chat_template(tokenize=True)` does), each token marked trained when it is the
/// assistant's. Words and bytes are those of the rendered text.
fn chat_tokenized(artifact: &Artifact, tokenizer: &Tokenizer) -> Result<TokenizedDataset, OpError> {
    let template = tokenizer.chat_template()?;
    let field = artifact
        .options
        .get("field")
        .map(String::as_str)
        .unwrap_or("messages");
    let (mut docs, mut trained) = (Vec::new(), Vec::new());
    let (mut words, mut bytes) = (0, 0);
    for path in &artifact.files {
        let text = std::fs::read_to_string(path).map_err(|e| OpError::io(path, "read", e))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{}:{}", path.display(), i + 1);
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| OpError::Invalid(format!("{}: not valid JSON: {e}", at())))?;
            let messages = crate::model::chat::messages(&v, field, &at)?;
            let (text, spans) = template
                .render_with_assistant_spans(&messages)
                .map_err(|e| OpError::Invalid(format!("{}: the chat template: {e}", at())))?;
            let (ids, offsets) = tokenizer.encode_with_offsets(&text)?;
            words += harness_word_count(&text);
            bytes += text.len();
            trained.push(crate::model::chat::assistant_mask(&offsets, &spans));
            docs.push(ids);
        }
    }
    if docs.is_empty() {
        return Err(OpError::Invalid("the dataset has no conversations".into()));
    }
    Ok(TokenizedDataset {
        docs,
        words,
        bytes,
        trained: Some(trained),
    })
}

/// A small, fast, seedable generator (splitmix64): data order must not depend on a crate's version.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Concatenates documents with `eos` between them and cuts `seq_len`-token sequences (the tail
/// that does not fill a sequence is dropped), shuffled by `seed`.
pub fn pack(
    data: &TokenizedDataset,
    seq_len: usize,
    eos: u32,
    seed: u64,
) -> Result<Vec<Vec<u32>>, OpError> {
    Ok(pack_with_mask(data, seq_len, eos, seed)?.tokens)
}

/// Packed sequences `[n][seq_len]` and, for chat data, their loss masks (the same shape: whether
/// the loss counts each token as a target).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Packed {
    pub tokens: Vec<Vec<u32>>,
    pub trained: Option<Vec<Vec<bool>>>,
}

impl Packed {
    /// The first `n` sequences and the rest.
    pub fn split_at(&self, n: usize) -> (Packed, Packed) {
        let (a, b) = self.tokens.split_at(n);
        let masks = self.trained.as_ref().map(|t| t.split_at(n));
        (
            Packed {
                tokens: a.to_vec(),
                trained: masks.map(|m| m.0.to_vec()),
            },
            Packed {
                tokens: b.to_vec(),
                trained: masks.map(|m| m.1.to_vec()),
            },
        )
    }

    /// The sequences at `indices`, in that order.
    pub fn pick(&self, indices: impl Iterator<Item = usize> + Clone) -> Packed {
        Packed {
            tokens: indices.clone().map(|i| self.tokens[i].clone()).collect(),
            trained: self
                .trained
                .as_ref()
                .map(|t| indices.map(|i| t[i].clone()).collect()),
        }
    }

    /// How many targets (every token but each sequence's first) the loss counts: all of them
    /// without a mask.
    pub fn trained_targets(&self) -> usize {
        match &self.trained {
            Some(t) => t
                .iter()
                .map(|m| m.iter().skip(1).filter(|x| **x).count())
                .sum(),
            None => self.tokens.iter().map(|s| s.len().saturating_sub(1)).sum(),
        }
    }

    /// Consecutive runs of `n` sequences (the last may be shorter).
    pub fn chunks(&self, n: usize) -> impl Iterator<Item = Packed> + '_ {
        let n = n.max(1);
        (0..self.tokens.len())
            .step_by(n)
            .map(move |s| self.pick(s..(s + n).min(self.tokens.len())))
    }
}

impl From<Vec<Vec<u32>>> for Packed {
    /// Plain sequences: every token trained.
    fn from(tokens: Vec<Vec<u32>>) -> Packed {
        Packed {
            tokens,
            trained: None,
        }
    }
}

/// [`pack`] with the loss mask cut and shuffled alongside the tokens; the EOS between documents is
/// never trained in chat data (the template ends its turns itself).
pub fn pack_with_mask(
    data: &TokenizedDataset,
    seq_len: usize,
    eos: u32,
    seed: u64,
) -> Result<Packed, OpError> {
    let mut stream = Vec::with_capacity(data.total_tokens() + data.docs.len());
    for d in &data.docs {
        stream.extend_from_slice(d);
        stream.push(eos);
    }
    if stream.len() < seq_len {
        return Err(OpError::Invalid(format!(
            "the dataset has {} tokens, less than one sequence of {seq_len}: add text or lower seq_len",
            stream.len()
        )));
    }
    let mut order: Vec<usize> = (0..stream.len() / seq_len).collect();
    SplitMix(seed).shuffle(&mut order);
    let cut = |s: &[u32]| -> Vec<Vec<u32>> {
        order
            .iter()
            .map(|&i| s[i * seq_len..(i + 1) * seq_len].to_vec())
            .collect()
    };
    let trained = data.trained.as_ref().map(|masks| {
        let mut flat = Vec::with_capacity(stream.len());
        for m in masks {
            flat.extend_from_slice(m);
            flat.push(false);
        }
        order
            .iter()
            .map(|&i| flat[i * seq_len..(i + 1) * seq_len].to_vec())
            .collect()
    });
    Ok(Packed {
        tokens: cut(&stream),
        trained,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_counted_like_the_harness() {
        // len(re.split(r"\s+", doc)) in Python.
        assert_eq!(harness_word_count("a b\n"), 3);
        assert_eq!(harness_word_count("a  b"), 2);
        assert_eq!(harness_word_count(""), 1);
        assert_eq!(harness_word_count(" a"), 2);
        assert_eq!(harness_word_count("one\n\ntwo three"), 3);
    }

    #[test]
    fn packing_is_deterministic_and_eos_separated() {
        let data = TokenizedDataset {
            docs: vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]],
            words: 0,
            bytes: 0,
            trained: None,
        };
        let a = pack(&data, 3, 0, 7).unwrap();
        assert_eq!(a, pack(&data, 3, 0, 7).unwrap());
        let mut all: Vec<u32> = a.concat();
        all.sort();
        assert_eq!(all, vec![0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_ne!(pack(&data, 3, 0, 8).unwrap(), a);
        let e = pack(&data, 100, 0, 1).unwrap_err().to_string();
        assert!(e.contains("less than one sequence"), "{e}");
    }

    /// The mask travels with its tokens through the cut and the shuffle; the EOS between
    /// documents is never trained.
    #[test]
    fn packing_keeps_each_token_with_its_mask() {
        let data = TokenizedDataset {
            docs: vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9]],
            words: 0,
            bytes: 0,
            // Odd tokens trained.
            trained: Some(vec![
                vec![true, false, true],
                vec![false, true],
                vec![false, true, false, true],
            ]),
        };
        let p = pack_with_mask(&data, 3, 0, 7).unwrap();
        assert_eq!(p.tokens, pack(&data, 3, 0, 7).unwrap());
        for (seq, mask) in p.tokens.iter().zip(p.trained.as_ref().unwrap()) {
            for (t, m) in seq.iter().zip(mask) {
                assert_eq!(*m, t % 2 == 1, "token {t}");
            }
        }
    }
}
