//! `trainer slurm RECIPE --nodes N --gpus-per-node G`: writes an sbatch script that trains the
//! recipe on a Slurm cluster, resumes after pre-emption and requeues itself, and with `--submit`
//! submits it.
//!
//! The script comes from the template `scripts/slurm/train.sbatch.tmpl` (compiled in; `--template`
//! takes another). The template holds the job's logic (one srun task per GPU, `--resume auto`,
//! requeue on exit code 75) and documents it; this module only fills in the placeholders, each
//! value quoted for the place it goes. The job runs in the directory `trainer slurm` was run
//! from (`#SBATCH --chdir`), so the recipe's relative paths (run directory, data) mean what they
//! mean here.
//!
//! [`JobOptions`] (time, partition, account, the pre-emption warning, the trainer command, --out,
//! --submit, ...) and the steps that turn them into a script are shared with `trainer sweep
//! --slurm` (`sweep_slurm_cmd.rs`), which writes a job array from its own template.

use anyhow::{bail, ensure, Context};
use std::io::Write;
use std::path::{Path, PathBuf};
use trainer::config::{self, AnyRecipe};

/// The template compiled into the binary.
const TEMPLATE: &str = include_str!("../../../scripts/slurm/train.sbatch.tmpl");
const TEMPLATE_NAME: &str = "scripts/slurm/train.sbatch.tmpl";

#[derive(clap::Args)]
pub struct SlurmArgs {
    recipe: PathBuf,
    /// Override a recipe key (repeatable); passed on to `trainer run` in the script.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Nodes to run on.
    #[arg(long, value_name = "N")]
    nodes: u32,
    /// GPUs per node, one task each; 0 for CPU-only nodes (one task per node).
    #[arg(long, value_name = "G")]
    gpus_per_node: u32,
    #[command(flatten)]
    job: JobOptions,
    /// Extra arguments for `trainer run`, after `--`.
    #[arg(last = true, value_name = "RUN_ARGS")]
    run_args: Vec<String>,
}

/// The job's settings that mean the same for one run (`trainer slurm`) and for a sweep's job
/// array (`trainer sweep --slurm`).
#[derive(clap::Args)]
pub struct JobOptions {
    /// Time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (default: the partition's).
    #[arg(long, value_name = "TIME")]
    time: Option<String>,
    #[arg(long, value_name = "P")]
    partition: Option<String>,
    #[arg(long, value_name = "A")]
    account: Option<String>,
    #[arg(long, value_name = "C")]
    cpus_per_task: Option<u32>,
    /// Seconds before the time limit at which Slurm sends SIGUSR1 (the trainer checkpoints and
    /// the job requeues itself) [default: 120].
    #[arg(long, value_name = "SECONDS")]
    signal_lead: Option<u32>,
    /// The job name (default: the recipe's run.name, or the sweep's name).
    #[arg(long, value_name = "NAME")]
    job_name: Option<String>,
    /// Where to write the script (default: the recipe's or sweep file's stem + .sbatch, in this
    /// directory).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Replace an existing, different script at --out.
    #[arg(long)]
    force: bool,
    /// Submit the script with sbatch and print the job id.
    #[arg(long)]
    submit: bool,
    /// A template to use instead of the built-in one (scripts/slurm/train.sbatch.tmpl, or
    /// scripts/slurm/sweep.sbatch.tmpl for a sweep).
    #[arg(long, value_name = "FILE")]
    template: Option<PathBuf>,
    /// The trainer command on the compute nodes (default: this binary, with this shell's
    /// LD_LIBRARY_PATH); e.g. `trainer` inside a container image.
    #[arg(long, value_name = "CMD")]
    trainer: Option<String>,
    /// An extra srun option (repeatable), e.g. --srun-arg=--container-image=trainer.sqsh.
    #[arg(long = "srun-arg", value_name = "ARG", allow_hyphen_values = true)]
    srun_args: Vec<String>,
}

/// The pre-emption warning when --signal-lead is not given.
const DEFAULT_SIGNAL_LEAD: u32 = 120;

impl JobOptions {
    /// The first of these flags that was given, for a command where they need another flag
    /// (`trainer sweep` without --slurm).
    pub fn first_given(&self) -> Option<&'static str> {
        [
            ("--time", self.time.is_some()),
            ("--partition", self.partition.is_some()),
            ("--account", self.account.is_some()),
            ("--cpus-per-task", self.cpus_per_task.is_some()),
            ("--signal-lead", self.signal_lead.is_some()),
            ("--job-name", self.job_name.is_some()),
            ("--out", self.out.is_some()),
            ("--force", self.force),
            ("--submit", self.submit),
            ("--template", self.template.is_some()),
            ("--trainer", self.trainer.is_some()),
            ("--srun-arg", !self.srun_args.is_empty()),
        ]
        .into_iter()
        .find(|(_, given)| *given)
        .map(|(flag, _)| flag)
    }

    fn signal_lead(&self) -> u32 {
        self.signal_lead.unwrap_or(DEFAULT_SIGNAL_LEAD)
    }

    /// Checks the values before anything is read or written; with --submit, returns sbatch's
    /// path (a script that cannot be submitted is not what was asked for).
    pub fn check(&self) -> anyhow::Result<Option<PathBuf>> {
        if let Some(c) = self.cpus_per_task {
            ensure!(c > 0, "--cpus-per-task: expected a positive integer, got 0");
        }
        // Slurm keeps the warning time in 16 bits.
        let lead = self.signal_lead();
        ensure!(
            (1..=u16::MAX as u32).contains(&lead),
            "--signal-lead: expected 1 to {} seconds, got {lead}",
            u16::MAX,
        );
        if let Some(t) = &self.time {
            let seconds = parse_time_limit(t).with_context(|| {
                format!("--time {t}: expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
            })?;
            ensure!(
                seconds > lead as u64,
                "--time {t} is not longer than the pre-emption warning (--signal-lead {lead} s)",
            );
        }
        for (flag, value) in [
            ("--partition", &self.partition),
            ("--account", &self.account),
            ("--job-name", &self.job_name),
        ] {
            if let Some(v) = value {
                check_sbatch_value(flag, v)?;
            }
        }
        if self.submit {
            Ok(Some(
                find_on_path("sbatch").context("--submit needs sbatch on PATH")?,
            ))
        } else {
            Ok(None)
        }
    }

    /// Where the script goes, the job name, and the placeholder values that every template
    /// shares: job_name, sbatch_options, submit_dir, log, signal, trainer, script, env,
    /// srun_options. `default_name` is the job name without --job-name (`what` says where it
    /// comes from, for the message when it cannot be one); `default_out` the script's file
    /// without --out; `log` the name pattern of the job's output file in the submit directory.
    pub fn job_script(
        &self,
        gpus_per_node: u32,
        (default_name, what): (&str, &str),
        default_out: PathBuf,
        log: &str,
    ) -> anyhow::Result<JobScript> {
        let submit_dir = std::env::current_dir().context("reading the working directory")?;
        check_sbatch_value("the working directory", &submit_dir.display().to_string())?;
        let job_name = self
            .job_name
            .clone()
            .unwrap_or_else(|| default_name.to_string());
        check_sbatch_value(
            &format!("{what} (the job name; or give --job-name)"),
            &job_name,
        )?;
        let out = self.out.clone().unwrap_or(default_out);
        let path = absolute(&submit_dir, &out);

        let (trainer, env) = match &self.trainer {
            Some(cmd) => (shell_quote(cmd), String::new()),
            None => {
                let exe = this_binary().context("locating the trainer binary")?;
                // The binary needs libtorch at run time; carry this shell's library path along
                // so that the script also works when it is submitted from another shell.
                let env = match std::env::var("LD_LIBRARY_PATH") {
                    Ok(p) if !p.is_empty() => {
                        format!("export LD_LIBRARY_PATH={}\n", shell_quote(&p))
                    }
                    _ => String::new(),
                };
                (shell_quote(&exe.display().to_string()), env)
            }
        };
        let mut sbatch_options = String::new();
        if gpus_per_node > 0 {
            sbatch_options += &format!("#SBATCH --gpus-per-node={gpus_per_node}\n");
        }
        if let Some(c) = self.cpus_per_task {
            sbatch_options += &format!("#SBATCH --cpus-per-task={c}\n");
        }
        if let Some(t) = &self.time {
            sbatch_options += &format!("#SBATCH --time={t}\n");
        }
        if let Some(p) = &self.partition {
            sbatch_options += &format!("#SBATCH --partition={p}\n");
        }
        if let Some(a) = &self.account {
            sbatch_options += &format!("#SBATCH --account={a}\n");
        }
        let srun_options: String = self
            .srun_args
            .iter()
            .map(|a| shell_quote(a) + " ")
            .collect();

        let dir_text = submit_dir.display().to_string();
        let values = vec![
            ("job_name", job_name.clone()),
            ("sbatch_options", sbatch_options),
            ("submit_dir", dir_text.clone()),
            ("log", format!("{dir_text}/{log}")),
            ("signal", format!("USR1@{}", self.signal_lead())),
            ("trainer", trainer.clone()),
            ("script", shell_quote(&path.display().to_string())),
            ("env", env.clone()),
            ("srun_options", srun_options.clone()),
        ];
        Ok(JobScript {
            out,
            path,
            submit_dir,
            job_name,
            trainer,
            env,
            srun_options,
            values,
        })
    }

    /// Renders the template (--template, or `builtin` named `builtin_name`) with the shared
    /// values and `extra`, and writes it to the script's path (see [`write_script`]); returns
    /// false when the file already held exactly this script.
    pub fn write(
        &self,
        script: &JobScript,
        (builtin, builtin_name): (&str, &str),
        extra: Vec<(&'static str, String)>,
    ) -> anyhow::Result<bool> {
        let (template, template_name) = match &self.template {
            Some(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("--template {}: cannot read", p.display()))?,
                p.display().to_string(),
            ),
            None => (builtin.to_string(), builtin_name.to_string()),
        };
        let mut values = script.values.clone();
        values.extend(extra);
        let text =
            render(&template, &values).with_context(|| format!("template {template_name}"))?;
        write_script(&script.path, &text, self.force)
    }

    /// `--partition` and `--account` as sbatch command-line options (for a job submitted
    /// without a script, e.g. a sweep's collect job).
    pub fn sbatch_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        if let Some(p) = &self.partition {
            flags.push(format!("--partition={p}"));
        }
        if let Some(a) = &self.account {
            flags.push(format!("--account={a}"));
        }
        flags
    }
}

/// A job script about to be written.
pub struct JobScript {
    /// --out as given (or the default), for messages.
    pub out: PathBuf,
    /// The script's absolute path.
    pub path: PathBuf,
    /// Where `trainer` ran: the job's working directory.
    pub submit_dir: PathBuf,
    pub job_name: String,
    /// The trainer command for bash (quoted) and the `export ...` lines it needs.
    pub trainer: String,
    pub env: String,
    /// The extra srun options, quoted, each followed by a space.
    pub srun_options: String,
    values: Vec<(&'static str, String)>,
}

pub fn run(args: &SlurmArgs) -> anyhow::Result<()> {
    ensure!(
        args.nodes > 0,
        "--nodes: expected a positive integer, got 0"
    );
    let sbatch = args.job.check()?;
    if let Some(a) = args.run_args.iter().find(|a| a.starts_with("--resume")) {
        bail!("{a}: the script passes --resume auto itself; leave it out of the run arguments");
    }

    let overrides = args
        .set
        .iter()
        .map(|s| config::Override::parse(s).map_err(anyhow::Error::from))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let run_cfg = match config::load_any(&args.recipe, &overrides)? {
        AnyRecipe::Pretrain(r) => r.run,
        AnyRecipe::Classify(r) => r.run,
    };
    let stem = args
        .recipe
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy();
    let script = args.job.job_script(
        args.gpus_per_node,
        (&run_cfg.name, "run.name"),
        PathBuf::from(format!("{stem}.sbatch")),
        "slurm-%x-%j.out",
    )?;
    let recipe_path = absolute(&script.submit_dir, &args.recipe);
    let run_dir = absolute(&script.submit_dir, &run_cfg.out_dir);

    let mut run_args = String::new();
    for s in &args.set {
        run_args += &format!(" --set {}", shell_quote(s));
    }
    for a in &args.run_args {
        run_args += &format!(" {}", shell_quote(a));
    }
    let written = args.job.write(
        &script,
        (TEMPLATE, TEMPLATE_NAME),
        vec![
            ("nodes", args.nodes.to_string()),
            ("tasks_per_node", args.gpus_per_node.max(1).to_string()),
            ("recipe", shell_quote(&recipe_path.display().to_string())),
            ("run_dir", shell_quote(&run_dir.display().to_string())),
            ("run_args", run_args),
        ],
    )?;
    eprintln!(
        "{} {} ({} node(s) x {} task(s), run directory {})",
        if written { "wrote" } else { "unchanged:" },
        script.out.display(),
        args.nodes,
        args.gpus_per_node.max(1),
        run_dir.display()
    );
    if let Some(sbatch) = sbatch {
        let path = script.path.display().to_string();
        let job_id = submit(&sbatch, std::slice::from_ref(&path), &path)?;
        eprintln!(
            "submitted job {job_id}; its log: slurm-{}-{job_id}.out",
            script.job_name
        );
        println!("{job_id}");
    }
    Ok(())
}

/// The absolute path of this binary. Linux reports a binary that was replaced on disk since it
/// started (a rebuild) as `PATH (deleted)`; the script wants the file now at PATH.
fn this_binary() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.canonicalize().or_else(|e| {
        let text = exe.to_string_lossy();
        match text.strip_suffix(" (deleted)") {
            Some(path) => Path::new(path).canonicalize(),
            None => Err(e),
        }
    })
}

/// Seconds in a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
fn parse_time_limit(text: &str) -> anyhow::Result<u64> {
    let num = |s: &str| -> anyhow::Result<u64> {
        ensure!(
            !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()),
            "not a number: {s:?}"
        );
        Ok(s.parse()?)
    };
    let (days, rest) = match text.split_once('-') {
        Some((d, rest)) => (Some(num(d)?), rest),
        None => (None, text),
    };
    let parts = rest
        .split(':')
        .map(num)
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let seconds = match (days, parts.as_slice()) {
        (None, [m]) => m * 60,
        (None, [m, s]) => m * 60 + s,
        (None, [h, m, s]) => h * 3600 + m * 60 + s,
        (Some(d), [h]) => d * 86400 + h * 3600,
        (Some(d), [h, m]) => d * 86400 + h * 3600 + m * 60,
        (Some(d), [h, m, s]) => d * 86400 + h * 3600 + m * 60 + s,
        _ => bail!("too many fields"),
    };
    Ok(seconds)
}

/// A value that goes into an `#SBATCH` line, which sbatch reads without a shell: no
/// whitespace, quotes, backslashes or `%` (sbatch's file-name patterns).
fn check_sbatch_value(what: &str, value: &str) -> anyhow::Result<()> {
    ensure!(!value.is_empty(), "{what}: empty");
    if let Some(c) = value
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '%'))
    {
        bail!("{what} {value:?}: the character {c:?} cannot go into an #SBATCH line");
    }
    Ok(())
}

/// `path` as an absolute path, relative paths taken from `base`.
pub fn absolute(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// A word for bash: single-quoted unless it is plainly safe.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Fills `{{name}}` placeholders; an unknown one is an error (a typo in a custom template would
/// otherwise reach bash as literal text).
fn render(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut out = String::with_capacity(template.len() + 1024);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .with_context(|| format!("an unclosed {{{{ at {:?}", first_line(&rest[start..])))?;
        let name = after[..end].trim();
        let value = values
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
            .with_context(|| {
                let known: Vec<&str> = values.iter().map(|(k, _)| *k).collect();
                format!(
                    "unknown placeholder {{{{{name}}}}} (known: {})",
                    known.join(", ")
                )
            })?;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// Writes the script through a temporary file and a rename, so that no reader (sbatch, a
/// requeued job) sees half of it. An existing file with other content is kept unless `force`.
/// Returns false when the file already held exactly this script.
fn write_script(path: &Path, script: &str, force: bool) -> anyhow::Result<bool> {
    match std::fs::read(path) {
        Ok(old) if old == script.as_bytes() => return Ok(false),
        Ok(_) if !force => bail!(
            "--out {}: the file exists and differs from the script to write; pass --force to replace it",
            path.display()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("--out {}: cannot read", path.display())),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(script.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("--out {}: cannot write", path.display()));
    }
    Ok(true)
}

/// The first executable file called `name` in a directory of PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `sbatch --parsable ARGS` and returns the job id it prints (`ID` or `ID;CLUSTER`);
/// `what` names the job in messages (the script's path).
pub fn submit(sbatch: &Path, args: &[String], what: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new(sbatch)
        .arg("--parsable")
        .args(args)
        .output()
        .with_context(|| format!("running {}", sbatch.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let why = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        bail!("sbatch {what} failed ({}): {}", out.status, why.trim());
    }
    let id = stdout.trim().split(';').next().unwrap_or("").to_string();
    ensure!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_'),
        "sbatch {what}: expected a job id on stdout, got {:?}",
        stdout.trim()
    );
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_limits() {
        assert_eq!(parse_time_limit("30").ok(), Some(1800));
        assert_eq!(parse_time_limit("30:15").ok(), Some(1815));
        assert_eq!(parse_time_limit("01:00:00").ok(), Some(3600));
        assert_eq!(parse_time_limit("2-0").ok(), Some(2 * 86400));
        assert_eq!(parse_time_limit("1-02:03").ok(), Some(86400 + 7200 + 180));
        assert_eq!(
            parse_time_limit("1-02:03:04").ok(),
            Some(86400 + 7200 + 184)
        );
        for bad in ["", "1h", "1:2:3:4", "-1", "1-", "a:00"] {
            assert!(parse_time_limit(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/a/b.toml"), "/a/b.toml");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn rendering() {
        let v = vec![("a", "1".to_string()), ("b", "x y".to_string())];
        assert_eq!(render("{{a}}-{{ b }}!", &v).ok().as_deref(), Some("1-x y!"));
        let e = render("{{c}}", &v)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown placeholder {{c}}"), "{e}");
        assert!(render("{{a", &v).is_err());
    }
}
