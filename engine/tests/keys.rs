//! Keys through the whole recipe path: text → tree → normalized params → canonical bytes → key.
//! Equal meanings spelled differently share a key; any single changed value does not.

use std::collections::BTreeMap;

use distillery::plan::params_canon;
use distillery::recipe::{RECIPE_FORMAT, load};
use distillery_cache::{CacheKey, KeyParts};
use distillery_ops::{
    ArtifactKind, Op, OpContext, OpError, OpRegistry, OpSignature, ParamSpec, ParamType, ParamValue,
};
use proptest::prelude::*;

struct Knobs;

impl Op for Knobs {
    fn signature(&self) -> OpSignature {
        OpSignature {
            name: "knobs",
            version: 1,
            doc: "",
            inputs: vec![],
            output: ArtifactKind::Report,
            params: vec![
                ParamSpec::with_default("tokens", ParamType::Int, ParamValue::Int(1000), ""),
                ParamSpec::with_default("lr", ParamType::Float, ParamValue::Float(1e-4), ""),
                ParamSpec::with_default("flag", ParamType::Bool, ParamValue::Bool(false), ""),
                ParamSpec::with_default("name", ParamType::Str, ParamValue::Str("x".into()), ""),
                ParamSpec::optional("layers", ParamType::IntList, ""),
            ],
        }
    }
    fn run(&self, _: &OpContext) -> Result<(), OpError> {
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Values {
    tokens: i64,
    lr: f64,
    flag: bool,
    name: String,
    layers: Vec<i64>,
}

fn values() -> impl Strategy<Value = Values> {
    (
        prop_oneof![
            0i64..5000,
            (1i64..200).prop_map(|k| k * 1000),
            (1i64..50).prop_map(|b| b * 1_000_000_000)
        ],
        prop_oneof![1e-7f64..1.0, (1i64..100).prop_map(|i| i as f64)],
        any::<bool>(),
        "[a-z]{1,6}",
        proptest::collection::vec(0i64..64, 0..4),
    )
        .prop_map(|(tokens, lr, flag, name, layers)| Values {
            tokens,
            lr,
            flag,
            name,
            layers,
        })
}

/// Spells the values as a recipe; `variant` picks among equal-meaning spellings and key orders.
fn spell(v: &Values, variant: u8) -> String {
    let tokens = match variant % 4 {
        0 => v.tokens.to_string(),
        1 => format!("\"{}\"", v.tokens),
        2 if v.tokens % 1_000_000_000 == 0 && v.tokens > 0 => {
            format!("\"{}B\"", v.tokens / 1_000_000_000)
        }
        2 | 3 if v.tokens % 1000 == 0 && v.tokens > 0 => format!("\"{}K\"", v.tokens / 1000),
        _ => format!("\"{}\"", v.tokens),
    };
    let lr = if variant % 2 == 0 {
        format!("{:e}", v.lr)
    } else {
        format!("{:?}", v.lr)
    };
    let lr = if v.lr.fract() == 0.0 && variant % 3 == 0 {
        format!("{}", v.lr as i64)
    } else {
        lr
    };
    let layers = format!(
        "[{}]",
        v.layers
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut entries = vec![
        format!("tokens = {tokens}"),
        format!("lr = {lr}"),
        format!("flag = {}", v.flag),
        format!("name = \"{}\"", v.name),
        format!("layers = {layers}"),
    ];
    entries.rotate_left(variant as usize % 5);
    let comment = if variant % 2 == 0 {
        "# a comment\n"
    } else {
        ""
    };
    format!(
        "[recipe]\ndescription = \"variant {variant}\"\n{comment}[steps.s]\nop = \"knobs\"\nparams = {{ {} }}\n",
        entries.join(", ")
    )
}

fn key_of(text: &str, registry: &OpRegistry) -> CacheKey {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, text).unwrap();
    let recipe = load(&path, &[], registry).unwrap_or_else(|e| panic!("{}\n{text}", e.render()));
    let params = params_canon(&recipe.steps[0].params);
    let inputs = BTreeMap::new();
    KeyParts {
        recipe_format: RECIPE_FORMAT,
        op: "knobs",
        op_version: 1,
        params: &params,
        inputs: &inputs,
        seed: None,
    }
    .key()
}

fn registry() -> OpRegistry {
    let mut r = OpRegistry::new();
    r.register(Knobs);
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn equal_meanings_share_a_key(v in values(), a in 0u8..12, b in 0u8..12) {
        let r = registry();
        prop_assert_eq!(key_of(&spell(&v, a), &r), key_of(&spell(&v, b), &r));
    }

    #[test]
    fn any_single_changed_value_changes_the_key(v in values(), w in values(), which in 0usize..5, variant in 0u8..12) {
        let r = registry();
        let mut changed = v.clone();
        let same = match which {
            0 => { changed.tokens = w.tokens; v.tokens == w.tokens }
            1 => { changed.lr = w.lr; v.lr == w.lr }
            2 => { changed.flag = !v.flag; false }
            3 => { changed.name = w.name.clone(); v.name == w.name }
            _ => { changed.layers = w.layers.clone(); v.layers == w.layers }
        };
        let a = key_of(&spell(&v, variant), &r);
        let b = key_of(&spell(&changed, variant), &r);
        prop_assert_eq!(a == b, same);
    }
}

#[test]
fn defaults_spelled_out_or_left_out_share_a_key() {
    let r = registry();
    let implicit = "[steps.s]\nop = \"knobs\"\n";
    let explicit = "[steps.s]\nop = \"knobs\"\nparams = { tokens = \"1K\", lr = 0.0001, flag = false, name = \"x\" }\n";
    assert_eq!(key_of(implicit, &r), key_of(explicit, &r));
    // An optional parameter given is a change.
    let with_layers = "[steps.s]\nop = \"knobs\"\nparams = { layers = [] }\n";
    assert_ne!(key_of(implicit, &r), key_of(with_layers, &r));
}
