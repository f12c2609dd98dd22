//! The agent's one command-line parser, for every subcommand (`container` included): an
//! option with a value takes the next argument whatever it is, a flag stands alone, and the
//! rest are positional. It is written by hand to keep the static agent's dependencies few,
//! and is strict on purpose: no `--opt=value`, no bundled short flags, each option at most
//! once unless the command collects it. Its errors are one line naming the option.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Why a command line was refused (exit status 2, or 1 for `container`).
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// An option came last, without its value.
    #[error("{0} needs a value")]
    NeedsValue(&'static str),
    /// An option that takes one value was given twice.
    #[error("{0} is given twice")]
    Twice(&'static str),
    /// An option the command does not take.
    #[error("unknown option {arg:?} (see `{help}`)")]
    Unknown {
        /// The argument as given.
        arg: String,
        /// The help command to point to.
        help: &'static str,
    },
    /// More positional arguments than the command takes.
    #[error("unexpected argument {arg:?} (see `{help}`)")]
    Unexpected {
        /// The argument as given.
        arg: String,
        /// The help command to point to.
        help: &'static str,
    },
    /// An option the command cannot do without.
    #[error("{option} is required (see `{help}`)")]
    Required {
        /// The option.
        option: &'static str,
        /// The help command to point to.
        help: &'static str,
    },
    /// A value the option cannot take; the sentence names the option, the value and why.
    #[error("{0}")]
    Invalid(String),
}

/// One argument, as the command's options classify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg<'a> {
    /// A flag the command takes.
    Flag(&'static str),
    /// An option the command takes, with its value.
    Value(&'static str, &'a str),
    /// Anything else that does not look like an option (`-` included).
    Positional(&'a str),
}

/// Reads a command line argument by argument, in order, so that a command checks each value
/// where it comes and reports the first problem first.
pub struct Parser<'a> {
    args: std::slice::Iter<'a, String>,
    valued: &'a [&'static str],
    flags: &'a [&'static str],
    help: &'static str,
}

impl<'a> Parser<'a> {
    /// A parser of `args` for a command taking the options `valued` (each with a value) and
    /// `flags`; errors point to `help` (e.g. `flotilla-agent --help`).
    pub fn new(args: &'a [String], valued: &'a [&'static str], flags: &'a [&'static str], help: &'static str) -> Parser<'a> {
        Parser { args: args.iter(), valued, flags, help }
    }

    /// The error for an argument the command does not take as an option.
    pub fn unknown(&self, arg: &str) -> UsageError {
        UsageError::Unknown { arg: arg.to_owned(), help: self.help }
    }

    /// The error for a positional argument too many.
    pub fn unexpected(&self, arg: &str) -> UsageError {
        UsageError::Unexpected { arg: arg.to_owned(), help: self.help }
    }

    /// The error for a required option that was not given.
    pub fn required(&self, option: &'static str) -> UsageError {
        UsageError::Required { option, help: self.help }
    }
}

impl<'a> Iterator for Parser<'a> {
    type Item = Result<Arg<'a>, UsageError>;

    fn next(&mut self) -> Option<Self::Item> {
        let arg = self.args.next()?;
        if let Some(flag) = self.flags.iter().copied().find(|f| f == arg) {
            return Some(Ok(Arg::Flag(flag)));
        }
        if let Some(name) = self.valued.iter().copied().find(|f| f == arg) {
            return Some(self.args.next().map(|v| Arg::Value(name, v.as_str())).ok_or(UsageError::NeedsValue(name)));
        }
        if arg.starts_with('-') && arg.len() > 1 {
            return Some(Err(self.unknown(arg)));
        }
        Some(Ok(Arg::Positional(arg)))
    }
}

/// The options of a subcommand other than `container`: `--root DIR` (every one has it), the
/// valued options and flags it takes, each at most once, and up to `max_positional`
/// positional arguments.
pub struct Options {
    /// The machine's root, absolute (`/` by default).
    pub root: PathBuf,
    /// The valued options given.
    pub values: BTreeMap<&'static str, String>,
    /// The flags given.
    pub flags: BTreeSet<&'static str>,
    /// The positional arguments.
    pub positional: Vec<String>,
}

impl Options {
    /// Parses the arguments after the subcommand.
    pub fn parse(args: &[String], valued: &[&'static str], flags: &[&'static str], max_positional: usize) -> Result<Options, UsageError> {
        let valued: Vec<&'static str> = valued.iter().copied().chain(["--root"]).collect();
        let mut parser = Parser::new(args, &valued, flags, "flotilla-agent --help");
        let (mut values, mut set, mut positional) = (BTreeMap::new(), BTreeSet::new(), Vec::new());
        while let Some(arg) = parser.next() {
            match arg? {
                Arg::Flag(flag) => {
                    set.insert(flag);
                }
                Arg::Value(name, value) => {
                    if values.insert(name, value.to_owned()).is_some() {
                        return Err(UsageError::Twice(name));
                    }
                }
                Arg::Positional(arg) if positional.len() < max_positional => positional.push(arg.to_owned()),
                Arg::Positional(arg) => return Err(parser.unexpected(arg)),
            }
        }
        let root = match values.remove("--root") {
            Some(dir) => std::path::absolute(&dir).map_err(|e| UsageError::Invalid(format!("--root {dir}: {e}")))?,
            None => PathBuf::from("/"),
        };
        Ok(Options { root, values, flags: set, positional })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn options_flags_and_positionals_in_any_order() {
        let o = Options::parse(&args("-f web -n 5 --root /m"), &["-n"], &["-f"], 1).unwrap();
        assert_eq!((o.root, o.values["-n"].as_str(), o.flags.contains("-f"), o.positional), (PathBuf::from("/m"), "5", true, vec!["web".to_owned()]));
        assert_eq!(Options::parse(&[], &[], &[], 0).unwrap().root, PathBuf::from("/"));
    }

    #[test]
    fn each_refusal_is_one_line_naming_the_argument() {
        let err = |s: &str| Options::parse(&args(s), &["-n"], &["-f"], 1).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err("-n"), "-n needs a value");
        assert_eq!(err("-n 1 -n 2"), "-n is given twice");
        assert_eq!(err("--root=/m"), "unknown option \"--root=/m\" (see `flotilla-agent --help`)");
        assert_eq!(err("a b"), "unexpected argument \"b\" (see `flotilla-agent --help`)");
        assert_eq!(err("-n --root"), "", "a value is the next argument, whatever it is");
    }
}
