//! A substituter's URL, as the agent fetches from it: `http://HOST[:PORT][/PATH]`. One parser,
//! so the deployer's check of `deploy.substituters` and the agent's fetch agree on every URL
//! (a port of 0, a control character, a user or fragment are refused by both).

/// A cache URL split into what a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUrl {
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    /// Host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// Port (80 unless given).
    pub port: u16,
    /// The path, starting with `/`.
    pub path: String,
}

/// Why a URL is not one the agent fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UrlProblem {
    /// `https://`: the agent carries no TLS.
    #[error("only plain http:// is fetched (the agent carries no TLS)")]
    Https,
    /// Another scheme, or none.
    #[error("it is not an http:// URL")]
    NotHttp,
    /// No host, or user information (`user@host`).
    #[error("no host, or user information in it")]
    Host,
    /// A port that is not 1 to 65535.
    #[error("the port is not a number from 1 to 65535")]
    Port,
    /// A fragment, space or control character.
    #[error("a fragment, space or control character in it")]
    Character,
}

impl CacheUrl {
    /// Parses `http://HOST[:PORT][/PATH]`.
    pub fn parse(url: &str) -> Result<CacheUrl, UrlProblem> {
        if url.starts_with("https://") {
            return Err(UrlProblem::Https);
        }
        let rest = url.strip_prefix("http://").ok_or(UrlProblem::NotHttp)?;
        if url.contains('#') || url.bytes().any(|b| b.is_ascii_control() || b.is_ascii_whitespace()) || url.chars().any(char::is_whitespace) {
            return Err(UrlProblem::Character);
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(UrlProblem::Host);
        }
        // `[v6 address]` or a name or v4 address, then `:PORT` or nothing.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (inner, after) = v6.split_once(']').ok_or(UrlProblem::Host)?;
                (inner, after.strip_prefix(':').map(Some).ok_or(UrlProblem::Host).or_else(|e| if after.is_empty() { Ok(None) } else { Err(e) })?)
            }
            None => match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            },
        };
        if host.is_empty() || host.contains(['[', ']', ':']) && !authority.starts_with('[') {
            return Err(UrlProblem::Host);
        }
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(UrlProblem::Port),
            },
        };
        if host.is_empty() {
            return Err(UrlProblem::Host);
        }
        Ok(CacheUrl { authority: authority.to_owned(), host: host.to_owned(), port, path: path.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_urls_the_agent_fetches_and_why_others_are_refused() {
        let u = CacheUrl::parse("http://10.0.0.1:8080/cache/").unwrap();
        assert_eq!((u.authority.as_str(), u.host.as_str(), u.port, u.path.as_str()), ("10.0.0.1:8080", "10.0.0.1", 8080, "/cache/"));
        assert_eq!(CacheUrl::parse("http://cache").unwrap().path, "/");
        assert_eq!(CacheUrl::parse("http://cache").unwrap().port, 80);
        let v6 = CacheUrl::parse("http://[::1]:81/").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 81));
        assert_eq!(CacheUrl::parse("http://[fe80::1]/x").unwrap().port, 80);
        for (bad, why) in [
            ("https://cache/", UrlProblem::Https),
            ("ftp://x/", UrlProblem::NotHttp),
            ("cache:5000", UrlProblem::NotHttp),
            ("http://", UrlProblem::Host),
            ("http:///nar", UrlProblem::Host),
            ("http://u@cache/", UrlProblem::Host),
            ("http://:80/", UrlProblem::Host),
            ("http://[::1/", UrlProblem::Host),
            ("http://ca]che/", UrlProblem::Host),
            ("http://cache:0/", UrlProblem::Port),
            ("http://cache:x/", UrlProblem::Port),
            ("http://cache:65536/", UrlProblem::Port),
            ("http://cache:/", UrlProblem::Port),
            ("http://cache:+80/", UrlProblem::Port),
            ("http://cache:1:2/", UrlProblem::Port),
            ("http://cache/a b", UrlProblem::Character),
            ("http://cache/a#b", UrlProblem::Character),
            ("http://cache/a\u{7f}", UrlProblem::Character),
            ("http://cache/a\rb", UrlProblem::Character),
            ("http://ca\nche/", UrlProblem::Character),
            ("http://cache\u{a0}/", UrlProblem::Character),
        ] {
            assert_eq!(CacheUrl::parse(bad), Err(why), "{bad:?}");
        }
    }
}
