//! `trainer sweep SWEEP --slurm --gpus-per-node G [--max-parallel K] [--submit]`: writes an
//! sbatch script that runs the sweep as a Slurm job array, and with `--submit` submits it and a
//! job that writes the results table once every array task has ended.
//!
//! Array task I runs `trainer sweep SWEEP --index I` (the I-th run of `--dry-run`'s list), which
//! does nothing when run I has its summary.json and otherwise becomes `trainer run BASE --set
//! ... --resume auto`: so a half-done run resumes, a requeued task continues where it stopped,
//! and submitting the same sweep again only does the work that is left. Each task is one node
//! with one Slurm task per GPU; a point never spans nodes.
//!
//! The script comes from `scripts/slurm/sweep.sbatch.tmpl` (compiled in; `--template` takes
//! another); its pre-emption handling is that of `trainer slurm`'s template, per array task. The
//! job settings (time, partition, ..., --out, --submit) are `trainer slurm`'s
//! [`JobOptions`], with the same checks and messages.

use crate::slurm_cmd::{absolute, shell_quote, submit, JobOptions};
use anyhow::{bail, ensure};
use std::path::{Path, PathBuf};
use trainer::sweep::{RunStatus, Sweep};

/// The template compiled into the binary.
const TEMPLATE: &str = include_str!("../../../scripts/slurm/sweep.sbatch.tmpl");
const TEMPLATE_NAME: &str = "scripts/slurm/sweep.sbatch.tmpl";

/// The collect job's time limit: it reads one summary.json per run.
const COLLECT_TIME_LIMIT: &str = "10";

pub fn run(
    sweep_file: &Path,
    gpus_per_node: Option<u32>,
    max_parallel: Option<u32>,
    job: &JobOptions,
) -> anyhow::Result<()> {
    let Some(gpus_per_node) = gpus_per_node else {
        bail!("--slurm needs --gpus-per-node G: the GPUs of each array task, on one node (0 for CPU-only nodes)");
    };
    if let Some(k) = max_parallel {
        ensure!(k > 0, "--max-parallel: expected a positive integer, got 0");
    }
    let sbatch = job.check()?;
    let sweep = Sweep::load(sweep_file)?;
    sweep.validate()?;
    let runs = sweep.runs()?;
    // Never empty (a sweep without keys has one point, without seeds the base recipe's seed),
    // but an array of no tasks would be a confusing sbatch error.
    ensure!(
        !runs.is_empty(),
        "{}: the sweep has no runs",
        sweep_file.display()
    );
    let array = match max_parallel {
        Some(k) => format!("0-{}%{k}", runs.len() - 1),
        None => format!("0-{}", runs.len() - 1),
    };
    let stem = sweep_file.file_stem().unwrap_or_default().to_string_lossy();
    let script = job.job_script(
        gpus_per_node,
        (&sweep.name, "sweep.name"),
        PathBuf::from(format!("{stem}.sbatch")),
        // %A the array's job id, %a the task's index.
        "slurm-%x-%A_%a.out",
    )?;
    let sweep_path = absolute(&script.submit_dir, sweep_file);
    let out_dir = absolute(&script.submit_dir, &sweep.out_dir);
    let written = job.write(
        &script,
        (TEMPLATE, TEMPLATE_NAME),
        vec![
            ("array", array.clone()),
            ("tasks_per_node", gpus_per_node.max(1).to_string()),
            ("sweep", shell_quote(&sweep_path.display().to_string())),
            ("out_dir", shell_quote(&out_dir.display().to_string())),
        ],
    )?;
    eprintln!(
        "{} {} (job array {array}: {} runs, each on 1 node x {} task(s); run directories in {})",
        if written { "wrote" } else { "unchanged:" },
        script.out.display(),
        runs.len(),
        gpus_per_node.max(1),
        out_dir.display()
    );
    let finished = runs
        .iter()
        .filter(|r| r.status() == RunStatus::Finished)
        .count();
    if finished > 0 {
        eprintln!(
            "  {finished} of {} runs already finished (summary.json present): their tasks do nothing",
            runs.len()
        );
    }
    let collect = format!(
        "trainer sweep {} --collect",
        shell_quote(&sweep_file.display().to_string())
    );
    let Some(sbatch) = sbatch else {
        eprintln!(
            "submit it with: sbatch {}\nwhen every task has ended, write the results table with: {collect}",
            shell_quote(&script.out.display().to_string())
        );
        return Ok(());
    };
    let path = script.path.display().to_string();
    let array_id = submit(&sbatch, std::slice::from_ref(&path), &path)?;
    eprintln!(
        "submitted array job {array_id} ({} tasks); logs: slurm-{}-{array_id}_<index>.out",
        runs.len(),
        script.job_name
    );
    println!("{array_id}");

    // The results table, once every task has ended however it ended (afterany): a failed run
    // is a row with unfinished = 1, not a table that never comes.
    let collect_name = format!("{}-collect", script.job_name);
    let dir = script.submit_dir.display().to_string();
    let command = format!(
        "{}srun {}{} sweep {} --collect",
        script.env.replace('\n', "; "),
        script.srun_options,
        script.trainer,
        shell_quote(&sweep_path.display().to_string())
    );
    let mut args = vec![
        format!("--dependency=afterany:{array_id}"),
        format!("--job-name={collect_name}"),
        format!("--chdir={dir}"),
        format!("--output={dir}/slurm-%x-%j.out"),
        "--nodes=1".to_string(),
        "--ntasks=1".to_string(),
        format!("--time={COLLECT_TIME_LIMIT}"),
    ];
    args.extend(job.sbatch_flags());
    args.push(format!("--wrap={command}"));
    match submit(&sbatch, &args, "--wrap (the collect job)") {
        Ok(id) => eprintln!(
            "submitted job {id}: {collect} once every task has ended; its log: slurm-{collect_name}-{id}.out"
        ),
        // The array is in the queue either way; the table can be written by hand.
        Err(e) => eprintln!(
            "warning: the collect job was not submitted ({e:#}); when every task has ended, run: {collect}"
        ),
    }
    Ok(())
}
