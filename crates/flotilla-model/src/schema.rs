//! The machine option schema (defined in `nix/options.nix`) and the checker that holds every
//! machine's evaluated config against it before anything is built.
//!
//! The checker sees JSON, as Nix printed it; it reports every problem it finds (not just the
//! first) and each report names the machine, the option path and, where it can, the fix.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// One declared option.
#[derive(Debug, Clone, Deserialize)]
pub struct OptionDecl {
    /// What values it takes.
    #[serde(rename = "type")]
    pub ty: OptionType,
    /// Its default (`null` when unset by default).
    #[serde(default)]
    pub default: Value,
    /// What it means, for users (Markdown).
    pub description: String,
    /// The machine must set it.
    #[serde(default)]
    pub required: bool,
    /// Its value, and every value inside it, is secret: errors about it name the option and
    /// the kind of value, never the value.
    #[serde(default)]
    pub secret: bool,
}

/// The type of an option, as `nix/options.nix` spells it.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum OptionType {
    /// A string.
    Str,
    /// `true` or `false`.
    Bool,
    /// An integer.
    Int,
    /// A TCP/UDP port, 1 to 65535.
    Port,
    /// An octal permission string, `"0644"`.
    Mode,
    /// A package: a store path (Nix prints a derivation as its output path).
    Package,
    /// An absolute path (store paths included).
    AbsPath,
    /// One of a fixed set of strings.
    Enum {
        /// The allowed strings.
        values: Vec<String>,
    },
    /// A list whose elements have one type.
    ListOf {
        /// The element type.
        elem: Box<OptionType>,
    },
    /// An attribute set with free names whose values have one type.
    AttrsOf {
        /// The value type.
        elem: Box<OptionType>,
    },
    /// An attribute set with declared options.
    Submodule {
        /// The declared options.
        options: BTreeMap<String, OptionDecl>,
    },
    /// `null` or a value of the inner type.
    NullOr {
        /// The inner type.
        elem: Box<OptionType>,
    },
    /// A value of any of these types.
    Either {
        /// The alternatives.
        types: Vec<OptionType>,
    },
    /// An attribute set whose `tag` attribute picks which options it has.
    #[serde(rename_all = "camelCase")]
    Tagged {
        /// The picking attribute, e.g. `type`.
        tag: String,
        /// The variant used when the tag is absent.
        default_tag: String,
        /// Each variant's options (the tag option included).
        variants: BTreeMap<String, BTreeMap<String, OptionDecl>>,
    },
}

/// The whole machine option schema: the top-level options.
pub type Schema = BTreeMap<String, OptionDecl>;

impl fmt::Display for OptionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionType::Str => f.write_str("a string"),
            OptionType::Bool => f.write_str("a boolean"),
            OptionType::Int => f.write_str("an integer"),
            OptionType::Port => f.write_str("a port number (1 to 65535)"),
            OptionType::Mode => f.write_str("an octal mode string such as \"0644\""),
            OptionType::Package => f.write_str("a package (a derivation or store path)"),
            OptionType::AbsPath => f.write_str("an absolute path"),
            OptionType::Enum { values } => {
                let quoted: Vec<String> = values.iter().map(|v| format!("\"{v}\"")).collect();
                write!(f, "one of {}", quoted.join(", "))
            }
            OptionType::ListOf { elem } => write!(f, "a list of {}", plural(elem)),
            OptionType::AttrsOf { elem } => write!(f, "an attribute set of {}", plural(elem)),
            OptionType::Submodule { .. } | OptionType::Tagged { .. } => f.write_str("an attribute set"),
            OptionType::NullOr { elem } => write!(f, "{elem} or null"),
            OptionType::Either { types } => {
                let parts: Vec<String> = types.iter().map(ToString::to_string).collect();
                f.write_str(&parts.join(" or "))
            }
        }
    }
}

/// The plural of a type's description, for "a list of strings".
fn plural(t: &OptionType) -> String {
    match t {
        OptionType::Str => "strings".into(),
        OptionType::Bool => "booleans".into(),
        OptionType::Int => "integers".into(),
        OptionType::Port => "port numbers (1 to 65535)".into(),
        OptionType::Mode => "octal mode strings".into(),
        OptionType::Package => "packages".into(),
        OptionType::AbsPath => "absolute paths".into(),
        OptionType::Submodule { .. } | OptionType::Tagged { .. } => "attribute sets".into(),
        OptionType::ListOf { elem } => format!("lists of {}", plural(elem)),
        OptionType::AttrsOf { elem } => format!("attribute sets of {}", plural(elem)),
        OptionType::NullOr { elem } => format!("{} or nulls", plural(elem)),
        other => format!("values that are {other}"),
    }
}

/// An option path such as `services.web.command` or `files."/etc/motd".text`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptionPath(Vec<String>);

impl OptionPath {
    /// The path of a top-level option.
    pub fn root(name: &str) -> Self {
        OptionPath(vec![name.to_owned()])
    }

    /// This path extended by a list index, shown as `[i]`.
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(format!("[{i}]"));
        OptionPath(v)
    }

    /// This path extended by one attribute name.
    pub fn child(&self, name: &str) -> Self {
        let mut v = self.0.clone();
        v.push(name.to_owned());
        OptionPath(v)
    }
}

impl fmt::Display for OptionPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.0.iter().enumerate() {
            if part.starts_with('[') {
                f.write_str(part)?;
                continue;
            }
            if i > 0 {
                f.write_str(".")?;
            }
            let plain = !part.is_empty()
                && part.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                && !part.as_bytes()[0].is_ascii_digit();
            if plain {
                f.write_str(part)?;
            } else {
                write!(f, "\"{}\"", part.replace('"', "\\\""))?;
            }
        }
        Ok(())
    }
}

/// One problem with one machine's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The machine.
    pub machine: String,
    /// The option at fault (empty for the machine as a whole).
    pub option: OptionPath,
    /// What is wrong and, where known, what to do.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.option.0.is_empty() {
            write!(f, "machine {}: {}", self.machine, self.problem)
        } else {
            write!(f, "machine {}: option `{}` {}", self.machine, self.option, self.problem)
        }
    }
}

/// The kind of a JSON value, for an error message: "a string", "a list".
fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an attribute set",
    }
}

/// Describes a JSON value for an error message: its kind and a short rendering.
pub fn describe_value(v: &Value) -> String {
    if v.is_null() {
        return "null".to_owned();
    }
    let kind = kind_of(v);
    let mut shown = v.to_string();
    if shown.len() > 40 {
        let cut = (0..=37).rev().find(|i| shown.is_char_boundary(*i)).unwrap_or(0);
        shown.truncate(cut);
        shown.push_str("...");
    }
    format!("{kind} ({shown})")
}

/// The nearest of `candidates` to `word`, if it is near enough to be a likely typo.
pub fn did_you_mean<'a, I: IntoIterator<Item = &'a str>>(word: &str, candidates: I) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&word.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over chars, with adjacent transpositions counting one.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// Checks one machine's config against the schema, returning every problem found.
pub fn check_against_schema(machine: &str, schema: &Schema, config: &Value) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let Value::Object(_) = config else {
        errors.push(ConfigError {
            machine: machine.to_owned(),
            option: OptionPath::default(),
            problem: format!(
                "must be an attribute set of options (or a function returning one), not {}",
                describe_value(config)
            ),
        });
        return errors;
    };
    let mut cx = Checker { machine, errors: &mut errors, secret: false };
    cx.options(&OptionPath::default(), schema, config);
    errors
}

struct Checker<'a> {
    machine: &'a str,
    errors: &'a mut Vec<ConfigError>,
    /// Inside a secret option: values are described by their kind only.
    secret: bool,
}

impl Checker<'_> {
    fn err(&mut self, option: &OptionPath, problem: String) {
        self.errors.push(ConfigError {
            machine: self.machine.to_owned(),
            option: option.clone(),
            problem,
        });
    }

    /// How a value is shown in an error: never the value itself inside a secret option.
    fn describe(&self, v: &Value) -> String {
        if self.secret && !v.is_null() {
            format!("{} (its value is not shown: it is secret)", kind_of(v))
        } else {
            describe_value(v)
        }
    }

    fn options(&mut self, at: &OptionPath, options: &BTreeMap<String, OptionDecl>, value: &Value) {
        let Value::Object(map) = value else {
            self.err(at, format!("must be an attribute set, not {}", self.describe(value)));
            return;
        };
        for (key, v) in map {
            let here = at.child(key);
            match options.get(key) {
                Some(decl) => {
                    let outer = self.secret;
                    self.secret |= decl.secret;
                    self.value(&here, &decl.ty, v);
                    self.secret = outer;
                }
                None => {
                    let hint = match did_you_mean(key, options.keys().map(String::as_str)) {
                        Some(near) => format!("; did you mean `{}`?", at.child(near)),
                        None => {
                            let known: Vec<&str> = options.keys().map(String::as_str).collect();
                            format!("; known options here: {}", known.join(", "))
                        }
                    };
                    self.errors.push(ConfigError {
                        machine: self.machine.to_owned(),
                        option: OptionPath::default(),
                        problem: format!("unknown option `{here}`{hint}"),
                    });
                }
            }
        }
        for (key, decl) in options {
            if decl.required && !map.contains_key(key) {
                self.err(&at.child(key), format!("is required: {}", decl.description));
            }
        }
    }

    fn value(&mut self, at: &OptionPath, ty: &OptionType, v: &Value) {
        if !self.matches(at, ty, v, true) {
            self.err(at, format!("must be {ty}, not {}", self.describe(v)));
        }
    }

    /// Whether `v` has type `ty`. Nested problems inside a value of the right shape are
    /// reported directly (when `report`), so the caller only reports a wrong shape.
    fn matches(&mut self, at: &OptionPath, ty: &OptionType, v: &Value, report: bool) -> bool {
        match (ty, v) {
            (OptionType::Str, Value::String(_)) => true,
            (OptionType::Bool, Value::Bool(_)) => true,
            (OptionType::Int, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (OptionType::Port, Value::Number(n)) => n.as_u64().is_some_and(|p| (1..=65535).contains(&p)),
            (OptionType::Mode, Value::String(s)) => {
                (3..=4).contains(&s.len()) && s.bytes().all(|c| (b'0'..=b'7').contains(&c))
            }
            (OptionType::Package, Value::String(s)) => flotilla_store::StorePath::parse_prefix(s).is_ok(),
            (OptionType::AbsPath, Value::String(s)) => s.starts_with('/'),
            (OptionType::Enum { values }, Value::String(s)) => values.contains(s),
            (OptionType::ListOf { elem }, Value::Array(items)) => {
                if report {
                    for (i, item) in items.iter().enumerate() {
                        let here = at.index(i);
                        self.value(&here, elem, item);
                    }
                }
                true
            }
            (OptionType::AttrsOf { elem }, Value::Object(map)) => {
                if report {
                    for (k, item) in map {
                        self.value(&at.child(k), elem, item);
                    }
                }
                true
            }
            (OptionType::Submodule { options }, Value::Object(_)) => {
                if report {
                    self.options(at, options, v);
                }
                true
            }
            (OptionType::Tagged { tag, default_tag, variants }, Value::Object(map)) => {
                let chosen = match map.get(tag) {
                    None => default_tag.as_str(),
                    Some(Value::String(s)) => s.as_str(),
                    Some(other) => {
                        if report {
                            self.err(&at.child(tag), format!("must be a string, not {}", self.describe(other)));
                        }
                        return true;
                    }
                };
                match variants.get(chosen) {
                    Some(options) if report => self.options(at, options, v),
                    Some(_) => {}
                    None if report => {
                        let names: Vec<&str> = variants.keys().map(String::as_str).collect();
                        let hint = did_you_mean(chosen, names.iter().copied())
                            .map(|n| format!("; did you mean \"{n}\"?"))
                            .unwrap_or_default();
                        self.err(
                            &at.child(tag),
                            format!("is \"{chosen}\", which is not one of {}{hint}", names.join(", ")),
                        );
                    }
                    None => {}
                }
                true
            }
            (OptionType::NullOr { .. }, Value::Null) => true,
            (OptionType::NullOr { elem }, _) => self.matches(at, elem, v, report),
            (OptionType::Either { types }, _) => {
                let fits = types.iter().position(|t| self.matches(at, t, v, false));
                match fits {
                    Some(i) => self.matches(at, &types[i], v, report),
                    None => false,
                }
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        serde_json::from_value(json!({
            "services": { "description": "", "default": {}, "type": { "kind": "attrsOf", "elem": {
                "kind": "submodule", "options": {
                    "command": { "description": "", "type": { "kind": "nullOr", "elem": { "kind": "listOf", "elem": { "kind": "str" } } } },
                    "restart": { "description": "", "type": { "kind": "enum", "values": ["always", "never"] } }
                } } } },
            "tags": { "description": "", "type": { "kind": "listOf", "elem": { "kind": "str" } } },
            "platform": { "description": "", "type": { "kind": "tagged", "tag": "type", "defaultTag": "local", "variants": {
                "local": { "type": { "description": "", "type": { "kind": "str" } } },
                "ssh": { "type": { "description": "", "type": { "kind": "str" } },
                         "host": { "description": "host to reach", "required": true, "type": { "kind": "str" } } }
            } } }
        }))
        .unwrap()
    }

    fn check(v: Value) -> Vec<String> {
        check_against_schema("web1", &schema(), &v).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn unknown_option_suggests_the_nearest() {
        assert_eq!(
            check(json!({ "servics": {} })),
            ["machine web1: unknown option `servics`; did you mean `services`?"]
        );
        assert_eq!(
            check(json!({ "services": { "web": { "comand": [] } } })),
            ["machine web1: unknown option `services.web.comand`; did you mean `services.web.command`?"]
        );
    }

    #[test]
    fn wrong_types_name_the_option_and_the_type() {
        assert_eq!(
            check(json!({ "tags": "web" })),
            ["machine web1: option `tags` must be a list of strings, not a string (\"web\")"]
        );
        assert_eq!(
            check(json!({ "services": { "web": { "command": [1], "restart": "sometimes" } } })),
            [
                "machine web1: option `services.web.command[0]` must be a string, not a number (1)",
                "machine web1: option `services.web.restart` must be one of \"always\", \"never\", not a string (\"sometimes\")"
            ]
        );
    }

    #[test]
    fn tagged_variants_and_required_options() {
        assert_eq!(
            check(json!({ "platform": { "type": "ssh" } })),
            ["machine web1: option `platform.host` is required: host to reach"]
        );
        assert_eq!(
            check(json!({ "platform": { "type": "shh" } })),
            ["machine web1: option `platform.type` is \"shh\", which is not one of local, ssh; did you mean \"ssh\"?"]
        );
        assert!(check(json!({ "platform": { "type": "local" }, "tags": [] })).is_empty());
    }

    #[test]
    fn values_inside_a_secret_option_are_never_shown() {
        let schema: Schema = serde_json::from_value(json!({
            "keys": { "description": "", "secret": true, "type": { "kind": "attrsOf", "elem": {
                "kind": "submodule", "options": {
                    "text": { "description": "", "type": { "kind": "nullOr", "elem": { "kind": "str" } } }
                } } } }
        }))
        .unwrap();
        let check = |v: Value| -> Vec<String> { check_against_schema("web1", &schema, &v).iter().map(ToString::to_string).collect() };
        assert_eq!(
            check(json!({ "keys": { "k": { "text": 12345 } } })),
            ["machine web1: option `keys.k.text` must be a string or null, not a number (its value is not shown: it is secret)"]
        );
        assert_eq!(
            check(json!({ "keys": { "k": "hunter2" } })),
            ["machine web1: option `keys.k` must be an attribute set, not a string (its value is not shown: it is secret)"]
        );
    }

    #[test]
    fn quotes_odd_attribute_names() {
        let p = OptionPath::root("files").child("/etc/motd").child("text");
        assert_eq!(p.to_string(), "files.\"/etc/motd\".text");
    }

    #[test]
    fn distance() {
        assert_eq!(edit_distance("servics", "services"), 1);
        assert_eq!(edit_distance("pakcages", "packages"), 1);
        assert_eq!(did_you_mean("xyz", ["services", "packages"]), None);
    }
}
