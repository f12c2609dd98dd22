//! Nix's `builders` syntax (`meta.builders`, `flotilla build|deploy --builders`), checked
//! once where it enters so that a typo is one clear error at evaluation, not a build that
//! silently never leaves this host. Nix stays the one that reads it: this only refuses what
//! Nix would misread or ignore.
//!
//! An entry is `URI [SYSTEMS [SSH-KEY [MAX-JOBS [SPEED [FEATURES [MANDATORY [HOST-KEY]]]]]]]`,
//! fields separated by blanks, `-` for a default; entries are separated by `;` or new lines;
//! `@FILE` names a file of entries (`#` starts a comment there), as Nix's `nix.machines`.

/// What `meta.builders` looks like, for error messages.
pub const BUILDERS_EXAMPLE: &str = "`ssh://builder x86_64-linux - 4` (URI, systems, ssh key, max jobs: Nix's `builders` syntax), or `@/etc/nix/machines`";

/// Where a `builders` value says entries are: inline, or in files (`@FILE`) to read and check
/// with [`check_builder_lines`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuilderSource {
    /// Entries written out.
    Inline(String),
    /// `@FILE`: a machines file.
    File(String),
}

/// Splits a `builders` value into its inline entries and its `@FILE`s.
pub fn builder_sources(spec: &str) -> Vec<BuilderSource> {
    spec.split([';', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| match e.strip_prefix('@') {
            Some(file) => BuilderSource::File(file.trim().to_owned()),
            None => BuilderSource::Inline(e.to_owned()),
        })
        .collect()
}

/// Checks lines of entries (inline, or a machines file's text: `#` comments allowed there);
/// the error says which entry and field is wrong and why, for the caller to prefix with the
/// option's name.
pub fn check_builder_lines(text: &str) -> Result<(), String> {
    for entry in text.split([';', '\n']) {
        let entry = entry.split('#').next().unwrap_or("").trim();
        if entry.is_empty() {
            continue;
        }
        check_entry(entry).map_err(|why| format!("the entry `{entry}` {why}"))?;
    }
    Ok(())
}

fn check_entry(entry: &str) -> Result<(), String> {
    let fields: Vec<&str> = entry.split_whitespace().collect();
    if fields.len() > 8 {
        return Err(format!("has {} fields, and Nix reads at most 8 (URI, systems, ssh key, max jobs, speed factor, supported features, mandatory features, host key)", fields.len()));
    }
    let uri = fields[0];
    if uri.starts_with('@') {
        return Err("starts with `@` in the middle of a list; `@FILE` stands alone as an entry".into());
    }
    if let Some((scheme, rest)) = uri.split_once("://") {
        if !["ssh", "ssh-ng"].contains(&scheme) {
            return Err(format!("has URI scheme `{scheme}://`; builders are reached with `ssh://` or `ssh-ng://`"));
        }
        if rest.is_empty() || rest.starts_with('-') {
            return Err("has no host after the URI scheme".into());
        }
    } else if uri.starts_with('-') {
        return Err(format!("starts with `{uri}`, which is not a host"));
    }
    let given = |i: usize| fields.get(i).copied().filter(|f| *f != "-");
    for (i, what) in [(3, "max jobs"), (4, "speed factor")] {
        if let Some(v) = given(i) {
            if !v.parse::<u32>().is_ok_and(|n| n > 0) {
                return Err(format!("has `{v}` as field {} ({what}), which must be a positive whole number or `-`", i + 1));
            }
        }
    }
    if let Some(key) = given(2) {
        if !key.starts_with('/') {
            return Err(format!("has `{key}` as field 3 (the ssh key), which must be an absolute path or `-`"));
        }
    }
    if let Some(systems) = given(1) {
        if let Some(bad) = systems.split(',').find(|s| s.split_once('-').is_none_or(|(a, b)| a.is_empty() || b.is_empty())) {
            return Err(format!("has system `{bad}` in field 2, which is not a Nix system like `x86_64-linux`"));
        }
    }
    if let Some(host_key) = given(7) {
        if flotilla_store::base64::decode(host_key).is_none() {
            return Err("has a field 8 (the builder's public host key) that is not base64; give `base64 -w0` of its `ssh_host_*_key.pub`".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_builders_syntax_is_accepted() {
        for ok in [
            "ssh://builder x86_64-linux - 4",
            "ssh://root@10.0.0.2 x86_64-linux,aarch64-linux /root/.ssh/id 2 1 kvm,big-parallel - c3NoLWVkMjU1MTkgQUFBQQ==",
            "builder; ssh-ng://other i686-linux",
            "",
            "# a comment\nssh://a x86_64-linux - - - - -\n",
        ] {
            check_builder_lines(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        assert_eq!(
            builder_sources("ssh://a x86_64-linux; @/etc/nix/machines"),
            [BuilderSource::Inline("ssh://a x86_64-linux".into()), BuilderSource::File("/etc/nix/machines".into())]
        );
    }

    #[test]
    fn mistakes_are_named_by_field() {
        let e = check_builder_lines("ssh://b x86_64-linux - four").unwrap_err();
        assert!(e.contains("`four` as field 4 (max jobs)"), "{e}");
        let e = check_builder_lines("http://b x86_64-linux").unwrap_err();
        assert!(e.contains("`http://`"), "{e}");
        let e = check_builder_lines("ssh://b x86_64 - 1").unwrap_err();
        assert!(e.contains("system `x86_64`"), "{e}");
        let e = check_builder_lines("ssh://b x86_64-linux key 1").unwrap_err();
        assert!(e.contains("absolute path"), "{e}");
        let e = check_builder_lines("ssh://b x86_64-linux - 1 1 - - not*base64").unwrap_err();
        assert!(e.contains("not base64"), "{e}");
        let e = check_builder_lines("ssh://b a-b - 1 1 - - - extra").unwrap_err();
        assert!(e.contains("9 fields"), "{e}");
    }
}
