//! Running external tools and reporting their failures.

use std::process::Command;

/// Errors from the test helpers. Messages include the command line and its stderr.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// The program could not be started.
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The program exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The output could not be understood.
    #[error("cannot parse the output of `{command}`: {detail}")]
    Parse {
        /// The command line.
        command: String,
        /// What was wrong.
        detail: String,
    },
    /// A child process could not be checked on or signalled.
    #[error("{action}: {source}")]
    Process {
        /// What was being done.
        action: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Renders a command line for messages.
pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `command` to completion and returns its stdout; a non-zero exit is an error.
///
/// ```
/// use std::process::Command;
/// let mut echo = Command::new("echo");
/// echo.arg("hi");
/// assert_eq!(can_dra_testkit::run(&mut echo).unwrap(), "hi\n");
/// ```
pub fn run(command: &mut Command) -> Result<String, TestkitError> {
    let line = describe(command);
    let output = command.output().map_err(|source| TestkitError::Spawn {
        command: line.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(TestkitError::Failed {
            command: line,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_carry_the_command_and_stderr() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo oops >&2; exit 3"]);
        let error = run(&mut command).unwrap_err().to_string();
        assert!(error.contains("sh -c"), "{error}");
        assert!(error.contains("oops"), "{error}");
    }

    #[test]
    fn missing_programs_are_spawn_errors() {
        let error = run(&mut Command::new("/nonexistent/tool")).unwrap_err();
        assert!(matches!(error, TestkitError::Spawn { .. }), "{error}");
    }
}
