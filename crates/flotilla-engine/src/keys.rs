//! Keys on the deployer's side: read each key's material (`text`, a `file` on the deployer, or
//! a `command`'s output) and bring a machine's keys in line with the declaration, sending only
//! the keys whose contents, place, owner or mode differ.
//!
//! Material lives only in memory here. It is never written to the state DB, never put in an
//! event, a log line or `--json` output (errors name the key and the source, never the
//! contents), and travels to the agent in a `PutKeys` request whose `Debug` hides it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

use flotilla_model::{KeySpec, UploadAt};
use flotilla_protocol::{KeyState, KeyUpload};
use flotilla_store::{NarHash, StorePath};

use crate::remote::{AgentClient, KeysPut, RemoteError};

/// One key, read and ready to send.
#[derive(Debug, Clone)]
pub struct ResolvedKey {
    /// What goes over the wire (its `Debug` hides the material).
    pub upload: KeyUpload,
    /// When it is sent.
    pub upload_at: UploadAt,
}

/// Reads every key of `machine`; the error names the key, the option and the fix.
pub fn resolve(machine: &str, specs: &BTreeMap<String, KeySpec>) -> Result<Vec<ResolvedKey>, String> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (name, k) in specs {
        let at = format!("machine {machine}: keys.{name}");
        let data = if let Some(text) = &k.text {
            Ok(text.clone().into_bytes())
        } else if let Some(file) = &k.file {
            std::fs::read(file).map_err(|e| format!("{at}.file: cannot read {file} on the deployer ({e}); fix the path or create the file"))
        } else if let Some(argv) = &k.command {
            run(&at, argv)
        } else {
            Err(format!("{at}: has no `text`, `file` or `command`; set one"))
        };
        let mode = u32::from_str_radix(k.mode.trim_start_matches("0o"), 8)
            .map_err(|_| format!("{at}.mode: {:?} is not an octal mode such as \"0600\"", k.mode));
        match (data, mode) {
            (Ok(data), Ok(mode)) => out.push(ResolvedKey {
                upload: KeyUpload { name: name.clone(), dest_dir: k.dest_dir.clone(), user: k.user.clone(), group: k.group.clone(), mode, data },
                upload_at: k.upload_at,
            }),
            (Err(e), _) | (_, Err(e)) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("\n"))
    }
}

fn run(at: &str, argv: &[String]) -> Result<Vec<u8>, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err(format!("{at}.command: is empty; give the program and its arguments"));
    };
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| format!("{at}.command: cannot run {program} on the deployer: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{at}.command: {program} failed ({}): {}; fix the command", out.status, err.trim()));
    }
    Ok(out.stdout)
}

/// Brings the machine's keys in line: sends the keys of `stage` (all keys when `None`) that
/// differ from what the machine has, and with `remove_undeclared` deletes the keys it placed
/// that are no longer declared. `switching_to` is the toplevel a switch activates right
/// after (see [`AgentClient::put_keys`]).
pub fn sync(client: &mut AgentClient, keys: &[ResolvedKey], stage: Option<UploadAt>, remove_undeclared: bool, switching_to: Option<&StorePath>) -> Result<KeysPut, RemoteError> {
    let have = client.list_keys()?;
    let (put, remove) = changes(&have, keys, stage, remove_undeclared);
    if put.is_empty() && remove.is_empty() {
        return Ok(KeysPut::default());
    }
    client.put_keys(put, remove, switching_to)
}

/// What [`sync`] sends and deletes, given the keys the machine `have`s: the one rule, which
/// `flotilla plan` shows by name.
pub fn changes(have: &[KeyState], keys: &[ResolvedKey], stage: Option<UploadAt>, remove_undeclared: bool) -> (Vec<KeyUpload>, Vec<String>) {
    let have: BTreeMap<&str, _> = have.iter().map(|k| (k.name.as_str(), k)).collect();
    let put: Vec<KeyUpload> = keys
        .iter()
        .filter(|k| stage.is_none_or(|s| s == k.upload_at))
        .filter(|k| {
            let u = &k.upload;
            have.get(u.name.as_str()).is_none_or(|h| {
                h.digest != digest(&u.data) || h.dest_dir != u.dest_dir || h.user != u.user || h.group != u.group || h.mode != u.mode
            })
        })
        .map(|k| k.upload.clone())
        .collect();
    let declared: BTreeSet<&str> = keys.iter().map(|k| k.upload.name.as_str()).collect();
    let remove: Vec<String> =
        if remove_undeclared { have.keys().filter(|n| !declared.contains(*n)).map(|n| n.to_string()).collect() } else { Vec::new() };
    (put, remove)
}

/// The keys as the machine reports them once a deploy left exactly `keys` there: what
/// `Current` compares the machine's with.
pub fn expected(keys: &[ResolvedKey]) -> Vec<KeyState> {
    keys.iter()
        .map(|k| {
            let u = &k.upload;
            KeyState { name: u.name.clone(), dest_dir: u.dest_dir.clone(), user: u.user.clone(), group: u.group.clone(), mode: u.mode, digest: digest(&u.data) }
        })
        .collect()
}

/// The digest the agent reports for a key's contents.
fn digest(data: &[u8]) -> String {
    format!("sha256:{}", NarHash::digest(data).to_hex())
}

/// "wrote token; restarted monitor", or "" when nothing happened.
pub fn summary(p: &KeysPut) -> String {
    let mut parts = Vec::new();
    let list = |verb: &str, v: &[String]| (!v.is_empty()).then(|| format!("{verb} {}", v.join(" ")));
    parts.extend(list("keys written:", &p.written));
    parts.extend(list("keys removed:", &p.removed));
    parts.extend(list("restarted for a key:", &p.restarted));
    parts.extend(list("started with its keys:", &p.started));
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> KeySpec {
        KeySpec {
            text: None,
            file: None,
            command: None,
            user: "root".into(),
            group: "root".into(),
            mode: "0640".into(),
            dest_dir: "/run/keys".into(),
            upload_at: UploadAt::PreActivation,
        }
    }

    #[test]
    fn material_comes_from_text_file_or_command() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        std::fs::write(&file, "from-file").unwrap();
        let specs = BTreeMap::from([
            ("a".to_owned(), KeySpec { text: Some("from-text".into()), ..spec() }),
            ("b".to_owned(), KeySpec { file: Some(file.to_string_lossy().into_owned()), ..spec() }),
            ("c".to_owned(), KeySpec { command: Some(vec!["/bin/sh".into(), "-c".into(), "printf from-command".into()]), ..spec() }),
        ]);
        let keys = resolve("m", &specs).unwrap();
        let data: Vec<&[u8]> = keys.iter().map(|k| k.upload.data.as_slice()).collect();
        assert_eq!(data, [b"from-text".as_slice(), b"from-file", b"from-command"]);
        assert_eq!(keys[0].upload.mode, 0o640);
    }

    #[test]
    fn a_missing_file_or_failing_command_names_the_key_and_never_the_material() {
        let specs = BTreeMap::from([
            ("gone".to_owned(), KeySpec { file: Some("/nonexistent/flotilla-key".into()), ..spec() }),
            ("fails".to_owned(), KeySpec { command: Some(vec!["/bin/sh".into(), "-c".into(), "echo oops >&2; exit 3".into()]), ..spec() }),
        ]);
        let err = resolve("web1", &specs).unwrap_err();
        assert!(err.contains("machine web1: keys.gone.file: cannot read /nonexistent/flotilla-key"), "{err}");
        assert!(err.contains("machine web1: keys.fails.command: /bin/sh failed (exit status: 3): oops"), "{err}");
    }
}
