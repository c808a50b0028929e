//! `owsfs-torture`: the torture harness. It runs trials of each scenario against real mounts
//! of the `owsfs` binary, on a `file://` store and on a SeaweedFS server, stops at the first
//! broken promise, and prints the figure table. `xfstests/torture` is the one command that
//! builds and runs it; see `xfstests/README.md`.

mod check;
mod corrupt;
mod crash;
mod full;
mod fuzz;
mod model;
mod node;
mod partition;
mod raw;
mod workload;

#[path = "../../testkit/seaweed.rs"]
mod seaweed;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::node::Owsfs;

#[derive(Parser)]
#[command(
    name = "owsfs-torture",
    about = "Crash, store-fault, partition and corruption trials against real owsfs mounts",
    after_help = "Exit status: 0 when every trial kept every promise, 1 at the first broken \
                  promise (its trial directory is kept under --work), 2 when the harness itself \
                  could not run."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// The CI mode: a few trials of each scenario on each store (a few minutes).
    #[arg(long, conflicts_with = "long")]
    short: bool,
    /// Run trials round-robin for this long (e.g. 2h), then print the figures.
    #[arg(long, value_parser = humantime::parse_duration)]
    long: Option<Duration>,
    /// Stores to run on.
    #[arg(long, value_delimiter = ',', default_value = "file,s3")]
    stores: Vec<StoreKind>,
    /// Scenarios to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "crash,faults,partition,corrupt,full"
    )]
    scenarios: Vec<Scenario>,
    /// Run only this trial number (to reproduce a failure; with the same --seed).
    #[arg(long)]
    trial: Option<u64>,
    /// Seed of every random choice [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// The owsfs binary under test.
    #[arg(long, env = "OWSFS_BIN", default_value = "target/release/owsfs")]
    owsfs: PathBuf,
    /// Where trials run (a directory per trial, removed when it passes).
    #[arg(long, default_value = "/var/tmp/owsfs-torture")]
    work: PathBuf,
    /// Keep the directories of trials that passed (under --work).
    #[arg(long)]
    keep: bool,
    /// Trials per scenario and store in --short mode.
    #[arg(long, default_value_t = 4)]
    short_trials: u64,
    /// Workers per store, side by side: the first runs every scenario, the others only the
    /// crash and store-fault trials (numbered from 1,000,000 × their index, so that each
    /// trial can be run again alone with --trial).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    jobs: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fuzz the parsers (journal segments, trees, list blobs, generation and lease records,
    /// SQLite WAL and database headers, store URLs) and the CLI, each for --for.
    Fuzz {
        /// How long each target runs (e.g. 10m).
        #[arg(long = "for", value_parser = humantime::parse_duration, default_value = "10m")]
        budget: Duration,
        /// Targets (default: all).
        #[arg(long, value_delimiter = ',', default_value = "all")]
        targets: Vec<String>,
    },
    /// (internal) Run the workload against a mount, logging what completed.
    #[command(hide = true)]
    Workload {
        #[arg(long)]
        mount: PathBuf,
        #[arg(long)]
        log: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        max_big: usize,
        #[arg(long)]
        sync_weight: u32,
        #[arg(long)]
        pause_us: u64,
        #[arg(long)]
        owsfs: PathBuf,
        #[arg(long, default_value_t = u64::MAX)]
        max_ops: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    File,
    S3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// The mixed workload, kill -9 of the daemon, restore, remount.
    Crash,
    /// The same behind injected store faults (daemon and restores).
    Faults,
    /// Two or three nodes, short leases, store access cut and restored, forced takeovers.
    Partition,
    /// A bit flip or a truncation in a pack, a generation, a lease or a journal segment.
    Corrupt,
    /// A full cache disk, a full `file://` store, a store lost for longer than the lease.
    Full,
}

/// SIGINT or SIGTERM stopped the run between two trials (after the first one the trial under
/// way finishes and cleans up; a second one ends the harness at once).
#[derive(Debug)]
struct Interrupted(u64);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted after trial {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// A promise the harness found broken (as opposed to the harness failing to run).
#[derive(Debug)]
pub struct Broken(pub String);

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BROKEN PROMISE: {}", self.0)
    }
}

impl std::error::Error for Broken {}

/// What trials share.
#[derive(Clone)]
pub struct Ctx {
    pub owsfs: Owsfs,
    pub work: PathBuf,
    pub self_exe: PathBuf,
    pub short: bool,
    pub seed: u64,
    /// A drill after every this many trials.
    pub drill_every: u64,
    /// The store's objects, behind owsfs's back.
    pub raw: raw::Raw,
    /// Keep the directories of trials that passed.
    pub keep: bool,
    /// The store is the trial's own (`Ctx::own_store`): it goes when the trial passed.
    pub own_store: bool,
}

impl Ctx {
    /// The context of a trial with a store of its own, named `name`: a directory in `dir` for
    /// `file://`, a prefix of the run's bucket on SeaweedFS. Every object in it is the
    /// trial's, and a passed trial's store is deleted, so a long run does not fill the disk.
    pub fn own_store(&self, name: &str, dir: &std::path::Path) -> Ctx {
        let (url, raw) = self.raw.fresh(name, dir);
        let mut owsfs = self.owsfs.clone();
        owsfs.store = url;
        Ctx {
            owsfs,
            raw,
            own_store: true,
            ..self.clone()
        }
    }

    /// A trial passed: its directory (and its own store) go, unless `--keep` asked to look at
    /// them.
    pub fn passed(&self, dir: &std::path::Path) -> Result<()> {
        if !self.keep {
            if self.own_store {
                self.raw
                    .remove_all()
                    .context("delete the passed trial's store")?;
            }
            std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        Ok(())
    }
}

/// The figures of a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    pub trials: u64,
    pub kills: u64,
    pub faults: u64,
    pub takeovers: u64,
    pub corruptions: u64,
    pub detected: u64,
    pub inconsistent: u64,
    pub lost: u64,
    pub drills: u64,
    /// Trials given up because the store refused a mount (`node::StoreRefused`); not counted
    /// in `trials`.
    pub skipped: u64,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.trials += o.trials;
        self.kills += o.kills;
        self.faults += o.faults;
        self.takeovers += o.takeovers;
        self.corruptions += o.corruptions;
        self.detected += o.detected;
        self.inconsistent += o.inconsistent;
        self.lost += o.lost;
        self.drills += o.drills;
        self.skipped += o.skipped;
    }
}

/// The figure table, in the fixed format the issue asks for.
fn table(rows: &[(String, Figures)]) -> String {
    let mut out = String::from(
        "store | trials | kills | faults injected | takeovers | corruptions injected/detected | inconsistent states | lost acknowledged writes\n",
    );
    out.push_str("--- | ---: | ---: | ---: | ---: | ---: | ---: | ---:\n");
    for (name, f) in rows {
        out.push_str(&format!(
            "{name} | {} | {} | {} | {} | {}/{} | {} | {}\n",
            f.trials,
            f.kills,
            f.faults,
            f.takeovers,
            f.corruptions,
            f.detected,
            f.inconsistent,
            f.lost
        ));
    }
    out
}

fn main() {
    let cli = Cli::parse();
    if let Some(Cmd::Workload {
        mount,
        log,
        seed,
        max_big,
        sync_weight,
        pause_us,
        owsfs,
        max_ops,
    }) = &cli.command
    {
        let r = workload::Runner {
            mount: mount.clone(),
            owsfs: owsfs.clone(),
            log: log.clone(),
            cfg: workload::Cfg {
                seed: *seed,
                max_big: *max_big,
                sync_weight: *sync_weight,
            },
            max_ops: *max_ops,
            pause: Duration::from_micros(*pause_us),
        }
        .run();
        if let Err(e) = r {
            eprintln!("workload stopped: {e:#}");
            std::process::exit(3);
        }
        return;
    }
    let result = match &cli.command {
        Some(Cmd::Fuzz { budget, targets }) => fuzz_all(&cli, *budget, targets),
        _ => run(&cli),
    };
    match result {
        Ok(()) => {}
        Err(e) if e.downcast_ref::<Interrupted>().is_some() => {
            eprintln!("\n{e}");
            std::process::exit(130);
        }
        Err(e) if e.downcast_ref::<Broken>().is_some() => {
            eprintln!("\n{e:#}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("\nowsfs-torture could not run: {e:#}");
            std::process::exit(2);
        }
    }
}

/// `owsfs-torture fuzz`: every target for `budget`, then a table of runs per target.
fn fuzz_all(cli: &Cli, budget: Duration, targets: &[String]) -> Result<()> {
    let owsfs = std::fs::canonicalize(&cli.owsfs).with_context(|| {
        format!(
            "the owsfs binary {} (build it, or pass --owsfs)",
            cli.owsfs.display()
        )
    })?;
    let seed = cli.seed.unwrap_or_else(rand::random);
    std::fs::create_dir_all(&cli.work)?;
    let work = tempfile::Builder::new()
        .prefix(&format!("fuzz-{seed}-"))
        .tempdir_in(&cli.work)?;
    println!(
        "owsfs-torture fuzz: seed {seed}, {} per target; work in {}",
        humantime::format_duration(budget),
        work.path().display()
    );
    let r = fuzz::run(targets, budget, seed, &owsfs, work.path());
    match r {
        Ok(outcomes) => {
            println!("\ntarget | time | inputs | accepted | panics");
            println!("--- | ---: | ---: | ---: | ---:");
            for o in &outcomes {
                println!(
                    "{} | {:.0} s | {} | {} | 0",
                    o.target,
                    o.elapsed.as_secs_f64(),
                    o.runs,
                    o.accepted
                );
            }
            Ok(())
        }
        Err(e) => {
            let _ = work.keep();
            Err(e)
        }
    }
}

/// A store for a run: a `file://` directory, or a SeaweedFS server of its own.
struct RunStore {
    url: String,
    env: Vec<(String, String)>,
    raw: raw::Raw,
}

fn open_store(kind: StoreKind, work: &std::path::Path) -> RunStore {
    match kind {
        StoreKind::File => RunStore {
            url: format!("file://{}", work.join("store").display()),
            env: Vec::new(),
            raw: raw::Raw::File(work.join("store")),
        },
        StoreKind::S3 => {
            let s3 = std::sync::Arc::new(seaweed::Seaweed::start());
            s3.create_bucket("torture");
            RunStore {
                url: s3.store_url("torture", "t"),
                env: s3.env(),
                raw: raw::Raw::S3 {
                    s3,
                    bucket: "torture".into(),
                    prefix: "t".into(),
                },
            }
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    if !cli.short && cli.long.is_none() && cli.trial.is_none() {
        bail!("say --short, --long DURATION, --trial N, or fuzz");
    }
    let owsfs_bin = std::fs::canonicalize(&cli.owsfs).with_context(|| {
        format!(
            "the owsfs binary {} (build it, or pass --owsfs)",
            cli.owsfs.display()
        )
    })?;
    let seed = cli.seed.unwrap_or_else(rand::random);
    let started = Instant::now();
    std::fs::create_dir_all(&cli.work)?;
    let run_dir = tempfile::Builder::new()
        .prefix(&format!("run-{seed}-"))
        .tempdir_in(&cli.work)
        .context("make the run directory")?;
    println!(
        "owsfs-torture: seed {seed}, stores {:?}, scenarios {:?}, {}; work in {}",
        cli.stores,
        cli.scenarios,
        match (cli.short, cli.long) {
            (true, _) => format!("short ({} trials each)", cli.short_trials),
            (_, Some(d)) => format!("long ({})", humantime::format_duration(d)),
            _ => "one trial".into(),
        },
        run_dir.path().display()
    );
    let mut rows = Vec::new();
    let mut stores = Vec::new();
    for kind in &cli.stores {
        let dir = run_dir.path().join(format!("{kind:?}").to_lowercase());
        std::fs::create_dir_all(&dir)?;
        let s = open_store(*kind, &dir);
        let ctx = Ctx {
            owsfs: Owsfs {
                bin: owsfs_bin.clone(),
                store: s.url.clone(),
                env: s.env.clone(),
                data_home: dir.join("data-home"),
            },
            work: dir,
            self_exe: std::env::current_exe()?,
            short: cli.short,
            seed,
            drill_every: if cli.short { 2 } else { 10 },
            raw: s.raw.clone(),
            keep: cli.keep,
            own_store: false,
        };
        stores.push((*kind, ctx, s, Figures::default()));
    }
    // The first SIGINT or SIGTERM lets the trial under way finish and clean up (its mounts,
    // daemons and small filesystems), then the figures so far are printed; a second one ends
    // the harness at once. The harness's children run in process groups of their own, so a
    // Ctrl-C on the terminal reaches the harness alone.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, interrupted.clone())?;
        signal_hook::flag::register(sig, interrupted.clone())?;
    }
    // Each store's trials run in a thread of their own, side by side (a trial waits on its
    // daemons and the store most of the time). The first failure stops the others at the end
    // of their trial under way.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results = std::thread::scope(|scope| {
        let jobs = if cli.trial.is_some() { 1 } else { cli.jobs };
        let mut threads = Vec::new();
        for (i, (kind, ctx, _, _)) in stores.iter().enumerate() {
            for worker in 0..jobs {
                let scenarios: Vec<Scenario> = cli
                    .scenarios
                    .iter()
                    .copied()
                    .filter(|s| worker == 0 || matches!(s, Scenario::Crash | Scenario::Faults))
                    .collect();
                if scenarios.is_empty() {
                    continue;
                }
                let (kind, ctx, failed, interrupted) = (*kind, ctx, &failed, &*interrupted);
                let run_dir = run_dir.path();
                threads.push((
                    i,
                    scope.spawn(move || {
                        let stop = || {
                            failed.load(std::sync::atomic::Ordering::SeqCst)
                                || interrupted.load(std::sync::atomic::Ordering::SeqCst)
                        };
                        let mut figs = Figures::default();
                        let first = cli.trial.unwrap_or(0) + worker * 1_000_000;
                        let r = store_trials(
                            cli, kind, ctx, &scenarios, first, &mut figs, started, run_dir, &stop,
                        );
                        if r.is_err() {
                            failed.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        (figs, r)
                    }),
                ));
            }
        }
        threads
            .into_iter()
            .map(|(i, t)| {
                let (figs, r) = t.join().expect("a store's trial thread panicked");
                (i, figs, r)
            })
            .collect::<Vec<_>>()
    });
    let results: Vec<Result<()>> = results
        .into_iter()
        .map(|(i, figs, r)| {
            stores[i].3.add(&figs);
            r
        })
        .collect();
    // A broken promise first, then a harness error, then an interruption.
    let mut result = Ok(());
    for r in results {
        let rank = |r: &Result<()>| match r {
            Ok(()) => 0,
            Err(e) if e.downcast_ref::<Interrupted>().is_some() => 1,
            Err(e) if e.downcast_ref::<Broken>().is_some() => 3,
            Err(_) => 2,
        };
        if rank(&r) > rank(&result) {
            result = r;
        }
    }
    if result.is_ok() && interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        result = Err(Interrupted(0).into());
    }
    let mut total = Figures::default();
    for (kind, _, _, f) in &stores {
        rows.push((format!("{kind:?}").to_lowercase(), *f));
        total.add(f);
    }
    rows.push(("total".into(), total));
    println!(
        "\nfigures after {:.0} s (seed {seed}; {} drills passed; {} trials skipped because the \
         store refused a mount):\n{}",
        started.elapsed().as_secs_f64(),
        total.drills,
        total.skipped,
        table(&rows)
    );
    if result
        .as_ref()
        .is_err_and(|e| e.downcast_ref::<Interrupted>().is_none())
        || cli.keep
    {
        // Keep the failing trial's files for a look.
        let _ = run_dir.keep();
    }
    result
}

/// The trials of one store, until the run is done, a trial fails, or `stop` says so (another
/// store's trial failed, or the run was interrupted).
#[allow(clippy::too_many_arguments)]
fn store_trials(
    cli: &Cli,
    kind: StoreKind,
    ctx: &Ctx,
    scenarios: &[Scenario],
    first: u64,
    figs: &mut Figures,
    started: Instant,
    run_dir: &std::path::Path,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    let seed = ctx.seed;
    let mut n = first;
    loop {
        for sc in scenarios {
            // A partition trial takes half a minute: in long mode, one round in four.
            if *sc == Scenario::Partition && cli.long.is_some() && !n.is_multiple_of(4) {
                continue;
            }
            let start = Instant::now();
            let r = match sc {
                Scenario::Crash => crash::trial(ctx, n, false, figs),
                Scenario::Faults => crash::trial(ctx, n, true, figs),
                Scenario::Partition => partition::trial(ctx, n, figs),
                Scenario::Corrupt => corrupt::trial(ctx, n, figs),
                Scenario::Full => full::trial(ctx, n, figs),
            };
            match r {
                Ok(summary) => println!(
                    "trial {n} {kind:?} {sc:?}: ok in {:.1} s: {summary}",
                    start.elapsed().as_secs_f64()
                ),
                Err(e) if e.downcast_ref::<node::StoreRefused>().is_some() => {
                    // Not a trial: the store would not let it start (or go on).
                    figs.trials = figs.trials.saturating_sub(1);
                    figs.skipped += 1;
                    println!(
                        "trial {n} {kind:?} {sc:?}: skipped after {:.1} s: {e:#}",
                        start.elapsed().as_secs_f64()
                    );
                    // Its directory and store go, as a passed trial's do.
                    let name = format!("{sc:?}").to_lowercase();
                    let dir = ctx.work.join(format!("{name}-{n}"));
                    let _ = ctx.own_store(&format!("{name}-{n}"), &dir).passed(&dir);
                    // A store that refuses often is not a run's worth of evidence.
                    let all = figs.trials + figs.skipped;
                    if all >= 50 && figs.skipped * 50 > all {
                        bail!(
                            "the store refused the mounts of {} of {all} trials (more than 2 %): \
                             is it healthy?",
                            figs.skipped
                        );
                    }
                }
                Err(e) => {
                    println!("trial {n} {kind:?} {sc:?}: FAILED");
                    return Err(e.context(format!(
                        "trial {n} ({kind:?}, {sc:?}); reproduce with: owsfs-torture --trial {n} \
                         --seed {seed} --stores {} --scenarios {}; its files are kept in {}",
                        format!("{kind:?}").to_lowercase(),
                        format!("{sc:?}").to_lowercase(),
                        run_dir.display()
                    )));
                }
            }
            if stop() {
                return Err(Interrupted(n).into());
            }
        }
        n += 1;
        let done = match (cli.trial, cli.long) {
            (Some(_), _) => true,
            (_, Some(d)) => started.elapsed() >= d,
            _ => n - first >= cli.short_trials,
        };
        if done {
            return Ok(());
        }
    }
}
