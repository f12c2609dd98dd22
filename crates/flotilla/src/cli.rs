//! The command line, as clap definitions. Completions and the man page are generated from
//! these, so they cannot drift from the real options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Deploy fleets of machines from one declarative Nix file.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// The state database [default: $XDG_STATE_HOME/flotilla/state.db]
    #[arg(long, global = true, env = "FLOTILLA_STATE", value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Add a Nix search path entry, as `nix-build -I` (e.g. nixpkgs=./nix/demo-pkgs.nix)
    #[arg(short = 'I', long = "include", global = true, value_name = "PATH")]
    pub include: Vec<String>,
    /// Binary caches Nix may substitute from ("" for none: offline builds never wait on a cache)
    #[arg(long, global = true, env = "FLOTILLA_SUBSTITUTERS", value_name = "URLS")]
    pub substituters: Option<String>,
    /// Show Nix's full evaluation trace on errors
    #[arg(long, global = true)]
    pub show_trace: bool,
    /// Print Nix's build log lines
    #[arg(short, long, global = true)]
    pub verbose: bool,
}

/// Which deployment a command acts on.
#[derive(Debug, Args, Clone)]
pub struct Target {
    /// The deployment file (it names its deployment through meta.name)
    #[arg(short, long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The deployment's name; its file is the one it was last evaluated from
    #[arg(short, long, value_name = "NAME")]
    pub deployment: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Evaluate and check every machine's configuration
    Eval {
        #[command(flatten)]
        target: Target,
        /// Print the checked configs as JSON
        #[arg(long)]
        json: bool,
    },
    /// Build the selected machines' systems (their toplevels)
    Build {
        #[command(flatten)]
        target: Target,
        /// Machines: comma-separated names, globs (web*) and @tags
        #[arg(long, value_name = "SELECTION", default_value = "")]
        on: String,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// List the deployments in the state database
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Show a deployment's machines: platform, address, tags, last build
    Info {
        #[command(flatten)]
        target: Target,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Show the ledger: every build and operation, who ran it and how it ended
    Log {
        /// Only this deployment's events
        #[arg(short, long, value_name = "NAME")]
        deployment: Option<String>,
        /// How many of the newest events
        #[arg(short = 'n', long, default_value_t = 50)]
        limit: usize,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Forget a deployment: its records and its builds' GC roots
    Delete {
        #[command(flatten)]
        target: Target,
    },
    /// Print the machine options as Markdown (docs/options.md is this output)
    Options,
    /// Developer commands: drive an agent that manages a plain directory as a machine's root
    #[command(hide = true)]
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
    /// Print shell completions
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff)
    Man,
}

/// What activation should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Goal {
    /// Copy the closure only
    Copy,
    /// Make it the current generation and run it now
    Switch,
    /// Make it the current generation for the next start only
    Boot,
    /// Run it now without making it a generation
    Test,
    /// Say what activation would change, change nothing
    DryActivate,
}

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Build one machine and push its system into DIR through a local agent, then activate it
    PushToRoot {
        /// The directory standing for the machine's root
        dir: PathBuf,
        #[command(flatten)]
        target: Target,
        /// The machine whose system to push
        #[arg(long)]
        machine: String,
        /// What to do once copied
        #[arg(long, value_enum, default_value = "switch")]
        goal: Goal,
        /// Compress the stream with zstd (worth it on slow links only)
        #[arg(long)]
        compress: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Copy the closures of store paths into DIR through a local agent (no activation)
    CopyToRoot {
        /// The directory standing for the machine's root
        dir: PathBuf,
        /// Store paths whose closures to copy
        #[arg(required = true)]
        paths: Vec<String>,
        /// Compress the stream with zstd
        #[arg(long)]
        compress: bool,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Ask the agent managing DIR
    Root {
        /// The directory standing for the machine's root
        dir: PathBuf,
        #[command(subcommand)]
        op: RootOp,
        /// Print JSON
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RootOp {
    /// Current generation, running system, services
    Status,
    /// Every generation
    Generations,
    /// Re-activate an earlier generation (default: the previous one)
    Rollback {
        /// The generation
        #[arg(long)]
        to: Option<u64>,
    },
    /// Delete old generations, keeping the newest N and the current one
    DeleteGenerations {
        /// How many to keep
        #[arg(long)]
        keep_last: u32,
    },
    /// Remove store paths no generation needs
    Gc,
}
