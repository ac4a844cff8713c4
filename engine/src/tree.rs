//! The recipe as a tree of spanned values, with `--set` overrides applied. Every node remembers
//! where it was written, so every later error can point at it.

use std::path::Path;

use toml::de::{DeTable, DeValue};

use crate::diag::{Diagnostic, Origin, SourceMap, Span};

#[derive(Clone, Debug)]
pub struct Node {
    pub value: Value,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Table),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Datetime(_) => "a date-time",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Key {
    pub name: String,
    pub span: Span,
}

/// A table in source order.
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub entries: Vec<(Key, Node)>,
}

impl Table {
    pub fn get(&self, name: &str) -> Option<&Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, v)| v)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.name.as_str())
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.entries
            .iter_mut()
            .find(|(k, _)| k.name == name)
            .map(|(_, v)| v)
    }
}

fn convert(source: usize, value: toml::Spanned<DeValue<'_>>) -> Result<Node, Diagnostic> {
    let span = Span {
        source,
        range: value.span(),
    };
    let value = match value.into_inner() {
        DeValue::String(s) => Value::Str(s.into_owned()),
        DeValue::Integer(i) => {
            let v = i64::from_str_radix(i.as_str(), i.radix()).map_err(|_| {
                Diagnostic::at(&span, "integer out of range").help("integers must fit in 64 bits")
            })?;
            Value::Int(v)
        }
        DeValue::Float(f) => {
            let v: f64 = f
                .as_str()
                .parse()
                .map_err(|_| Diagnostic::at(&span, format!("`{}` is not a number", f.as_str())))?;
            Value::Float(v)
        }
        DeValue::Boolean(b) => Value::Bool(b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| convert(source, v))
                .collect::<Result<_, _>>()?,
        ),
        DeValue::Table(t) => Value::Table(convert_table(source, t)?),
    };
    Ok(Node { value, span })
}

fn convert_table(source: usize, table: DeTable<'_>) -> Result<Table, Diagnostic> {
    let mut out = Table::default();
    for (k, v) in table {
        let key = Key {
            name: k.get_ref().to_string(),
            span: Span {
                source,
                range: k.span(),
            },
        };
        out.entries.push((key, convert(source, v)?));
    }
    Ok(out)
}

fn parse_error(source: usize, text: &str, err: toml::de::Error) -> Diagnostic {
    let range = err.span().unwrap_or(0..0);
    let range = if range.is_empty() && range.start < text.len() {
        range.start..range.start + 1
    } else {
        range
    };
    // The parser's message repeats the excerpt; keep its first line only.
    let message = err
        .message()
        .lines()
        .next()
        .unwrap_or("invalid TOML")
        .to_string();
    Diagnostic::at(&Span { source, range }, format!("invalid TOML: {message}"))
}

/// Parses the recipe file into a tree.
pub fn parse_file(path: &Path, text: String, map: &mut SourceMap) -> Result<Table, Diagnostic> {
    let source = map.add(Origin::File(path.to_path_buf()), text);
    let text = map.texts[source].text.clone();
    let parsed = DeTable::parse(&text).map_err(|e| parse_error(source, &text, e))?;
    convert_table(source, parsed.into_inner())
}

/// Applies `--set a.b.c=VALUE`: VALUE is read as TOML (`4096`, `1e-4`, `"x"`, `[1, 2]`), and
/// anything that is not valid TOML is taken as a bare string.
pub fn apply_override(
    root: &mut Table,
    index: usize,
    arg: &str,
    map: &mut SourceMap,
) -> Result<(), Diagnostic> {
    let source = map.add(Origin::Override(index), arg.to_string());
    let whole = Span {
        source,
        range: 0..arg.len(),
    };
    let Some((path, raw)) = arg.split_once('=') else {
        return Err(Diagnostic::at(&whole, format!("`--set {arg}` has no `=`"))
            .help("write --set steps.NAME.params.KEY=VALUE"));
    };
    let path_span = Span {
        source,
        range: 0..path.len(),
    };
    let parts: Vec<&str> = path.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(
            Diagnostic::at(&path_span, format!("`{path}` is not a dotted key"))
                .help("write --set steps.NAME.params.KEY=VALUE"),
        );
    }
    let value_start = path.len() + 1;
    let value_range = value_start..arg.len();
    let node = match DeValue::parse(raw.trim()) {
        Ok(v) => {
            let mut n = convert(source, v)?;
            shift(&mut n, value_start + (raw.len() - raw.trim_start().len()));
            n
        }
        Err(_) => Node {
            value: Value::Str(raw.to_string()),
            span: Span {
                source,
                range: value_range,
            },
        },
    };
    let mut table = root;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        if last {
            match table.get_mut(part) {
                Some(existing) => *existing = node.clone(),
                None => table.entries.push((
                    Key {
                        name: part.to_string(),
                        span: path_span.clone(),
                    },
                    node.clone(),
                )),
            }
            return Ok(());
        }
        if table.get(part).is_none() {
            table.entries.push((
                Key {
                    name: part.to_string(),
                    span: path_span.clone(),
                },
                Node {
                    value: Value::Table(Table::default()),
                    span: path_span.clone(),
                },
            ));
        }
        let next = table.get_mut(part).unwrap();
        match &mut next.value {
            Value::Table(t) => table = t,
            other => {
                return Err(Diagnostic::at(
                    &path_span,
                    format!(
                        "`{}` is {}, not a table: cannot set `{path}`",
                        parts[..=i].join("."),
                        other.type_name()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Moves every span of a node parsed from a substring to its place in the whole argument.
fn shift(node: &mut Node, by: usize) {
    node.span.range = node.span.range.start + by..node.span.range.end + by;
    match &mut node.value {
        Value::Array(items) => items.iter_mut().for_each(|n| shift(n, by)),
        Value::Table(t) => t.entries.iter_mut().for_each(|(k, v)| {
            k.span.range = k.span.range.start + by..k.span.range.end + by;
            shift(v, by)
        }),
        _ => {}
    }
}
