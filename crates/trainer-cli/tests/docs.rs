//! The documentation's snippets against the real binary: README.md and every page of docs/ (but
//! the generated docs/recipe-keys.md, which `crates/trainer/src/config/keys.rs` keeps current).
//!
//! - Every fenced `toml` block is validated with `trainer validate`: a whole recipe (it has
//!   `[run]`) as it is, a sweep file (`[sweep]`) with `trainer sweep FILE --dry-run`, and any
//!   other block as a fragment merged onto `configs/quickstart.toml` (a table that has a `kind`,
//!   or a value that is not a table, replaces the base's; other tables merge key by key), so a
//!   key that drifts from the schema fails here.
//! - Every fenced `sh` block runs, line by line through bash, in a fresh copy of a directory that
//!   holds a 2-step quickstart run (`runs/quickstart`), small text files (`corpus.txt`, `new.txt`,
//!   `data/new.txt`) and links to the repository's `configs/` and `benches/`, with `trainer` (on
//!   PATH) and `scripts/trainer` being the binary under test (one libtorch thread each,
//!   `OMP_NUM_THREADS=1`). Every command must succeed, except the last one of a block that a
//!   `text` block follows right after: each line of that text must match a line of the command's
//!   output (`...` standing for any text), its `error:` lines must be all the command printed,
//!   and when there is one the exit code must be 1.
//! - Every relative link points to an existing file, and every `#anchor` to a heading there.
//!
//! A block the test cannot run carries an HTML comment right before its fence:
//! `<!-- doc-test: example (REASON) -->` or `<!-- doc-test: skip (REASON) -->` (counted and
//! printed with its reason); a fragment that needs another base carries
//! `<!-- doc-test: base [FILE] [without KEY, KEY] [--set KEY=VALUE]... -->` (checked on FILE
//! instead of the quickstart, with those keys removed from the base first, and validated with
//! those `--set` overrides). `the_checker_catches_drift` proves on deliberately broken snippets
//! that each check can fail.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The longest a documented command may take here.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

// ---- reading markdown ----------------------------------------------------------------------

/// What the HTML comment before a fence asks for.
#[derive(Debug, Clone, PartialEq)]
enum Marker {
    /// Not run: `example (...)` or `skip (...)`, with the word and the reason.
    NotRun { word: String, reason: String },
    /// A fragment checked on `file` (None: the quickstart) with the keys `without` removed
    /// first, validated with the `set` overrides.
    Base {
        file: Option<String>,
        without: Vec<String>,
        set: Vec<String>,
    },
}

#[derive(Debug, Clone)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    lang: String,
    body: String,
    marker: Option<Result<Marker, String>>,
    /// Whether only blank lines separate this block from the previous fenced block.
    follows_previous: bool,
}

fn parse_marker(comment: &str) -> Result<Marker, String> {
    let inner = comment
        .trim()
        .strip_prefix("<!--")
        .and_then(|s| s.strip_suffix("-->"))
        .map(str::trim)
        .and_then(|s| s.strip_prefix("doc-test:"))
        .map(str::trim)
        .ok_or_else(|| format!("not a doc-test marker: {comment}"))?;
    for word in ["example", "skip"] {
        if let Some(rest) = inner.strip_prefix(word) {
            let reason = rest
                .trim()
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .map(str::trim)
                .unwrap_or_default();
            if reason.is_empty() {
                return Err(format!(
                    "`doc-test: {word}` needs a reason in parentheses: {comment}"
                ));
            }
            return Ok(Marker::NotRun {
                word: word.to_string(),
                reason: reason.to_string(),
            });
        }
    }
    if let Some(rest) = inner.strip_prefix("base") {
        let mut set = Vec::new();
        let mut words = Vec::new();
        let mut tokens = rest.split_whitespace();
        while let Some(t) = tokens.next() {
            if t == "--set" {
                match tokens.next() {
                    Some(kv) if kv.contains('=') => set.push(kv.to_string()),
                    _ => return Err(format!("`--set` without KEY=VALUE: {comment}")),
                }
            } else {
                words.push(t);
            }
        }
        let rest = words.join(" ");
        let (file, without) = match rest.split_once("without") {
            Some((f, w)) => (f.trim().to_string(), w.to_string()),
            None => (rest.trim().to_string(), String::new()),
        };
        let without: Vec<String> = without
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(String::from)
            .collect();
        if file.is_empty() && without.is_empty() && set.is_empty() {
            return Err(format!(
                "`doc-test: base` names no file, key or override: {comment}"
            ));
        }
        return Ok(Marker::Base {
            file: (!file.is_empty()).then_some(file),
            without,
            set,
        });
    }
    Err(format!(
        "unknown doc-test marker (example, skip or base): {comment}"
    ))
}

fn fenced_blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut last_end: Option<usize> = None;
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            let fence_indent = lines[i].len() - trimmed.len();
            let start = i;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && !lines[i].trim_start().starts_with("```") {
                let l = lines[i];
                body.push(
                    if l.len() >= fence_indent && l[..fence_indent].trim().is_empty() {
                        &l[fence_indent..]
                    } else {
                        l.trim_start()
                    },
                );
                i += 1;
            }
            // The nearest non-blank line above the fence: a marker when it is a doc-test comment.
            let above = lines[..start].iter().rev().find(|l| !l.trim().is_empty());
            let marker = above
                .filter(|l| l.trim_start().starts_with("<!-- doc-test"))
                .map(|l| parse_marker(l));
            let follows_previous = last_end
                .is_some_and(|end| lines[end + 1..start].iter().all(|l| l.trim().is_empty()));
            blocks.push(Block {
                line: start + 1,
                lang: lang.trim().to_string(),
                body: body.join("\n") + "\n",
                marker,
                follows_previous,
            });
            last_end = Some(i.min(lines.len() - 1));
        }
        i += 1;
    }
    blocks
}

/// The command lines of an `sh` block: `\`-continued lines joined, comment lines and blank ones
/// left out.
fn command_lines(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in body.lines() {
        let t = line.trim_end();
        if current.is_empty() && (t.trim().is_empty() || t.trim_start().starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                out.push(std::mem::take(&mut current).trim().to_string());
            }
        }
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

/// Whether `line` matches `pattern`, where `...` in the pattern stands for any text.
fn matches_wildcard(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("...").collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || !line[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

// ---- links ---------------------------------------------------------------------------------

/// GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a markdown file's headings (outside code blocks), repeated ones numbered as
/// GitHub numbers them.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let Some(heading) = line
            .strip_prefix('#')
            .map(|h| h.trim_start_matches('#'))
            .filter(|h| h.starts_with(' '))
        else {
            continue;
        };
        let base = slug(heading);
        let mut candidate = base.clone();
        let mut n = 0;
        while seen.contains(&candidate) {
            n += 1;
            candidate = format!("{base}-{n}");
        }
        seen.insert(candidate);
    }
    seen
}

/// The targets of the markdown links `[text](target)` outside code blocks and inline code.
fn link_targets(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_code = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        // Inline code spans may hold `](` that is no link.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            }
            plain.push(' ');
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((n + 1, after[..end].trim().to_string()));
            rest = &after[end..];
        }
    }
    out
}

fn check_links(file: &Path, text: &str, failures: &mut Vec<String>) -> usize {
    let dir = file.parent().expect("a file's directory");
    let mut checked = 0;
    for (line, target) in link_targets(text) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        checked += 1;
        let (path, anchor) = match target.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (target.as_str(), None),
        };
        let resolved = if path.is_empty() {
            file.to_path_buf()
        } else {
            dir.join(path)
        };
        if !resolved.exists() {
            failures.push(format!(
                "{}:{line}: link to {target}: {} does not exist",
                file.display(),
                resolved.display()
            ));
            continue;
        }
        if let Some(anchor) = anchor {
            let heads = if resolved.is_file() && resolved.extension().is_some_and(|e| e == "md") {
                anchors(&std::fs::read_to_string(&resolved).expect("reading a linked page"))
            } else {
                BTreeSet::new()
            };
            if !heads.contains(anchor) {
                failures.push(format!(
                    "{}:{line}: link to {target}: no heading with the anchor #{anchor} in {}",
                    file.display(),
                    resolved.display()
                ));
            }
        }
    }
    checked
}

// ---- the places snippets run in ------------------------------------------------------------

/// A directory tree copied with its symbolic links kept as links.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type().expect("file type");
        if kind.is_symlink() {
            let target = std::fs::read_link(&src).expect("read_link");
            std::os::unix::fs::symlink(target, &dst).expect("symlink");
        } else if kind.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).expect("copy");
        }
    }
}

/// Where the snippets run: `fixture` is copied for each `sh` block, `toml_dir` (the fixture plus
/// `runs/quickstart-hf`) is where the TOML blocks are validated.
struct Env {
    _tmp: tempfile::TempDir,
    bin_dir: PathBuf,
    fixture: PathBuf,
    toml_dir: PathBuf,
    scratch: PathBuf,
    counter: std::cell::Cell<usize>,
}

impl Env {
    fn new() -> Env {
        let tmp = workdir();
        let root = tmp.path().to_path_buf();
        let repo = repo_root();
        let bin_dir = root.join("bin");
        std::fs::create_dir_all(&bin_dir).expect("bin dir");
        std::os::unix::fs::symlink(trainer_bin(), bin_dir.join("trainer")).expect("symlink");

        let fixture = root.join("fixture");
        std::fs::create_dir_all(fixture.join("scripts")).expect("mkdir");
        std::fs::create_dir_all(fixture.join("data")).expect("mkdir");
        for d in ["configs", "benches"] {
            std::os::unix::fs::symlink(repo.join(d), fixture.join(d)).expect("symlink");
        }
        // `scripts/trainer` provisions and builds, then runs the binary: here, the binary.
        std::os::unix::fs::symlink(trainer_bin(), fixture.join("scripts/trainer"))
            .expect("symlink");
        // The reader's own files that the snippets name.
        let prose = "Alice was beginning to get very tired of sitting by her sister on the bank, \
                     and of having nothing to do: once or twice she had peeped into the book her \
                     sister was reading.\n";
        std::fs::write(fixture.join("corpus.txt"), prose.repeat(400)).expect("corpus.txt");
        let letters = "abcdefghijklmnopqrstuvwxyz ".repeat(4000);
        std::fs::write(fixture.join("new.txt"), &letters).expect("new.txt");
        std::fs::write(fixture.join("data/new.txt"), &letters).expect("data/new.txt");
        // A finished quickstart run, two steps long.
        trainer(
            &fixture,
            &[
                "run",
                "configs/quickstart.toml",
                "--set",
                "train.max_steps=2",
                "--set",
                "schedule.warmup_steps=1",
                "--set",
                "run.threads=1",
            ],
        )
        .assert_success();
        let _ = std::fs::remove_dir_all(fixture.join(".logs"));

        let toml_dir = root.join("toml");
        copy_tree(&fixture, &toml_dir);
        trainer(
            &toml_dir,
            &[
                "export",
                "runs/quickstart",
                "--to",
                "hf",
                "runs/quickstart-hf",
            ],
        )
        .assert_success();
        let scratch = root.join("scratch");
        std::fs::create_dir_all(&scratch).expect("scratch");
        Env {
            _tmp: tmp,
            bin_dir,
            fixture,
            toml_dir,
            scratch,
            counter: std::cell::Cell::new(0),
        }
    }

    fn next(&self) -> usize {
        let n = self.counter.get();
        self.counter.set(n + 1);
        n
    }
}

/// What a shell command left behind.
struct Shell {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `line` through bash in `cwd`, `trainer` on PATH, killed (with its children) after the
/// timeout.
fn bash(env: &Env, cwd: &Path, line: &str) -> Shell {
    use std::os::unix::process::CommandExt;
    let n = env.next();
    let out_path = env.scratch.join(format!("cmd-{n}.out"));
    let err_path = env.scratch.join(format!("cmd-{n}.err"));
    let path = format!(
        "{}:{}",
        env.bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .args(["-c", line])
        .current_dir(cwd)
        .env("PATH", path)
        // One libtorch thread: on a busy machine several spinning OpenMP threads per command
        // make a short run take minutes.
        .env("OMP_NUM_THREADS", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .process_group(0)
        .spawn()
        .expect("starting bash");
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code();
        }
        if start.elapsed() > COMMAND_TIMEOUT {
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Shell {
        code,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

// ---- checking ------------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    recipes: usize,
    fragments: usize,
    sweeps: usize,
    sh_blocks: usize,
    commands: usize,
    expected_outputs: usize,
    links: usize,
    not_run: Vec<String>,
    failures: Vec<String>,
    /// Seconds each command took, with where it is.
    timings: Vec<(f64, String)>,
}

impl Report {
    fn summary(&self) -> String {
        format!(
            "toml blocks validated: {} whole recipes, {} fragments, {} sweep files; sh blocks run: \
             {} ({} commands, {} with their expected output); links checked: {}; not run: {}",
            self.recipes,
            self.fragments,
            self.sweeps,
            self.sh_blocks,
            self.commands,
            self.expected_outputs,
            self.links,
            self.not_run.len()
        )
    }
}

/// Removes a dotted key (`data.train`) from a TOML table; false when it is not there.
fn remove_key(table: &mut toml::Table, dotted: &str) -> bool {
    match dotted.split_once('.') {
        None => table.remove(dotted).is_some(),
        Some((head, rest)) => match table.get_mut(head) {
            Some(toml::Value::Table(t)) => remove_key(t, rest),
            _ => false,
        },
    }
}

/// Merges a fragment onto a base recipe: a fragment table with a `kind` (another variant) or a
/// value that is not a table replaces the base's; other tables merge key by key.
fn merge(base: &mut toml::Table, fragment: &toml::Table) {
    for (key, value) in fragment {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(f)) if !f.contains_key("kind") => {
                merge(b, f)
            }
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

fn validate_output(out: &Out) -> String {
    format!("exit code {:?}\n{}", out.code, out.stderr.trim_end())
}

fn check_toml(env: &Env, name: &str, block: &Block, report: &mut Report) {
    let at = format!("{name}:{}", block.line);
    let (base_file, without, set) = match &block.marker {
        Some(Ok(Marker::Base { file, without, set })) => {
            (file.clone(), without.clone(), set.clone())
        }
        _ => (None, Vec::new(), Vec::new()),
    };
    let table: toml::Table = match block.body.parse() {
        Ok(t) => t,
        Err(e) => {
            report
                .failures
                .push(format!("{at}: the toml block does not parse: {e}"));
            return;
        }
    };
    let dir = &env.toml_dir;
    let file = format!("doc-{}.toml", env.next());
    let (args, text): (Vec<String>, String) = if table.contains_key("sweep") {
        report.sweeps += 1;
        (
            vec!["sweep".into(), file.clone(), "--dry-run".into()],
            block.body.clone(),
        )
    } else if table.contains_key("run") {
        report.recipes += 1;
        (vec!["validate".into(), file.clone()], block.body.clone())
    } else {
        report.fragments += 1;
        let base_path = base_file.unwrap_or_else(|| "configs/quickstart.toml".to_string());
        let base_text = std::fs::read_to_string(dir.join(&base_path))
            .unwrap_or_else(|e| panic!("{at}: the base recipe {base_path}: {e}"));
        let mut base: toml::Table = base_text.parse().expect("the base recipe parses");
        for key in &without {
            if !remove_key(&mut base, key) {
                report.failures.push(format!(
                    "{at}: `base without {key}`: {base_path} has no {key}"
                ));
                return;
            }
        }
        merge(&mut base, &table);
        (
            vec!["validate".into(), file.clone()],
            toml::to_string(&base).expect("a merged recipe serialises"),
        )
    };
    std::fs::write(dir.join(&file), &text).expect("writing the snippet");
    let mut args = args;
    for kv in &set {
        args.push("--set".into());
        args.push(kv.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = trainer(dir, &args);
    if out.code != Some(0) || out.stderr.contains("panicked") {
        report.failures.push(format!(
            "{at}: `trainer {}` refused the toml block:\n{}\n--- checked as ---\n{text}",
            args.join(" "),
            validate_output(&out)
        ));
    }
}

fn check_sh(env: &Env, name: &str, block: &Block, expected: Option<&Block>, report: &mut Report) {
    let at = format!("{name}:{}", block.line);
    let lines = command_lines(&block.body);
    if lines.is_empty() {
        report
            .failures
            .push(format!("{at}: an sh block without commands"));
        return;
    }
    report.sh_blocks += 1;
    let dir = env.scratch.join(format!("sh-{}", env.next()));
    copy_tree(&env.fixture, &dir);
    for (i, line) in lines.iter().enumerate() {
        report.commands += 1;
        let started = Instant::now();
        let out = bash(env, &dir, line);
        report
            .timings
            .push((started.elapsed().as_secs_f64(), format!("{at}: {line}")));
        let last = i + 1 == lines.len();
        let describe = || {
            format!(
                "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.code,
                out.stdout.trim_end(),
                out.stderr.trim_end()
            )
        };
        if out.stderr.contains("panicked") {
            report
                .failures
                .push(format!("{at}: `{line}` panicked:\n{}", describe()));
            return;
        }
        match expected.filter(|_| last) {
            None => {
                if out.code != Some(0) {
                    report
                        .failures
                        .push(format!("{at}: `{line}` failed:\n{}", describe()));
                    return;
                }
            }
            Some(want) => {
                report.expected_outputs += 1;
                let want_lines: Vec<&str> = want
                    .body
                    .lines()
                    .map(str::trim_end)
                    .filter(|l| !l.is_empty())
                    .collect();
                let got: Vec<&str> = out.stdout.lines().chain(out.stderr.lines()).collect();
                let want_errors = want_lines
                    .iter()
                    .filter(|l| l.starts_with("error:"))
                    .count();
                let got_errors = out
                    .stderr
                    .lines()
                    .filter(|l| l.starts_with("error:"))
                    .count();
                let mut problems = Vec::new();
                if want_errors > 0 && out.code != Some(1) {
                    problems.push("the exit code is not 1".to_string());
                }
                if want_errors != got_errors {
                    problems.push(format!(
                        "{got_errors} `error:` lines, the docs show {want_errors}"
                    ));
                }
                for w in &want_lines {
                    if !got.iter().any(|g| matches_wildcard(w, g)) {
                        problems.push(format!("no output line matches {w:?}"));
                    }
                }
                if !problems.is_empty() {
                    report.failures.push(format!(
                        "{at}: `{line}` does not print what {name}:{} shows: {}\n{}",
                        want.line,
                        problems.join("; "),
                        describe()
                    ));
                }
            }
        }
    }
}

/// Checks one markdown page (its name for messages, its path for links).
fn check_page(env: &Env, name: &str, path: &Path, text: &str, report: &mut Report) {
    report.links += check_links(path, text, &mut report.failures);
    let blocks = fenced_blocks(text);
    for (i, block) in blocks.iter().enumerate() {
        let at = format!("{name}:{}", block.line);
        if let Some(Err(e)) = &block.marker {
            report.failures.push(format!("{at}: {e}"));
            continue;
        }
        if let Some(Ok(Marker::NotRun { word, reason })) = &block.marker {
            if block.lang == "toml" || block.lang == "sh" {
                report
                    .not_run
                    .push(format!("{at} ({} {word}): {reason}", block.lang));
            } else {
                report.failures.push(format!(
                    "{at}: a doc-test marker on a `{}` block, which is never run",
                    block.lang
                ));
            }
            continue;
        }
        match block.lang.as_str() {
            "toml" => check_toml(env, name, block, report),
            "sh" => {
                let next = blocks
                    .get(i + 1)
                    .filter(|b| b.lang == "text" && b.follows_previous && b.marker.is_none());
                check_sh(env, name, block, next, report);
            }
            _ => {
                if matches!(&block.marker, Some(Ok(Marker::Base { .. }))) {
                    report.failures.push(format!(
                        "{at}: `doc-test: base` on a `{}` block",
                        block.lang
                    ));
                }
            }
        }
    }
}

/// README.md and docs/*.md but the generated recipe-keys.md.
fn pages() -> Vec<PathBuf> {
    let root = repo_root();
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .filter(|p| p.file_name().is_some_and(|n| n != "recipe-keys.md"))
        .collect();
    docs.sort();
    assert!(docs.len() > 5, "docs/ has no pages");
    pages.extend(docs);
    pages
}

#[test]
fn every_snippet_and_link_in_the_docs_works() {
    let start = Instant::now();
    let env = Env::new();
    let root = repo_root();
    let mut report = Report::default();
    for page in pages() {
        let name = page
            .strip_prefix(&root)
            .expect("under the repository")
            .display()
            .to_string();
        let text = std::fs::read_to_string(&page).expect("reading a page");
        check_page(&env, &name, &page, &text, &mut report);
    }
    println!("{}", report.summary());
    for n in &report.not_run {
        println!("  not run: {n}");
    }
    report.timings.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (secs, what) in report.timings.iter().take(5) {
        println!("  slowest: {secs:.1} s {what}");
    }
    println!("docs test took {:.1} s", start.elapsed().as_secs_f64());
    assert!(
        report.failures.is_empty(),
        "{} snippet(s) or link(s) of the docs fail:\n\n{}",
        report.failures.len(),
        report.failures.join("\n\n")
    );
    // The docs do hold snippets of every kind (a parser that found nothing would pass).
    assert!(report.recipes >= 1 && report.fragments >= 10 && report.sweeps >= 1);
    assert!(report.commands >= 20 && report.expected_outputs >= 10);
}

/// Each check fails on a snippet that is wrong, through the same code the docs go through.
#[test]
fn the_checker_catches_drift() {
    let env = Env::new();
    let page = repo_root().join("docs/README.md");
    let check = |text: &str| {
        let mut report = Report::default();
        check_page(&env, "broken.md", &page, text, &mut report);
        report
    };
    let fence = "```";
    let cases = [
        (
            "a fragment with a key the schema does not have",
            format!("{fence}toml\n[optim]\nkind = \"adamw\"\nlr = 3e-3\nmomentom = 0.9\n{fence}\n"),
            "unknown field `momentom`",
        ),
        (
            "a fragment with a wrong type",
            format!("{fence}toml\n[train]\nbatch_size = \"sixteen\"\n{fence}\n"),
            "invalid type",
        ),
        (
            "a whole recipe with a misspelt section",
            format!(
                "{fence}toml\n[run]\nname = \"x\"\nout_dir = \"runs/x\"\n[modle]\nkind = \"llama\"\n{fence}\n"
            ),
            "unknown field `modle`",
        ),
        (
            "a sweep over a key the recipe does not have",
            format!(
                "{fence}toml\n[sweep]\nbase = \"configs/quickstart.toml\"\n[sweep.grid]\n\"optim.learning_rate\" = [1e-3]\n{fence}\n"
            ),
            "unknown field `learning_rate`",
        ),
        (
            "a fragment that does not parse",
            format!("{fence}toml\n[optim\nlr = 1\n{fence}\n"),
            "does not parse",
        ),
        (
            "a command that fails",
            format!("{fence}sh\ntrainer validate configs/quickstart.toml --set train.bogus=1\n{fence}\n"),
            "failed",
        ),
        (
            "an error line that changed",
            format!(
                "{fence}sh\ntrainer validate configs/quickstart.toml --set data.seq_len=1024\n{fence}\n\n{fence}text\nerror: data.seq_len is too long\n{fence}\n"
            ),
            "no output line matches",
        ),
        (
            "an expected error from a command that succeeds",
            format!(
                "{fence}sh\ntrainer validate configs/quickstart.toml\n{fence}\n\n{fence}text\nerror: ...\n{fence}\n"
            ),
            "the exit code is not 1",
        ),
        (
            "a marker without its reason",
            format!("<!-- doc-test: example -->\n{fence}sh\nsrun trainer run x.toml\n{fence}\n"),
            "needs a reason",
        ),
        (
            "an unknown marker",
            format!("<!-- doc-test: maybe (later) -->\n{fence}sh\ntrue\n{fence}\n"),
            "unknown doc-test marker",
        ),
        (
            "a link to a page that is not there",
            "See [the page](no-such-page.md).\n".to_string(),
            "does not exist",
        ),
        (
            "a link to a heading that is not there",
            "See [recipes](recipes.md#no-such-heading).\n".to_string(),
            "no heading with the anchor",
        ),
    ];
    for (what, text, needle) in &cases {
        let report = check(text);
        assert!(
            report.failures.iter().any(|f| f.contains(needle)),
            "{what}: expected a failure containing {needle:?}, got {:?}",
            report.failures
        );
    }
    // And the same snippets, written right, pass.
    let good = format!(
        "[recipes](recipes.md#name-patterns)\n\n{fence}toml\n[optim]\nkind = \"adamw\"\nlr = 3e-3\nbetas = [0.9, 0.99]\n{fence}\n\n\
         {fence}sh\ntrainer validate configs/quickstart.toml --set train.max_steps=100\n{fence}\n\n\
         {fence}sh\ntrainer validate configs/quickstart.toml --set data.seq_len=1024\n{fence}\n\n\
         {fence}text\nerror: --set data.seq_len=1024: data.seq_len: seq_len (1024) must not exceed ...\n{fence}\n\n\
         <!-- doc-test: example (needs Slurm) -->\n{fence}sh\nsrun trainer run x.toml\n{fence}\n"
    );
    let report = check(&good);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        (
            report.fragments,
            report.commands,
            report.expected_outputs,
            report.not_run.len()
        ),
        (1, 2, 1, 1)
    );
}

#[test]
fn markers_and_wildcards_parse() {
    assert_eq!(
        parse_marker("<!-- doc-test: example (needs a GPU) -->"),
        Ok(Marker::NotRun {
            word: "example".into(),
            reason: "needs a GPU".into()
        })
    );
    assert_eq!(
        parse_marker("<!-- doc-test: base without data.train, train.clip_grad_norm -->"),
        Ok(Marker::Base {
            file: None,
            without: vec!["data.train".into(), "train.clip_grad_norm".into()],
            set: vec![]
        })
    );
    assert_eq!(
        parse_marker("<!-- doc-test: base configs/x.toml --set model.max_seq_len=1024 -->"),
        Ok(Marker::Base {
            file: Some("configs/x.toml".into()),
            without: vec![],
            set: vec!["model.max_seq_len=1024".into()]
        })
    );
    assert!(matches_wildcard("error: a: ...: c", "error: a: b: c"));
    assert!(matches_wildcard("x ... y ... z", "x 1 y 2 z"));
    assert!(!matches_wildcard("error: a: ...: c", "error: a: b: d"));
    assert!(!matches_wildcard("exact", "exact!"));
    assert_eq!(
        slug("task = \"classify\" (image-classification recipes)"),
        "task--classify-image-classification-recipes"
    );
    assert_eq!(slug("One-shot: `trainer prune`"), "one-shot-trainer-prune");
    assert_eq!(
        command_lines("# a comment\ntrainer a \\\n  --b c   # why\n\ntrainer d\n"),
        vec![
            "trainer a    --b c   # why".to_string(),
            "trainer d".to_string()
        ]
    );
}
