//! Test results: parsing libtest's `test result:` lines, adding them up per stage, and the final report
//! (a per-stage table and one `summary:` line).

use std::fmt::Write as _;
use std::ops::AddAssign;
use std::time::Duration;

/// The counts of one or more libtest runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tests that ran and passed.
    pub passed: u64,
    /// Tests that ran and failed.
    pub failed: u64,
    /// Tests marked `#[ignore]` (or ignored doctests) that did not run.
    pub ignored: u64,
    /// Benchmarks measured.
    pub measured: u64,
    /// Tests left out by a name filter.
    pub filtered_out: u64,
    /// How many `test result:` lines were added up.
    pub runs: u64,
}

impl AddAssign for Counts {
    fn add_assign(&mut self, other: Self) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.measured += other.measured;
        self.filtered_out += other.filtered_out;
        self.runs += other.runs;
    }
}

/// Parses one libtest summary line, e.g.
/// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`.
///
/// Colour escapes (a test binary writing to a terminal) are ignored.
pub fn parse_line(line: &str) -> Option<Counts> {
    let line = strip_ansi(line);
    let rest = &line[line.find("test result: ")? + "test result: ".len()..];
    let (_status, fields) = rest.split_once(". ")?;
    let mut counts = Counts {
        runs: 1,
        ..Counts::default()
    };
    let mut seen = false;
    for field in fields.split(';') {
        let mut words = field.split_whitespace();
        let Some(Ok(n)) = words.next().map(str::parse::<u64>) else {
            continue;
        };
        let slot = match words.next() {
            Some("passed") => &mut counts.passed,
            Some("failed") => &mut counts.failed,
            Some("ignored") => &mut counts.ignored,
            Some("measured") => &mut counts.measured,
            Some("filtered") => &mut counts.filtered_out,
            _ => continue,
        };
        *slot = n;
        seen = true;
    }
    seen.then_some(counts)
}

/// Adds up every `test result:` line in `output`.
pub fn parse_output(output: &str) -> Counts {
    let mut total = Counts::default();
    for counts in output.lines().filter_map(parse_line) {
        total += counts;
    }
    total
}

/// Removes ANSI CSI escape sequences (`ESC [ ... final`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, up to the final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// How a stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Ran and everything passed.
    Passed,
    /// Ran, but something failed (a lint, a test, the command itself), or it could not run.
    Failed,
    /// Not run in this invocation (by flag).
    NotRun,
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Stage {
    /// What the stage was, e.g. `unit tests` or `kernel tests (vm)`.
    pub name: String,
    /// How it ended.
    pub status: Status,
    /// Test counts, for stages that run tests.
    pub counts: Option<Counts>,
    /// Wall time.
    pub elapsed: Duration,
    /// Whether the stage runs the kernel tests (their ignored counterparts in other stages are not skipped).
    pub kernel: bool,
    /// Why it failed or did not run, or what is worth knowing (mode, boot time).
    pub note: String,
}

/// The totals of a whole suite run, for the `summary:` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Tests that passed in any stage.
    pub passed: u64,
    /// Tests that failed in any stage.
    pub failed: u64,
    /// Ignored tests that no stage ran.
    pub skipped: u64,
}

/// Adds up the stages. Kernel tests appear as ignored in the unit-test stage and run in the kernel stage, so each
/// test the kernel stage ran is taken off the ignored count; what remains was skipped.
pub fn totals(stages: &[Stage]) -> Totals {
    let mut all = Counts::default();
    let mut ran_by_kernel_stage = 0;
    for stage in stages {
        if let Some(counts) = stage.counts {
            all += counts;
            if stage.kernel {
                ran_by_kernel_stage += counts.passed + counts.failed;
            }
        }
    }
    Totals {
        passed: all.passed,
        failed: all.failed,
        skipped: all.ignored.saturating_sub(ran_by_kernel_stage),
    }
}

/// True when every stage that ran passed and at least one did.
pub fn succeeded(stages: &[Stage]) -> bool {
    stages.iter().all(|s| s.status != Status::Failed)
        && stages.iter().any(|s| s.status == Status::Passed)
}

/// The report: a table with one row per stage, then the `summary:` line.
pub fn render(stages: &[Stage]) -> String {
    let width = stages
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:<8} {:>7} {:>7} {:>8} {:>9}  note",
        "stage", "result", "passed", "failed", "ignored", "time"
    );
    for stage in stages {
        let result = match stage.status {
            Status::Passed => "ok",
            Status::Failed => "FAILED",
            Status::NotRun => "not run",
        };
        let num = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let counts = stage.counts;
        let time = if stage.status == Status::NotRun {
            "-".to_owned()
        } else {
            format!("{:.1}s", stage.elapsed.as_secs_f64())
        };
        let row = format!(
            "{:<width$}  {:<8} {:>7} {:>7} {:>8} {:>9}  {}",
            stage.name,
            result,
            num(counts.map(|c| c.passed)),
            num(counts.map(|c| c.failed)),
            num(counts.map(|c| c.ignored)),
            time,
            stage.note
        );
        let _ = writeln!(out, "{}", row.trim_end());
    }
    let totals = totals(stages);
    let _ = writeln!(
        out,
        "summary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.skipped
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(passed: u64, failed: u64, ignored: u64) -> Counts {
        Counts {
            passed,
            failed,
            ignored,
            runs: 1,
            ..Counts::default()
        }
    }

    fn stage(name: &str, status: Status, c: Option<Counts>, kernel: bool) -> Stage {
        Stage {
            name: name.into(),
            status,
            counts: c,
            elapsed: Duration::from_millis(1500),
            kernel,
            note: String::new(),
        }
    }

    #[test]
    fn libtest_lines_are_parsed() {
        let ok = "test result: ok. 12 passed; 0 failed; 3 ignored; 0 measured; 2 filtered out; finished in 0.31s";
        assert_eq!(
            parse_line(ok),
            Some(Counts {
                passed: 12,
                ignored: 3,
                filtered_out: 2,
                runs: 1,
                ..Counts::default()
            })
        );
        let failed = "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s";
        assert_eq!(parse_line(failed), Some(counts(1, 2, 0)));
        assert_eq!(parse_line("running 3 tests"), None);
        assert_eq!(parse_line("test foo ... ok"), None);
    }

    #[test]
    fn coloured_and_console_lines_are_parsed() {
        let line = "test result: \u{1b}[32mok\u{1b}[0m. 4 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s\r";
        assert_eq!(parse_line(line), Some(counts(4, 0, 1)));
    }

    #[test]
    fn output_totals_add_every_binary() {
        let output = "\
running 2 tests
test a ... ok
test b ... ignored
test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s

running 0 tests
test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

running 3 tests
test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.02s
";
        let total = parse_output(output);
        assert_eq!(
            (total.passed, total.failed, total.ignored, total.runs),
            (3, 1, 1, 3)
        );
    }

    #[test]
    fn kernel_tests_run_by_the_kernel_stage_are_not_skipped() {
        let stages = [
            stage("unit tests", Status::Passed, Some(counts(40, 0, 5)), false),
            stage(
                "kernel tests (vm)",
                Status::Passed,
                Some(counts(3, 1, 0)),
                true,
            ),
        ];
        assert_eq!(
            totals(&stages),
            Totals {
                passed: 43,
                failed: 1,
                skipped: 1
            }
        );
    }

    #[test]
    fn kernel_tests_count_as_skipped_when_their_stage_does_not_run() {
        let stages = [
            stage("unit tests", Status::Passed, Some(counts(40, 0, 5)), false),
            stage("kernel tests", Status::NotRun, None, true),
        ];
        assert_eq!(totals(&stages).skipped, 5);
        assert!(succeeded(&stages));
    }

    #[test]
    fn any_failed_stage_fails_the_run() {
        let stages = [
            stage("fmt", Status::Failed, None, false),
            stage("unit tests", Status::Passed, Some(counts(1, 0, 0)), false),
        ];
        assert!(!succeeded(&stages));
        assert!(!succeeded(&[stage(
            "unit tests",
            Status::NotRun,
            None,
            false
        )]));
    }

    #[test]
    fn report_ends_with_the_exact_summary_line() {
        let stages = [
            stage("clippy", Status::Passed, None, false),
            stage("unit tests", Status::Passed, Some(counts(7, 0, 2)), false),
            Stage {
                note: "1 test failed".into(),
                ..stage(
                    "kernel tests (vm)",
                    Status::Failed,
                    Some(counts(1, 1, 0)),
                    true,
                )
            },
        ];
        let report = render(&stages);
        let lines: Vec<_> = report.lines().collect();
        assert_eq!(
            lines.last(),
            Some(&"summary: 8 passed, 1 failed, 0 skipped")
        );
        assert_eq!(lines.len(), 5);
        assert!(lines[3].starts_with("kernel tests (vm)  FAILED"));
        assert!(lines[3].ends_with("1 test failed"));
    }
}
