//! Running host commands: quietly (output shown only on failure), capturing, or teeing stdout to the user while
//! keeping a copy for parsing.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;

use anyhow::{Context, Result, bail};

/// Runs `cmd` and returns its stdout; fails (with stderr) when it exits non-zero.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} exited with {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with its output captured; on failure the output goes into the error so the user sees why.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} exited with {}:\n{}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `cmd` with stdout copied to our stdout as it arrives and also returned; stderr is inherited.
pub fn run_tee(cmd: &mut Command) -> Result<(ExitStatus, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    let stdout = child.stdout.take().context("child stdout was not piped")?;
    let copier = thread::spawn(move || tee(stdout, std::io::stdout()));
    let status = child.wait()?;
    let captured = copier
        .join()
        .map_err(|_| anyhow::anyhow!("output copier panicked"))??;
    Ok((status, String::from_utf8_lossy(&captured).into_owned()))
}

/// Copies `from` to `to` chunk by chunk (flushing each, so progress shows live) and returns everything read.
pub fn tee(mut from: impl Read, mut to: impl Write) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(all),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        all.extend_from_slice(&buf[..n]);
        // A closed stdout (e.g. `| head`) must not stop the child from being drained.
        let _ = to.write_all(&buf[..n]).and_then(|()| to.flush());
    }
}

/// A short human description of a command for messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}
