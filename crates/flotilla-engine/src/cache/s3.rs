//! S3 (and S3-compatible stores) as a cache [`Destination`]: `s3://BUCKET[/PREFIX]?region=R&endpoint=URL`,
//! the same layout as a cache directory, objects written with single PUTs signed with AWS
//! Signature Version 4 (hand-written here: an HMAC chain over sha256, far smaller than an SDK).
//!
//! Credentials come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`),
//! else from `~/.aws/credentials` (`profile=` in the URL or `AWS_PROFILE`, else `default`).
//! They are never printed: not in errors, not in `Debug`. A PUT of an object is atomic in S3,
//! so the NAR-before-narinfo order of [`super::push`] is all a reader needs.

use std::fs::{self, File};
use std::io::{Seek as _, SeekFrom};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::push::{Destination, Staged};
use super::{io_err, CacheError, Result};

/// An access key: which key, its secret, and the session token of temporary credentials.
#[derive(Clone)]
pub struct Credentials {
    access_key: String,
    secret_key: zeroize::Zeroizing<String>,
    session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(…)")
    }
}

impl Credentials {
    /// From the environment, else the shared credentials file.
    pub fn find(profile: Option<&str>) -> Result<Credentials> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let (Some(access_key), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            return Ok(Credentials { access_key, secret_key: secret.into(), session_token: env("AWS_SESSION_TOKEN") });
        }
        let profile = profile.map(str::to_owned).or_else(|| env("AWS_PROFILE")).unwrap_or_else(|| "default".to_owned());
        let file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")));
        let none = || {
            CacheError::Input(format!(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or put an access key in ~/.aws/credentials under [{profile}]"
            ))
        };
        let Some(file) = file else { return Err(none()) };
        let Ok(text) = fs::read_to_string(&file).map(zeroize::Zeroizing::new) else { return Err(none()) };
        let (mut section, mut ak, mut sk, mut tok) = (String::new(), None, None, None);
        for line in text.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.trim().to_owned();
            } else if section == profile {
                if let Some((k, v)) = line.split_once('=') {
                    let v = v.trim().to_owned();
                    match k.trim() {
                        "aws_access_key_id" => ak = Some(v),
                        "aws_secret_access_key" => sk = Some(v),
                        "aws_session_token" => tok = Some(v),
                        _ => {}
                    }
                }
            }
        }
        match (ak, sk) {
            (Some(access_key), Some(secret)) => Ok(Credentials { access_key, secret_key: secret.into(), session_token: tok }),
            _ => Err(CacheError::Input(format!(
                "{} has no aws_access_key_id and aws_secret_access_key under [{profile}]; add them, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                file.display()
            ))),
        }
    }
}

/// A bucket (and prefix) reached over HTTP(S), path-style (`ENDPOINT/BUCKET/KEY`) when an
/// endpoint is given, virtual-hosted (`https://BUCKET.s3.REGION.amazonaws.com/KEY`) otherwise.
#[derive(Debug)]
pub struct S3Cache {
    url: String,
    /// `scheme://host[:port]` and the path before the object key.
    base: String,
    host: String,
    key_prefix: String,
    region: String,
    creds: Credentials,
    agent: ureq::Agent,
    staged: AtomicUsize,
}

/// `%XX` for everything but S3's unreserved characters (`/` kept in keys).
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // RFC 2104 over sha256 (64-byte blocks).
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let (mut inner, mut outer) = (Sha256::new(), Sha256::new());
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// `YYYYMMDDTHHMMSSZ` for a time since the epoch (UTC).
fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d, hh, mm, ss) = flotilla_model::civil(secs as i64);
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

impl S3Cache {
    /// Parses `s3://BUCKET[/PREFIX]?region=R&endpoint=URL[&scheme=http|https][&profile=P]`
    /// and finds the credentials.
    pub fn open(url: &str) -> Result<S3Cache> {
        let bad = |why: &str| CacheError::Input(format!("the cache URL `{url}` {why}; write it as s3://BUCKET[/PREFIX]?region=REGION[&endpoint=http://HOST:PORT]"));
        let rest = url.strip_prefix("s3://").ok_or_else(|| bad("does not start with s3://"))?;
        let (loc, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = loc.split_once('/').unwrap_or((loc, ""));
        if bucket.is_empty() || !bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
            return Err(bad("has no valid bucket name (lowercase letters, digits, `-`, `.`)"));
        }
        let (mut region, mut endpoint, mut scheme, mut profile) = (None, None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "region" => region = Some(v.to_owned()),
                "endpoint" => endpoint = Some(v.to_owned()),
                "scheme" => scheme = Some(v.to_owned()),
                "profile" => profile = Some(v.to_owned()),
                _ => return Err(bad(&format!("has the parameter `{k}`, which is not one of region, endpoint, scheme, profile"))),
            }
        }
        let region = region.unwrap_or_else(|| "us-east-1".to_owned());
        let (base_url, path_style) = match endpoint {
            Some(e) if e.contains("://") => (e.trim_end_matches('/').to_owned(), true),
            Some(e) => (format!("{}://{}", scheme.as_deref().unwrap_or("https"), e.trim_end_matches('/')), true),
            None => (format!("https://{bucket}.s3.{region}.amazonaws.com"), false),
        };
        let Some((sch, authority)) = base_url.split_once("://") else { return Err(bad("has a malformed endpoint")) };
        if sch != "http" && sch != "https" {
            return Err(bad("has an endpoint that is neither http:// nor https://"));
        }
        let host = authority.split('/').next().unwrap_or_default().to_owned();
        if host.is_empty() {
            return Err(bad("has an endpoint without a host"));
        }
        // The Host header ureq sends: the default port of the scheme is left out.
        let host = host.strip_suffix(if sch == "http" { ":80" } else { ":443" }).unwrap_or(&host).to_owned();
        let base = if path_style { format!("{sch}://{authority}/{bucket}") } else { format!("{sch}://{authority}") };
        let prefix = prefix.trim_matches('/');
        let key_prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        let creds = Credentials::find(profile.as_deref())?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_per_read(Some(Duration::from_secs(300)))
            .build()
            .into();
        Ok(S3Cache { url: url.to_owned(), base, host, key_prefix, region, creds, agent, staged: AtomicUsize::new(0) })
    }

    /// The object's URL path (below the host) and full URL.
    fn object(&self, name: &str) -> (String, String) {
        let key = format!("{}{name}", self.key_prefix);
        let url = format!("{}/{}", self.base, uri_encode(&key, true));
        let path = url.splitn(4, '/').nth(3).map_or_else(|| "/".to_owned(), |p| format!("/{p}"));
        (path, url)
    }

    /// The signed headers of a request: SigV4 with the payload's sha256 in hex.
    fn sign(&self, method: &str, path: &str, payload_sha256: &str) -> Vec<(&'static str, String)> {
        let date = amz_date(SystemTime::now());
        let day = &date[..8];
        let mut headers: Vec<(&'static str, String)> = vec![("host", self.host.clone()), ("x-amz-content-sha256", payload_sha256.to_owned()), ("x-amz-date", date.clone())];
        if let Some(t) = &self.creds.session_token {
            headers.push(("x-amz-security-token", t.clone()));
        }
        let signed: Vec<&str> = headers.iter().map(|(k, _)| *k).collect();
        let signed = signed.join(";");
        let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{}\n", v.trim())).collect();
        let canonical = format!("{method}\n{path}\n\n{canonical_headers}\n{signed}\n{payload_sha256}");
        let scope = format!("{day}/{}/s3/aws4_request", self.region);
        let to_sign = format!("AWS4-HMAC-SHA256\n{date}\n{scope}\n{}", hex(&Sha256::digest(canonical.as_bytes())));
        let mut k = hmac(format!("AWS4{}", &*self.creds.secret_key).as_bytes(), day.as_bytes());
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            k = hmac(&k, part.as_bytes());
        }
        let sig = hex(&hmac(&k, to_sign.as_bytes()));
        headers.push(("authorization", format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={sig}", self.creds.access_key)));
        headers.retain(|(k, _)| *k != "host");
        headers
    }

    fn failed(&self, what: &str, name: &str, why: impl std::fmt::Display) -> CacheError {
        CacheError::Remote(format!("S3 {what} of {name} in {} failed: {why}", self.url))
    }

    fn status_error(&self, what: &str, name: &str, mut resp: ureq::http::Response<ureq::Body>) -> CacheError {
        let status = resp.status();
        let body = resp.body_mut().with_config().limit(4096).read_to_string().unwrap_or_default();
        let code = body.split("<Code>").nth(1).and_then(|c| c.split("</Code>").next()).unwrap_or("");
        let fix = match status.as_u16() {
            403 => "; check the access key and that it may write this bucket",
            404 => "; check that the bucket exists",
            _ => "",
        };
        self.failed(what, name, format!("HTTP {status} {code}{fix}"))
    }
}

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

impl Destination for S3Cache {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let (path, url) = self.object(name);
        let mut req = self.agent.get(&url);
        for (k, v) in self.sign("GET", &path, EMPTY_SHA256) {
            req = req.header(k, v);
        }
        let mut resp = req.call().map_err(|e| self.failed("GET", name, e))?;
        match resp.status().as_u16() {
            200 => Ok(Some(resp.body_mut().with_config().limit(16 << 20).read_to_vec().map_err(|e| self.failed("GET", name, e))?)),
            404 => Ok(None),
            _ => Err(self.status_error("GET", name, resp)),
        }
    }

    fn put(&self, name: &str, bytes: &[u8], content_type: &str) -> Result<()> {
        let (path, url) = self.object(name);
        let mut req = self.agent.put(&url).header("content-type", content_type);
        for (k, v) in self.sign("PUT", &path, &hex(&Sha256::digest(bytes))) {
            req = req.header(k, v);
        }
        let resp = req.send(bytes).map_err(|e| self.failed("PUT", name, e))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.status_error("PUT", name, resp))
        }
    }

    /// A NAR is staged in a file with no name (O_TMPFILE in the temporary directory; where
    /// that is unsupported, one unlinked as soon as it is made): a push killed at any moment,
    /// even by SIGKILL, leaves nothing in $TMPDIR.
    fn stage(&self) -> Result<Staged> {
        let dir = std::env::temp_dir();
        let open = |path: &Path, flags: i32| fs::OpenOptions::new().read(true).write(true).create_new(flags == 0).mode(0o600).custom_flags(flags | libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path);
        match open(&dir, libc::O_TMPFILE) {
            Ok(f) => return Ok(Staged::unnamed(f)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) => {}
            Err(e) => return Err(io_err("create a staging file in", &dir)(e)),
        }
        let n = self.staged.fetch_add(1, Ordering::Relaxed);
        let p = dir.join(format!("flotilla-cache-push-{}-{n}.nar.zst", std::process::id()));
        let f = open(&p, 0).map_err(io_err("create", &p))?;
        fs::remove_file(&p).map_err(io_err("remove", &p))?;
        Ok(Staged::unnamed(f))
    }

    fn commit_nar(&self, staged: Staged, name: &str, sha256: &[u8; 32]) -> Result<()> {
        let mut file: &File = &staged.file;
        file.seek(SeekFrom::Start(0)).map_err(|e| self.failed("PUT", name, e))?;
        let (path, url) = self.object(name);
        let mut req = self.agent.put(&url).header("content-type", "application/x-nix-nar");
        for (k, v) in self.sign("PUT", &path, &hex(sha256)) {
            req = req.header(k, v);
        }
        let resp = req.send(file).map_err(|e| self.failed("PUT", name, e))?;
        drop(staged); // the staging file is removed either way
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.status_error("PUT", name, resp))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        assert_eq!(hex(&hmac(b"Jefe", b"what do ya want for nothing?")), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn the_signing_key_matches_aws_documented_example() {
        // docs.aws.amazon.com "Examples of how to derive a signing key for Signature Version 4".
        let mut k = hmac(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", b"20120215");
        for part in ["us-east-1", "iam", "aws4_request"] {
            k = hmac(&k, part.as_bytes());
        }
        assert_eq!(hex(&k), "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
    }

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(amz_date(UNIX_EPOCH + Duration::from_secs(1_709_251_199)), "20240229T235959Z");
    }
}
