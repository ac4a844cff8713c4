//! Tokenization with the `tokenizers` crate, from a Hugging Face `tokenizer.json` (a checkpoint's,
//! or one rebuilt from GGUF metadata).

use std::path::Path;

use crate::model::ModelError;
use crate::model::chat::ChatTemplate;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The checkpoint's chat template, compiled when the checkpoint has one (an error kept for
    /// when chat data asks for it: other data never needs it).
    chat: Option<Result<ChatTemplate, String>>,
    origin: std::path::PathBuf,
}

impl Tokenizer {
    pub fn from_json(json: &str, origin: &Path) -> Result<Tokenizer, ModelError> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| {
            ModelError::Tokenizer {
                path: origin.to_path_buf(),
                why: e.to_string(),
            }
        })?;
        Ok(Tokenizer {
            inner,
            chat: None,
            origin: origin.to_path_buf(),
        })
    }

    /// Attaches the checkpoint's chat template: its Jinja source (or why it could not be read)
    /// and the special tokens it may name.
    pub fn with_chat_template(
        mut self,
        source: Option<Result<String, String>>,
        special_tokens: serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        self.chat = source.map(|s| {
            s.and_then(|s| ChatTemplate::new(&s, special_tokens).map_err(|e| e.to_string()))
        });
        self
    }

    /// The chat template; an error naming the checkpoint when it has none or it does not compile.
    pub fn chat_template(&self) -> Result<&ChatTemplate, ModelError> {
        match &self.chat {
            Some(Ok(t)) => Ok(t),
            Some(Err(e)) => Err(ModelError::Tokenizer {
                path: self.origin.clone(),
                why: format!("its chat template cannot be used: {e}"),
            }),
            None => Err(ModelError::Tokenizer {
                path: self.origin.clone(),
                why: "chat data needs the model's chat template, and it has none (no chat_template.jinja, no `chat_template` in tokenizer_config.json); add one, or use format = \"jsonl\" text".into(),
            }),
        }
    }

    /// Token ids of `text` without special tokens added, with each token's byte range in it.
    pub fn encode_with_offsets(
        &self,
        text: &str,
    ) -> Result<(Vec<u32>, Vec<(usize, usize)>), ModelError> {
        self.inner
            .encode(text, false)
            .map(|e| (e.get_ids().to_vec(), e.get_offsets().to_vec()))
            .map_err(|e| ModelError::Tokenizer {
                path: self.origin.clone(),
                why: e.to_string(),
            })
    }

    /// Token ids of `text`, without special tokens added (BOS is the caller's choice).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer {
                path: Default::default(),
                why: e.to_string(),
            })
    }

    /// The special tokens the tokenizer's post-processor puts around a single text
    /// (`tokenizer.json` `post_processor`, e.g. Gemma's and Llama 3's BOS): `(before, after)`.
    /// What Hugging Face's `tokenizer.encode(text)` adds by default (`add_special_tokens=True`),
    /// and so what lm-evaluation-harness's `tok_encode` adds to every context and document.
    pub fn special_affixes(&self) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
        let probe = "a";
        let plain = self.encode(probe)?;
        let with = self
            .inner
            .encode_fast(probe, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer {
                path: Default::default(),
                why: e.to_string(),
            })?;
        let at = with
            .windows(plain.len().max(1))
            .position(|w| w == plain.as_slice())
            .ok_or_else(|| ModelError::Tokenizer {
                path: Default::default(),
                why: format!(
                    "its post-processor changes the text's own tokens ({plain:?} became {with:?}); only special tokens around the text are supported"
                ),
            })?;
        Ok((with[..at].to_vec(), with[at + plain.len()..].to_vec()))
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// `decode` without special tokens (`skip_special_tokens=True`): the text of a generation.
    pub fn decode_text(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
