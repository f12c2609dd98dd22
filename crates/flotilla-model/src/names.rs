//! Names of machines and deployments, checked once where they enter and carried as types.
//!
//! A machine name becomes a hostname, a directory name, a veth suffix and a state DB key, so
//! it follows the hostname label rules (RFC 1123) and nothing else gets through.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` is not a valid {what} name: use 1 to 63 letters, digits and `-`, starting and ending with a letter or digit")]
pub struct NameError {
    /// The refused name.
    pub name: String,
    /// "machine" or "deployment".
    pub what: &'static str,
}

fn valid_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

macro_rules! label_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $ty(String);

        impl $ty {
            /// Checks `name` and wraps it.
            pub fn new(name: &str) -> Result<Self, NameError> {
                if valid_label(name) {
                    Ok(Self(name.to_owned()))
                } else {
                    Err(NameError { name: name.to_owned(), what: $what })
                }
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

label_type!(
    /// A machine's name within its deployment; also its hostname.
    MachineName,
    "machine"
);
label_type!(
    /// A deployment's name (`meta.name`), unique within one state DB.
    DeploymentName,
    "deployment"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hostname_labels() {
        for ok in ["web1", "a", "db-primary", "0x", "A-b"] {
            MachineName::new(ok).unwrap();
        }
    }

    #[test]
    fn refuses_everything_else() {
        for bad in ["", "-a", "a-", "a_b", "a.b", "a/b", "..", &"x".repeat(64), "wéb"] {
            let e = MachineName::new(bad).unwrap_err();
            assert_eq!(e.name, bad);
        }
    }

    #[test]
    fn checked_when_deserialised() {
        assert!(serde_json::from_str::<MachineName>("\"bad name\"").is_err());
        assert_eq!(
            serde_json::from_str::<MachineName>("\"web1\"").unwrap().as_str(),
            "web1"
        );
    }
}
