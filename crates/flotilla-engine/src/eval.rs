//! Evaluation: a deployment file read in two Nix phases (platforms, then full configs with
//! the facts planned in between), checked against the option schema. Nothing here writes to
//! the state DB or touches a machine; the build records what the evaluation found.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flotilla_model::{BUILDERS_EXAMPLE, check_against_schema, ConfigError, DeploymentName, MachineConfig, MachineName, Schema, Selection};
use flotilla_nix::{EvalArgs, NixError};
use flotilla_state::{DeploymentUpsert, MachineUpsert};
use serde_json::Value;

use crate::{facts, Engine, EngineError, Result};

/// A deployment file evaluated and checked.
#[derive(Debug, Clone)]
pub struct Evaluated {
    /// `meta.name`.
    pub name: DeploymentName,
    /// `meta.description`.
    pub description: String,
    /// The deployment file (absolute).
    pub file: PathBuf,
    /// The option schema it was checked against.
    pub schema: Schema,
    /// Each machine's checked config.
    pub machines: BTreeMap<MachineName, MachineConfig>,
    /// The facts it was evaluated with.
    pub facts: BTreeMap<MachineName, BTreeMap<String, Value>>,
    /// Where Nix may build: `meta.builders` and `meta.buildLocally`, checked.
    pub builders: flotilla_nix::Builders,
}

impl Evaluated {
    /// Replaces `meta.builders` with `spec` (`--builders`), checked as the option is.
    pub fn set_builders(&mut self, spec: &str) -> Result<()> {
        check_builders("--builders", spec)?;
        self.builders.spec = Some(spec.to_owned());
        Ok(())
    }

    /// The machines `sel` picks.
    pub fn select(&self, sel: &Selection) -> Result<Vec<MachineName>> {
        let it = self.machines.iter().map(|(n, c)| (n, c.tags.as_slice()));
        Ok(sel.apply(it)?.into_iter().collect())
    }

    /// The checked configs as JSON, with key material redacted: what `flotilla eval` prints.
    pub fn to_json(&self) -> Value {
        let machines: serde_json::Map<String, Value> = self
            .machines
            .iter()
            .map(|(n, c)| {
                let mut c = c.clone();
                for k in c.keys.values_mut() {
                    *k = k.redacted();
                }
                (n.to_string(), serde_json::to_value(&c).expect("config serialises"))
            })
            .collect();
        serde_json::json!({
            "name": self.name,
            "description": self.description,
            "machines": machines,
            "facts": self.facts,
        })
    }
}

impl Engine {
    /// Evaluates and checks a deployment file. Nothing is written anywhere.
    pub fn evaluate(&self, file: &Path) -> Result<Evaluated> {
        let file = resolve_file(file)?;
        let mut args = EvalArgs { deployment: &file, facts_json: "{}".into(), agent: None, only: vec![] };
        // Phase 1: names and platforms, without facts.
        let phase1 = self.nix.eval_json("phase1", &args, false)?;
        let planned = self.plan(&file, &phase1)?;
        // Phase 2: full configs with facts.
        args.facts_json = serde_json::to_string(&planned.facts).expect("facts serialise");
        let configs = self.nix.eval_json("configs", &args, false)?;
        planned.check(file, &configs)
    }

    /// Evaluates and checks a deployment file and, when its facts are already known (it was
    /// evaluated before and nothing moved), instantiates every machine's toplevel in the same
    /// single Nix call. Otherwise, or if that call fails, it is [`Engine::evaluate`], and the
    /// toplevels are left to [`Engine::build`].
    pub fn evaluate_for_build(&self, file: &Path, agent: &Path) -> Result<(Evaluated, Option<Toplevels>)> {
        let abs = resolve_file(file)?;
        let known = self.state.deployments()?.into_iter().find(|d| d.file.as_deref() == Some(&*abs.to_string_lossy()));
        if let Some(dep) = known {
            let stored = self.state.facts(&dep.name)?;
            let args = EvalArgs {
                deployment: &abs,
                facts_json: serde_json::to_string(&stored).expect("facts serialise"),
                agent: Some(agent),
                only: vec![],
            };
            if let Ok(all) = self.nix.eval_json("everything", &args, true) {
                let planned = self.plan(&abs, &all["phase1"])?;
                let same = planned.facts.iter().all(|(m, f)| stored.get(m.as_str()) == Some(f));
                if same {
                    let toplevels: Option<Toplevels> = serde_json::from_value(all["toplevels"].clone()).ok();
                    let ev = planned.check(abs, &all["configs"])?;
                    return Ok((ev, toplevels));
                }
            }
        }
        Ok((self.evaluate(&abs)?, None))
    }

    /// Reads phase 1 and plans facts: everything about a deployment but its configs.
    fn plan(&self, file: &Path, phase1: &Value) -> Result<Planned> {
        let raw_name = phase1.get("name").and_then(Value::as_str).ok_or_else(|| {
            EngineError::Config(vec![format!(
                "{}: the deployment sets no `meta.name`; add `meta.name = \"my-fleet\";` (it names the deployment in the state DB)",
                file.display()
            )])
        })?;
        let name = DeploymentName::new(raw_name).map_err(|e| EngineError::Config(vec![format!("option `meta.name`: {e}")]))?;
        let description = phase1.get("description").and_then(Value::as_str).unwrap_or("").to_owned();
        let builders = match (phase1.get("builders"), phase1.get("buildLocally")) {
            (Some(Value::Null) | None, Some(Value::Bool(local))) => flotilla_nix::Builders { spec: None, local: *local },
            (Some(Value::String(spec)), Some(Value::Bool(local))) => {
                check_builders("meta.builders", spec)?;
                flotilla_nix::Builders { spec: Some(spec.clone()), local: *local }
            }
            (Some(Value::String(_) | Value::Null) | None, other) => {
                return Err(EngineError::Config(vec![format!(
                    "option `meta.buildLocally` is {}, not a boolean; write `true` (this host builds what the builders cannot) or `false` (only `meta.builders` build)",
                    other.map_or("missing".into(), flotilla_model::describe_value)
                )]))
            }
            (Some(other), _) => {
                return Err(EngineError::Config(vec![format!(
                    "option `meta.builders` is {}, not a string; write Nix's builders syntax, e.g. {BUILDERS_EXAMPLE}",
                    flotilla_model::describe_value(other)
                )]))
            }
        };
        let schema: Schema = serde_json::from_value(phase1["options"].clone())
            .map_err(|e| EngineError::Nix(NixError::Output { command: "eval.nix phase1".into(), detail: format!("option schema: {e}") }))?;

        let mut errors = Vec::new();
        let mut platforms = BTreeMap::new();
        let empty = serde_json::Map::new();
        let machines1 = phase1.get("machines").and_then(Value::as_object).unwrap_or(&empty);
        if machines1.is_empty() {
            errors.push(format!("deployment {name}: `machines` is empty; declare at least one machine"));
        }
        for (raw, m) in machines1 {
            let machine = match MachineName::new(raw) {
                Ok(n) => n,
                Err(e) => {
                    errors.push(format!("machine {raw}: {e}"));
                    continue;
                }
            };
            // A platform that does not parse is reported, with its option path, by the full
            // check after phase 2; until then the machine simply gets no planned facts.
            let platform_value = m.get("platform").cloned().unwrap_or(Value::Null);
            if let Ok(p) = serde_json::from_value(platform_value) {
                platforms.insert(machine, p);
            }
        }

        let stored = self.state.facts(name.as_str())?;
        let facts = match facts::plan(&platforms, &stored) {
            Ok(f) => f,
            Err(e) => {
                errors.extend(e);
                BTreeMap::new()
            }
        };
        if !errors.is_empty() {
            return Err(EngineError::Config(errors));
        }
        Ok(Planned { name, description, schema, facts, builders })
    }

}

/// Every machine's instantiated toplevel, by machine name.
pub type Toplevels = BTreeMap<MachineName, flotilla_nix::Toplevel>;

/// A deployment read as far as its facts.
struct Planned {
    name: DeploymentName,
    description: String,
    schema: Schema,
    facts: BTreeMap<MachineName, BTreeMap<String, Value>>,
    builders: flotilla_nix::Builders,
}

impl Planned {
    /// Checks phase 2's configs against the schema and each other.
    fn check(self, file: PathBuf, configs: &Value) -> Result<Evaluated> {
        let mut errors = Vec::new();
        let mut machines = BTreeMap::new();
        let empty = serde_json::Map::new();
        for (raw, value) in configs.as_object().unwrap_or(&empty) {
            let Ok(machine) = MachineName::new(raw) else { continue };
            let found = check_against_schema(raw, &self.schema, value);
            if !found.is_empty() {
                errors.extend(found.iter().map(ConfigError::to_string));
                continue;
            }
            match serde_json::from_value::<MachineConfig>(value.clone()) {
                Ok(cfg) => {
                    errors.extend(cfg.check(raw).iter().map(ConfigError::to_string));
                    machines.insert(machine, cfg);
                }
                Err(e) => errors.push(format!("machine {raw}: {e} (the option schema and flotilla disagree: please report this)")),
            }
        }
        if !errors.is_empty() {
            return Err(EngineError::Config(errors));
        }
        Ok(Evaluated { name: self.name, description: self.description, file, schema: self.schema, machines, facts: self.facts, builders: self.builders })
    }
}

/// Checks a `builders` value (`option` names where it came from): every inline entry, and
/// every `@FILE` read now (it must exist: Nix would quietly build nowhere else without it).
/// The deployer only reads the file; Nix reads it again when it builds.
fn check_builders(option: &str, spec: &str) -> Result<()> {
    use flotilla_model::{builder_sources, check_builder_lines, BuilderSource};
    let bad = |why: String| EngineError::Config(vec![format!("option `{option}`: {why}; write Nix's builders syntax, e.g. {BUILDERS_EXAMPLE}")]);
    for source in builder_sources(spec) {
        match source {
            BuilderSource::Inline(entry) => check_builder_lines(&entry).map_err(bad)?,
            BuilderSource::File(file) => {
                if !file.starts_with('/') {
                    return Err(bad(format!("the machines file `@{file}` is not an absolute path")));
                }
                let text = std::fs::read_to_string(&file).map_err(|e| bad(format!("the machines file `@{file}` cannot be read ({e})")))?;
                check_builder_lines(&text).map_err(|why| bad(format!("in the machines file `@{file}`, {why}")))?;
            }
        }
    }
    Ok(())
}

fn resolve_file(file: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(file).map_err(|source| EngineError::Io { what: "cannot resolve", path: file.to_owned(), source })?;
    if !abs.is_file() {
        return Err(EngineError::Config(vec![format!(
            "deployment file {} does not exist; pass the file that defines your machines with -f",
            abs.display()
        )]));
    }
    Ok(abs)
}

/// Calls `f` with the state DB's view of an evaluation: the deployment and its machines with
/// their platforms, tags and facts.
pub(crate) fn with_upserts<R>(ev: &Evaluated, f: impl FnOnce(&DeploymentUpsert<'_>, &[MachineUpsert<'_>]) -> R) -> R {
    let file = ev.file.to_string_lossy();
    let specs: Vec<Value> = ev.machines.values().map(|c| serde_json::to_value(&c.platform).expect("serialises")).collect();
    let no_facts = BTreeMap::new();
    let upserts: Vec<MachineUpsert<'_>> = ev
        .machines
        .iter()
        .zip(&specs)
        .map(|((name, c), spec)| MachineUpsert {
            name: name.as_str(),
            platform: c.platform.kind(),
            platform_spec: spec,
            tags: &c.tags,
            facts: ev.facts.get(name).unwrap_or(&no_facts),
        })
        .collect();
    let dep = DeploymentUpsert { name: ev.name.as_str(), file: Some(&file), description: &ev.description };
    f(&dep, &upserts)
}
