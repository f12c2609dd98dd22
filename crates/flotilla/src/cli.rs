//! The command line, as clap definitions. Completions and the man page are generated from
//! these, so they cannot drift from the real options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use flotilla_engine::deploy::Goal;
use flotilla_engine::image::ImageFormat;

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
    /// The state database: an SQLite file, or postgres://USER@HOST[:PORT]/DB (password in ~/.pgpass) [default: $XDG_STATE_HOME/flotilla/state.db]
    #[arg(long, global = true, env = "FLOTILLA_STATE", value_name = "FILE|URL")]
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
        /// Nix's remote builders for this run, instead of `meta.builders` (Nix's `builders`
        /// syntax: `ssh://HOST SYSTEMS SSH-KEY MAX-JOBS ...; ...` or `@FILE`; "" builds here only)
        #[arg(long, value_name = "BUILDERS")]
        builders: Option<String>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Show what a deploy would change on each selected machine, changing nothing: generation,
    /// packages, closure size and bytes to send, services started/stopped/restarted and why,
    /// /etc, users, keys (by name) and the health checks that gate the switch
    Plan {
        #[command(flatten)]
        target: Target,
        /// Machines: comma-separated names, globs (web*) and @tags
        #[arg(long, value_name = "SELECTION", default_value = "")]
        on: String,
        /// Evaluate only: plan the machines whose systems are built already, and say which are not
        #[arg(long)]
        no_build: bool,
        /// Nix's remote builders for this run, instead of `meta.builders` (as `deploy --builders`)
        #[arg(long, value_name = "BUILDERS")]
        builders: Option<String>,
        /// Print one JSON object per machine, then the summary, one per line
        #[arg(long)]
        json: bool,
    },
    /// Deploy: provision what is missing, build, copy, activate and check every selected machine
    Deploy {
        #[command(flatten)]
        target: Target,
        /// Machines: comma-separated names, globs (web*) and @tags
        #[arg(long, value_name = "SELECTION", default_value = "")]
        on: String,
        /// How far to go
        #[arg(long, value_enum, default_value = "switch")]
        goal: DeployGoal,
        /// Machines worked on at once in every phase (by default 8 provisioned and 8 copied to
        /// at once, and --activate-parallel activating)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        parallel: Option<u16>,
        /// Machines activating at once, also with --parallel (default 64: activations mostly
        /// wait on their services' checks)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        activate_parallel: Option<u16>,
        /// Seconds a machine's health checks may take in all before it rolls back
        #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        check_timeout: u64,
        /// Seconds each machine waits for this deployer to confirm a switch or test over a
        /// new connection before it rolls back by itself; 0 asks for no confirmation
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        confirm_timeout: u64,
        /// When any machine fails, revert the machines that were deployed
        #[arg(long)]
        rollback_all_on_failure: bool,
        /// Machines fetch what their `deploy.substituters` caches have (signed by their
        /// `deploy.trustedPublicKeys`) before this deployer pushes the rest
        #[arg(long)]
        substitute_on_destination: bool,
        /// Nix's remote builders for this run, instead of `meta.builders` (Nix's `builders`
        /// syntax: `ssh://HOST SYSTEMS SSH-KEY MAX-JOBS ...; ...` or `@FILE`; "" builds here only)
        #[arg(long, value_name = "BUILDERS")]
        builders: Option<String>,
        /// Where the systems are built: `target` builds every selected (ssh) machine's system on
        /// its host with the host's Nix, as `deploy.buildOnTarget` does for one machine
        #[arg(long, value_enum, value_name = "WHERE")]
        build_on: Option<BuildOn>,
        /// Print the plan first (as `flotilla plan` does) and ask before deploying it; without
        /// a terminal it refuses unless --yes. The deploy stops if a toplevel changed since
        #[arg(long)]
        plan: bool,
        /// With --plan: deploy the plan without asking
        #[arg(long, requires = "plan")]
        yes: bool,
        /// Activate every machine, also one that already runs its system as this deploy would
        /// leave it (/etc, accounts and services reconciled again, health checks run); without
        /// it such a machine is only asked whether anything differs
        #[arg(long)]
        reactivate: bool,
        /// The final table lists only the machines that failed or changed, then counts the
        /// unchanged ones; the JSON report of --json is the same with or without it
        #[arg(long)]
        summary: bool,
        /// Print events as JSON lines, then the report as one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Return machines to an earlier generation: the one before the current, or --to N
    Rollback {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        on: On,
        /// The generation to return to (see `flotilla generations MACHINE`)
        #[arg(long, value_name = "N")]
        to: Option<u64>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// List a machine's generations: number, date, toplevel, status, which is current
    Generations {
        #[command(flatten)]
        target: Target,
        /// The machine
        machine: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Send machines the keys that changed and delete the ones no longer declared, without a deploy
    UploadKeys {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        on: On,
    },
    /// Start stopped machines
    Start {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        on: On,
        /// Boot generation N (see `flotilla generations MACHINE`): a stopped machine's profile
        /// is switched from outside first, so a release whose agent no longer answers is undone
        #[arg(long, value_name = "N")]
        generation: Option<u64>,
    },
    /// Stop machines; their agents stop every service cleanly first
    Stop {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        on: On,
    },
    /// Stop, then start machines; they come back on their current generation
    Reboot {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        on: On,
        /// Reboot the host itself (ssh machines), wait for it to answer, then start the agent
        #[arg(long)]
        hard: bool,
    },
    /// Remove machines entirely: processes, network, disk; their records are forgotten
    Destroy {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        on: On,
        /// Do not ask for confirmation
        #[arg(long, short = 'y')]
        yes: bool,
        /// Only remove them from the state, doing nothing on their hosts: for machines whose
        /// host is gone for good (an ssh host decommissioned), which destroy cannot reach
        #[arg(long)]
        forget: bool,
    },
    /// Compare machines' live state with what was deployed; differences are recorded as drift
    Check {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        on: On,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a machine (or in all of them, output prefixed by machine name)
    Exec {
        #[command(flatten)]
        target: Target,
        /// The machine
        #[arg(required_unless_present_any = ["all", "on"], conflicts_with_all = ["all", "on"])]
        machine: Option<String>,
        /// Run it in every machine of the deployment
        #[arg(long)]
        all: bool,
        /// Run it in these machines (names, globs, @tags)
        #[arg(long, value_name = "SELECTION")]
        on: Option<String>,
        /// Record the command line in the ledger (by default the ledger says only that a
        /// command ran, and how it ended: arguments may hold passwords)
        #[arg(long)]
        record_command: bool,
        /// The command and its arguments
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Open an interactive shell in a machine (on an ssh host: an ssh session, as the login user)
    Shell {
        #[command(flatten)]
        target: Target,
        /// The machine
        machine: String,
    },
    /// Show a machine's service logs
    Logs {
        #[command(flatten)]
        target: Target,
        /// The machine
        machine: String,
        /// The service (default: all of them)
        service: Option<String>,
        /// Keep printing new lines
        #[arg(short = 'F', long)]
        follow: bool,
        /// Lines to show from the end of each log
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
        /// Show the machine's console (its boot messages, kept on this host) instead
        #[arg(long, conflicts_with = "service")]
        console: bool,
    },
    /// Break a deployment's lock whose process died (never one that runs on this host)
    Unlock {
        #[command(flatten)]
        target: Target,
        /// Also break a lock held on another host, whose process cannot be checked from here
        /// (the ledger records that it was forced)
        #[arg(long)]
        force: bool,
    },
    /// List the deployments in the state database
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Write everything the state holds of a deployment (machines, facts, generations, the ledger) as JSON to standard output; it holds no secrets
    Export {
        /// The deployment
        #[arg(short, long, value_name = "NAME")]
        deployment: String,
    },
    /// Read a deployment written by `flotilla export` from standard input into this state
    Import {
        /// Replace the deployment (and its ledger) if this state has it already
        #[arg(long)]
        replace: bool,
    },
    /// Show a deployment's machines, live: platform, address, state, generation, services, health
    Info {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        on: On,
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
        /// Forget first the machines whose hosts are gone for good (as `destroy --forget`);
        /// machines that still exist are still refused
        #[arg(long)]
        force: bool,
        /// With --force: do not ask for confirmation
        #[arg(long, short = 'y', requires = "force")]
        yes: bool,
    },
    /// Build an image of a machine's current configuration: a bootable disk image (it needs
    /// boot.kernel; prints a qemu-system-x86_64 command that boots it), or an OCI image
    /// (`oci`, a layout directory; `docker-archive`, a `docker load` tar) whose container runs
    /// the machine's services with the agent as init; `--push` (or `flotilla image push`)
    /// sends an OCI image to a registry
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Image {
        #[command(subcommand)]
        command: Option<ImageCommand>,
        #[command(flatten)]
        target: Target,
        /// The machine
        #[arg(required = true)]
        machine: Option<String>,
        /// The image format
        #[arg(long, value_enum, required = true)]
        format: Option<ImageFormatArg>,
        /// Where to put the image. A disk image or a docker-archive: a file, or a directory
        /// to put it in, named with the configuration's hash [default: the current directory].
        /// oci: the layout directory, new, empty or a layout of before whose layers are
        /// reused [default: ./MACHINE-oci]
        #[arg(short, long, value_name = "PATH")]
        output: Option<PathBuf>,
        /// An OCI image's tag [default: the hash of the machine's toplevel]
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
        /// A label of an OCI image's config, KEY=VALUE (again for more; beside image.labels)
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Push the OCI image to a registry: docker://HOST[:PORT]/REPO[:TAG]; only the blobs
        /// the registry lacks are uploaded
        #[arg(long, value_name = "REF")]
        push: Option<String>,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Nix binary caches: make a signing key, publish closures signed with it, serve them
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Check this host for everything flotilla uses: each line ok, or the problem and its fix
    /// (exit status 0 when the default platform can deploy from here)
    Doctor {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Print the machine options as Markdown (docs/options.md is this output)
    Options,
    /// Run a command in a machine through its agent connection, this terminal's stdio relayed
    /// (what `exec`, `shell` and `logs` run for a platform reached only over the agent
    /// protocol); exits with the command's status, 128+N for signal N
    #[command(hide = true)]
    AgentExec {
        #[command(flatten)]
        target: Target,
        /// The machine
        machine: String,
        /// Give the command a terminal (this one must be a terminal: it is put in raw mode)
        #[arg(long)]
        tty: bool,
        /// The command and its arguments
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
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

/// `flotilla image`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Push an OCI image layout directory to a registry (the OCI distribution protocol): only
    /// the blobs the registry lacks are uploaded, the manifest last
    Push {
        /// The OCI image layout directory (`oci-layout`, `index.json`, `blobs/`) holding one
        /// image
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// Where to: docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]
        #[arg(value_name = "REF")]
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

/// How to reach a registry.
#[derive(Debug, Args, Clone)]
pub struct RegistryArgs {
    /// Speak plain HTTP (no TLS) to a registry that is not on this host's loopback (one on
    /// 127.0.0.1 or localhost always is spoken to in plain HTTP). Credentials come from
    /// $REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json,
    /// ~/.config/containers/auth.json and ~/.docker/config.json (`skopeo login`, `docker login`)
    #[arg(long)]
    pub plain_http: bool,
}

/// Which machines an operation acts on.
#[derive(Debug, Args, Clone)]
pub struct On {
    /// Machines: comma-separated names, globs (web*) and @tags [default: all]
    #[arg(long, value_name = "SELECTION", default_value = "")]
    pub on: String,
}


/// How far `deploy` goes: the engine's [`Goal`], one for one, spelled for the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeployGoal {
    /// Activate now and make it the boot default
    Switch,
    /// Make it the boot default only (it runs from the next start)
    Boot,
    /// Activate now, not as the boot default
    Test,
    /// Say what activation would change, change nothing
    DryActivate,
    /// Build only: nothing is provisioned or copied
    Build,
    /// Build and copy; activate nothing
    Copy,
}

/// A disk image format, as `flotilla image --format` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageFormatArg {
    /// The ext4 root filesystem (`.img`, sparse)
    Raw,
    /// QEMU's qcow2
    Qcow2,
    /// VirtualBox
    Vdi,
    /// VMware
    Vmdk,
    /// `disk.raw` in a `.tar.gz`, as Google Compute Engine imports it
    Gce,
    /// An OCI image layout directory (skopeo, podman, umoci read it)
    Oci,
    /// A `docker load` archive
    DockerArchive,
}

/// What `--format` asks for: a disk image or an OCI image.
pub enum ImageKind {
    /// A disk image.
    Disk(ImageFormat),
    /// An OCI image.
    Oci(flotilla_engine::oci::OciFormat),
}

impl From<ImageFormatArg> for ImageKind {
    fn from(f: ImageFormatArg) -> ImageKind {
        use flotilla_engine::oci::OciFormat;
        match f {
            ImageFormatArg::Raw => ImageKind::Disk(ImageFormat::Raw),
            ImageFormatArg::Qcow2 => ImageKind::Disk(ImageFormat::Qcow2),
            ImageFormatArg::Vdi => ImageKind::Disk(ImageFormat::Vdi),
            ImageFormatArg::Vmdk => ImageKind::Disk(ImageFormat::Vmdk),
            ImageFormatArg::Gce => ImageKind::Disk(ImageFormat::Gce),
            ImageFormatArg::Oci => ImageKind::Oci(OciFormat::Oci),
            ImageFormatArg::DockerArchive => ImageKind::Oci(OciFormat::DockerArchive),
        }
    }
}

impl From<DeployGoal> for Goal {
    fn from(g: DeployGoal) -> Goal {
        match g {
            DeployGoal::Switch => Goal::Switch,
            DeployGoal::Boot => Goal::Boot,
            DeployGoal::Test => Goal::Test,
            DeployGoal::DryActivate => Goal::DryActivate,
            DeployGoal::Build => Goal::Build,
            DeployGoal::Copy => Goal::Copy,
        }
    }
}

/// The goals `debug push-to-root` takes: it copies, so every goal but `build`.
fn push_goal() -> impl clap::builder::TypedValueParser<Value = Goal> {
    use clap::builder::TypedValueParser as _;
    use clap::ValueEnum as _;
    let values = DeployGoal::value_variants().iter().filter(|g| **g != DeployGoal::Build).filter_map(DeployGoal::to_possible_value);
    clap::builder::PossibleValuesParser::new(values).map(|s: String| Goal::from(DeployGoal::from_str(&s, false).expect("one of the listed values")))
}

/// `flotilla cache ...`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Make a signing key pair, DIR/NAME.secret (mode 0600) and DIR/NAME.public, in the format
    /// `nix-store --generate-binary-cache-key` writes; an existing file is never overwritten
    Keygen {
        /// The key's name, written before each signature (e.g. cache.example.org-1)
        name: String,
        /// The directory to write the pair into (made if missing)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Push a deployment's closures (every selected machine's toplevel, built as `flotilla
    /// build` builds it), or the closures of PATHS, to a binary cache: only what it lacks,
    /// signed with --key. DEST is a directory (Nix reads it as file://DEST) or
    /// s3://BUCKET[/PREFIX]?region=R[&endpoint=URL]
    Push {
        /// The cache: a directory, or s3://BUCKET[/PREFIX]?region=R&endpoint=URL
        dest: String,
        #[command(flatten)]
        target: Target,
        /// Machines: comma-separated names, globs (web*) and @tags
        #[arg(long, value_name = "SELECTION", default_value = "", conflicts_with = "paths")]
        on: String,
        /// Store paths to push with their closures, instead of a deployment's
        #[arg(conflicts_with_all = ["file", "deployment"])]
        paths: Vec<String>,
        /// The secret key that signs the narinfos (as `flotilla cache keygen` writes it)
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Paths compressed at once [default: the number of cores]
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        parallel: Option<u16>,
        /// zstd compression level
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Serve a cache directory (what `flotilla cache push` or `nix copy --to file://DIR` wrote),
    /// or this host's store with --store, as a Nix binary cache over HTTP until SIGINT/SIGTERM
    Serve {
        /// The cache directory
        #[arg(value_name = "DIR", required_unless_present = "store", conflicts_with = "store")]
        dir: Option<PathBuf>,
        /// Serve this host's Nix store: narinfos from Nix's database signed with --key, NARs
        /// compressed with zstd once into --cache-dir
        #[arg(long)]
        store: bool,
        /// Where to listen, e.g. 127.0.0.1:5000 or [::]:80
        #[arg(long, value_name = "ADDR")]
        bind: String,
        /// Sign every narinfo served with this secret key (`NAME:base64`, as `flotilla cache
        /// keygen` writes); required with --store
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// The cache's priority among a client's substituters (lower is preferred), instead of
        /// the directory's nix-cache-info
        #[arg(long, value_name = "N")]
        priority: Option<u32>,
        /// With --store: where compressed NARs are kept [default: $XDG_CACHE_HOME/flotilla/serve]
        #[arg(long, value_name = "DIR", requires = "store")]
        cache_dir: Option<PathBuf>,
    },
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
        #[arg(long, value_parser = push_goal(), default_value = "switch")]
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}

/// Where `deploy --build-on` builds the systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BuildOn {
    /// On this host (and Nix's builders), as each machine's `deploy.buildOnTarget` says
    Local,
    /// On each machine's host, with its own Nix
    Target,
}
