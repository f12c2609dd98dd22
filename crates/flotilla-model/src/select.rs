//! `--on` selections: a comma list of machine names, globs (`web*`, `db-?`) and `@tag`s.

use std::collections::BTreeSet;

use crate::MachineName;

/// One term of a selection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Tag(String),
    Glob(String),
}

/// A parsed `--on` argument. An empty selection selects every machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    terms: Vec<Term>,
}

/// A term of a selection that matched no machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--on: `{term}` matches no machine; machines: {known}")]
pub struct SelectionError {
    /// The term as the user wrote it.
    pub term: String,
    /// The machines there are, comma-separated, to show what would have matched.
    pub known: String,
}

impl Selection {
    /// Selects every machine.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses `web1,web*,@db`. Blank terms are ignored.
    pub fn parse(s: &str) -> Self {
        let terms = s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| match t.strip_prefix('@') {
                Some(tag) => Term::Tag(tag.to_owned()),
                None => Term::Glob(t.to_owned()),
            })
            .collect();
        Selection { terms }
    }

    /// True when the selection names nothing, i.e. selects everything.
    pub fn is_all(&self) -> bool {
        self.terms.is_empty()
    }

    /// The machines selected out of `machines` (name and tags). Every term must match at
    /// least one machine: a typo should not silently deploy to nothing.
    pub fn apply<'a, I>(&self, machines: I) -> Result<BTreeSet<MachineName>, SelectionError>
    where
        I: IntoIterator<Item = (&'a MachineName, &'a [String])> + Clone,
    {
        if self.terms.is_empty() {
            return Ok(machines.into_iter().map(|(n, _)| n.clone()).collect());
        }
        let mut out = BTreeSet::new();
        for term in &self.terms {
            let mut matched = false;
            for (name, tags) in machines.clone() {
                let hit = match term {
                    Term::Tag(t) => tags.iter().any(|x| x == t),
                    Term::Glob(g) => glob_match(g.as_bytes(), name.as_str().as_bytes()),
                };
                if hit {
                    matched = true;
                    out.insert(name.clone());
                }
            }
            if !matched {
                let known: Vec<&str> = machines.clone().into_iter().map(|(n, _)| n.as_str()).collect();
                return Err(SelectionError {
                    term: match term {
                        Term::Tag(t) => format!("@{t}"),
                        Term::Glob(g) => g.clone(),
                    },
                    known: known.join(", "),
                });
            }
        }
        Ok(out)
    }
}

/// Shell-style glob with `*` and `?` only.
fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_match(&pat[1..], s) || (!s.is_empty() && glob_match(pat, &s[1..])),
        (Some(b'?'), Some(_)) => glob_match(&pat[1..], &s[1..]),
        (Some(p), Some(c)) if p == c => glob_match(&pat[1..], &s[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Vec<(MachineName, Vec<String>)> {
        [("web1", "web"), ("web2", "web"), ("db", "data"), ("monitor", "ops")]
            .iter()
            .map(|(n, t)| (MachineName::new(n).unwrap(), vec![t.to_string()]))
            .collect()
    }

    fn names(sel: &str) -> Result<Vec<String>, SelectionError> {
        let f = fleet();
        let it = f.iter().map(|(n, t)| (n, t.as_slice()));
        Selection::parse(sel)
            .apply(it)
            .map(|s| s.into_iter().map(|n| n.to_string()).collect())
    }

    #[test]
    fn names_globs_and_tags() {
        assert_eq!(names("").unwrap().len(), 4);
        assert_eq!(names("web1").unwrap(), ["web1"]);
        assert_eq!(names("web*").unwrap(), ["web1", "web2"]);
        assert_eq!(names("@web,db").unwrap(), ["db", "web1", "web2"]);
        assert_eq!(names("w?b2").unwrap(), ["web2"]);
    }

    #[test]
    fn a_term_matching_nothing_is_an_error() {
        let e = names("web1,wbe2").unwrap_err();
        assert_eq!(e.term, "wbe2");
        assert!(e.to_string().contains("web1, web2"), "{e}");
        assert_eq!(names("@nope").unwrap_err().term, "@nope");
    }
}
