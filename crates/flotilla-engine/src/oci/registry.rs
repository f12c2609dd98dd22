//! Pushing an image to a registry over the OCI distribution protocol, and reading one from an
//! OCI image layout directory.
//!
//! A push asks the registry which blobs it has (`HEAD`), uploads only the missing ones, each
//! streamed from its [`PushSource`] in one `PATCH` (never staged in a temporary copy) and
//! committed with `PUT ?digest=` once its digest is checked, and puts the manifest last: a push
//! that fails midway leaves blobs the registry collects, never a tag naming a partial image.
//!
//! A small synchronous client on `ureq`: the distribution protocol is a handful of requests,
//! and the client crates for it bring an async runtime and some 150 crates with them.
//! Registries on a loopback address are spoken to in plain HTTP (as `skopeo
//! --dest-tls-verify=false` would for a local test registry); any other only over TLS unless
//! the caller says plain HTTP. A password never reaches an error, the log or the state DB.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::auth::{self, AuthFileError, Challenge, Credentials};
use super::{digest_of, open_blob, open_regular, sha256_digest, valid_tag, Descriptor, PushSource, MANIFEST_TYPE};

/// How a reference is written, for errors that reject one.
const REFERENCE_FORM: &str = "docker://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]";

/// Where an image goes: a registry, a repository in it, and a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `HOST[:PORT]`, as auth files name it.
    pub host: String,
    /// `a/b/c`.
    pub repository: String,
    /// The tag, when one was given.
    pub tag: Option<String>,
    /// `sha256:<hex>`, when the image was named by its digest.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]` or the same without `docker://`.
    pub fn parse(s: &str) -> Result<Reference, RegistryError> {
        let bad = |reason: &str| RegistryError::BadReference { reference: s.to_owned(), reason: reason.to_owned() };
        let rest = match s.strip_prefix("docker://") {
            Some(r) => r,
            None if s.contains("://") => return Err(bad("only docker:// references name a registry")),
            None => s,
        };
        let (host, path) = rest.split_once('/').ok_or_else(|| bad("it names no repository"))?;
        if !valid_host(host) {
            return Err(bad(&format!("`{host}` is not a registry host (a name with a dot, localhost or an address, and an optional :PORT)")));
        }
        let (name, digest) = match path.split_once('@') {
            Some((n, d)) => {
                if !valid_digest(d) {
                    return Err(bad(&format!("`{d}` is not a digest (sha256: and 64 lowercase hex digits)")));
                }
                (n, Some(d.to_owned()))
            }
            None => (path, None),
        };
        let (repository, tag) = match name.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_owned())),
            _ => (name, None),
        };
        if !valid_repository(repository) {
            return Err(bad(&format!("`{repository}` is not a repository name (lowercase letters, digits and . _ - between them, parts joined by /)")));
        }
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(bad(&format!("`{t}` is not a tag (up to 128 of A-Z a-z 0-9 _ . -, not starting with . or -)")));
            }
        }
        Ok(Reference { host: host.to_owned(), repository: repository.to_owned(), tag, digest })
    }

    /// Whether the registry is on this host's loopback, where plain HTTP is allowed.
    pub fn is_loopback(&self) -> bool {
        let name = match self.host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => self.host.rsplit_once(':').map_or(self.host.as_str(), |(h, _)| h),
        };
        name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// What the manifest is put under: the digest, the tag, or `latest`.
    fn manifest_ref(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        match (&self.digest, &self.tag) {
            (Some(d), _) => write!(f, "@{d}"),
            (None, Some(t)) => write!(f, ":{t}"),
            (None, None) => write!(f, ":latest"),
        }
    }
}

fn valid_host(h: &str) -> bool {
    let (name, port) = match h.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, rest)) if addr.parse::<std::net::Ipv6Addr>().is_ok() => ("localhost", rest.strip_prefix(':').map(Some).unwrap_or(if rest.is_empty() { None } else { Some("x") })),
            _ => return false,
        },
        None => match h.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (h, None),
        },
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = !name.is_empty()
        && name.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !l.starts_with('-') && !l.ends_with('-'))
        && (name.contains('.') || name == "localhost" || port.is_some());
    port_ok && name_ok
}

fn valid_repository(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && r.split('/').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
        })
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
}

/// Why a push failed. No variant holds a password or an `Authorization` header.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not name an image in a registry.
    #[error("image reference `{reference}`: {reason}; write it as {REFERENCE_FORM}")]
    BadReference {
        /// As given.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// No connection, or not the protocol expected.
    #[error("registry {registry} is unreachable: {detail}; {hint}")]
    Unreachable {
        /// `HOST[:PORT]`.
        registry: String,
        /// What the connection said.
        detail: String,
        /// What to do.
        hint: &'static str,
    },
    /// The registry wants a login and none was found.
    #[error("registry {registry} asks for a login and no credentials for it are in {}; log in with `skopeo login {registry}` (or `docker login {registry}`), or point REGISTRY_AUTH_FILE at an auth file that has them", files_list(.searched))]
    NoCredentials {
        /// `HOST[:PORT]`.
        registry: String,
        /// The auth files looked in.
        searched: Vec<PathBuf>,
    },
    /// The registry refused the credentials found.
    #[error("registry {registry} refused the login of user {username} (from {}); log in again with `skopeo login {registry}` (or `docker login {registry}`)", .from.display())]
    LoginRefused {
        /// `HOST[:PORT]`.
        registry: String,
        /// Whose login.
        username: String,
        /// The auth file it came from.
        from: PathBuf,
    },
    /// An auth file could not be read.
    #[error(transparent)]
    AuthFile(#[from] AuthFileError),
    /// The registry answered a request with an error.
    #[error("registry {registry} answered {status} to {what}: {detail}")]
    Answer {
        /// `HOST[:PORT]`.
        registry: String,
        /// The request, in words.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The registry's own words, or the fix.
        detail: String,
    },
    /// The image source gave other bytes than its manifest names.
    #[error("the image's blob {digest} is not what its manifest says ({detail}); nothing was tagged: rebuild the image")]
    SourceMismatch {
        /// The blob.
        digest: String,
        /// Size or digest found.
        detail: String,
    },
    /// Reading a blob from the image source failed.
    #[error("reading the image's blob {digest}: {source}")]
    Source {
        /// The blob.
        digest: String,
        /// Why.
        source: std::io::Error,
    },
    /// An OCI layout directory could not be read as an image.
    #[error("OCI layout {}: {detail}", .path.display())]
    Layout {
        /// The directory.
        path: PathBuf,
        /// What is wrong, and the fix.
        detail: String,
    },
}

fn files_list(files: &[PathBuf]) -> String {
    if files.is_empty() {
        return "no auth file (neither REGISTRY_AUTH_FILE nor HOME is set)".to_owned();
    }
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// How to push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Speak plain HTTP to a registry that is not on a loopback address.
    pub plain_http: bool,
    /// Credentials to use instead of the auth files'.
    pub credentials: Option<Credentials>,
}

/// What a push reports while it works, blob by blob.
#[derive(Debug, Clone)]
pub enum PushEvent<'a> {
    /// The registry has this blob already.
    Present(&'a Descriptor),
    /// This blob's upload starts.
    Uploading(&'a Descriptor),
    /// How many bytes of the blob went so far.
    Progress {
        /// The blob.
        blob: &'a Descriptor,
        /// Bytes sent.
        sent: u64,
    },
    /// The blob is in the registry.
    Uploaded {
        /// The blob.
        blob: &'a Descriptor,
        /// How long its upload took.
        secs: f64,
    },
    /// The manifest is in the registry, under the reference.
    Manifest {
        /// Its digest.
        digest: &'a str,
    },
}

/// One blob of a push.
#[derive(Debug, Clone, Serialize)]
pub struct BlobReport {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
}

/// What a push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// Where the image went (`HOST/REPO:TAG`).
    pub reference: String,
    /// The manifest's digest: `HOST/REPO@DIGEST` names exactly this image.
    pub digest: String,
    /// Blobs uploaded by this push.
    pub uploaded: Vec<BlobReport>,
    /// Blobs the registry had already.
    pub present: Vec<BlobReport>,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// How long the push took.
    pub secs: f64,
}

/// Pushes `source` to `reference`: the blobs the registry lacks, then the manifest.
pub fn push(source: &dyn PushSource, reference: &Reference, options: &PushOptions, progress: &mut dyn FnMut(&PushEvent)) -> Result<PushReport, RegistryError> {
    let started = Instant::now();
    let (manifest, media_type) = source.manifest();
    let digest = sha256_digest(manifest);
    if let Some(want) = &reference.digest {
        if *want != digest {
            return Err(RegistryError::BadReference {
                reference: reference.to_string(),
                reason: format!("the image's manifest is {digest}, not the digest the reference names"),
            });
        }
    }
    let client = Client::connect(reference, options)?;
    let mut report = PushReport { reference: reference.to_string(), digest: digest.clone(), uploaded: Vec::new(), present: Vec::new(), bytes_uploaded: 0, secs: 0.0 };
    let mut seen = std::collections::BTreeSet::new();
    for blob in source.blobs() {
        if !valid_digest(&blob.digest) {
            return Err(RegistryError::SourceMismatch { digest: blob.digest.clone(), detail: "it is not a sha256 digest".into() });
        }
        if !seen.insert(blob.digest.clone()) {
            continue;
        }
        let row = BlobReport { digest: blob.digest.clone(), size: blob.size, media_type: blob.media_type.clone() };
        if client.renewing(|| client.has_blob(&blob))? {
            progress(&PushEvent::Present(&blob));
            report.present.push(row);
            continue;
        }
        progress(&PushEvent::Uploading(&blob));
        let t = Instant::now();
        client.renewing(|| client.upload(source, &blob, &mut *progress))?;
        progress(&PushEvent::Uploaded { blob: &blob, secs: t.elapsed().as_secs_f64() });
        report.bytes_uploaded += blob.size;
        report.uploaded.push(row);
    }
    client.renewing(|| client.put_manifest(reference.manifest_ref(), manifest, media_type))?;
    progress(&PushEvent::Manifest { digest: &digest });
    report.secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A connection to one repository of one registry, logged in.
struct Client {
    agent: ureq::Agent,
    /// `http[s]://HOST[:PORT]`
    base: String,
    registry: String,
    repository: String,
    plain_http: bool,
    /// The `Authorization` header, renewed when a token expires (hence the lock: the
    /// requests take it by `&self`).
    authorization: std::sync::Mutex<Option<String>>,
    /// Where the Bearer token came from, to fetch a new one when the registry refuses the
    /// old one mid-push (tokens live minutes; a large push takes longer).
    bearer: Option<Bearer>,
}

/// A token service and the login it takes.
struct Bearer {
    realm: String,
    service: Option<String>,
    creds: Option<Credentials>,
    searched: Vec<PathBuf>,
}

/// How much of an error body is read: a registry's error is a short JSON document.
const ERROR_BODY_LIMIT: u64 = 64 * 1024;
/// Bytes per message between a blob's source and its upload.
const CHUNK: usize = 256 * 1024;
/// How often upload progress is reported.
const PROGRESS_EVERY: u64 = 16 << 20;

impl Client {
    fn connect(reference: &Reference, options: &PushOptions) -> Result<Client, RegistryError> {
        let plain_http = options.plain_http || reference.is_loopback();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(15)))
            // A registry answers a blob's commit once it has checked the digest of all of it.
            .timeout_recv_response(Some(Duration::from_secs(600)))
            .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        let scheme = if plain_http { "http" } else { "https" };
        let mut client = Client {
            agent,
            base: format!("{scheme}://{}", reference.host),
            registry: reference.host.clone(),
            repository: reference.repository.clone(),
            plain_http,
            authorization: std::sync::Mutex::new(None),
            bearer: None,
        };
        client.login(options.credentials.clone())?;
        Ok(client)
    }

    /// Asks `/v2/` what the registry wants, and gets it: nothing, a Basic login or a token.
    fn login(&mut self, given: Option<Credentials>) -> Result<(), RegistryError> {
        let url = format!("{}/v2/", self.base);
        let resp = self.agent.get(&url).call().map_err(|e| self.transport(e))?;
        match resp.status().as_u16() {
            200..=299 => return Ok(()),
            401 => {}
            s => return Err(self.answer("the API check (GET /v2/)", s, resp, "is this address a container registry?")),
        }
        let challenge = resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).and_then(Challenge::parse);
        let searched = auth::auth_files();
        let creds = match given {
            Some(c) => Some(c),
            None => auth::lookup(&searched, &self.registry)?,
        };
        let no_creds = || RegistryError::NoCredentials { registry: self.registry.clone(), searched: searched.clone() };
        match challenge {
            Some(Challenge::Basic) => {
                let c = creds.ok_or_else(no_creds)?;
                self.set_authorization(c.basic_header());
                let resp = self.authed(self.agent.get(&url), &url).call().map_err(|e| self.transport(e))?;
                match resp.status().as_u16() {
                    200..=299 => Ok(()),
                    401 => Err(self.refused(&c)),
                    s => Err(self.answer("the login (GET /v2/)", s, resp, "")),
                }
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                let token = self.token(&realm, service.as_deref(), creds.as_ref(), no_creds)?;
                self.set_authorization(format!("Bearer {token}"));
                self.bearer = Some(Bearer { realm, service, creds, searched });
                Ok(())
            }
            None => Err(RegistryError::Answer {
                registry: self.registry.clone(),
                what: "the API check (GET /v2/)".into(),
                status: 401,
                detail: "it asks for a login this client does not speak (neither Basic nor Bearer)".into(),
            }),
        }
    }

    fn set_authorization(&self, value: String) {
        *self.authorization.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    }

    /// Runs `request` (whose requests take the current login), and once more with a new
    /// token when the registry answered 401 and the login is a Bearer token: a token expires
    /// (minutes, at the token service's choice) and a push of large layers outlives it. A
    /// second 401 is the registry's answer.
    fn renewing<T>(&self, mut request: impl FnMut() -> Result<T, RegistryError>) -> Result<T, RegistryError> {
        match request() {
            Err(RegistryError::Answer { status: 401, .. }) if self.bearer.is_some() => {
                let b = self.bearer.as_ref().expect("checked");
                let no_creds = || RegistryError::NoCredentials { registry: self.registry.clone(), searched: b.searched.clone() };
                let token = self.token(&b.realm, b.service.as_deref(), b.creds.as_ref(), no_creds)?;
                self.set_authorization(format!("Bearer {token}"));
                request()
            }
            r => r,
        }
    }

    /// A token to pull and push this repository, from the registry's token service.
    fn token(&self, realm: &str, service: Option<&str>, creds: Option<&Credentials>, no_creds: impl Fn() -> RegistryError) -> Result<String, RegistryError> {
        let scope = format!("repository:{}:pull,push", self.repository);
        let mut req = self.agent.get(realm).query("scope", &scope);
        if let Some(s) = service {
            req = req.query("service", s);
        }
        // A password goes only to a token service over TLS or on the registry's own host.
        let realm_host = realm.split_once("://").map(|(_, r)| r.split('/').next().unwrap_or(""));
        let safe = realm.starts_with("https://") || realm_host == Some(self.registry.as_str());
        if let (Some(c), true) = (creds, safe) {
            req = req.header("Authorization", c.basic_header());
        }
        let mut resp = req.call().map_err(|e| self.transport(e))?;
        match resp.status().as_u16() {
            200..=299 => {}
            401 | 403 => return Err(creds.map_or_else(no_creds, |c| self.refused(c))),
            s => return Err(self.answer("the token request", s, resp, "")),
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let text = resp.body_mut().with_config().limit(ERROR_BODY_LIMIT).read_to_string().map_err(|e| self.transport(e))?;
        let t: Token = serde_json::from_str(&text).map_err(|_| self.protocol("the token request", "its answer is not a token"))?;
        t.token.or(t.access_token).filter(|t| !t.is_empty()).ok_or_else(|| self.protocol("the token request", "its answer holds no token"))
    }

    /// Adds the login to a request for `url` when `url` is on this registry (an upload may be
    /// sent elsewhere; the login is not).
    fn authed<B>(&self, req: ureq::RequestBuilder<B>, url: &str) -> ureq::RequestBuilder<B> {
        let same = url.strip_prefix(&self.base).is_some_and(|r| r.starts_with('/'));
        let a = self.authorization.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match (a, same) {
            (Some(a), true) => req.header("Authorization", a),
            _ => req,
        }
    }

    fn has_blob(&self, blob: &Descriptor) -> Result<bool, RegistryError> {
        let url = format!("{}/v2/{}/blobs/{}", self.base, self.repository, blob.digest);
        let resp = self.authed(self.agent.head(&url), &url).call().map_err(|e| self.transport(e))?;
        match resp.status().as_u16() {
            200..=299 => Ok(true),
            404 => Ok(false),
            s => Err(self.answer(&format!("the check for blob {}", blob.digest), s, resp, "")),
        }
    }

    /// Starts an upload session, streams the blob into it, checks what was sent, commits it.
    fn upload(&self, source: &dyn PushSource, blob: &Descriptor, progress: &mut dyn FnMut(&PushEvent)) -> Result<(), RegistryError> {
        let what = format!("the upload of blob {}", blob.digest);
        let url = format!("{}/v2/{}/blobs/uploads/", self.base, self.repository);
        let resp = self.authed(self.agent.post(&url), &url).send_empty().map_err(|e| self.transport(e))?;
        if resp.status().as_u16() != 202 {
            let s = resp.status().as_u16();
            return Err(self.answer(&what, s, resp, ""));
        }
        let session = self.location(&resp, &what)?;
        let sent = self.stream(&session, source, blob, progress);
        let next = match sent {
            Ok(next) => next,
            Err(e) => {
                self.cancel(&session);
                return Err(e);
            }
        };
        let sep = if next.contains('?') { '&' } else { '?' };
        let commit = format!("{next}{sep}digest={}", blob.digest);
        let resp = self.authed(self.agent.put(&commit), &commit).send_empty().map_err(|e| self.transport(e))?;
        match resp.status().as_u16() {
            201 | 204 => Ok(()),
            s => {
                let e = self.answer(&what, s, resp, "");
                self.cancel(&next);
                Err(e)
            }
        }
    }

    /// One `PATCH` whose body is the blob as the source writes it: the source writes on this
    /// thread, the request reads on another, through a bounded channel. Returns the session's
    /// next location once the bytes sent are checked against the descriptor.
    fn stream(&self, session: &str, source: &dyn PushSource, blob: &Descriptor, progress: &mut dyn FnMut(&PushEvent)) -> Result<String, RegistryError> {
        let what = format!("the upload of blob {}", blob.digest);
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
        let req = self.authed(self.agent.patch(session), session).header("Content-Type", "application/octet-stream");
        let (written, resp) = std::thread::scope(|s| {
            let sender = s.spawn(move || req.send(ureq::SendBody::from_owned_reader(ChannelReader { rx, buf: Vec::new(), pos: 0, ended: false })));
            let mut w = ChannelWriter { tx: Some(tx), buf: Vec::with_capacity(CHUNK), hash: Sha256::new(), n: 0, next_report: PROGRESS_EVERY, blob, progress, upload_stopped: false };
            let written = source.write_blob(blob, &mut w).and_then(|()| w.finish()).map(|()| (w.n, digest_of(w.hash.clone())));
            let upload_stopped = w.upload_stopped;
            // Without finish's end mark the channel's closing is an error to the request, which
            // then aborts instead of ending the body as if it were complete.
            drop(w);
            let resp = sender.join().expect("the upload thread does not panic");
            (written.map_err(|e| (e, upload_stopped)), resp)
        });
        let resp = match (written, resp) {
            // The source failed by itself (a blob file gone or short): the request's failure
            // is only its consequence.
            (Err((e, false)), _) => return Err(RegistryError::Source { digest: blob.digest.clone(), source: e }),
            // The request's own failure explains a write that found the channel closed.
            (_, Err(e)) => return Err(self.transport(e)),
            (Err((e, _)), Ok(_)) => return Err(RegistryError::Source { digest: blob.digest.clone(), source: e }),
            (Ok((n, digest)), Ok(resp)) => {
                if n != blob.size || digest != blob.digest {
                    return Err(RegistryError::SourceMismatch { digest: blob.digest.clone(), detail: format!("{n} bytes with digest {digest}, not {} bytes", blob.size) });
                }
                resp
            }
        };
        match resp.status().as_u16() {
            202 => self.location(&resp, &what),
            s => Err(self.answer(&what, s, resp, "")),
        }
    }

    fn put_manifest(&self, reference: &str, manifest: &[u8], media_type: &str) -> Result<(), RegistryError> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.repository);
        let resp = self.authed(self.agent.put(&url), &url).header("Content-Type", media_type).send(manifest).map_err(|e| self.transport(e))?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            s => Err(self.answer("the manifest's upload", s, resp, "")),
        }
    }

    /// Abandons an upload session; the registry would expire it anyway.
    fn cancel(&self, session: &str) {
        let _ = self.authed(self.agent.delete(session), session).call();
    }

    /// The absolute URL of a response's `Location`.
    fn location(&self, resp: &ureq::http::Response<ureq::Body>, what: &str) -> Result<String, RegistryError> {
        let loc = resp.headers().get("location").and_then(|v| v.to_str().ok()).ok_or_else(|| self.protocol(what, "its answer has no Location"))?;
        if loc.starts_with("http://") || loc.starts_with("https://") {
            Ok(loc.to_owned())
        } else if loc.starts_with('/') {
            Ok(format!("{}{loc}", self.base))
        } else {
            Err(self.protocol(what, "its answer's Location is not a URL"))
        }
    }

    fn transport(&self, e: ureq::Error) -> RegistryError {
        let hint = match &e {
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Protocol(_) if !self.plain_http => {
                "if it serves plain HTTP (a test registry), pass --plain-http"
            }
            ureq::Error::Timeout(_) => "check the address, the network and that the registry is running",
            _ => "check the address and that the registry is running",
        };
        RegistryError::Unreachable { registry: self.registry.clone(), detail: e.to_string(), hint }
    }

    fn protocol(&self, what: &str, detail: &str) -> RegistryError {
        RegistryError::Answer { registry: self.registry.clone(), what: what.to_owned(), status: 0, detail: detail.to_owned() }
    }

    fn refused(&self, c: &Credentials) -> RegistryError {
        RegistryError::LoginRefused { registry: self.registry.clone(), username: c.username.clone(), from: c.from.clone() }
    }

    /// An error status, in the registry's own words (its JSON `errors`) where it gave some.
    fn answer(&self, what: &str, status: u16, mut resp: ureq::http::Response<ureq::Body>, fallback: &str) -> RegistryError {
        let text = resp.body_mut().with_config().limit(ERROR_BODY_LIMIT).read_to_string().unwrap_or_default();
        #[derive(serde::Deserialize)]
        struct Errors {
            errors: Vec<OneError>,
        }
        #[derive(serde::Deserialize)]
        struct OneError {
            code: Option<String>,
            message: Option<String>,
        }
        let said = serde_json::from_str::<Errors>(&text)
            .map(|e| e.errors.iter().map(|e| format!("{}: {}", e.code.as_deref().unwrap_or("ERROR"), e.message.as_deref().unwrap_or(""))).collect::<Vec<_>>().join("; "))
            .unwrap_or_default();
        let fix = match status {
            401 => format!("log in with `skopeo login {}`", self.registry),
            403 => format!("the login has no right to push to {}; ask the registry's admin, or log in as another user with `skopeo login {}`", self.repository, self.registry),
            _ => fallback.to_owned(),
        };
        let detail = match (said.is_empty(), fix.is_empty()) {
            (true, true) => "no reason given".to_owned(),
            (true, false) => fix,
            (false, true) => said.chars().take(500).collect(),
            (false, false) => format!("{}; {fix}", said.chars().take(500).collect::<String>()),
        };
        RegistryError::Answer { registry: self.registry.clone(), what: what.to_owned(), status, detail }
    }
}

/// The source's side of a blob's stream: hashes and counts what it passes on.
struct ChannelWriter<'a, 'p> {
    tx: Option<mpsc::SyncSender<Vec<u8>>>,
    buf: Vec<u8>,
    hash: Sha256,
    n: u64,
    next_report: u64,
    blob: &'a Descriptor,
    progress: &'p mut dyn FnMut(&PushEvent),
    /// Set when a write found the request's end of the channel gone.
    upload_stopped: bool,
}

impl Write for ChannelWriter<'_, '_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.hash.update(data);
        self.n += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        if self.n >= self.next_report {
            (self.progress)(&PushEvent::Progress { blob: self.blob, sent: self.n });
            self.next_report = self.n + PROGRESS_EVERY;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl ChannelWriter<'_, '_> {
    /// Sends what is left and the end mark (an empty chunk).
    fn finish(&mut self) -> std::io::Result<()> {
        self.send()?;
        let tx = self.tx.take().ok_or_else(|| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        let sent = tx.send(Vec::new());
        self.stopped(sent)
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let tx = self.tx.as_ref().ok_or_else(|| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        let sent = tx.send(chunk);
        self.stopped(sent)
    }

    fn stopped<T>(&mut self, sent: Result<(), mpsc::SendError<T>>) -> std::io::Result<()> {
        sent.map_err(|_| {
            self.upload_stopped = true;
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped")
        })
    }
}

/// The request's side of a blob's stream: an empty chunk is the end, a channel closed
/// before it an error (the source failed).
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(b) => {
                    self.ended = b.is_empty();
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the image source stopped")),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`) holding one
/// image, as `skopeo copy ... oci:DIR` or `umoci` write it.
///
/// Files are opened without following symbolic links, and a blob must be a regular file of
/// the size its descriptor gives: a layout another user can write cannot make a push run as
/// root send a file that user cannot read.
pub struct OciLayoutDir {
    root: PathBuf,
    manifest: Vec<u8>,
    media_type: String,
    blobs: Vec<Descriptor>,
}

#[derive(serde::Deserialize)]
struct JsonDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
}

impl OciLayoutDir {
    /// Reads the layout's index and its one image's manifest.
    pub fn open(path: &Path) -> Result<OciLayoutDir, RegistryError> {
        let bad = |detail: String| RegistryError::Layout { path: path.to_owned(), detail };
        let read = |rel: &str, limit: u64| -> Result<Vec<u8>, RegistryError> {
            let (mut f, _) = open_regular(&path.join(rel)).map_err(|e| bad(format!("{rel}: {e}")))?;
            let mut v = Vec::new();
            Read::take(&mut f, limit).read_to_end(&mut v).map_err(|e| bad(format!("{rel}: {e}")))?;
            Ok(v)
        };
        read("oci-layout", 4096).map_err(|_| bad("it has no oci-layout file: is it an OCI image layout (`skopeo copy ... oci:DIR`)?".into()))?;
        #[derive(serde::Deserialize)]
        struct Index {
            manifests: Vec<JsonDescriptor>,
        }
        let index: Index = serde_json::from_slice(&read("index.json", 16 << 20)?).map_err(|e| bad(format!("index.json is not an OCI index ({e})")))?;
        let [m] = index.manifests.as_slice() else {
            return Err(bad(format!("its index.json lists {} images; push a layout that holds one", index.manifests.len())));
        };
        if !valid_digest(&m.digest) {
            return Err(bad(format!("its index names `{}`, not a sha256 digest", m.digest)));
        }
        let manifest = read(&blob_rel(&m.digest), 16 << 20)?;
        if sha256_digest(&manifest) != m.digest || manifest.len() as u64 != m.size {
            return Err(bad(format!("its manifest blob does not match the digest {} its index gives", m.digest)));
        }
        #[derive(serde::Deserialize)]
        struct Manifest {
            #[serde(rename = "mediaType", default)]
            media_type: Option<String>,
            config: JsonDescriptor,
            #[serde(default)]
            layers: Vec<JsonDescriptor>,
        }
        let parsed: Manifest = serde_json::from_slice(&manifest)
            .map_err(|e| bad(format!("its manifest is not an image manifest (a multi-platform index cannot be pushed from a layout; {e})")))?;
        let media_type = m.media_type.clone().or(parsed.media_type).unwrap_or_else(|| MANIFEST_TYPE.to_owned());
        let blobs = std::iter::once(parsed.config)
            .chain(parsed.layers)
            .map(|d| {
                if !valid_digest(&d.digest) {
                    return Err(bad(format!("its manifest names `{}`, not a sha256 digest", d.digest)));
                }
                Ok(Descriptor { media_type: d.media_type.unwrap_or_default(), digest: d.digest, size: d.size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OciLayoutDir { root: path.to_owned(), manifest, media_type, blobs })
    }
}

fn blob_rel(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

impl PushSource for OciLayoutDir {
    fn manifest(&self) -> (&[u8], &str) {
        (&self.manifest, &self.media_type)
    }

    fn blobs(&self) -> Vec<Descriptor> {
        self.blobs.clone()
    }

    fn write_blob(&self, d: &Descriptor, out: &mut dyn Write) -> std::io::Result<()> {
        let path = self.root.join(blob_rel(&d.digest));
        let f = open_blob(&self.root, &path, d.size).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let n = std::io::copy(&mut f.take(d.size), out)?;
        if n != d.size {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("{} has {n} bytes, its descriptor says {}", path.display(), d.size)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    struct NoBlobs;
    impl PushSource for NoBlobs {
        fn manifest(&self) -> (&[u8], &str) {
            (b"{}", MANIFEST_TYPE)
        }
        fn blobs(&self) -> Vec<Descriptor> {
            Vec::new()
        }
        fn write_blob(&self, _: &Descriptor, _: &mut dyn Write) -> std::io::Result<()> {
            unreachable!()
        }
    }

    /// A Bearer token login. Debian's registry has no token service of its own, so a stand-in
    /// on 127.0.0.1 answers as the distribution spec's token flow does: the API check asks for
    /// a token from a realm, the realm takes a Basic login and gives a token, the manifest's PUT
    /// must carry it.
    #[test]
    fn bearer_token_login_from_the_realm_the_registry_names() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for conn in listener.incoming().take(3) {
                let mut conn = std::io::BufReader::new(conn.unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    conn.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    head.push(line.trim().to_owned());
                }
                let header = |n: &str| head.iter().find_map(|h| h.split_once(": ").filter(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.to_owned()));
                let len: usize = header("content-length").map_or(0, |l| l.parse().unwrap());
                let mut body = vec![0; len];
                conn.read_exact(&mut body).unwrap();
                let auth = header("authorization").unwrap_or_default();
                let (status, extra, text) = match head[0].split(' ').nth(1).unwrap() {
                    "/v2/" => (401, format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\"\r\n"), String::new()),
                    p if p.starts_with("/token?") && auth == "Basic YWxpY2U6cHc=" => (200, String::new(), r#"{"token":"tok"}"#.to_owned()),
                    "/v2/team/web/manifests/v1" if auth == "Bearer tok" => (201, String::new(), String::new()),
                    _ => (401, String::new(), String::new()),
                };
                let reply = format!("HTTP/1.1 {status} X\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
                conn.get_mut().write_all(reply.as_bytes()).unwrap();
                seen.push(format!("{} {status}", head[0].rsplit_once(' ').unwrap().0));
            }
            seen
        });
        let reference = Reference::parse(&format!("docker://127.0.0.1:{port}/team/web:v1")).unwrap();
        let creds = Credentials::new("alice".into(), "pw".into(), "test".into());
        let report = push(&NoBlobs, &reference, &PushOptions { plain_http: false, credentials: Some(creds) }, &mut |_| {}).unwrap();
        assert_eq!(report.digest, sha256_digest(b"{}"));
        let seen = seen.join().unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0], "GET /v2/ 401");
        assert!(seen[1].starts_with("GET /token?") && seen[1].contains("scope=repository%3Ateam%2Fweb%3Apull%2Cpush") && seen[1].ends_with(" 200"), "{seen:?}");
        assert_eq!(seen[2], "PUT /v2/team/web/manifests/v1 201");
    }

    /// A stand-in registry on 127.0.0.1: one request per connection, each answered by
    /// `answer(method, path, authorization, body)` with a status, extra header lines and a
    /// body; a chunked body is read whole. Returns its port and the log of `METHOD PATH
    /// STATUS` lines.
    fn stand_in(answer: impl Fn(&str, &str, &str, &[u8]) -> (u16, String, String) + Send + 'static) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let mut conn = std::io::BufReader::new(conn);
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if conn.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    head.push(line.trim().to_owned());
                }
                if head.is_empty() {
                    continue;
                }
                let header = |n: &str| head.iter().find_map(|h| h.split_once(": ").filter(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.to_owned()));
                let mut body = Vec::new();
                if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
                    loop {
                        let mut size = String::new();
                        if conn.read_line(&mut size).unwrap_or(0) == 0 {
                            break;
                        }
                        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
                        let mut chunk = vec![0; n + 2];
                        if conn.read_exact(&mut chunk).is_err() || n == 0 {
                            break;
                        }
                        body.extend_from_slice(&chunk[..n]);
                    }
                } else {
                    body.resize(header("content-length").map_or(0, |l| l.parse().unwrap()), 0);
                    let _ = conn.read_exact(&mut body);
                }
                let mut parts = head[0].split(' ');
                let (method, path) = (parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned());
                let (status, extra, text) = answer(&method, &path, &header("authorization").unwrap_or_default(), &body);
                let reply = format!("HTTP/1.1 {status} X\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
                let _ = conn.get_mut().write_all(reply.as_bytes());
                log2.lock().unwrap().push(format!("{method} {} {status}", path.split('?').next().unwrap()));
            }
        });
        (port, log)
    }

    /// One blob in memory.
    struct OneBlob(Vec<u8>, Descriptor);
    impl OneBlob {
        fn new(bytes: &[u8]) -> OneBlob {
            OneBlob(bytes.to_vec(), Descriptor { media_type: super::super::LAYER_TYPE.into(), digest: sha256_digest(bytes), size: bytes.len() as u64 })
        }
    }
    impl PushSource for OneBlob {
        fn manifest(&self) -> (&[u8], &str) {
            (b"{}", MANIFEST_TYPE)
        }
        fn blobs(&self) -> Vec<Descriptor> {
            vec![self.1.clone()]
        }
        fn write_blob(&self, _: &Descriptor, out: &mut dyn Write) -> std::io::Result<()> {
            out.write_all(&self.0)
        }
    }

    /// Tokens expire: the stand-in token service gives `tok1`, then `tok2`; the registry takes
    /// `tok1` for the API check and the first blob check only, then answers 401 with a Bearer
    /// challenge, as a registry does once a token's time is up. The push fetches a new token
    /// and repeats the refused request once, and goes on with it.
    #[test]
    fn an_expired_bearer_token_is_renewed_once_and_the_request_repeated() {
        let issued = std::sync::atomic::AtomicUsize::new(0);
        let uses_of_tok1 = std::sync::atomic::AtomicUsize::new(0);
        let port_cell = std::sync::Arc::new(std::sync::OnceLock::<u16>::new());
        let port_for = port_cell.clone();
        let (port, log) = stand_in(move |method, path, auth, _body| {
            use std::sync::atomic::Ordering::SeqCst;
            let port = *port_for.get().unwrap();
            let challenge = format!("WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\"\r\n");
            let fresh = auth == "Bearer tok2" || (auth == "Bearer tok1" && uses_of_tok1.fetch_add(1, SeqCst) < 1);
            match (method, path) {
                ("GET", "/v2/") => (401, challenge, String::new()),
                ("GET", p) if p.starts_with("/token?") => (200, String::new(), format!(r#"{{"token":"tok{}"}}"#, issued.fetch_add(1, SeqCst) + 1)),
                _ if !fresh => (401, challenge, r#"{"errors":[{"code":"UNAUTHORIZED","message":"token expired"}]}"#.into()),
                ("HEAD", _) => (404, String::new(), String::new()),
                ("POST", _) => (202, "Location: /v2/team/web/blobs/uploads/s1\r\n".into(), String::new()),
                ("PATCH", _) => (202, "Location: /v2/team/web/blobs/uploads/s1?state=2\r\n".into(), String::new()),
                ("PUT", p) if p.contains("digest=") || p.ends_with("/manifests/v1") => (201, String::new(), String::new()),
                _ => (400, String::new(), String::new()),
            }
        });
        port_cell.set(port).unwrap();
        let reference = Reference::parse(&format!("docker://127.0.0.1:{port}/team/web:v1")).unwrap();
        let creds = Credentials::new("alice".into(), "pw".into(), "test".into());
        let source = OneBlob::new(b"a layer");
        let report = push(&source, &reference, &PushOptions { plain_http: false, credentials: Some(creds) }, &mut |_| {}).unwrap();
        assert_eq!(report.uploaded.len(), 1);
        let log = log.lock().unwrap().clone();
        assert_eq!(
            log,
            [
                "GET /v2/ 401".to_owned(),
                "GET /token 200".into(),
                "HEAD /v2/team/web/blobs/".to_owned() + &source.1.digest + " 404",
                "POST /v2/team/web/blobs/uploads/ 401".into(),
                "GET /token 200".into(),
                "POST /v2/team/web/blobs/uploads/ 202".into(),
                "PATCH /v2/team/web/blobs/uploads/s1 202".into(),
                "PUT /v2/team/web/blobs/uploads/s1 201".into(),
                "PUT /v2/team/web/manifests/v1 201".into(),
            ]
        );
    }

    /// A blob of a layout that is not what its descriptor says (shorter on disk) is reported as
    /// the layout's fault, naming the file, not as the registry being unreachable.
    #[test]
    fn a_short_blob_in_a_layout_is_the_layouts_error_not_the_registrys() {
        let d = tempfile::tempdir().unwrap();
        let layer = b"the layer's bytes".to_vec();
        let layer_digest = sha256_digest(&layer);
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": { "mediaType": super::super::CONFIG_TYPE, "digest": sha256_digest(&config), "size": config.len() },
            "layers": [{ "mediaType": super::super::LAYER_TYPE, "digest": layer_digest, "size": layer.len() }],
        }))
        .unwrap();
        let blobs = d.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for b in [&config, &manifest] {
            std::fs::write(blobs.join(sha256_digest(b).trim_start_matches("sha256:")), b).unwrap();
        }
        // Truncated: the descriptor says 17 bytes, the file has 5.
        let blob_file = blobs.join(layer_digest.trim_start_matches("sha256:"));
        std::fs::write(&blob_file, &layer[..5]).unwrap();
        std::fs::write(d.path().join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = serde_json::json!({ "schemaVersion": 2, "manifests": [{ "mediaType": MANIFEST_TYPE, "digest": sha256_digest(&manifest), "size": manifest.len() }] });
        std::fs::write(d.path().join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();

        let (port, log) = stand_in(|method, _path, _auth, _body| match method {
            "GET" => (200, String::new(), String::new()),
            "HEAD" => (404, String::new(), String::new()),
            "PUT" => (201, String::new(), String::new()),
            _ => (202, "Location: /v2/web/blobs/uploads/s1\r\n".into(), String::new()),
        });
        let layout = OciLayoutDir::open(d.path()).unwrap();
        let reference = Reference::parse(&format!("docker://127.0.0.1:{port}/web:v1")).unwrap();
        let e = push(&layout, &reference, &PushOptions::default(), &mut |_| {}).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, RegistryError::Source { .. }), "{text}");
        assert!(!text.contains("unreachable") && text.contains(&blob_file.display().to_string()) && text.contains("has 5 bytes, its descriptor says 17"), "{text}");
        assert!(!log.lock().unwrap().iter().any(|l| l.starts_with("PUT /v2/web/manifests")), "nothing was tagged");
    }

    #[test]
    fn references() {
        let r = Reference::parse("docker://127.0.0.1:5000/team/web:v1").unwrap();
        assert_eq!((r.host.as_str(), r.repository.as_str(), r.tag.as_deref(), r.digest.as_deref()), ("127.0.0.1:5000", "team/web", Some("v1"), None));
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/web:v1");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("registry.example.com/web@{d}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.digest.as_deref(), r.is_loopback()), (None, Some(d.as_str()), false));
        assert!(Reference::parse("localhost/web").unwrap().is_loopback());
        assert!(Reference::parse("[::1]:5000/web").unwrap().is_loopback());
        assert_eq!(Reference::parse("localhost:5000/web").unwrap().manifest_ref(), "latest");
        for bad in ["web:v1", "docker://web", "oci:///tmp/x", "docker://h.example/Web", "docker://h.example/web:-x", "docker://h.example/web@sha256:abc", "docker://h.example:port/web", "docker://h.example/"] {
            let e = Reference::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(REFERENCE_FORM), "{bad}: {e}");
        }
    }
}
