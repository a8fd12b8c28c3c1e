//! The tools that check `deploy/` (tests/tests/monitoring.rs runs them): Prometheus'
//! `promtool` and Alertmanager's `amtool` from Debian's packages, and their servers
//! (`prometheus`, `prometheus-alertmanager`) for the end-to-end alert test, TypeScript with
//! Grafana's published dashboard types (`@grafana/schema`) from npm, and
//! `kubernetes-validate` (Kubernetes' schemas, bundled) from PyPI. The npm and PyPI ones
//! go into caches under the target directory; each is installed only when missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{step, target_dir};

/// Versions the checks were written against.
const TYPESCRIPT_VERSION: &str = "5.9.3";
const GRAFANA_SCHEMA_VERSION: &str = "13.2.3";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Environment variables that tell the tests where each tool is (the tests fall back
/// to `PATH` and to these same caches).
pub const PROMTOOL_ENV: &str = "BELAY_PROMTOOL";
pub const AMTOOL_ENV: &str = "BELAY_AMTOOL";
pub const GRAFANA_TOOLS_ENV: &str = "BELAY_GRAFANA_TOOLS";
pub const PYTHON_TOOLS_ENV: &str = "BELAY_PYTHON_TOOLS";
/// The Prometheus and Alertmanager servers the end-to-end alert test runs.
pub const PROMETHEUS_ENV: &str = "BELAY_PROMETHEUS";
pub const ALERTMANAGER_ENV: &str = "BELAY_ALERTMANAGER";

/// Every tool, installed when missing, as `(environment variable, path)` for the tests.
pub fn ensure_all() -> Result<Vec<(&'static str, PathBuf)>> {
    Ok(vec![
        (
            PROMTOOL_ENV,
            ensure_debian_tool("promtool", "prometheus", PROMTOOL_ENV)?,
        ),
        (
            AMTOOL_ENV,
            ensure_debian_tool("amtool", "prometheus-alertmanager", AMTOOL_ENV)?,
        ),
        (
            PROMETHEUS_ENV,
            ensure_debian_tool("prometheus", "prometheus", PROMETHEUS_ENV)?,
        ),
        // Debian names Alertmanager's server after its package.
        (
            ALERTMANAGER_ENV,
            ensure_debian_tool(
                "prometheus-alertmanager",
                "prometheus-alertmanager",
                ALERTMANAGER_ENV,
            )?,
        ),
        (GRAFANA_TOOLS_ENV, ensure_grafana_tools()?),
        (PYTHON_TOOLS_ENV, ensure_python_tools()?),
    ])
}

/// `program` from `env` when set, else from `PATH`, else installed with apt-get (as
/// root). `--no-install-recommends`: the tests need the program, not the exporters and
/// web assets Debian recommends beside it.
fn ensure_debian_tool(program: &str, package: &str, env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        anyhow::ensure!(path.is_file(), "{env}={} is not a file", path.display());
        return Ok(path);
    }
    if let Some(path) = on_path(program) {
        return Ok(path);
    }
    if !belay_testkit::running_as_root() {
        bail!(
            "{program} not found (the tests check deploy/ with it); install it with `sudo \
             apt-get install {package}`, or set {env} to its path"
        );
    }
    step(Command::new("apt-get").arg("update"))?;
    step(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    on_path(program)
        .with_context(|| format!("{program} still missing after `apt-get install {package}`"))
}

fn on_path(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// A directory whose node_modules holds `typescript` and `@grafana/schema`.
fn ensure_grafana_tools() -> Result<PathBuf> {
    let dir = match std::env::var_os(GRAFANA_TOOLS_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => target_dir().join("tools/grafana"),
    };
    let tsc = dir.join("node_modules/typescript/bin/tsc");
    let schema = dir.join("node_modules/@grafana/schema/package.json");
    if tsc.is_file() && installed_version(&schema).as_deref() == Some(GRAFANA_SCHEMA_VERSION) {
        return Ok(dir);
    }
    crate::tools::ensure_npm()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    step(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(format!("typescript@{TYPESCRIPT_VERSION}"))
            .arg(format!("@grafana/schema@{GRAFANA_SCHEMA_VERSION}")),
    )?;
    anyhow::ensure!(
        tsc.is_file() && schema.is_file(),
        "npm installed typescript and @grafana/schema but {} or {} is missing",
        tsc.display(),
        schema.display()
    );
    Ok(dir)
}

/// The `version` of an npm package.json, if it can be read.
fn installed_version(package_json: &Path) -> Option<String> {
    let text = std::fs::read_to_string(package_json).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["version"].as_str().map(str::to_owned)
}

/// A Python virtual environment with `kubernetes-validate` (and PyYAML, its
/// dependency, which the tests also use to read the YAML files).
fn ensure_python_tools() -> Result<PathBuf> {
    let dir = match std::env::var_os(PYTHON_TOOLS_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => target_dir().join("tools/python"),
    };
    let validate = dir.join("bin/kubernetes-validate");
    let marker = dir.join(format!(
        "kubernetes-validate-{KUBERNETES_VALIDATE_VERSION}.installed"
    ));
    if validate.is_file() && marker.is_file() {
        return Ok(dir);
    }
    let python = on_path("python3").context(
        "python3 not found (the tests validate deploy/kubernetes with kubernetes-validate from \
         PyPI); install it with `sudo apt-get install python3 python3-venv`",
    )?;
    step(Command::new(&python).args(["-m", "venv"]).arg(&dir))?;
    step(
        Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            )),
    )?;
    anyhow::ensure!(
        validate.is_file(),
        "pip installed kubernetes-validate but {} is missing",
        validate.display()
    );
    std::fs::write(&marker, "").with_context(|| format!("writing {}", marker.display()))?;
    Ok(dir)
}
