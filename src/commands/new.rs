//! `sluice new NAME`: a function folder from a template, declared in a
//! pipeline file, ready for `sluice invoke` (what `sam init` and `cargo
//! lambda new` do for Lambda).
//!
//! Templates: `python` (a handler to edit, `handler.py`, and the Runtime
//! API loop of `examples/functions/python`, which needs nothing but the
//! host's `python3`), `node` (`index.mjs` with an async handler, and the
//! Runtime API loop of `examples/functions/node`, which needs nothing but
//! the host's `node`), `shell` (bash and curl, `examples/functions/shell`)
//! and `rust` (a cargo project on the official `lambda_runtime`, built at
//! once with its `build.sh`; the pipeline runs `target/lambda/NAME/`, where
//! `cargo lambda build` puts the `bootstrap` too). The runtime loops are the
//! examples' files themselves, built into the binary, so they cannot drift
//! apart.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use sluice_pipeline::Pipeline;

use crate::exit;

/// A function template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// `handler.py` with `def handler(event, context)`, run by a Runtime
    /// API loop in Python's standard library.
    Python,
    /// `index.mjs` with `export const handler = async (event, context)`,
    /// run by a Runtime API loop in Node's standard library.
    Node,
    /// A bash `bootstrap` that talks to the Runtime API with curl.
    Shell,
    /// A cargo project with `lambda_runtime`, built by its `build.sh`
    /// (needs cargo; the first build fetches and compiles the runtime's
    /// crates).
    Rust,
}

/// One file of a template: name, contents, whether it is executable.
type TemplateFile = (&'static str, &'static str, bool);

/// Cargo's names for the Rust template: `{{name}}` in its files.
const NAME_SLOT: &str = "{{name}}";

impl Template {
    /// The files, with `{{name}}` replaced by the function's name.
    fn files_for(self, name: &str) -> Vec<(&'static str, String, bool)> {
        self.files()
            .iter()
            .map(|(file, text, executable)| (*file, text.replace(NAME_SLOT, name), *executable))
            .collect()
    }

    fn files(self) -> &'static [TemplateFile] {
        match self {
            Template::Python => &[
                (
                    "bootstrap",
                    include_str!("../../examples/functions/python/bootstrap"),
                    true,
                ),
                (
                    "handler.py",
                    include_str!("../templates/python/handler.py"),
                    false,
                ),
            ],
            Template::Node => &[
                (
                    "bootstrap",
                    include_str!("../../examples/functions/node/bootstrap"),
                    true,
                ),
                (
                    "index.mjs",
                    include_str!("../templates/node/index.mjs"),
                    false,
                ),
            ],
            Template::Shell => &[(
                "bootstrap",
                include_str!("../../examples/functions/shell/bootstrap"),
                true,
            )],
            Template::Rust => &[
                (
                    "Cargo.toml",
                    include_str!("../templates/rust/Cargo.toml.in"),
                    false,
                ),
                (
                    "src/main.rs",
                    include_str!("../templates/rust/src/main.rs.in"),
                    false,
                ),
                (
                    "build.sh",
                    include_str!("../templates/rust/build.sh.in"),
                    true,
                ),
                (
                    ".gitignore",
                    include_str!("../templates/rust/gitignore.in"),
                    false,
                ),
            ],
        }
    }

    /// The function folder the pipeline names: the template's folder, or
    /// for Rust the build's output in it.
    fn function_dir(self, folder: &Path, name: &str) -> PathBuf {
        match self {
            Template::Python | Template::Node | Template::Shell => folder.to_path_buf(),
            Template::Rust => folder.join("target").join("lambda").join(name),
        }
    }

    /// Whether `name` suits the template (cargo refuses some package names).
    fn check_name(self, name: &str) -> Result<(), String> {
        const RESERVED: &[&str] = &["alloc", "core", "proc-macro", "proc_macro", "std", "test"];
        if self == Template::Rust
            && (!name.starts_with(|c: char| c.is_ascii_alphabetic()) || RESERVED.contains(&name))
        {
            return Err(format!(
                "{name:?} cannot name a cargo package: the rust template needs a name that \
                 starts with a letter and is not one of {}",
                RESERVED.join(", ")
            ));
        }
        Ok(())
    }

    /// Extra lines of its `[functions.NAME]` table.
    fn settings(self) -> &'static str {
        match self {
            Template::Python => "handler = \"handler.handler\"   # MODULE.FUNCTION in the folder\n",
            Template::Node => "handler = \"index.handler\"     # MODULE.FUNCTION in the folder\n",
            Template::Shell | Template::Rust => "",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Template::Python => "python",
            Template::Node => "node",
            Template::Shell => "shell",
            Template::Rust => "rust",
        }
    }
}

/// `path` as the pipeline file will name it: relative to the pipeline's
/// folder when inside it, else absolute.
fn path_in_pipeline(pipeline_dir: &Path, folder: &Path) -> String {
    let folder = fs::canonicalize(folder).unwrap_or_else(|_| folder.to_path_buf());
    let base = fs::canonicalize(pipeline_dir).unwrap_or_else(|_| pipeline_dir.to_path_buf());
    match folder.strip_prefix(&base) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
        _ => folder.display().to_string(),
    }
}

fn write_file(path: &Path, text: &str, executable: bool) -> std::io::Result<()> {
    fs::write(path, text)?;
    let mode = if executable { 0o755 } else { 0o644 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// What `new` checked before writing anything.
struct Plan {
    folder: PathBuf,
    pipeline: PathBuf,
    /// The pipeline file's text before (`None`: it does not exist yet).
    before: Option<String>,
}

fn plan(
    name: &str,
    template: Template,
    dir: Option<PathBuf>,
    pipeline: PathBuf,
) -> Result<Plan, String> {
    sluice_pipeline::check_name(name).map_err(|e| format!("function name: {e}"))?;
    template.check_name(name)?;
    let before = match fs::read_to_string(&pipeline) {
        Ok(text) => {
            let p = Pipeline::load(&pipeline).map_err(|e| e.to_string())?;
            if p.functions.contains_key(name) {
                return Err(format!(
                    "{} already declares [functions.{name}] (choose another name, or edit it there)",
                    pipeline.display()
                ));
            }
            Some(text)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("reading {}: {e}", pipeline.display())),
    };
    let pipeline_dir = pipeline
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let folder = dir.unwrap_or_else(|| pipeline_dir.join("functions").join(name));
    if fs::read_dir(&folder).is_ok_and(|mut d| d.next().is_some()) {
        return Err(format!(
            "{} exists and is not empty: give another folder with --dir",
            folder.display()
        ));
    }
    Ok(Plan {
        folder,
        pipeline,
        before,
    })
}

/// Write the folder and the pipeline table; on a failure, undo both.
fn create(name: &str, template: Template, plan: &Plan) -> Result<(), String> {
    let folder_existed = plan.folder.exists();
    let undo = |e: String| {
        if !folder_existed {
            let _ = fs::remove_dir_all(&plan.folder);
        }
        match &plan.before {
            Some(text) => {
                let _ = fs::write(&plan.pipeline, text);
            }
            None => {
                let _ = fs::remove_file(&plan.pipeline);
            }
        }
        e
    };
    fs::create_dir_all(&plan.folder)
        .map_err(|e| format!("creating {}: {e}", plan.folder.display()))?;
    for (file, text, executable) in template.files_for(name) {
        let path = plan.folder.join(file);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| undo(format!("creating {}: {e}", parent.display())))?;
        }
        write_file(&path, &text, executable)
            .map_err(|e| undo(format!("writing {}: {e}", path.display())))?;
    }
    if template == Template::Rust {
        build(&plan.folder).map_err(undo)?;
    }
    let pipeline_dir = plan
        .pipeline
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut table = String::new();
    if plan.before.as_deref().is_some_and(|t| !t.is_empty()) {
        table.push('\n');
    }
    table.push_str(&format!(
        "[functions.{name}]\npath = {:?}\n{}",
        path_in_pipeline(pipeline_dir, &template.function_dir(&plan.folder, name)),
        template.settings()
    ));
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&plan.pipeline)
        .map_err(|e| undo(format!("opening {}: {e}", plan.pipeline.display())))?;
    if plan
        .before
        .as_deref()
        .is_some_and(|t| !t.is_empty() && !t.ends_with('\n'))
    {
        table.insert(0, '\n');
    }
    file.write_all(table.as_bytes())
        .map_err(|e| undo(format!("writing {}: {e}", plan.pipeline.display())))?;
    drop(file);
    // The result must load: a template that does not would be sluice's bug.
    Pipeline::load(&plan.pipeline)
        .map_err(|e| undo(format!("the new pipeline does not load: {e}")))?;
    Ok(())
}

/// Runs a Rust template's `build.sh`, cargo's output going to the terminal.
fn build(folder: &Path) -> Result<(), String> {
    let script = folder.join("build.sh");
    crate::log_note!("building {} (cargo build --release)", folder.display());
    match std::process::Command::new("bash").arg(&script).status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!(
            "{} failed ({s}): nothing was created; fix what cargo says (is cargo installed, \
             can it reach crates.io?) and run `sluice new` again",
            script.display()
        )),
        Err(e) => Err(format!("running {}: {e}", script.display())),
    }
}

/// Create function `name` from `template`.
pub fn run(name: &str, template: Template, dir: Option<PathBuf>, pipeline: PathBuf) -> u8 {
    let plan = match plan(name, template, dir, pipeline) {
        Ok(p) => p,
        Err(e) => {
            crate::log_error!("{e}");
            return exit::USAGE;
        }
    };
    if let Err(e) = create(name, template, &plan) {
        crate::log_error!("{e}");
        return exit::INVOKE_FAILED;
    }
    let files: Vec<&str> = template.files().iter().map(|f| f.0).collect();
    println!(
        "created {} ({} function: {}) and [functions.{name}] in {}",
        plan.folder.display(),
        template.name(),
        files.join(", "),
        plan.pipeline.display()
    );
    println!(
        "try it: sluice invoke --pipeline {} {name} --payload '{{\"hello\": \"world\"}}'",
        plan.pipeline.display()
    );
    if template == Template::Rust {
        println!(
            "after editing src/main.rs: {}",
            plan.folder.join("build.sh").display()
        );
    }
    exit::OK
}
