//! Malformed recipes: each gives one clear error at the exact line:column, exit code 2, no panic.

mod common;

use common::{Env, stderr, text};

struct Case {
    name: &'static str,
    recipe: &'static str,
    /// `--set` arguments.
    set: &'static [&'static str],
    /// "file:line:column" expected after `-->`.
    at: &'static str,
    /// Substrings the message must contain (message and help).
    says: &'static [&'static str],
}

const HEAD: &str = "[sources.teacher]\nkind = \"model\"\npath = \"model\"\n\n[sources.text]\nkind = \"dataset\"\nfiles = \"data/*.txt\"\n\n";

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "toml syntax",
            recipe: "[steps.a\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:1:9",
            says: &["invalid TOML"],
        },
        Case {
            name: "duplicate step",
            recipe: "[steps.a]\nop = \"emit\"\n[steps.a]\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:3:8",
            says: &["invalid TOML", "duplicate"],
        },
        Case {
            name: "unknown top-level table",
            recipe: "[recipes]\nname = \"x\"\n[steps.a]\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:1:2",
            says: &["unknown key `recipes`", "did you mean `recipe`?"],
        },
        Case {
            name: "unknown recipe key",
            recipe: "[recipe]\nnmae = \"x\"\n[steps.a]\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:2:1",
            says: &["unknown key `nmae` in [recipe]", "did you mean `name`?"],
        },
        Case {
            name: "negative seed",
            recipe: "[recipe]\nseed = -1\n[steps.a]\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:2:8",
            says: &["recipe.seed must be a non-negative integer"],
        },
        Case {
            name: "no steps",
            recipe: "[recipe]\nname = \"x\"\n",
            set: &[],
            at: "r.toml:1:1",
            says: &["the recipe has no steps"],
        },
        Case {
            name: "step without op",
            recipe: "[steps.a]\nparams = {}\n",
            set: &[],
            at: "r.toml:1:8",
            says: &[
                "step `a` has no `op`",
                "known ops: calibrate, compare, depth_scan, distill, draw, emit",
            ],
        },
        Case {
            name: "unknown op",
            recipe: "[steps.a]\nop = \"emitt\"\n",
            set: &[],
            at: "r.toml:2:6",
            says: &["unknown op `emitt`", "did you mean `emit`?"],
        },
        Case {
            name: "op not a string",
            recipe: "[steps.a]\nop = 3\n",
            set: &[],
            at: "r.toml:2:6",
            says: &["steps.a.op must be a string"],
        },
        Case {
            name: "unknown step key",
            recipe: "[steps.a]\nop = \"emit\"\nparam = { text = \"x\" }\n",
            set: &[],
            at: "r.toml:3:1",
            says: &["unknown key `param` in step `a`", "did you mean `params`?"],
        },
        Case {
            name: "unknown param",
            recipe: "[steps.a]\nop = \"emit\"\nparams = { txet = \"x\" }\n",
            set: &[],
            at: "r.toml:3:12",
            says: &[
                "unknown parameter `txet` for op `emit`",
                "did you mean `text`?",
            ],
        },
        Case {
            name: "float param given a string",
            recipe: "[steps.a]\nop = \"emit\"\nparams = { lr = \"fast\" }\n",
            set: &[],
            at: "r.toml:3:17",
            says: &[
                "parameter `lr`: `fast` is not a number",
                "expected a number",
            ],
        },
        Case {
            name: "integer param given a fraction",
            recipe: "[steps.a]\nop = \"emit\"\nparams = { tokens = 1.5 }\n",
            set: &[],
            at: "r.toml:3:21",
            says: &["parameter `tokens`: expected an integer, found a float"],
        },
        Case {
            name: "bad count suffix",
            recipe: "[steps.a]\nop = \"emit\"\nparams = { tokens = \"12Q\" }\n",
            set: &[],
            at: "r.toml:3:21",
            says: &["`12Q` is not an integer", "\"127B\""],
        },
        Case {
            name: "bad choice",
            recipe: "[steps.a]\nop = \"emit\"\nparams = { mode = \"fats\" }\n",
            set: &[],
            at: "r.toml:3:19",
            says: &["`fats` is not a valid choice", "did you mean `fast`?"],
        },
        Case {
            name: "list element of the wrong type",
            recipe: "[steps.a]\nop = \"emit\"\nparams = { layers = [1, \"a\"] }\n",
            set: &[],
            at: "r.toml:3:25",
            says: &["parameter `layers`: `a` is not an integer"],
        },
        Case {
            name: "op-specific check",
            recipe: "[steps.a]\nop = \"emit\"\nparams = { hidden_size = 7 }\n",
            set: &[],
            at: "r.toml:3:26",
            says: &["hidden_size must be even, got 7"],
        },
        Case {
            name: "missing input",
            recipe: "[steps.j]\nop = \"join\"\n",
            set: &[],
            at: "r.toml:1:8",
            says: &["step `j` is missing input `left` (report)"],
        },
        Case {
            name: "unknown port",
            recipe: "[steps.a]\nop = \"emit\"\n[steps.j]\nop = \"join\"\ninputs = { lfet = \"steps.a\", left = \"steps.a\" }\n",
            set: &[],
            at: "r.toml:5:12",
            says: &["op `join` has no input port `lfet`", "did you mean `left`?"],
        },
        Case {
            name: "reference without namespace",
            recipe: "[steps.a]\nop = \"emit\"\n[steps.j]\nop = \"join\"\ninputs = { left = \"a\" }\n",
            set: &[],
            at: "r.toml:5:19",
            says: &["`a` is not a reference", "did you mean `steps.a`?"],
        },
        Case {
            name: "unknown step reference",
            recipe: "[steps.abc]\nop = \"emit\"\n[steps.j]\nop = \"join\"\ninputs = { left = \"steps.abd\" }\n",
            set: &[],
            at: "r.toml:5:19",
            says: &["no step named `abd`", "did you mean `steps.abc`?"],
        },
        Case {
            name: "unknown source reference",
            recipe: "[steps.i]\nop = \"inspect\"\ninputs = { model = \"sources.teachr\" }\n",
            set: &[],
            at: "r.toml:11:20",
            says: &[
                "no source named `teachr`",
                "did you mean `sources.teacher`?",
            ],
        },
        Case {
            name: "stats wired into a report port",
            recipe: "[steps.s]\nop = \"stats\"\n[steps.j]\nop = \"join\"\ninputs = { left = \"steps.s\" }\n",
            set: &[],
            at: "r.toml:5:19",
            says: &["`steps.s` is a stats, but input `left` of op `join` takes a report"],
        },
        Case {
            name: "dataset wired into a model port",
            recipe: "[steps.i]\nop = \"inspect\"\ninputs = { model = \"sources.text\" }\n",
            set: &[],
            at: "r.toml:11:20",
            says: &["`sources.text` is a dataset, but input `model` of op `inspect` takes a model"],
        },
        Case {
            name: "cycle",
            recipe: "[steps.a]\nop = \"join\"\ninputs = { left = \"steps.b\" }\n[steps.b]\nop = \"join\"\ninputs = { left = \"steps.a\" }\n",
            set: &[],
            at: "r.toml:3:19",
            says: &["steps `a`, `b` depend on each other in a cycle"],
        },
        Case {
            name: "self reference",
            recipe: "[steps.a]\nop = \"join\"\ninputs = { left = \"steps.a\" }\n",
            set: &[],
            at: "r.toml:3:19",
            says: &["step `a` takes its own output as input"],
        },
        Case {
            name: "source without kind",
            recipe: "[sources.m]\npath = \"model\"\n[steps.a]\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:1:10",
            says: &["source `m` has no `kind`"],
        },
        Case {
            name: "unknown source kind",
            recipe: "[sources.m]\nkind = \"modle\"\npath = \"model\"\n[steps.a]\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:2:8",
            says: &["unknown source kind `modle`", "did you mean `model`?"],
        },
        Case {
            name: "model source without path",
            recipe: "[sources.m]\nkind = \"model\"\n[steps.a]\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:1:10",
            says: &["model source `m` has no `path`"],
        },
        Case {
            name: "glob matching nothing",
            recipe: "[sources.d]\nkind = \"dataset\"\nfiles = [\"data/*.txt\", \"nothing/*.txt\"]\n[steps.a]\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:3:24",
            says: &["`nothing/*.txt` matches no files"],
        },
        Case {
            name: "model path missing",
            recipe: "[sources.m]\nkind = \"model\"\npath = \"no-such-model\"\n[steps.i]\nop = \"inspect\"\ninputs = { model = \"sources.m\" }\n",
            set: &[],
            at: "r.toml:3:8",
            says: &["model source `m`", "does not exist"],
        },
        Case {
            name: "unset environment variable",
            recipe: "[sources.m]\nkind = \"model\"\npath = \"${DISTILLERY_TEST_UNSET}/m\"\n[steps.a]\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:3:8",
            says: &["environment variable `DISTILLERY_TEST_UNSET` is not set"],
        },
        Case {
            name: "field on a text dataset",
            recipe: "[sources.d]\nkind = \"dataset\"\nfiles = \"data/*.txt\"\nfield = \"text\"\n[steps.a]\nop = \"emit\"\n",
            set: &[],
            at: "r.toml:4:9",
            says: &["`field` only applies to JSONL datasets"],
        },
        Case {
            name: "bad resources",
            recipe: "[steps.a]\nop = \"emit\"\nresources = { threads = 0 }\n",
            set: &[],
            at: "r.toml:3:25",
            says: &["resources.threads must be a positive integer"],
        },
        Case {
            name: "params not a table",
            recipe: "[steps.a]\nop = \"emit\"\nparams = 3\n",
            set: &[],
            at: "r.toml:3:10",
            says: &["steps.a.params must be a table, found an integer"],
        },
        Case {
            name: "override without =",
            recipe: "[steps.a]\nop = \"emit\"\n",
            set: &["steps.a.params.lr"],
            at: "--set #1:1:1",
            says: &["has no `=`"],
        },
        Case {
            name: "override of an unknown param",
            recipe: "[steps.a]\nop = \"emit\"\n",
            set: &["steps.a.params.lrr=1e-4"],
            at: "--set #1:1:1",
            says: &[
                "unknown parameter `lrr` for op `emit`",
                "did you mean `lr`?",
            ],
        },
        Case {
            name: "override with a wrong type",
            recipe: "[steps.a]\nop = \"emit\"\n",
            set: &["steps.a.params.tokens=lots"],
            at: "--set #1:1:23",
            says: &["`lots` is not an integer"],
        },
    ]
}

#[test]
fn malformed_recipes_are_clear_errors_at_the_right_place() {
    let env = Env::new();
    env.write("model/config.json", "{}");
    env.write("data/a.txt", "text");
    let cases = cases();
    assert!(cases.len() >= 25);
    let mut failures = Vec::new();
    for case in &cases {
        let body = if case.recipe.contains("sources.teach") || case.recipe.contains("sources.text")
        {
            format!("{HEAD}{}", case.recipe)
        } else {
            case.recipe.to_string()
        };
        env.write("r.toml", &body);
        let mut args = vec!["plan", "r.toml"];
        for s in case.set {
            args.push("--set");
            args.push(s);
        }
        let out = env.run(&args);
        let err = stderr(&out);
        let mut problems = Vec::new();
        if out.status.code() != Some(2) {
            problems.push(format!("exit code {:?}, expected 2", out.status.code()));
        }
        if !err.contains(&format!("--> {}\n", case.at)) {
            problems.push(format!("expected location {}", case.at));
        }
        for s in case.says {
            if !err.contains(s) {
                problems.push(format!("expected message containing {s:?}"));
            }
        }
        if err.contains("panicked") || err.contains("backtrace") {
            problems.push("panicked".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "case `{}`: {}\n{}",
                case.name,
                problems.join("; "),
                text(&out)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn all_errors_are_reported_at_once() {
    let env = Env::new();
    env.write(
        "r.toml",
        "[steps.a]\nop = \"emit\"\nparams = { txet = 1, lr = \"x\" }\n[steps.b]\nop = \"nope\"\n",
    );
    let out = env.run(&["plan", "r.toml"]);
    let err = stderr(&out);
    assert!(
        err.contains("unknown parameter `txet`")
            && err.contains("`x` is not a number")
            && err.contains("unknown op `nope`"),
        "{err}"
    );
    assert!(err.contains("the recipe has 3 errors"), "{err}");
}

#[test]
fn json_mode_reports_recipe_errors_as_json() {
    let env = Env::new();
    env.write("r.toml", "[steps.a]\nop = \"emitt\"\n");
    let out = env.run(&["run", "r.toml", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"], "recipe_error");
    assert_eq!(v["errors"][0]["location"]["line"], 2);
    assert_eq!(v["errors"][0]["location"]["column"], 6);
    assert_eq!(v["errors"][0]["help"], "did you mean `emit`?");
}

#[test]
fn missing_recipe_file_is_a_user_error() {
    let env = Env::new();
    let out = env.run(&["run", "nope.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read recipe `nope.toml`"),
        "{}",
        stderr(&out)
    );
}
