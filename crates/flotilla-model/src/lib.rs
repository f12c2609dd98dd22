//! The vocabulary of a deployment: names, `--on` selections, the machine option schema and its
//! checker, the typed machine config shared by the deployer and the agent, and how text from a
//! machine is made safe to print and record.
//!
//! Pure: no I/O, no processes. Everything here is checked once where it enters and then
//! carried in a type.

mod builders;
mod config;
mod names;
mod schema;
mod select;
mod text;
mod units;

pub use builders::{builder_sources, check_builder_lines, BuilderSource, BUILDERS_EXAMPLE};
pub use config::{
    etc_relative, start_order, Accel, BootOptions, DeployerCheck, DeploySettings, ImageOptions, MAX_OCI_LAYERS, FileSpec, GroupSpec, HealthCheck, KeySpec, LocalPlatform,
    MachineConfig, Platform, PortForward, QemuPlatform, RestartPolicy, ServiceSpec, SshPlatform,
    SystemConfig, SystemOptions, UploadAt, UserSpec, BUILTIN_GROUPS, BUILTIN_USERS,
};
pub use names::{DeploymentName, MachineName, NameError};
pub use schema::{
    check_against_schema, describe_value, did_you_mean, ConfigError, OptionDecl, OptionPath,
    OptionType, Schema,
};
pub use select::{Selection, SelectionError};
pub use text::{escape_controls, escape_controls_block};
pub use units::{civil, format_time, human_bytes};
