//! `flotilla cache keygen`, `push` and `serve`: the command-line side of
//! `flotilla_engine::cache`. Everything that can be refused (the key, the destination, the
//! paths) is checked before anything is built or written.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use flotilla_engine::cache::push::{self, Destination, DirCache, PushOptions, PushReport};
use flotilla_engine::cache::{keys, s3::S3Cache};
use flotilla_engine::EngineEvent;
use flotilla_store::StorePath;

use crate::cli::{CacheCommand, Global};
use crate::{output, Outcome};

pub(crate) fn run(g: &Global, command: &CacheCommand) -> Result<Outcome> {
    match command {
        CacheCommand::Serve { dir, store, bind, key, priority, cache_dir } => serve(g, dir.as_deref(), *store, bind, key.as_deref(), *priority, cache_dir.as_deref()),
        CacheCommand::Keygen { name, out, json } => {
            let files = keys::keygen(name, out)?;
            if *json {
                output::json(&files);
            } else {
                outln!("secret key: {} (keep it private: it signs what the cache serves)", files.secret.display());
                outln!("public key: {}", files.public.display());
                outln!("trust it with: trusted-public-keys = {}", files.public_key);
            }
            Ok(Outcome::Ok)
        }
        CacheCommand::Push { dest, target, on, paths, key, parallel, level, json } => {
            let key = keys::read_secret_key(key)?;
            let dest: Box<dyn Destination> = if dest.starts_with("s3://") {
                Box::new(S3Cache::open(dest)?)
            } else if let Some((scheme, _)) = dest.split_once("://").filter(|(s, _)| *s != "file") {
                bail!("cannot push to a `{scheme}://` cache: DEST is a directory (file://DIR or DIR) or s3://BUCKET[/PREFIX]?region=R&endpoint=URL");
            } else {
                Box::new(DirCache::open(Path::new(dest.strip_prefix("file://").unwrap_or(dest)))?)
            };
            let nix = crate::nix(g)?;
            let roots = if paths.is_empty() {
                if target.file.is_none() && target.deployment.is_none() {
                    bail!("say what to push: store PATHS, or a deployment's toplevels with -f FILE or -d NAME (and --on to pick machines)");
                }
                let crate::Prepared { mut engine, ev, instantiated, selected, agent } = crate::prepare_build(g, target, on, None)?;
                let verbose = g.verbose;
                let mut listen = |e: &EngineEvent| output::progress(e, verbose);
                let report = engine.build_instantiated(&ev, &selected, &agent, instantiated, &mut listen)?;
                if !report.all_ok() {
                    output::build_report(&report, false);
                    bail!("some machines did not build (above); nothing was pushed");
                }
                report.machines.iter().filter_map(|m| m.toplevel.clone()).collect()
            } else {
                paths.iter().map(|p| store_path(p)).collect::<Result<Vec<StorePath>>>()?
            };
            let Some(closure) = nix.closure_info(&roots)? else {
                bail!("some of {} are not valid paths in this host's store; build or fetch them first (nix-store -r PATH)", roots.iter().map(StorePath::to_absolute).collect::<Vec<_>>().join(", "));
            };
            let mut opts = PushOptions { level: *level, ..PushOptions::default() };
            if let Some(n) = parallel {
                opts.parallel = usize::from(*n);
            }
            let verbose = g.verbose;
            let progress = move |line: &str| {
                if verbose {
                    eprintln!("{line}");
                }
            };
            let report = push::push(dest.as_ref(), &key, &closure, opts, &progress)?;
            print_report(&report, *json);
            Ok(Outcome::Ok)
        }
    }
}

/// A store path from the command line: `/nix/store/...`, or a link to one (`./result`).
fn store_path(arg: &str) -> Result<StorePath> {
    if let Ok(p) = StorePath::parse(arg) {
        return Ok(p);
    }
    let bad = || anyhow::anyhow!("`{arg}` is not a store path (/nix/store/HASH-NAME) nor a link to one");
    let real = std::fs::canonicalize(arg).map_err(|_| bad())?;
    StorePath::parse(&real.to_string_lossy()).map_err(|_| bad())
}

fn print_report(r: &PushReport, as_json: bool) {
    if as_json {
        return output::json(r);
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    outln!(
        "pushed {} of {} paths to {} ({:.1} MiB of NAR, {:.1} MiB compressed) in {:.1}s; {} were there already",
        r.pushed,
        r.paths,
        r.cache,
        mib(r.nar_bytes),
        mib(r.file_bytes),
        r.elapsed.as_secs_f64(),
        r.skipped
    );
    if !r.kept_foreign.is_empty() {
        outln!("{} of those carry no signature of key {}: left as they are (signed by another key)", r.kept_foreign.len(), r.key);
    }
}

/// `flotilla cache serve`: runs until SIGINT or SIGTERM.
fn serve(g: &Global, dir: Option<&Path>, store: bool, bind: &str, key: Option<&Path>, priority: Option<u32>, cache_dir: Option<&Path>) -> Result<Outcome> {
    use flotilla_engine::cache::serve::{ServeOptions, Server, Source};
    let source = match (dir, store) {
        (Some(dir), false) => Source::Dir(dir.to_owned()),
        _ => Source::Store { cache_dir: cache_dir.map_or_else(default_serve_cache_dir, Path::to_owned) },
    };
    let what = match &source {
        Source::Dir(d) => d.display().to_string(),
        Source::Store { cache_dir } => format!("this host's store (NARs kept in {})", cache_dir.display()),
    };
    let opts = ServeOptions { source, bind: bind.to_owned(), key: key.map(Path::to_owned), priority, verbose: g.verbose };
    let server = Server::open(&opts)?;
    let addr = server.local_addr().context("the listening address")?;
    eprintln!("serving {what} ({} narinfos) at http://{addr}", server.narinfos());
    let signal = server.run().context("serving")?;
    eprintln!("stopped ({signal})");
    Ok(Outcome::Ok)
}

/// `--store`'s default cache directory: `$XDG_CACHE_HOME/flotilla/serve`, else `~/.cache/...`.
fn default_serve_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("flotilla/serve")
}
