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

use anyhow::{bail, ensure, Context};
use std::io::Write;
use std::path::{Path, PathBuf};
use trainer::recipe::{self, AnyRecipe};

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
    /// the job requeues itself).
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    signal_lead: u32,
    /// The job name (default: the recipe's run.name).
    #[arg(long, value_name = "NAME")]
    job_name: Option<String>,
    /// Where to write the script (default: RECIPE's file stem + .sbatch, in this directory).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Replace an existing, different script at --out.
    #[arg(long)]
    force: bool,
    /// Submit the script with sbatch and print the job id.
    #[arg(long)]
    submit: bool,
    /// A template to use instead of the built-in scripts/slurm/train.sbatch.tmpl.
    #[arg(long, value_name = "FILE")]
    template: Option<PathBuf>,
    /// The trainer command on the compute nodes (default: this binary, with this shell's
    /// LD_LIBRARY_PATH); e.g. `trainer` inside a container image.
    #[arg(long, value_name = "CMD")]
    trainer: Option<String>,
    /// An extra srun option (repeatable), e.g. --srun-arg=--container-image=trainer.sqsh.
    #[arg(long = "srun-arg", value_name = "ARG", allow_hyphen_values = true)]
    srun_args: Vec<String>,
    /// Extra arguments for `trainer run`, after `--`.
    #[arg(last = true, value_name = "RUN_ARGS")]
    run_args: Vec<String>,
}

pub fn run(args: &SlurmArgs) -> anyhow::Result<()> {
    ensure!(
        args.nodes > 0,
        "--nodes: expected a positive integer, got 0"
    );
    if let Some(c) = args.cpus_per_task {
        ensure!(c > 0, "--cpus-per-task: expected a positive integer, got 0");
    }
    // Slurm keeps the warning time in 16 bits.
    ensure!(
        (1..=u16::MAX as u32).contains(&args.signal_lead),
        "--signal-lead: expected 1 to {} seconds, got {}",
        u16::MAX,
        args.signal_lead
    );
    if let Some(t) = &args.time {
        let seconds = parse_time_limit(t).with_context(|| {
            format!("--time {t}: expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
        })?;
        ensure!(
            seconds > args.signal_lead as u64,
            "--time {t} is not longer than the pre-emption warning (--signal-lead {} s)",
            args.signal_lead
        );
    }
    for (flag, value) in [
        ("--partition", &args.partition),
        ("--account", &args.account),
        ("--job-name", &args.job_name),
    ] {
        if let Some(v) = value {
            check_sbatch_value(flag, v)?;
        }
    }
    if let Some(a) = args.run_args.iter().find(|a| a.starts_with("--resume")) {
        bail!("{a}: the script passes --resume auto itself; leave it out of the run arguments");
    }
    // Before anything is written: a script that cannot be submitted is not what was asked for.
    let sbatch = if args.submit {
        Some(find_on_path("sbatch").context("--submit needs sbatch on PATH")?)
    } else {
        None
    };

    let overrides = args
        .set
        .iter()
        .map(|s| recipe::Override::parse(s).map_err(anyhow::Error::from))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let run_cfg = match recipe::load_any(&args.recipe, &overrides)? {
        AnyRecipe::Pretrain(r) => r.run,
        AnyRecipe::Classify(r) => r.run,
    };
    let submit_dir = std::env::current_dir().context("reading the working directory")?;
    check_sbatch_value("the working directory", &submit_dir.display().to_string())?;
    let recipe_path = absolute(&submit_dir, &args.recipe);
    let run_dir = absolute(&submit_dir, &run_cfg.out_dir);
    let job_name = args
        .job_name
        .clone()
        .unwrap_or_else(|| run_cfg.name.clone());
    check_sbatch_value("run.name (the job name; or give --job-name)", &job_name)?;

    let out = match &args.out {
        Some(p) => p.clone(),
        None => {
            let stem = args
                .recipe
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy();
            PathBuf::from(format!("{stem}.sbatch"))
        }
    };
    let script_path = absolute(&submit_dir, &out);

    let (trainer_cmd, env) = match &args.trainer {
        Some(cmd) => (shell_quote(cmd), String::new()),
        None => {
            let exe = this_binary().context("locating the trainer binary")?;
            // The binary needs libtorch at run time; carry this shell's library path along so
            // that the script also works when it is submitted from another shell.
            let env = match std::env::var("LD_LIBRARY_PATH") {
                Ok(p) if !p.is_empty() => format!("export LD_LIBRARY_PATH={}\n", shell_quote(&p)),
                _ => String::new(),
            };
            (shell_quote(&exe.display().to_string()), env)
        }
    };

    let mut sbatch_options = String::new();
    if args.gpus_per_node > 0 {
        sbatch_options += &format!("#SBATCH --gpus-per-node={}\n", args.gpus_per_node);
    }
    if let Some(c) = args.cpus_per_task {
        sbatch_options += &format!("#SBATCH --cpus-per-task={c}\n");
    }
    if let Some(t) = &args.time {
        sbatch_options += &format!("#SBATCH --time={t}\n");
    }
    if let Some(p) = &args.partition {
        sbatch_options += &format!("#SBATCH --partition={p}\n");
    }
    if let Some(a) = &args.account {
        sbatch_options += &format!("#SBATCH --account={a}\n");
    }
    let srun_options: String = args
        .srun_args
        .iter()
        .map(|a| shell_quote(a) + " ")
        .collect();
    let mut run_args = String::new();
    for s in &args.set {
        run_args += &format!(" --set {}", shell_quote(s));
    }
    for a in &args.run_args {
        run_args += &format!(" {}", shell_quote(a));
    }

    let submit_dir_text = submit_dir.display().to_string();
    let values: Vec<(&str, String)> = vec![
        ("job_name", job_name.clone()),
        ("nodes", args.nodes.to_string()),
        ("tasks_per_node", args.gpus_per_node.max(1).to_string()),
        ("sbatch_options", sbatch_options),
        ("submit_dir", submit_dir_text.clone()),
        ("log", format!("{submit_dir_text}/slurm-%x-%j.out")),
        ("signal", format!("USR1@{}", args.signal_lead)),
        ("trainer", trainer_cmd),
        ("recipe", shell_quote(&recipe_path.display().to_string())),
        ("run_dir", shell_quote(&run_dir.display().to_string())),
        ("script", shell_quote(&script_path.display().to_string())),
        ("env", env),
        ("srun_options", srun_options),
        ("run_args", run_args),
    ];
    let (template, template_name) = match &args.template {
        Some(p) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("--template {}: cannot read", p.display()))?,
            p.display().to_string(),
        ),
        None => (TEMPLATE.to_string(), TEMPLATE_NAME.to_string()),
    };
    let script = render(&template, &values).with_context(|| format!("template {template_name}"))?;

    let written = write_script(&script_path, &script, args.force)?;
    eprintln!(
        "{} {} ({} node(s) x {} task(s), run directory {})",
        if written { "wrote" } else { "unchanged:" },
        out.display(),
        args.nodes,
        args.gpus_per_node.max(1),
        run_dir.display()
    );
    if let Some(sbatch) = sbatch {
        let job_id = submit(&sbatch, &script_path)?;
        eprintln!("submitted job {job_id}; its log: slurm-{job_name}-{job_id}.out");
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
fn absolute(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// A word for bash: single-quoted unless it is plainly safe.
fn shell_quote(s: &str) -> String {
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

/// Runs `sbatch --parsable SCRIPT` and returns the job id it prints (`ID` or `ID;CLUSTER`).
fn submit(sbatch: &Path, script: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(sbatch)
        .arg("--parsable")
        .arg(script)
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
        bail!(
            "sbatch {} failed ({}): {}",
            script.display(),
            out.status,
            why.trim()
        );
    }
    let id = stdout.trim().split(';').next().unwrap_or("").to_string();
    ensure!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_'),
        "sbatch {}: expected a job id on stdout, got {:?}",
        script.display(),
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
