//! Cache keys: blake3 over one canonical, unambiguous byte encoding.
//!
//! Everything that can change a step's result goes through [`Canon`]; two values that mean the same
//! thing must encode to the same bytes, and two that differ must not. The encoding is salted with
//! [`KEY_SCHEME_VERSION`] so that changing the scheme itself invalidates every key at once.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Version of the key scheme (this module's encoding). Bump it when the encoding changes.
///
/// History: 2 added the recipe seed for ops that use it and keyed source files by names relative
/// to their file set (never absolute paths).
pub const KEY_SCHEME_VERSION: u32 = 2;

/// A 256-bit content key, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        CacheKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// The first 12 hex digits, for tables meant for people.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }

    /// The blake3 of a byte string, as a key.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        CacheKey(*blake3::hash(bytes).as_bytes())
    }
}

impl From<blake3::Hash> for CacheKey {
    fn from(h: blake3::Hash) -> Self {
        CacheKey(*h.as_bytes())
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.short())
    }
}

/// Why a string is not a key.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a cache key (expected 64 hex digits)")]
pub struct ParseKeyError(pub String);

impl FromStr for CacheKey {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        blake3::Hash::from_hex(s.trim())
            .map(CacheKey::from)
            .map_err(|_| ParseKeyError(s.to_string()))
    }
}

impl Serialize for CacheKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for CacheKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A value in canonical form. Maps are ordered by key; floats are compared by value (`1e-4` and
/// `0.0001` are the same f64), with `-0.0` folded into `0.0`. NaN has no canonical form and is
/// rejected by [`Canon::float`].
#[derive(Clone, Debug, PartialEq)]
pub enum Canon {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List(Vec<Canon>),
    Map(BTreeMap<String, Canon>),
}

impl Canon {
    /// A float in canonical form, or `None` for NaN.
    pub fn float(x: f64) -> Option<Canon> {
        if x.is_nan() {
            None
        } else if x == 0.0 {
            Some(Canon::Float(0.0))
        } else {
            Some(Canon::Float(x))
        }
    }

    /// Appends the canonical encoding: a one-byte tag, then a length-prefixed body, so that no two
    /// different values share a byte string.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Canon::Null => out.push(b'n'),
            Canon::Bool(b) => {
                out.push(b'b');
                out.push(*b as u8);
            }
            Canon::Int(i) => {
                out.push(b'i');
                out.extend_from_slice(&i.to_le_bytes());
            }
            Canon::Float(x) => {
                out.push(b'f');
                let x = if *x == 0.0 { 0.0f64 } else { *x };
                out.extend_from_slice(&x.to_bits().to_le_bytes());
            }
            Canon::Str(s) => {
                out.push(b's');
                encode_bytes(s.as_bytes(), out);
            }
            Canon::List(items) => {
                out.push(b'l');
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    item.encode_into(out);
                }
            }
            Canon::Map(map) => {
                out.push(b'm');
                out.extend_from_slice(&(map.len() as u64).to_le_bytes());
                for (k, v) in map {
                    encode_bytes(k.as_bytes(), out);
                    v.encode_into(out);
                }
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// A JSON rendering for manifests and plans (people read these; keys never hash them).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Canon::Null => Value::Null,
            Canon::Bool(b) => Value::Bool(*b),
            Canon::Int(i) => i64::try_from(*i)
                .map(Value::from)
                .unwrap_or_else(|_| Value::String(i.to_string())),
            Canon::Float(x) => serde_json::Number::from_f64(*x)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            Canon::Str(s) => Value::String(s.clone()),
            Canon::List(items) => Value::Array(items.iter().map(Canon::to_json).collect()),
            Canon::Map(map) => {
                Value::Object(map.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }
}

fn encode_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Everything a step's key is made of.
#[derive(Clone, Debug)]
pub struct KeyParts<'a> {
    /// Version of the recipe format that produced the parameters.
    pub recipe_format: u32,
    pub op: &'a str,
    /// The op's implementation version: bumped whenever its output for the same inputs changes.
    pub op_version: u32,
    /// Normalized parameters (defaults filled in), as a map.
    pub params: &'a Canon,
    /// Input port name to the key of the artifact wired into it.
    pub inputs: &'a BTreeMap<String, CacheKey>,
    /// The recipe seed, for an op whose result depends on it; `None` leaves it out of the key.
    pub seed: Option<u64>,
}

impl KeyParts<'_> {
    pub fn key(&self) -> CacheKey {
        let mut inputs = BTreeMap::new();
        for (port, key) in self.inputs {
            inputs.insert(port.clone(), Canon::Str(key.to_hex()));
        }
        let mut top = BTreeMap::new();
        top.insert("key_scheme".into(), Canon::Int(KEY_SCHEME_VERSION as i128));
        top.insert(
            "recipe_format".into(),
            Canon::Int(self.recipe_format as i128),
        );
        top.insert("op".into(), Canon::Str(self.op.to_string()));
        top.insert("op_version".into(), Canon::Int(self.op_version as i128));
        top.insert("params".into(), self.params.clone());
        top.insert("inputs".into(), Canon::Map(inputs));
        if let Some(seed) = self.seed {
            top.insert("seed".into(), Canon::Int(seed as i128));
        }
        let mut hasher = blake3::Hasher::new_derive_key("distillery step key");
        hasher.update(&Canon::Map(top).encode());
        hasher.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parts_key(params: Canon, inputs: &BTreeMap<String, CacheKey>) -> CacheKey {
        KeyParts {
            recipe_format: 1,
            op: "prune",
            op_version: 1,
            params: &params,
            inputs,
            seed: None,
        }
        .key()
    }

    #[test]
    fn key_round_trips_through_hex() {
        let k = CacheKey::of_bytes(b"abc");
        assert_eq!(k.to_hex().parse::<CacheKey>().unwrap(), k);
        assert!("xyz".parse::<CacheKey>().is_err());
    }

    #[test]
    fn equal_floats_encode_equally() {
        let a = Canon::float("1e-4".parse().unwrap()).unwrap();
        let b = Canon::float("0.0001".parse().unwrap()).unwrap();
        assert_eq!(a.encode(), b.encode());
        assert_eq!(
            Canon::float(-0.0).unwrap().encode(),
            Canon::float(0.0).unwrap().encode()
        );
        assert!(Canon::float(f64::NAN).is_none());
    }

    #[test]
    fn types_do_not_collide() {
        assert_ne!(Canon::Int(1).encode(), Canon::Float(1.0).encode());
        assert_ne!(Canon::Str("1".into()).encode(), Canon::Int(1).encode());
        // Length prefixes keep concatenations apart.
        let ab_c = Canon::List(vec![Canon::Str("ab".into()), Canon::Str("c".into())]);
        let a_bc = Canon::List(vec![Canon::Str("a".into()), Canon::Str("bc".into())]);
        assert_ne!(ab_c.encode(), a_bc.encode());
    }

    #[test]
    fn every_part_is_in_the_key() {
        let inputs: BTreeMap<String, CacheKey> =
            [("model".to_string(), CacheKey::of_bytes(b"m"))].into();
        let params = Canon::Map([("x".to_string(), Canon::Int(1))].into());
        let base = KeyParts {
            recipe_format: 1,
            op: "prune",
            op_version: 1,
            params: &params,
            inputs: &inputs,
            seed: None,
        };
        let k = base.key();
        let seeded = KeyParts {
            seed: Some(42),
            ..base.clone()
        }
        .key();
        assert_ne!(k, seeded);
        assert_ne!(
            seeded,
            KeyParts {
                seed: Some(7),
                ..base.clone()
            }
            .key()
        );
        assert_ne!(
            k,
            KeyParts {
                recipe_format: 2,
                ..base.clone()
            }
            .key()
        );
        assert_ne!(
            k,
            KeyParts {
                op: "score",
                ..base.clone()
            }
            .key()
        );
        assert_ne!(
            k,
            KeyParts {
                op_version: 2,
                ..base.clone()
            }
            .key()
        );
        let other_inputs: BTreeMap<String, CacheKey> =
            [("model".to_string(), CacheKey::of_bytes(b"n"))].into();
        assert_ne!(
            k,
            KeyParts {
                inputs: &other_inputs,
                ..base.clone()
            }
            .key()
        );
        let renamed: BTreeMap<String, CacheKey> =
            [("teacher".to_string(), CacheKey::of_bytes(b"m"))].into();
        assert_ne!(
            k,
            KeyParts {
                inputs: &renamed,
                ..base.clone()
            }
            .key()
        );
    }

    fn canon_leaf() -> impl Strategy<Value = Canon> {
        prop_oneof![
            any::<bool>().prop_map(Canon::Bool),
            any::<i64>().prop_map(|i| Canon::Int(i as i128)),
            any::<f64>()
                .prop_filter("not nan", |x| !x.is_nan())
                .prop_map(|x| Canon::float(x).unwrap()),
            "[a-z]{0,6}".prop_map(Canon::Str),
        ]
    }

    proptest! {
        /// Changing any single value of a parameter map changes the key.
        #[test]
        fn any_single_change_changes_the_key(
            map in proptest::collection::btree_map("[a-z]{1,8}", canon_leaf(), 1..8),
            pick in any::<prop::sample::Index>(),
            replacement in canon_leaf(),
        ) {
            let inputs = BTreeMap::new();
            let name = map.keys().nth(pick.index(map.len())).unwrap().clone();
            let mut changed = map.clone();
            changed.insert(name.clone(), replacement.clone());
            let same = map[&name].encode() == replacement.encode();
            let a = parts_key(Canon::Map(map), &inputs);
            let b = parts_key(Canon::Map(changed), &inputs);
            prop_assert_eq!(a == b, same);
        }

        /// Insertion order of a map never matters.
        #[test]
        fn map_order_does_not_matter(entries in proptest::collection::vec(("[a-z]{1,8}", canon_leaf()), 0..8)) {
            let forward: BTreeMap<_, _> = entries.iter().cloned().collect();
            let mut backward = BTreeMap::new();
            for (k, v) in entries.iter().rev() {
                backward.entry(k.clone()).or_insert_with(|| forward[k].clone());
                let _ = v;
            }
            prop_assert_eq!(Canon::Map(forward).encode(), Canon::Map(backward).encode());
        }
    }
}
