//! Moving a deployment between states (SQLite to a team's PostgreSQL, one server to another):
//! everything the state holds of it, as one versioned JSON document. Secrets are never in the
//! state, so never in an export. Importing is one transaction: a deployment that exists is
//! refused unless replaced on purpose, and a locked one is never replaced.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::db::{params, Tx};
use crate::{deployment_id, event_row, generation_row, insert_event, now, parse_json, Event, GenerationRecord, Result, State, StateError};

/// What [`Export::format`] says: this is a flotilla state export.
pub const FORMAT: &str = "flotilla-state-export";
/// The newest export version this flotilla writes and reads.
pub const VERSION: u32 = 1;

/// One deployment, as exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format's version ([`VERSION`]).
    pub version: u32,
    /// The deployment's own row.
    pub deployment: ExportedDeployment,
    /// Its machines, by name.
    pub machines: Vec<ExportedMachine>,
    /// Its ledger, oldest first.
    pub events: Vec<Event>,
}

/// A deployment's row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedDeployment {
    /// Its name.
    pub name: String,
    /// The file it was last evaluated from.
    pub file: Option<String>,
    /// `meta.description`.
    pub description: String,
    /// First recorded.
    pub created_at: i64,
    /// Last changed.
    pub updated_at: i64,
}

/// A machine with its facts and every generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedMachine {
    /// Its name.
    pub name: String,
    /// `platform.type`.
    pub platform: String,
    /// The checked `platform` option.
    pub platform_spec: Value,
    /// Its tags.
    pub tags: Vec<String>,
    /// First recorded.
    pub created_at: i64,
    /// Last changed.
    pub updated_at: i64,
    /// Facts: key to (value, when recorded).
    pub facts: BTreeMap<String, (Value, i64)>,
    /// Builds and generations, oldest first.
    pub generations: Vec<GenerationRecord>,
    /// The deployer host holding it (local and qemu machines); absent in older exports.
    #[serde(default)]
    pub host: Option<String>,
}

impl State {
    /// Everything the state holds of deployment `name`.
    pub fn export(&self, name: &str) -> Result<Export> {
        self.read(|tx| {
            let d = tx
                .query_opt("SELECT id, name, file, description, created_at, updated_at FROM deployments WHERE name = $1", params![name])?
                .ok_or_else(|| StateError::NoDeployment(name.to_owned()))?;
            let dep_id = d.int(0)?;
            let deployment = ExportedDeployment { name: d.text(1)?, file: d.opt_text(2)?, description: d.text(3)?, created_at: d.int(4)?, updated_at: d.int(5)? };
            let mut machines = Vec::new();
            for m in tx.query("SELECT id, name, platform, platform_spec, tags, created_at, updated_at, host FROM machines WHERE deployment_id = $1 ORDER BY name", params![dep_id])? {
                let id = m.int(0)?;
                let mut facts = BTreeMap::new();
                for f in tx.query("SELECT key, value, updated_at FROM facts WHERE machine_id = $1", params![id])? {
                    facts.insert(f.text(0)?, (parse_json(&f.text(1)?, "facts.value")?, f.int(2)?));
                }
                let generations = tx
                    .query("SELECT number, toplevel, drv, status, built_at, activated_at FROM generations WHERE machine_id = $1 ORDER BY id", params![id])?
                    .iter()
                    .map(generation_row)
                    .collect::<Result<_>>()?;
                machines.push(ExportedMachine {
                    name: m.text(1)?,
                    platform: m.text(2)?,
                    platform_spec: parse_json(&m.text(3)?, "machines.platform_spec")?,
                    tags: serde_json::from_str(&m.text(4)?).map_err(|source| StateError::Json { what: "machines.tags", source })?,
                    created_at: m.int(5)?,
                    updated_at: m.int(6)?,
                    facts,
                    generations,
                    host: m.opt_text(7)?,
                });
            }
            let events = tx
                .query("SELECT deployment, machine, at, actor, kind, status, message, details, id FROM events WHERE deployment = $1 ORDER BY id", params![name])?
                .iter()
                .map(event_row)
                .collect::<Result<_>>()?;
            Ok(Export { format: FORMAT.into(), version: VERSION, deployment, machines, events })
        })
    }

    /// Imports an export in one transaction, with a ledger event saying so. A deployment of
    /// that name that exists is refused unless `replace` (then everything of it, its ledger
    /// included, is replaced); one that is locked is refused whatever `replace` says.
    pub fn import(&mut self, export: &Export, replace: bool, actor: &str) -> Result<()> {
        if export.format != FORMAT || export.version > VERSION || export.version == 0 {
            return Err(StateError::Import(format!(
                "it is not a flotilla state export this flotilla reads (format `{}`, version {}; this flotilla reads `{FORMAT}` up to version {VERSION}); export it again with this flotilla, or upgrade this one",
                export.format, export.version
            )));
        }
        let name = &export.deployment.name;
        let t = now();
        self.write(|tx| {
            if let Some(holder) = crate::lock_row(tx, name)? {
                return Err(StateError::Locked { deployment: name.clone(), holder: Box::new(holder) });
            }
            if deployment_id(tx, name)?.is_some() {
                if !replace {
                    return Err(StateError::Import(format!(
                        "deployment `{name}` exists in this state already; nothing was imported. Import with --replace to replace it and its ledger, or `flotilla delete -d {name}` first"
                    )));
                }
                tx.execute("DELETE FROM deployments WHERE name = $1", params![name.as_str()])?;
                tx.execute("DELETE FROM events WHERE deployment = $1", params![name.as_str()])?;
            }
            write_export(tx, export)?;
            insert_event(tx, &Event {
                deployment: name.clone(),
                machine: None,
                at: t,
                actor: actor.to_owned(),
                kind: "import".into(),
                status: "ok".into(),
                message: format!("imported {} machines and {} events{}", export.machines.len(), export.events.len(), if replace { ", replacing what was here" } else { "" }),
                details: None,
            })
        })
    }
}

fn write_export(tx: &mut dyn Tx, e: &Export) -> Result<()> {
    let d = &e.deployment;
    let dep_id = tx
        .query_one(
            "INSERT INTO deployments (name, file, description, created_at, updated_at) VALUES ($1, $2, $3, $4, $5) RETURNING id",
            params![d.name.as_str(), d.file.as_deref(), d.description.as_str(), d.created_at, d.updated_at],
        )?
        .int(0)?;
    for m in &e.machines {
        let id = tx
            .query_one(
                "INSERT INTO machines (deployment_id, name, platform, platform_spec, tags, created_at, updated_at, host) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                params![dep_id, m.name.as_str(), m.platform.as_str(), m.platform_spec.to_string(), crate::json(&m.tags), m.created_at, m.updated_at, m.host.as_deref()],
            )?
            .int(0)?;
        for (key, (value, at)) in &m.facts {
            tx.execute("INSERT INTO facts (machine_id, key, value, updated_at) VALUES ($1, $2, $3, $4)", params![id, key.as_str(), value.to_string(), *at])?;
        }
        for g in &m.generations {
            tx.execute(
                "INSERT INTO generations (machine_id, number, toplevel, drv, status, built_at, activated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                params![id, g.number, g.toplevel.as_str(), g.drv.as_deref(), g.status.as_str(), g.built_at, g.activated_at],
            )?;
        }
    }
    for ev in &e.events {
        // The ledger names its deployment: an export's events are all of this one.
        insert_event(tx, &Event { deployment: d.name.clone(), ..ev.clone() })?;
    }
    Ok(())
}

/// Reads an export (from `flotilla import`'s standard input).
pub fn parse(text: &str) -> Result<Export> {
    serde_json::from_str(text).map_err(|e| StateError::Import(format!("the input is not a flotilla state export ({e}); make one with `flotilla export -d NAME > NAME.json`")))
}
