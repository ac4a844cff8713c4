//! Datasets to token sequences: documents from text files or JSONL, tokenized once (the `tokenize`
//! op caches the result as a dataset artifact), packed into fixed-length sequences with EOS between
//! documents, shuffled deterministically from the recipe seed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::model::tokenizer::Tokenizer;
use crate::op::{Artifact, OpError};

/// Name of the token file in a tokenized dataset artifact: u32 little-endian, documents back to back.
pub const TOKENS_FILE: &str = "tokens.u32";
/// Document boundaries of a tokenized dataset: JSON `{"docs": [[start, len], ...], "words": n}`.
pub const INDEX_FILE: &str = "index.json";

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
        Ok(TokenizedDataset {
            docs,
            words: v["words"].as_u64().unwrap_or(0) as usize,
            bytes: v["bytes"].as_u64().unwrap_or(0) as usize,
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
    Ok((TokenizedDataset { docs, words, bytes }, Some(counts)))
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
    let mut seqs: Vec<Vec<u32>> = stream.chunks_exact(seq_len).map(<[u32]>::to_vec).collect();
    SplitMix(seed).shuffle(&mut seqs);
    Ok(seqs)
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
}
