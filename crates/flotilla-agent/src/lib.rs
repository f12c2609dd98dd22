//! flotilla-agent: the static binary that runs on every target. It builds toplevels inside
//! Nix builds (`build-system`), and on a machine receives closures, activates generations and
//! supervises services. It must stay small and static: it is copied to every machine.

mod accounts_file;
pub mod activate;
pub mod build_image;
pub mod build_system;
pub mod cli;
pub mod container;
pub mod daemon;
pub mod error;
mod etc;
pub mod exec;
pub mod forward;
pub mod health;
pub mod http;
pub mod keys;
pub mod logs;
pub mod machine;
pub mod server;
pub mod substitute;
pub mod supervisor;
pub mod uninstall;
mod users;
pub mod vm;
