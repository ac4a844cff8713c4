//! A step's cache key: op, op version, canonical parameters, input keys and (when the op uses it) the seed.

use std::collections::BTreeMap;

use distillery_cache::{CacheKey, Canon, KeyParts};
use distillery_ops::{Op, ParamValue, Params};

use super::ResolvedSource;
use crate::recipe::{RECIPE_FORMAT, Recipe, Ref};

/// The canonical form of normalized parameters.
pub fn params_canon(params: &Params) -> Canon {
    fn one(v: &ParamValue) -> Canon {
        match v {
            ParamValue::Int(i) => Canon::Int(*i as i128),
            ParamValue::Float(x) => Canon::float(*x).unwrap_or(Canon::Null),
            ParamValue::Bool(b) => Canon::Bool(*b),
            ParamValue::Str(s) => Canon::Str(s.clone()),
            ParamValue::List(items) => Canon::List(items.iter().map(one).collect()),
        }
    }
    Canon::Map(params.0.iter().map(|(k, v)| (k.clone(), one(v))).collect())
}

/// A step's key and what went into it.
pub(super) struct StepKey {
    pub key: CacheKey,
    pub params: Canon,
    /// port → key of what feeds it (absent optional sources left out)
    pub inputs: BTreeMap<String, CacheKey>,
    /// The recipe seed when the op uses it.
    pub seed: Option<u64>,
}

/// The key of step `i`, whose inputs' keys are in `keys` (steps before it in topological order).
pub(super) fn step_key(
    recipe: &Recipe,
    i: usize,
    op: &dyn Op,
    sources: &[ResolvedSource],
    keys: &[Option<CacheKey>],
) -> StepKey {
    let step = &recipe.steps[i];
    let mut params = params_canon(&step.params);
    // Several ranks sum gradients in another order than one: other bits, so another key. (Not a
    // parameter name an op can have: those have no dot.)
    if let (Some(tasks), Canon::Map(m)) = (step.resources.tasks.filter(|t| *t > 1), &mut params) {
        m.insert("resources.tasks".into(), Canon::Int(tasks as i128));
    }
    let mut inputs = BTreeMap::new();
    for input in &step.inputs {
        let key = match input.target {
            Ref::Source(j) if !sources[j].present => continue,
            Ref::Source(j) => sources[j].key,
            Ref::Step(j) => keys[j].expect("topological order"),
        };
        inputs.insert(input.port.clone(), key);
    }
    let seed = op.uses_seed(&step.params).then_some(recipe.seed);
    let key = KeyParts {
        recipe_format: RECIPE_FORMAT,
        op: &step.op,
        op_version: op.signature().version,
        params: &params,
        inputs: &inputs,
        seed,
    }
    .key();
    StepKey {
        key,
        params,
        inputs,
        seed,
    }
}
