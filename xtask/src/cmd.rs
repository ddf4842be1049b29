//! Running host tools (apt-get, mkfs.vfat, mtools, sgdisk, qemu-img...) with errors that say
//! what was run and what it printed, and that name `scripts/setup.sh` when a tool is missing.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Builds a command from a program and its arguments.
pub fn command<I, S>(program: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Describes a command for error messages: `prog arg arg`.
fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `c` with captured output; fails with its stderr unless it exits 0.
pub fn run(mut c: Command) -> Result<Output> {
    let what = describe(&c);
    c.stdin(Stdio::null());
    let out = match c.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "`{}` not found: run scripts/setup.sh (as root) to install the host tools",
                c.get_program().to_string_lossy()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("starting `{what}`")),
    };
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs `c` and returns its stdout as text.
pub fn stdout(c: Command) -> Result<String> {
    let out = run(c)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with a message naming `scripts/setup.sh` when `path` (a file a package ships) is absent.
pub fn require_file(path: &Path, package: &str) -> Result<()> {
    if !path.exists() {
        bail!(
            "{} is missing (package {package}): run scripts/setup.sh (as root)",
            path.display()
        );
    }
    Ok(())
}
