//! Senders and receivers on SocketCAN sockets inside the demo's namespaces.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use can_dra_dataplane::netns::Netns;
use socketcan::{CanFrame, CanSocket, EmbeddedFrame, Frame, Socket, StandardId};

/// One frame seen by a receiver.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// The CAN id.
    pub id: u32,
    /// The sequence number carried in the payload.
    pub sequence: u32,
    /// When it was read.
    pub at: Instant,
}

/// A socket reading frames on a thread until stopped.
#[derive(Debug)]
pub struct Receiver {
    stop: Arc<AtomicBool>,
    last_frame: Arc<std::sync::Mutex<Instant>>,
    thread: JoinHandle<Vec<Seen>>,
}

fn open(netns: &Netns, interface: &str) -> anyhow::Result<CanSocket> {
    let name = interface.to_string();
    netns
        .run(move || CanSocket::open(&name))?
        .with_context(|| format!("opening a CAN socket on {interface} in {}", netns.label()))
}

/// Starts reading every frame that arrives on `interface` in `netns`.
pub fn listen(netns: &Netns, interface: &str) -> anyhow::Result<Receiver> {
    let socket = open(netns, interface)?;
    socket.set_read_timeout(Duration::from_millis(50))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let last_frame = Arc::new(std::sync::Mutex::new(Instant::now()));
    let last_seen = last_frame.clone();
    let thread = std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stopping.load(Ordering::Relaxed) {
            if let Ok(frame) = socket.read_frame() {
                let data = frame.data();
                let sequence = data
                    .get(1..5)
                    .and_then(|bytes| bytes.try_into().ok())
                    .map_or(u32::MAX, u32::from_le_bytes);
                let at = Instant::now();
                seen.push(Seen {
                    id: frame.raw_id(),
                    sequence,
                    at,
                });
                if let Ok(mut last) = last_seen.lock() {
                    *last = at;
                }
            }
        }
        seen
    });
    Ok(Receiver {
        stop,
        last_frame,
        thread,
    })
}

impl Receiver {
    /// When the last frame arrived (or when listening started).
    pub fn last_frame(&self) -> Instant {
        self.last_frame
            .lock()
            .map_or_else(|_| Instant::now(), |last| *last)
    }

    /// Stops reading and returns what was seen.
    pub fn finish(self) -> anyhow::Result<Vec<Seen>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("a receiver thread panicked"))
    }
}

/// Sends `count` frames with `id`, numbered from 0, `gap` apart (back to back when zero,
/// waiting whenever the queue is full). Returns the send time of each sequence number.
pub fn send(
    netns: &Netns,
    interface: &str,
    id: u16,
    count: u32,
    gap: Duration,
) -> anyhow::Result<Vec<Instant>> {
    let socket = open(netns, interface)?;
    let can_id = StandardId::new(id).ok_or_else(|| anyhow!("0x{id:x} is not a standard id"))?;
    let mut sent = Vec::with_capacity(count as usize);
    for sequence in 0..count {
        let mut data = [0u8; 8];
        data[0] = 0xCA;
        data[1..5].copy_from_slice(&sequence.to_le_bytes());
        let frame = CanFrame::new(can_id, &data).ok_or_else(|| anyhow!("building a frame"))?;
        let started = Instant::now();
        loop {
            match socket.write_frame(&frame) {
                Ok(()) => break,
                // A shaped or full queue pushes back: wait, as a real sender on a busy bus would.
                Err(error) if error.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) => {
                    if started.elapsed() > Duration::from_secs(5) {
                        return Err(anyhow!("{interface}: queue stayed full for 5 s"));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(error) => {
                    return Err(error).with_context(|| format!("sending on {interface}"));
                }
            }
        }
        sent.push(Instant::now());
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    Ok(sent)
}
