//! The Nix layer: the only place in flotilla that runs `nix-*` commands.
//!
//! It evaluates deployments through the project's Nix library (`nix/`, embedded in the binary
//! and written to a cache directory on first use), instantiates and realises toplevels, and
//! queries path info for copying. Errors carry Nix's own message, trimmed of noise, so a user
//! sees the file and line Nix points at.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flotilla_store::{NarHash, StorePath};

mod setup;
mod store_db;
pub use store_db::{StoreDb, StoreRow};
use serde_json::Value;

pub use setup::{build_users, diagnose, store_ready, BuildUsers, NixConfig, StoreAccess};

/// The Nix library, embedded so an installed `flotilla` needs no source tree.
const LIBRARY: &[(&str, &str)] = &[
    ("eval.nix", include_str!("../../../nix/eval.nix")),
    ("options.nix", include_str!("../../../nix/options.nix")),
    ("demo-pkgs.nix", include_str!("../../../nix/demo-pkgs.nix")),
];

/// Everything that can go wrong talking to Nix.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    /// A Nix command could not be started at all.
    #[error("cannot run `{program}`: {source}; is Nix installed (Debian: apt-get install nix-bin)?")]
    Spawn {
        /// The command.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// Evaluation failed: Nix's message.
    #[error("{0}")]
    Eval(String),
    /// A build failed: Nix's message.
    #[error("{0}")]
    Build(String),
    /// Nix cannot build on this host at all (no build users, a store it cannot write, a
    /// daemon that does not answer): the host's problem and its fix, said once.
    #[error("{0}")]
    Setup(String),
    /// Nix printed something flotilla cannot read.
    #[error("unexpected output from `{command}`: {detail}")]
    Output {
        /// The command.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// The embedded Nix library could not be written out.
    #[error("cannot write flotilla's Nix library to {path}: {source}")]
    Library {
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// This crate's result type.
pub type Result<T, E = NixError> = std::result::Result<T, E>;

/// How flotilla runs Nix.
#[derive(Debug, Clone, Default)]
pub struct NixOptions {
    /// `-I` search path entries, e.g. `nixpkgs=./nix/demo-pkgs.nix`.
    pub include: Vec<String>,
    /// `--option substituters VALUE` when set (`Some("")` disables substitution: offline).
    pub substituters: Option<String>,
    /// Pass `--show-trace`.
    pub show_trace: bool,
    /// Use this directory as the Nix library instead of the embedded copy.
    pub library: Option<PathBuf>,
}

/// A handle on the local Nix installation.
#[derive(Debug, Clone)]
pub struct Nix {
    opts: NixOptions,
    library: PathBuf,
}

/// Arguments to `nix/eval.nix`.
#[derive(Debug, Clone)]
pub struct EvalArgs<'a> {
    /// The deployment file (absolute).
    pub deployment: &'a Path,
    /// Facts as JSON.
    pub facts_json: String,
    /// The static agent binary, for toplevels.
    pub agent: Option<&'a Path>,
    /// Machine names whose toplevels are wanted.
    pub only: Vec<String>,
}

/// A derivation and its output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Toplevel {
    /// The `.drv`.
    pub drv: StorePath,
    /// Its output, the toplevel.
    pub out: StorePath,
}

/// What `realise` learned: which outputs exist now, and Nix's complaints if any failed.
#[derive(Debug, Clone, Default)]
pub struct RealiseOutcome {
    /// Errors Nix printed (each `error: ...` paragraph), empty when all built.
    pub errors: Vec<String>,
    /// What the user should know of this host's Nix though nothing failed because of it
    /// (a binary cache that cannot be reached), each once.
    pub notes: Vec<String>,
    /// Remote builders Nix could not use, each once, as Nix said it (`cannot build on
    /// 'ssh://b': ...`): what a build falls back from, or why it failed.
    pub unusable_builders: Vec<String>,
    /// Why the builders were not used at all, when a Nix daemon dropped them (the user is
    /// not one of its `trusted-users`): the fix, for a note, or for the failure of a machine
    /// that may build only on them.
    pub builders_ignored: Option<String>,
}

/// Where Nix may build: Nix's distributed builds, as `meta.builders` and `--builders` give
/// them (validated by `flotilla_model::check_builders` before they get here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Builders {
    /// Nix's `builders` setting (`ssh://host x86_64-linux - 4; ...` or `@/path/machines`);
    /// `None` leaves Nix's own configuration alone, `Some("")` turns remote builds off.
    pub spec: Option<String>,
    /// Whether this host builds too (`false`: `--max-jobs 0`, only the builders build, and a
    /// builder that cannot be reached fails the builds that need it instead of falling back).
    pub local: bool,
}

impl Builders {
    /// Nix's own configuration: its builders, if any, and local builds.
    pub fn nix_default() -> Builders {
        Builders { spec: None, local: true }
    }
}

/// A store path's metadata, for copying: the wire's type itself, so what Nix reports here is
/// what the deployer sends and the agent registers, with no copy field by field between them.
pub use flotilla_protocol::PathInfo;

impl Nix {
    /// Prepares to run Nix with `opts`, writing out the Nix library if needed.
    pub fn new(opts: NixOptions) -> Result<Nix> {
        let library = match &opts.library {
            Some(dir) => dir.clone(),
            None => materialise_library()?,
        };
        Ok(Nix { opts, library })
    }

    /// The directory holding `eval.nix`.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Options every Nix command takes; `eval` adds the search path, which only evaluation
    /// reads (`nix-store` refuses `-I`).
    fn common_args(&self, cmd: &mut Command, eval: bool) {
        if eval {
            for i in &self.opts.include {
                cmd.arg("-I").arg(i);
            }
        }
        if let Some(s) = &self.opts.substituters {
            cmd.args(["--option", "substituters", s]);
        }
        if self.opts.show_trace {
            cmd.arg("--show-trace");
        }
    }

    /// Evaluates attribute `attr` of `eval.nix` to JSON. `write` allows Nix to write to the
    /// store (derivations, imported paths); without it evaluation only computes paths.
    pub fn eval_json(&self, attr: &str, args: &EvalArgs<'_>, write: bool) -> Result<Value> {
        let mut cmd = Command::new("nix-instantiate");
        cmd.args(["--eval", "--strict", "--json"]);
        if write {
            cmd.arg("--read-write-mode");
        }
        cmd.arg(self.library.join("eval.nix"));
        cmd.arg("--argstr").arg("deployment").arg(args.deployment);
        cmd.arg("--argstr").arg("factsJson").arg(&args.facts_json);
        if let Some(agent) = args.agent {
            cmd.arg("--argstr").arg("agent").arg(agent);
        }
        cmd.arg("--argstr").arg("only").arg(args.only.join(","));
        cmd.arg("-A").arg(attr);
        self.common_args(&mut cmd, true);
        let out = run(&mut cmd, "nix-instantiate")?;
        if !out.status.success() {
            let err = clean_error(&out.stderr);
            return Err(diagnose(&err).map(NixError::Setup).unwrap_or(NixError::Eval(err)));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| NixError::Output {
            command: "nix-instantiate --eval --json".into(),
            detail: e.to_string(),
        })
    }

    /// The machine option schema (`nix/options.nix`) as JSON, without any deployment.
    pub fn options_schema(&self) -> Result<Value> {
        let mut cmd = Command::new("nix-instantiate");
        cmd.args(["--eval", "--strict", "--json"]).arg(self.library.join("options.nix"));
        let out = run(&mut cmd, "nix-instantiate")?;
        if !out.status.success() {
            return Err(NixError::Eval(clean_error(&out.stderr)));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| NixError::Output { command: "nix-instantiate options.nix".into(), detail: e.to_string() })
    }

    /// Realises `drvs` in one `nix-store --realise --keep-going` call, so Nix schedules all
    /// builds together and one failure does not stop the others. Nix's progress lines go to
    /// `on_line`. Which outputs exist afterwards is for the caller to check, except when Nix
    /// could not build at all for a reason of this host's (`NixError::Setup`).
    /// `builders` says where Nix may build (see [`Builders`]).
    pub fn realise(&self, drvs: &[StorePath], builders: &Builders, on_line: &mut dyn FnMut(&str)) -> Result<RealiseOutcome> {
        if drvs.is_empty() {
            return Ok(RealiseOutcome::default());
        }
        let mut cmd = Command::new("nix-store");
        cmd.args(["--realise", "--keep-going"]);
        self.common_args(&mut cmd, false);
        self.builder_args(&mut cmd, builders);
        cmd.args(drvs.iter().map(StorePath::to_absolute));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| NixError::Spawn { program: "nix-store".into(), source })?;
        let mut stdout = child.stdout.take().expect("piped");
        let drain = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stdout.read_to_end(&mut s);
        });
        let mut errors: Vec<String> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        let mut unusable_builders: Vec<String> = Vec::new();
        let mut builders_ignored = None;
        let mut in_error = false;
        for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
            let Ok(line) = line else { break };
            // Nix's build hook says so when a builder cannot be reached, and goes on to the
            // next builder, or to this host.
            if line.starts_with("cannot build on '") && !unusable_builders.contains(&line) {
                unusable_builders.push(line.clone());
            }
            if builders_ignored.is_none() && setup::ignored_builder_setting(&line).is_some() {
                builders_ignored = Some(setup::builders_ignored(&current_user()));
            }
            if let Some(note) = setup::unreachable_substituter(&line) {
                if !notes.contains(&note) {
                    notes.push(note);
                }
            }
            if line.starts_with("error:") {
                errors.push(line.clone());
                in_error = true;
            } else if in_error && (line.starts_with(' ') || line.is_empty()) {
                if let Some(last) = errors.last_mut() {
                    last.push('\n');
                    last.push_str(&line);
                }
            } else {
                in_error = false;
            }
            on_line(&line);
        }
        let _ = drain.join();
        let status = child.wait().map_err(|source| NixError::Spawn { program: "nix-store".into(), source })?;
        if !status.success() && errors.is_empty() {
            errors.push(format!("nix-store --realise failed with {status}"));
        }
        if let Some(problem) = errors.iter().find_map(|e| diagnose(e)) {
            return Err(NixError::Setup(problem));
        }
        Ok(RealiseOutcome { errors, notes, unusable_builders, builders_ignored })
    }

    /// Nix's distributed-build options for `builders`. The builders fetch their inputs from
    /// their own caches (`builders-use-substitutes`) unless substitution is off
    /// (`substituters = ""`): offline, a builder waiting out its caches' retries would only
    /// be slower than receiving the inputs from here.
    fn builder_args(&self, cmd: &mut Command, builders: &Builders) {
        if let Some(spec) = &builders.spec {
            cmd.args(["--option", "builders", spec]);
            let offline = self.opts.substituters.as_deref() == Some("");
            if !spec.trim().is_empty() && !offline {
                cmd.args(["--option", "builders-use-substitutes", "true"]);
            }
        }
        if !builders.local {
            cmd.args(["--max-jobs", "0"]);
        }
    }

    /// The command line that realises `drv` on another host with that host's Nix (run there
    /// over ssh by the platform): the deployer's substitution policy goes with it, so an
    /// offline deploy does not wait on the host's caches. `nix_store` is the host's, by its
    /// absolute path (each `remote_*` command takes it: the host's `PATH` may not lead to it).
    /// The output is kept from the host's collector by the GC root `root`, which Nix replaces.
    pub fn remote_realise_argv(&self, nix_store: &str, drv: &StorePath, root: &str) -> Vec<String> {
        let mut argv: Vec<String> = vec![nix_store.to_owned(), "--realise".to_owned(), "--add-root".to_owned(), root.to_owned()];
        if let Some(s) = &self.opts.substituters {
            argv.extend(["--option".to_owned(), "substituters".to_owned(), s.clone()]);
        }
        argv.push(drv.to_absolute());
        argv
    }

    /// The command line that prints which paths another host's Nix lacks (run there over ssh
    /// by the platform), with the paths on its stdin as [`Nix::remote_invalid_input`] writes
    /// them: a system's derivations number thousands, and ssh hands the remote shell one
    /// `sh -c` argument, which Linux caps at 128 KiB; `xargs` splits them as the host allows.
    pub fn remote_invalid_argv(nix_store: &str) -> Vec<String> {
        ["xargs", nix_store, "--check-validity", "--print-invalid"].map(str::to_owned).to_vec()
    }

    /// The stdin of [`Nix::remote_invalid_argv`]: one path a line (store paths hold no blanks
    /// or quotes, so `xargs` takes each line as one argument).
    pub fn remote_invalid_input(paths: &[StorePath]) -> Vec<u8> {
        paths.iter().map(|p| p.to_absolute() + "\n").collect::<String>().into_bytes()
    }

    /// The command line that imports what [`Nix::export`] wrote, on another host.
    pub fn remote_import_argv(nix_store: &str) -> Vec<String> {
        [nix_store, "--import"].map(str::to_owned).to_vec()
    }

    /// `paths` (valid here) in `nix-store --export` format, for another host's Nix to import:
    /// derivations and sources, which are small (outputs go by the agent's protocol).
    pub fn export(&self, paths: &[StorePath]) -> Result<Vec<u8>> {
        let mut cmd = Command::new("nix-store");
        cmd.arg("--export").args(paths.iter().map(StorePath::to_absolute));
        let out = run(&mut cmd, "nix-store")?;
        if !out.status.success() {
            return Err(NixError::Build(clean_error(&out.stderr)));
        }
        Ok(out.stdout)
    }

    /// Which of `paths` are not valid in this store. A path on disk is not proof: a build that
    /// failed outside Nix's sandbox leaves its output's directory behind, half written, until
    /// the collector or the next build of it removes it.
    pub fn invalid(&self, paths: &[StorePath]) -> Result<Vec<StorePath>> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = Command::new("nix-store");
        cmd.args(["--check-validity", "--print-invalid"]).args(paths.iter().map(StorePath::to_absolute));
        let out = run(&mut cmd, "nix-store")?;
        if !out.status.success() {
            return Err(NixError::Eval(clean_error(&out.stderr)));
        }
        parse_paths(&out.stdout, "nix-store --check-validity --print-invalid")
    }

    /// Whether `path` is valid in this store (see [`Nix::invalid`]).
    pub fn is_valid(&self, path: &StorePath) -> Result<bool> {
        Ok(self.invalid(std::slice::from_ref(path))?.is_empty())
    }

    /// The derivations in the closure of `drv` (to tell which failed build belongs to which
    /// machine).
    pub fn drv_closure(&self, drv: &StorePath) -> Result<Vec<StorePath>> {
        let mut cmd = Command::new("nix-store");
        cmd.args(["--query", "--requisites"]).arg(drv.to_absolute());
        let out = run(&mut cmd, "nix-store")?;
        if !out.status.success() {
            return Err(NixError::Eval(clean_error(&out.stderr)));
        }
        parse_paths(&out.stdout, "nix-store --query --requisites")
    }

    /// Path info of every path in the closure of `roots`, references first, read from the
    /// store's database, or else in one `nix path-info --recursive` call whatever the closure's
    /// size. `None` when some root is not valid (not built yet): the answer doubles as the
    /// check that nothing needs building.
    pub fn closure_info(&self, roots: &[StorePath]) -> Result<Option<Vec<PathInfo>>> {
        if roots.is_empty() {
            return Ok(Some(Vec::new()));
        }
        // Nix's own database answers the same without a process; Nix answers when it cannot.
        if let Ok(found) = store_db::closure(roots) {
            return Ok(found.map(references_first));
        }
        self.closure_info_from_nix(roots)
    }

    /// [`Nix::closure_info`], read from the store's database only (`Err` when it cannot be).
    pub fn closure_info_from_store_db(&self, roots: &[StorePath]) -> Result<Option<Vec<PathInfo>>, String> {
        Ok(store_db::closure(roots)?.map(references_first))
    }

    /// [`Nix::closure_info`], asked of `nix path-info`.
    pub fn closure_info_from_nix(&self, roots: &[StorePath]) -> Result<Option<Vec<PathInfo>>> {
        let mut cmd = Command::new("nix");
        cmd.args(["--extra-experimental-features", "nix-command", "path-info", "--json", "--recursive"]);
        self.common_args(&mut cmd, false);
        cmd.args(roots.iter().map(StorePath::to_absolute));
        let out = run(&mut cmd, "nix")?;
        if !out.status.success() {
            let err = clean_error(&out.stderr);
            if err.contains("is not valid") {
                return Ok(None);
            }
            return Err(NixError::Eval(err));
        }
        let infos = parse_path_info_json(&out.stdout).map_err(|detail| NixError::Output { command: "nix path-info --json".into(), detail })?;
        Ok(Some(references_first(infos)))
    }
}

/// Parses `nix path-info --json` output: an array of objects with a `path` (Nix up to 2.18,
/// and Lix), or an object keyed by path (later Nix), where `null` marks an invalid path.
fn parse_path_info_json(stdout: &[u8]) -> Result<Vec<PathInfo>, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        #[serde(default)]
        path: Option<String>,
        nar_hash: String,
        nar_size: u64,
        #[serde(default)]
        references: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Shape {
        List(Vec<Raw>),
        Map(std::collections::BTreeMap<String, Option<Raw>>),
    }
    let raw: Vec<(String, Raw)> = match serde_json::from_slice(stdout).map_err(|e| e.to_string())? {
        Shape::List(list) => list.into_iter().map(|r| (r.path.clone().unwrap_or_default(), r)).collect(),
        Shape::Map(map) => map
            .into_iter()
            .map(|(p, r)| r.map(|r| (p.clone(), r)).ok_or_else(|| format!("{p} is not valid")))
            .collect::<Result<_, _>>()?,
    };
    raw.into_iter()
        .map(|(path, r)| {
            let path = StorePath::parse(&path).map_err(|e| e.to_string())?;
            let nar_hash = NarHash::parse(&r.nar_hash).map_err(|e| format!("{path}: narHash: {e}"))?;
            let references = r.references.iter().map(|p| StorePath::parse(p).map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
            Ok(PathInfo { path, references, nar_hash, nar_size: r.nar_size })
        })
        .collect()
}

/// Orders path infos so every path comes after the paths it refers to (what a copy needs:
/// a path is only registered on the target once its references are). Ties keep name order.
pub fn references_first(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let mut by_path: std::collections::BTreeMap<StorePath, PathInfo> = infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let keys: Vec<StorePath> = by_path.keys().cloned().collect();
    let mut done = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        // Iterative depth-first post-order; references outside the set are ignored.
        let mut stack = vec![(k, false)];
        while let Some((p, expanded)) = stack.pop() {
            if done.contains(&p) {
                continue;
            }
            if expanded {
                done.insert(p.clone());
                if let Some(info) = by_path.remove(&p) {
                    out.push(info);
                }
                continue;
            }
            stack.push((p.clone(), true));
            if let Some(info) = by_path.get(&p) {
                for r in info.references.iter().rev() {
                    if *r != p && !done.contains(r) {
                        stack.push((r.clone(), false));
                    }
                }
            }
        }
    }
    out
}

/// The closure of `roots` within `all` (a closure that holds theirs), references first.
pub fn closure_within(all: &[PathInfo], roots: &[StorePath]) -> Vec<PathInfo> {
    let index: std::collections::HashMap<&StorePath, &PathInfo> = all.iter().map(|i| (&i.path, i)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut todo: Vec<&StorePath> = roots.iter().collect();
    while let Some(p) = todo.pop() {
        if seen.insert(p) {
            if let Some(info) = index.get(p) {
                todo.extend(info.references.iter());
            }
        }
    }
    // `all` is references-first already; keep its order.
    all.iter().filter(|i| seen.contains(&i.path)).cloned().collect()
}

fn parse_paths(stdout: &[u8], command: &str) -> Result<Vec<StorePath>> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| StorePath::parse(l).map_err(|e| NixError::Output { command: command.into(), detail: e.to_string() }))
        .collect()
}

pub(crate) fn run(cmd: &mut Command, program: &str) -> Result<std::process::Output> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|source| NixError::Spawn { program: program.into(), source })
}

/// Nix's stderr without the lines that only add noise for a flotilla user.
pub fn clean_error(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("use '--show-trace' to show detailed location information"))
        .filter(|l| !l.starts_with("warning: unable to download") && !l.contains("retrying in"))
        .collect();
    let msg = kept.join("\n").trim().to_owned();
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg).to_owned();
    if msg.contains("file 'nixpkgs' was not found in the Nix search path") {
        format!("{msg}\nhint: set `meta.nixpkgs` in the deployment, or pass `-I nixpkgs=PATH` (this repository ships a small offline set: -I nixpkgs=nix/demo-pkgs.nix)")
    } else {
        msg
    }
}

/// Writes the embedded Nix library to `$XDG_CACHE_HOME/flotilla/nix-<hash>` (or under
/// `~/.cache`) unless it is there already; a new flotilla gets a new directory.
fn materialise_library() -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    LIBRARY.hash(&mut h);
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into()).join(".cache"));
    let dir = base.join("flotilla").join(format!("nix-{:016x}", h.finish()));
    if dir.join("eval.nix").exists() {
        return Ok(dir);
    }
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| NixError::Library { path, source }
    };
    let parent = dir.parent().expect("has a parent");
    std::fs::create_dir_all(parent).map_err(err(parent))?;
    let tmp = tempdir_in(parent).map_err(err(parent))?;
    for (name, text) in LIBRARY {
        std::fs::write(tmp.join(name), text).map_err(err(&tmp.join(name)))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another flotilla wrote it first: theirs is identical.
        Err(_) if dir.join("eval.nix").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(NixError::Library { path: dir, source: e }),
    }
}

/// A new directory in `parent`, made by this call, that only its owner may enter (`parent`
/// may be the temporary directory, which is anyone's).
fn tempdir_in(parent: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    for i in 0..100u32 {
        let p = parent.join(format!(".tmp-{}-{nanos:x}-{i}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary directory name"))
}

/// The user Nix builds for, by name as `trusted-users` lists it (the login's, as the
/// environment says; the daemon knows it by uid, which names the same account).
fn current_user() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "the deploying user".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/8d5m1hrinrziw2v0llnw5myz7kwb1wnn-a";
    const B: &str = "/nix/store/lqyqgm6dylqgkgshgv1d4y2mii3zlrnj-b";
    const C: &str = "/nix/store/00000000000000000000000000000000-c";

    /// Findings on issue 18, item 4: the derivations go on stdin, so a system of thousands
    /// (5000 here, 300 KiB of paths) fits through ssh's one `sh -c` argument (128 KiB at most).
    #[test]
    fn remote_validity_query_takes_5000_paths_through_one_shell_argument() {
        let paths: Vec<StorePath> = (0..5000).map(|i| StorePath::parse(&format!("/nix/store/{:0>32}-fake-drv-{i}.drv", i % 10)).unwrap()).collect();
        let line = Nix::remote_invalid_argv("nix-store").join(" ");
        assert!(line.len() < 1024, "the command line stays short: {line}");
        let mut child = Command::new("sh")
            .args(["-c", &line])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("prerequisite missing: sh");
        let input = Nix::remote_invalid_input(&paths);
        assert!(input.len() > 128 * 1024, "the list is longer than one argument may be");
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(out.status.success(), "prerequisite missing or failing: nix-store ({})", out.status);
        let printed: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
        assert_eq!(printed.len(), 5000, "every fake path is reported invalid");
        assert_eq!(printed[4999], paths[4999].to_absolute());
    }

    fn info(p: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: StorePath::parse(p).unwrap(),
            references: refs.iter().map(|r| StorePath::parse(r).unwrap()).collect(),
            nar_hash: NarHash::parse("sha256-gnrG9qZ4EoLkK7Lw/6/COHG55s9O1M/bMPRnS2iH9jY=").unwrap(),
            nar_size: 1,
        }
    }

    #[test]
    fn path_info_json_parses() {
        let json = format!(r#"[{{"path":"{A}","narHash":"sha256-gnrG9qZ4EoLkK7Lw/6/COHG55s9O1M/bMPRnS2iH9jY=","narSize":2034368,"references":["{A}"],"deriver":"{B}.drv","ultimate":true}}]"#);
        let infos = parse_path_info_json(json.as_bytes()).unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].nar_size, 2034368);
        assert_eq!(infos[0].references, [infos[0].path.clone()]);
        assert!(parse_path_info_json(br#"[{"path":"/nix/store/x","narHash":"sha256-x","narSize":1}]"#).is_err());
        // Later Nix: an object keyed by path.
        let keyed = format!(r#"{{"{A}":{{"narHash":"sha256-gnrG9qZ4EoLkK7Lw/6/COHG55s9O1M/bMPRnS2iH9jY=","narSize":7,"references":[]}}}}"#);
        assert_eq!(parse_path_info_json(keyed.as_bytes()).unwrap()[0].nar_size, 7);
        assert!(parse_path_info_json(format!(r#"{{"{A}":null}}"#).as_bytes()).is_err());
    }

    #[test]
    fn references_come_first_and_closures_keep_that_order() {
        // A refers to B and itself, B to C.
        let ordered = references_first(vec![info(A, &[A, B]), info(B, &[C]), info(C, &[])]);
        let names: Vec<String> = ordered.iter().map(|i| i.path.name().to_owned()).collect();
        assert_eq!(names, ["c", "b", "a"]);
        let only_b = closure_within(&ordered, &[StorePath::parse(B).unwrap()]);
        assert_eq!(only_b.iter().map(|i| i.path.name().to_owned()).collect::<Vec<_>>(), ["c", "b"]);
    }

    #[test]
    fn errors_lose_the_show_trace_hint() {
        let e = clean_error(b"error: undefined variable 'x'\n\n       at /a.nix:1:1:\n(use '--show-trace' to show detailed location information)\n");
        assert_eq!(e, "undefined variable 'x'\n\n       at /a.nix:1:1:");
    }
}
