//! Capturing frames with `candump -L` and sending them with `cansend`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::command::{TestkitError, describe, run};
use crate::namespace::Namespace;

/// One frame as `candump -L` logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedFrame {
    /// The interface it was received on.
    pub interface: String,
    /// The identifier, without flag bits.
    pub id: u32,
    /// 29-bit identifier (logged with 8 hex digits).
    pub extended: bool,
    /// A CAN FD frame (logged with `##`).
    pub fd: bool,
    /// The FD flags nibble (BRS 1, ESI 2); 0 for Classic frames.
    pub fd_flags: u8,
    /// A remote (RTR) frame.
    pub remote: bool,
    /// The payload.
    pub data: Vec<u8>,
}

impl CapturedFrame {
    /// Parses one `candump -L` line: `(1700000000.000000) can0 123#DEADBEEF`,
    /// `... 12345678#R`, `... 123##1AABB`.
    ///
    /// ```
    /// use can_dra_testkit::CapturedFrame;
    /// let frame = CapturedFrame::parse_log_line("(1.000000) vcan0 123##1AABB").unwrap();
    /// assert_eq!((frame.id, frame.fd, frame.data), (0x123, true, vec![0xaa, 0xbb]));
    /// ```
    pub fn parse_log_line(line: &str) -> Option<Self> {
        let mut parts = line.split_whitespace();
        let _timestamp = parts.next().filter(|t| t.starts_with('('))?;
        let interface = parts.next()?.to_string();
        let (id_text, rest) = parts.next()?.split_once('#')?;
        let id = u32::from_str_radix(id_text, 16).ok()?;
        let extended = id_text.len() == 8;
        let (fd, fd_flags, payload) = match rest.strip_prefix('#') {
            Some(fd_rest) => {
                let mut chars = fd_rest.chars();
                let flags = chars.next()?.to_digit(16)?;
                (true, u8::try_from(flags).ok()?, chars.as_str())
            }
            None => (false, 0, rest),
        };
        let remote = !fd && payload.starts_with('R');
        let data = if remote {
            Vec::new()
        } else {
            decode_hex(payload)?
        };
        Some(Self {
            interface,
            id: id & if extended { 0x1fff_ffff } else { 0x7ff },
            extended,
            fd,
            fd_flags,
            remote,
            data,
        })
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    // cansend accepts '.' separators; candump never prints them, but be lenient.
    let digits: Vec<u8> = text.bytes().filter(|&b| b != b'.').collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(pair, 16).ok()
        })
        .collect()
}

/// A running `candump -L` on one interface of a namespace.
///
/// [`Candump::start`] returns once candump's socket is registered with the kernel, so frames
/// sent afterwards are captured. candump runs under `stdbuf -oL`, so lines are visible while
/// it runs and [`Candump::wait_for`] can wait for an expected number of frames.
#[derive(Debug)]
pub struct Candump {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    command: String,
}

/// How long to wait for candump to register its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the capture must stay quiet before [`Candump::stop`] ends it.
const SETTLE: Duration = Duration::from_millis(300);

impl Candump {
    /// Starts `candump -L INTERFACE` inside `ns`.
    pub fn start(ns: &dyn Namespace, interface: &str) -> Result<Self, TestkitError> {
        let baseline = receivers(ns, interface)?;
        let mut command = ns.command("stdbuf");
        command
            .args(["-oL", "candump", "-L", interface])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let line = describe(&command);
        let mut child = command.spawn().map_err(|source| TestkitError::Spawn {
            command: line.clone(),
            source,
        })?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        // Drain stdout continuously so a busy capture never blocks candump on a full pipe.
        let reader = child.stdout.take().map(|stdout| {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut lines) = lines.lock() {
                        lines.push(line);
                    }
                }
            })
        });
        let mut dump = Self {
            child,
            lines,
            reader,
            command: line,
        };
        dump.wait_ready(ns, interface, baseline)?;
        Ok(dump)
    }

    fn wait_ready(
        &mut self,
        ns: &dyn Namespace,
        interface: &str,
        baseline: Option<usize>,
    ) -> Result<(), TestkitError> {
        let Some(baseline) = baseline else {
            // No /proc/net/can (CAN procfs disabled): fall back to a generous pause.
            std::thread::sleep(Duration::from_millis(500));
            return Ok(());
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(TestkitError::Failed {
                    command: self.command.clone(),
                    status,
                    stderr: "exited before capturing".to_string(),
                });
            }
            if receivers(ns, interface)?.unwrap_or(0) > baseline {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(TestkitError::Timeout(format!(
            "`{}` did not open its socket within {READY_TIMEOUT:?}",
            self.command
        )))
    }

    /// The frames captured so far.
    pub fn frames(&self) -> Vec<CapturedFrame> {
        self.lines
            .lock()
            .map(|lines| {
                lines
                    .iter()
                    .filter_map(|line| CapturedFrame::parse_log_line(line))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until at least `count` frames are captured or `timeout` passes; returns how many
    /// were captured.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let captured = self.line_count();
            if captured >= count || Instant::now() >= deadline {
                return captured;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn line_count(&self) -> usize {
        self.lines.lock().map(|lines| lines.len()).unwrap_or(0)
    }

    /// Waits until nothing new arrives for a moment (so late duplicates are caught too), stops
    /// candump and returns every captured frame.
    pub fn stop(mut self) -> Result<Vec<CapturedFrame>, TestkitError> {
        let mut seen = self.line_count();
        let mut quiet_since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(10);
        while quiet_since.elapsed() < SETTLE && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.line_count();
            if now != seen {
                seen = now;
                quiet_since = Instant::now();
            }
        }
        self.finish();
        Ok(self.frames())
    }

    fn finish(&mut self) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Candump {
    fn drop(&mut self) {
        if self.reader.is_some() {
            self.finish();
        }
    }
}

/// The `/proc/net/can/rcvlist_all` rows for `interface` in `ns`: `None` without CAN procfs.
fn receiver_rows(
    ns: &dyn Namespace,
    interface: &str,
) -> Result<Option<Vec<Vec<String>>>, TestkitError> {
    let mut command = ns.command("cat");
    command.arg("/proc/net/can/rcvlist_all");
    let Ok(text) = run(&mut command) else {
        return Ok(None);
    };
    Ok(Some(
        text.lines()
            .map(|line| {
                line.split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|fields| fields.first().map(String::as_str) == Some(interface))
            .collect(),
    ))
}

/// How many receive-all sockets (candump without filters) are bound to `interface`.
fn receivers(ns: &dyn Namespace, interface: &str) -> Result<Option<usize>, TestkitError> {
    Ok(receiver_rows(ns, interface)?.map(|rows| rows.len()))
}

/// Sends one frame with `cansend INTERFACE FRAME` inside `ns` (`123#DEADBEEF`, `123##1AABB`).
pub fn cansend(ns: &dyn Namespace, interface: &str, frame: &str) -> Result<(), TestkitError> {
    let mut command = ns.command("cansend");
    command.args([interface, frame]);
    run(&mut command).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_extended_remote_and_fd_lines_parse() {
        let classic =
            CapturedFrame::parse_log_line("(1700000000.123456) can0 123#DEADBEEF").unwrap();
        assert_eq!(classic.interface, "can0");
        assert_eq!(classic.id, 0x123);
        assert!(!classic.extended && !classic.fd && !classic.remote);
        assert_eq!(classic.data, vec![0xde, 0xad, 0xbe, 0xef]);

        let empty = CapturedFrame::parse_log_line("(1.0) vcan0 7FF#").unwrap();
        assert_eq!((empty.id, empty.data.len()), (0x7ff, 0));

        let extended = CapturedFrame::parse_log_line("(1.0) vcan0 1ABCDEF0#R").unwrap();
        assert!(extended.extended && extended.remote);
        assert_eq!(extended.id, 0x1abc_def0);

        let fd =
            CapturedFrame::parse_log_line("(1.0) vxh 00000042##3000102030405060708090A0B0C0D0E0F")
                .unwrap();
        assert!(fd.fd && fd.extended);
        assert_eq!(fd.fd_flags, 3);
        assert_eq!(fd.data, (0u8..16).collect::<Vec<_>>());
    }

    #[test]
    fn garbage_lines_are_skipped() {
        for line in [
            "",
            "can0 123#00",
            "(1.0) can0",
            "(1.0) can0 xyz#00",
            "(1.0) can0 123#0",
            "(1.0) can0 123##",
        ] {
            assert_eq!(CapturedFrame::parse_log_line(line), None, "{line:?}");
        }
    }
}
