//! `flotilla image --format oci|docker-archive`: an OCI image of a machine, with no Docker
//! daemon and no staged copy of the closure. Nix builds the machine layer
//! (`ociRoots.<machine>` of eval.nix, builder `flotilla-agent build-oci-root`: the agent's
//! registry, generation 1, `/etc` as activation places it), cached like any build; the store
//! paths are grouped into layers by popularity ([`layers`]) and each layer's reproducible tar
//! ([`tar`]) is streamed from the store through its sha256 into the layout ([`layout`]).
//! Same closure, same bytes: layers, config and manifest digests are equal on any host.
//!
//! By default the agent is the container's init (`flotilla-agent init --root /`): with no
//! `/run/current-system` it switches to the `system` profile (generation 1) and starts the
//! machine's services in `after` order, and SIGTERM stops them. `image.entrypoint` runs one
//! program instead.
//!
//! Any image is pushed to a registry as a [`PushSource`] ([`registry`], logins from [`auth`]):
//! a manifest and the blobs it names, each written on demand into the upload stream.

pub mod auth;
pub mod layers;
pub mod layout;
pub mod registry;
pub mod tar;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_model::MachineName;
use serde::{Deserialize, Serialize};

use crate::{Engine, EngineError, Evaluated, Listener, Result};
use layout::Layout;

/// A blob of an image: what a registry stores under its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Its media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
}

/// An image that can be pushed: its manifest and the blobs the manifest names.
pub trait PushSource {
    /// The manifest's bytes and media type.
    fn manifest(&self) -> (&[u8], &str);
    /// The config and the layers.
    fn blobs(&self) -> Vec<Descriptor>;
    /// Writes the blob `d` to `out`, the very bytes its digest names.
    fn write_blob(&self, d: &Descriptor, out: &mut dyn std::io::Write) -> std::io::Result<()>;
}

/// The OCI manifest's media type.
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The OCI config's media type.
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// An uncompressed layer's media type (its digest is its diff id).
pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// `created`, fixed so that two builds are the same bytes.
pub const CREATED: &str = "1970-01-01T00:00:01Z";

/// An OCI image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OciFormat {
    /// An OCI image layout directory.
    Oci,
    /// A `docker load` archive.
    DockerArchive,
}

impl OciFormat {
    /// Its name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            OciFormat::Oci => "oci",
            OciFormat::DockerArchive => "docker-archive",
        }
    }
}

/// What the user asked for beyond the machine's options.
#[derive(Debug, Clone, Default)]
pub struct OciRequest {
    /// `--tag`; `None`: the toplevel's hash.
    pub tag: Option<String>,
    /// `--label K=V`, as given.
    pub labels: Vec<String>,
    /// `-o`.
    pub output: Option<PathBuf>,
    /// Where a docker archive's layout is kept between builds (its index of known layers
    /// makes the next build quick): the data directory, beside the state.
    pub cache: PathBuf,
}

/// A built image, with what the push half reads.
#[derive(Debug, Clone)]
pub struct OciImage {
    /// The layout holding its blobs.
    pub layout: PathBuf,
    /// The manifest's bytes.
    pub manifest: Vec<u8>,
    /// The config.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
}

impl PushSource for OciImage {
    fn manifest(&self) -> (&[u8], &str) {
        (&self.manifest, MANIFEST_TYPE)
    }
    fn blobs(&self) -> Vec<Descriptor> {
        std::iter::once(self.config.clone()).chain(self.layers.iter().cloned()).collect()
    }
    fn write_blob(&self, d: &Descriptor, out: &mut dyn Write) -> io::Result<()> {
        let path = self.layout.join("blobs/sha256").join(d.digest.trim_start_matches("sha256:"));
        let f = open_blob(&self.layout, &path, d.size)?;
        let n = io::copy(&mut io::Read::take(f, d.size), out)?;
        if n != d.size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} has {n} bytes, its descriptor says {}", path.display(), d.size)));
        }
        Ok(())
    }
}

/// A built OCI image, placed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OciReport {
    /// The machine.
    pub machine: MachineName,
    /// The format.
    pub format: OciFormat,
    /// The layout directory or the archive.
    pub path: PathBuf,
    /// The tag.
    pub tag: String,
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    /// The machine's toplevel.
    pub toplevel: String,
    /// Layers in the image.
    pub layers: usize,
    /// Layers whose tar was made in this run (the others were known from the layout's index).
    pub layers_written: usize,
    /// Store paths in the image.
    pub store_paths: usize,
    /// What the container runs.
    pub entrypoint: Vec<String>,
    /// The config's labels.
    pub labels: BTreeMap<String, String>,
    /// The built image, for the push.
    #[serde(skip)]
    pub image: Option<OciImage>,
}

#[derive(Debug, Deserialize)]
struct RootEntry {
    path: String,
    mode: u32,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Deserialize)]
struct ClosurePath {
    path: String,
    references: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RootInfo {
    toplevel: String,
    agent: String,
    closure: Vec<ClosurePath>,
    entries: Vec<RootEntry>,
}

/// Whether `tag` is a tag a registry takes: up to 128 of `A-Z a-z 0-9 _ . -`, not starting
/// with `.` or `-`.
pub(crate) fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty() && b.len() <= 128 && (b[0].is_ascii_alphanumeric() || b[0] == b'_') && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

/// `sha256:<hex>` of what `h` hashed.
pub(crate) fn digest_of(h: sha2::Sha256) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", h.finalize())
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    digest_of(sha2::Sha256::new_with_prefix(bytes))
}

/// Opens a regular file for reading without following a symbolic link in its last
/// component; returns it and its size (of the file opened, not of whatever the name names
/// later).
pub(crate) fn open_regular(path: &Path) -> io::Result<(std::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a regular file", path.display())));
    }
    Ok((f, meta.len()))
}

/// Opens the blob file `path` of the image layout `layout` to send it out (to a registry, into
/// an archive), refusing what a user who can write the layout could have put there to make a
/// push run as root send a file that user cannot read: a link (not followed), a file with
/// other names (a hard link: `st_nlink` > 1), a file owned by another than the layout
/// directory's owner or this process. Its bytes are checked against the digest only as they
/// stream, so these checks come first. Returns the file and its size, which must be `size`.
pub(crate) fn open_blob(layout: &Path, path: &Path, size: u64) -> io::Result<std::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let (f, len) = open_regular(path)?;
    let meta = f.metadata()?;
    let owner = std::fs::symlink_metadata(layout)?.uid();
    let me = flotilla_proc::euid();
    if meta.nlink() > 1 {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{} has {} names (hard links); a layout's blob has one: rebuild the layout", path.display(), meta.nlink())));
    }
    if meta.uid() != owner && Some(meta.uid()) != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to uid {}, not to the layout's owner (uid {owner}): rebuild the layout as its owner", path.display(), meta.uid()),
        ));
    }
    if len != size {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} has {len} bytes, its descriptor says {size}: the layout is damaged, rebuild it", path.display())));
    }
    Ok(f)
}

/// Parses `--label K=V` arguments.
pub fn parse_labels(labels: &[String]) -> std::result::Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for l in labels {
        match l.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.chars().any(char::is_whitespace) => {
                out.insert(k.to_owned(), v.to_owned());
            }
            _ => return Err(format!("--label {l:?}: a label is KEY=VALUE with a KEY of no spaces, e.g. --label org.example.team=data")),
        }
    }
    Ok(out)
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).env_remove("GIT_DIR").env_remove("GIT_WORK_TREE").stderr(std::process::Stdio::null()).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// `.revision` and `.source` of the deployment file's git repository, when they say what was
/// built: only for a file the repository tracks (a file in a directory under someone's home
/// repository is not that repository's), the commit only when the tree has no uncommitted
/// change to tracked files (a label claiming a commit must be that commit), the remote only
/// as [`public_source`] gives it.
fn git_annotations(file: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(dir) = file.parent() else { return out };
    let Some(top) = git(dir, &["rev-parse", "--show-toplevel"]) else { return out };
    let top = PathBuf::from(top);
    let real = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_owned());
    let Ok(rel) = real.strip_prefix(&top) else { return out };
    if git(&top, &["ls-files", "--error-unmatch", "--full-name", "--", &rel.to_string_lossy()]).is_none() {
        return out;
    }
    let clean = Command::new("git")
        .arg("-C")
        .arg(&top)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.is_empty());
    if clean {
        if let Some(rev) = git(&top, &["rev-parse", "HEAD"]) {
            out.insert("org.opencontainers.image.revision".into(), rev);
        }
    }
    if let Some(src) = git(&top, &["config", "--get", "remote.origin.url"]).and_then(|u| public_source(&u)) {
        out.insert("org.opencontainers.image.source".into(), src);
    }
    out
}

/// A remote URL as it may be published in an image: without its user, password or token
/// (`https://user:token@host/r` is `https://host/r`), query or fragment; `None` when a secret
/// cannot be cut out with certainty (an scp-like `user:pw@host:path`, control characters).
pub(crate) fn public_source(url: &str) -> Option<String> {
    if url.is_empty() || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return None;
    }
    let url = url.split(['?', '#']).next().unwrap_or("");
    if let Some((scheme, rest)) = url.split_once("://") {
        if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+.-".contains(&b)) {
            return None;
        }
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if host.is_empty() && scheme != "file" {
            return None;
        }
        return Some(if path.is_empty() && !rest.contains('/') { format!("{scheme}://{host}") } else { format!("{scheme}://{host}/{path}") });
    }
    // scp-like `[user@]host:path` (ssh knows no password in it) or a local path.
    match url.split_once('@') {
        Some((user, _)) if user.contains(':') || user.contains('/') => None,
        Some((_, host_path)) => Some(host_path.to_owned()),
        None => Some(url.to_owned()),
    }
}

/// Whether `-o PATH` of an `oci` image may be written: a new directory, an empty one, or an
/// OCI image layout (whose known layers are reused, its index replaced); anything else is the
/// user's and is not written into.
fn check_layout_dest(o: &Path) -> std::result::Result<(), String> {
    let meta = match std::fs::symlink_metadata(o) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("-o {}: {e}", o.display())),
        Ok(m) => m,
    };
    if !meta.is_dir() {
        return Err(format!("-o {}: it exists and is not a directory, and an `oci` image is a layout directory; give a new directory's path, or use `--format docker-archive` for one file", o.display()));
    }
    let empty = std::fs::read_dir(o).map_err(|e| format!("-o {}: {e}", o.display()))?.next().is_none();
    if !empty && !o.join("oci-layout").is_file() {
        return Err(format!(
            "-o {}: the directory holds files and is no OCI image layout (it has no `oci-layout`), and flotilla writes an image only into a new or empty directory or a layout of before; give a new directory's path, e.g. -o {}",
            o.display(),
            o.join("image").display()
        ));
    }
    Ok(())
}

fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

impl Engine {
    /// Builds `machine`'s OCI image: the machine layer with Nix, the store layers streamed
    /// into the layout at `-o` (oci) or a layout in `cache` made into the archive at `-o`
    /// (docker-archive).
    pub fn oci_image(&self, ev: &Evaluated, machine: &MachineName, format: OciFormat, req: &OciRequest, agent: &Path, listen: Listener<'_>) -> Result<OciReport> {
        let config_err = |m: String| EngineError::Config(vec![m]);
        let cfg = ev.machines.get(machine).ok_or_else(|| {
            config_err(format!(
                "deployment {} has no machine {machine}; its machines: {}",
                ev.name,
                ev.machines.keys().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })?;
        let opts = &cfg.image;
        // The evaluation checks it too (MachineConfig::check); this guards a config from elsewhere.
        if !(2..=flotilla_model::MAX_OCI_LAYERS).contains(&opts.max_layers) {
            return Err(config_err(format!(
                "machine {machine}: option `image.maxLayers` is {}, and an OCI image needs at least 2 layers (the store, the machine) and registries refuse more than {max}; set it between 2 and {max} (default 100)",
                opts.max_layers,
                max = flotilla_model::MAX_OCI_LAYERS
            )));
        }
        if opts.entrypoint.as_ref().is_some_and(|e| e.is_empty() || !e[0].starts_with('/')) {
            return Err(config_err(format!("machine {machine}: option `image.entrypoint` must be a program's absolute path and its arguments, e.g. [ \"${{pkgs.busybox}}/bin/httpd\" \"-f\" ]; unset it to run the agent as init")));
        }
        let mut labels = opts.labels.clone();
        labels.extend(parse_labels(&req.labels).map_err(config_err)?);
        if let Some(t) = &req.tag {
            if !valid_tag(t) {
                return Err(config_err(format!("--tag {t:?}: a tag is up to 128 letters, digits, `_`, `.` and `-`, not starting with `.` or `-`")));
            }
        }
        if format == OciFormat::Oci {
            if let Some(o) = &req.output {
                check_layout_dest(o).map_err(config_err)?;
            }
        }
        crate::check_agent(agent)?;

        let out = self.build_artifact(ev, machine, &format!("ociRoots.{machine}"), "the OCI image's machine layer", agent, listen)?;
        let info_path = out.join("nix-support/oci-root.json");
        let info: RootInfo = std::fs::read(&info_path)
            .map_err(|source| EngineError::Io { what: "cannot read", path: info_path.clone(), source })
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| EngineError::Io { what: "cannot parse", path: info_path.clone(), source: io::Error::other(e) }))?;

        let hash = flotilla_store::StorePath::parse(&info.toplevel).map(|p| p.hash_part().to_owned()).map_err(|e| EngineError::Io {
            what: "cannot use",
            path: info_path.clone(),
            source: io::Error::other(format!("its toplevel {:?} is not a store path ({e}); rebuild the machine layer", info.toplevel)),
        })?;
        let tag = req.tag.clone().unwrap_or(hash);
        let archive_name = format!("{machine}-{tag}.tar");
        let dest = match (&req.output, format) {
            // A directory given for an archive is where the archive goes, under its own name.
            (Some(o), OciFormat::DockerArchive) if o.is_dir() => o.join(archive_name),
            (Some(o), _) => o.clone(),
            (None, OciFormat::Oci) => PathBuf::from(format!("{machine}-oci")),
            (None, OciFormat::DockerArchive) => PathBuf::from(archive_name),
        };
        let dest = std::path::absolute(&dest).map_err(|source| EngineError::Io { what: "cannot resolve", path: dest.clone(), source })?;
        let layout_dir = match format {
            OciFormat::Oci => dest.clone(),
            OciFormat::DockerArchive => req.cache.join("oci").join(machine.as_str()),
        };
        let io_at = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| EngineError::Io { what, path, source }
        };
        let mut layout = Layout::open(&layout_dir).map_err(io_at("cannot make the image layout", &layout_dir))?;

        // The store layers, then the machine layer, which holds the toplevel: a change of the
        // toplevel alone (a file's text, an option) is then one new layer, not two.
        let closure: BTreeMap<String, Vec<String>> = info.closure.iter().map(|c| (c.path.clone(), c.references.iter().filter(|r| **r != c.path).cloned().collect())).collect();
        let groups = layers::group(&closure, (opts.max_layers - 1) as usize, &[info.toplevel.as_str()]);
        let mut descs = Vec::new();
        let mut history = Vec::new();
        let mut written = 0;
        for g in &groups {
            let key = format!("store\n{}", g.join("\n"));
            let d = match layout.known(&key) {
                Some(k) => Descriptor { media_type: LAYER_TYPE.into(), digest: k.digest, size: k.size },
                None => {
                    written += 1;
                    layout.write_blob(LAYER_TYPE, Some(&key), &mut |w| write_store_layer(g, w)).map_err(io_at("cannot write a layer of", &layout_dir))?
                }
            };
            let names: Vec<&str> = g.iter().map(|p| p.trim_start_matches("/nix/store/").get(33..).unwrap_or(p)).collect();
            history.push(format!("store paths: {}", if names.len() > 3 { format!("{} and {} more", names[..3].join(", "), names.len() - 3) } else { names.join(", ") }));
            descs.push(d);
        }
        // Keyed apart from the machine layers of before, which did not hold the toplevel.
        let key = format!("machine+toplevel\n{}", out.display());
        let d = match layout.known(&key) {
            Some(k) => Descriptor { media_type: LAYER_TYPE.into(), digest: k.digest, size: k.size },
            None => {
                written += 1;
                layout
                    .write_blob(LAYER_TYPE, Some(&key), &mut |w| write_machine_layer(&out.join("root"), &info.entries, Path::new(&info.toplevel), w))
                    .map_err(io_at("cannot write the machine layer of", &layout_dir))?
            }
        };
        history.push(format!("machine {machine}: its toplevel, registry, generation 1, /etc"));
        descs.push(d);
        layout.save_known().map_err(io_at("cannot write the layer index of", &layout_dir))?;

        let entrypoint = opts.entrypoint.clone().unwrap_or_else(|| vec![info.agent.clone(), "init".into(), "--root".into(), "/".into()]);
        let mut annotations = BTreeMap::from([
            ("org.opencontainers.image.created".to_owned(), CREATED.to_owned()),
            ("org.opencontainers.image.title".to_owned(), machine.to_string()),
            ("org.opencontainers.image.version".to_owned(), tag.clone()),
        ]);
        annotations.extend(git_annotations(&ev.file));
        for (k, v) in &annotations {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let config = serde_json::json!({
            "architecture": architecture(),
            "os": "linux",
            "created": CREATED,
            "config": {
                "Entrypoint": entrypoint,
                "Env": ["PATH=/run/current-system/sw/bin:/nix/var/flotilla/profiles/system/sw/bin"],
                "Labels": labels,
                "StopSignal": "SIGTERM",
                "WorkingDir": "/",
            },
            "rootfs": { "type": "layers", "diff_ids": descs.iter().map(|d| d.digest.clone()).collect::<Vec<_>>() },
            "history": history.iter().map(|h| serde_json::json!({ "created": CREATED, "created_by": format!("flotilla image: {h}") })).collect::<Vec<_>>(),
        });
        let config_bytes = serde_json::to_vec(&config).expect("serialises");
        let config_desc = layout.write_bytes(CONFIG_TYPE, &config_bytes).map_err(io_at("cannot write the config of", &layout_dir))?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": config_desc,
            "layers": descs,
            "annotations": annotations,
        }))
        .expect("serialises");
        let manifest_desc = layout.write_bytes(MANIFEST_TYPE, &manifest).map_err(io_at("cannot write the manifest of", &layout_dir))?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": MANIFEST_TYPE,
                "digest": manifest_desc.digest,
                "size": manifest_desc.size,
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }],
        });
        layout.write_file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_at("cannot write", &layout_dir))?;
        layout.write_file("index.json", &serde_json::to_vec(&index).expect("serialises")).map_err(io_at("cannot write", &layout_dir))?;
        if format == OciFormat::DockerArchive {
            let repo_tag = format!("{}:{tag}", machine.as_str().to_ascii_lowercase());
            layout::write_docker_archive(&layout, &config_desc, &descs, &repo_tag, &dest).map_err(io_at("cannot write", &dest))?;
        }
        Ok(OciReport {
            machine: machine.clone(),
            format,
            path: dest,
            tag,
            manifest_digest: manifest_desc.digest,
            toplevel: info.toplevel,
            layers: descs.len(),
            layers_written: written,
            store_paths: closure.len(),
            entrypoint,
            labels,
            image: Some(OciImage { layout: layout_dir, manifest, config: config_desc, layers: descs }),
        })
    }
}

/// A store layer: `nix/`, `nix/store/` and each path's tree, in order.
fn write_store_layer(paths: &[String], w: &mut dyn Write) -> io::Result<()> {
    let mut t = tar::TarWriter::new(w);
    t.entry(b"nix", 0o755, 0, 0, tar::Kind::Dir)?;
    t.entry(b"nix/store", 0o755, 0, 0, tar::Kind::Dir)?;
    let mut sorted: Vec<&String> = paths.iter().collect();
    sorted.sort();
    for p in sorted {
        t.tree(Path::new(p), p.trim_start_matches('/').as_bytes())?;
    }
    t.finish()?;
    Ok(())
}

/// The machine layer: the builder's staged root, entry by entry as its listing says (modes and
/// owners as the machine has them; Nix's canonicalisation of the output is undone here), and
/// the toplevel's tree from the store, in its place in the byte order of names.
fn write_machine_layer(root: &Path, entries: &[RootEntry], toplevel: &Path, w: &mut dyn Write) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut t = tar::TarWriter::new(w);
    let top_name = toplevel.as_os_str().as_bytes().strip_prefix(b"/").unwrap_or(toplevel.as_os_str().as_bytes());
    let mut top_written = false;
    for e in entries {
        if !top_written && e.path.as_bytes() > top_name {
            t.tree(toplevel, top_name)?;
            top_written = true;
        }
        let path = root.join(&e.path);
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path)?;
            t.entry(e.path.as_bytes(), 0o777, e.uid, e.gid, tar::Kind::Symlink { target: target.as_os_str().as_bytes() })?;
        } else if meta.is_dir() {
            t.entry(e.path.as_bytes(), e.mode, e.uid, e.gid, tar::Kind::Dir)?;
        } else {
            let (mut f, size) = open_regular(&path)?;
            t.entry(e.path.as_bytes(), e.mode, e.uid, e.gid, tar::Kind::File { size, reader: &mut f })?;
        }
    }
    if !top_written {
        t.tree(toplevel, top_name)?;
    }
    t.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layout's blob goes out (to a registry, an archive) only when it is what the layout's
    /// writer made: one name, the layout's owner's or ours, not a link, of its size.
    #[test]
    fn a_layout_blob_that_is_a_hard_link_or_anothers_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let blob = d.path().join("blob");
        std::fs::write(&blob, "12345").unwrap();
        assert!(open_blob(d.path(), &blob, 5).is_ok());
        assert!(open_blob(d.path(), &blob, 6).unwrap_err().to_string().contains("has 5 bytes, its descriptor says 6"));
        let other = d.path().join("elsewhere");
        std::fs::hard_link(&blob, &other).unwrap();
        let e = open_blob(d.path(), &blob, 5).unwrap_err().to_string();
        assert!(e.contains("has 2 names (hard links)"), "{e}");
        std::fs::remove_file(&other).unwrap();
        std::os::unix::fs::symlink(&blob, &other).unwrap();
        assert!(open_blob(d.path(), &other, 5).is_err(), "a symbolic link is not followed");
        if flotilla_proc::is_root() {
            std::os::unix::fs::chown(&blob, Some(4321), None).unwrap();
            let e = open_blob(d.path(), &blob, 5).unwrap_err().to_string();
            assert!(e.contains("belongs to uid 4321, not to the layout's owner"), "{e}");
        }
    }

    #[test]
    fn a_remote_urls_user_and_token_never_reach_a_label() {
        for (url, want) in [
            ("https://alice:ghp_SECRET@github.com/org/fleet.git", Some("https://github.com/org/fleet.git")),
            ("https://oauth2:SECRET@gitlab.example.com:8443/org/fleet", Some("https://gitlab.example.com:8443/org/fleet")),
            ("https://SECRET@host.example/r", Some("https://host.example/r")),
            ("https://host.example/r?private_token=SECRET#x", Some("https://host.example/r")),
            ("ssh://git@host.example:22/org/r.git", Some("ssh://host.example:22/org/r.git")),
            ("git@github.com:org/fleet.git", Some("github.com:org/fleet.git")),
            ("alice:SECRET@host.example:org/r", None),
            ("/srv/git/fleet.git", Some("/srv/git/fleet.git")),
            ("https://user:pa ss@h/r", None),
        ] {
            let got = public_source(url);
            assert_eq!(got.as_deref(), want, "{url}");
            assert!(!got.unwrap_or_default().contains("SECRET"), "{url}");
        }
    }

    #[test]
    fn labels_and_tags_are_checked() {
        assert_eq!(parse_labels(&["a=b".into(), "c=".into()]).unwrap(), BTreeMap::from([("a".into(), "b".into()), ("c".into(), String::new())]));
        assert!(parse_labels(&["novalue".into()]).unwrap_err().contains("KEY=VALUE"));
        assert!(parse_labels(&["=v".into()]).is_err());
        assert!(valid_tag("v1.0_x-y") && !valid_tag("-x") && !valid_tag("a/b") && !valid_tag(""));
    }
}
