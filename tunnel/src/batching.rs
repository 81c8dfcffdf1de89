//! When frames read from CAN leave as a datagram: the batching policy of the CAN → peers
//! direction, as a small state machine without sockets or a clock of its own (the caller passes
//! the time), so every policy can be checked frame by frame.
//!
//! The caller reads frames from the CAN socket and, for each one:
//! 1. asks [`Batcher::sends_before`] whether the pending frames must leave first (the new frame
//!    would not fit their datagram), then
//! 2. adds it with [`Batcher::push`], which says whether the batch must leave now;
//!
//! and when the socket has nothing more to read it asks [`Batcher::idle`]: send now, or hold
//! until a deadline while reading on. After every send it calls [`Batcher::sent`].

use std::fmt;
use std::time::{Duration, Instant};

use crate::codec::{FRAME_HEADER_LEN, HEADER_LEN};

/// The window of the default policy.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(1);

/// Datagrams that are not full which [`Batching::Adaptive`] sends back to back before it paces
/// them to one per window: enough that a light stream whose frames come about a window apart,
/// with jitter, is never held.
pub const ADAPTIVE_BURST: u32 = 4;

/// How frames read from CAN are grouped into datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// The default. Datagrams that are not full are paced to one per `window` on average, with
    /// a burst of [`ADAPTIVE_BURST`] allowed (a token bucket, refilled one token per window).
    /// On a lightly loaded link a token is there, so a frame leaves as soon as the CAN socket has
    /// nothing more to read: light traffic waits for nothing. Under load the bucket is empty and
    /// frames are collected until the next token or until a datagram is full, whichever comes
    /// first. No frame waits longer than the window.
    Adaptive {
        /// Longest a frame waits; also the interval at which the pacing refills a token.
        window: Duration,
    },
    /// What was read leaves as soon as the CAN socket has nothing more to read (the default
    /// before adaptive batching): no added latency, but under load one small datagram per
    /// wake-up, which costs CPU on both ends and overflows the receiver's socket buffer first.
    Drain,
    /// Every batch waits `window` after its first frame, however light the traffic.
    Fixed {
        /// How long a batch waits after its first frame.
        window: Duration,
    },
}

impl Default for Batching {
    fn default() -> Self {
        Batching::Adaptive {
            window: DEFAULT_WINDOW,
        }
    }
}

impl Batching {
    /// The policy's window (zero for [`Batching::Drain`]).
    pub fn window(self) -> Duration {
        match self {
            Batching::Adaptive { window } | Batching::Fixed { window } => window,
            Batching::Drain => Duration::ZERO,
        }
    }
}

impl fmt::Display for Batching {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Batching::Adaptive { window } => write!(f, "adaptive {window:?}"),
            Batching::Drain => f.write_str("drain"),
            Batching::Fixed { window } => write!(f, "fixed {window:?}"),
        }
    }
}

/// What the caller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send the pending frames now.
    Send,
    /// Keep reading; send at this moment at the latest.
    HoldUntil(Instant),
    /// Keep reading: nothing is pending, or the batch may still grow.
    Read,
}

/// The batching state of one endpoint: what is pending and when the last datagram left.
#[derive(Debug, Clone)]
pub struct Batcher {
    policy: Batching,
    datagram_limit: usize,
    max_frames: usize,
    frames: usize,
    /// Encoded size of the pending frames plus one datagram header.
    bytes: usize,
    /// When the oldest pending frame was read.
    opened: Option<Instant>,
    /// The pacing of [`Batching::Adaptive`] (a generic cell rate algorithm): a datagram that is
    /// not full may leave at `paced - (ADAPTIVE_BURST - 1) * window` or later.
    paced: Option<Instant>,
}

impl Batcher {
    /// A batcher for datagrams of at most `datagram_limit` bytes and batches of at most
    /// `max_frames` frames (at least 1).
    pub fn new(policy: Batching, datagram_limit: usize, max_frames: usize) -> Self {
        Self {
            policy,
            datagram_limit,
            max_frames: max_frames.max(1),
            frames: 0,
            bytes: HEADER_LEN,
            opened: None,
            paced: None,
        }
    }

    /// The policy.
    pub fn policy(&self) -> Batching {
        self.policy
    }

    /// Frames pending.
    pub fn pending(&self) -> usize {
        self.frames
    }

    /// Whether the pending frames must be sent before a frame of `encoded_len` bytes joins
    /// them: under [`Batching::Adaptive`], when it would not fit their datagram. The other
    /// policies let the encoder split a batch over several datagrams.
    pub fn sends_before(&self, encoded_len: usize) -> bool {
        matches!(self.policy, Batching::Adaptive { .. })
            && self.frames > 0
            && self.bytes + encoded_len > self.datagram_limit
    }

    /// A frame of `encoded_len` bytes, read at `now`, joins the batch. [`Next::Send`] when the
    /// batch must leave now: it is full (frames, or a datagram under the adaptive policy), or
    /// its oldest frame has waited the whole window.
    pub fn push(&mut self, now: Instant, encoded_len: usize) -> Next {
        if self.frames == 0 {
            self.opened = Some(now);
        }
        self.frames += 1;
        self.bytes += encoded_len;
        if self.frames >= self.max_frames {
            return Next::Send;
        }
        let full = self.bytes + FRAME_HEADER_LEN > self.datagram_limit;
        // While the socket still has frames, they join the batch (that costs no latency) until
        // the oldest has waited the whole window; `idle` decides the rest.
        let waited_window = self
            .opened
            .is_some_and(|opened| opened + self.policy.window() <= now);
        match self.policy {
            Batching::Adaptive { .. } if full => Next::Send,
            Batching::Adaptive { .. } | Batching::Fixed { .. } if waited_window => Next::Send,
            _ => Next::Read,
        }
    }

    /// The CAN socket has nothing more to read at `now`: send, hold until a deadline, or (with
    /// nothing pending) just read on.
    pub fn idle(&self, now: Instant) -> Next {
        if self.frames == 0 {
            return Next::Read;
        }
        match self.due() {
            Some(due) if due > now => Next::HoldUntil(due),
            _ => Next::Send,
        }
    }

    /// The pending frames left at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.frames = 0;
        self.bytes = HEADER_LEN;
        self.opened = None;
        if let Batching::Adaptive { window } = self.policy {
            // One token per datagram. The cap keeps the next datagram at most a window away
            // even after a run of full ones (which do not wait for tokens).
            let paced = self.paced.map_or(now, |paced| paced.max(now)) + window;
            self.paced = Some(paced.min(now + window + self.tolerance(window)));
        }
    }

    /// When the pending frames must leave at the latest; `None` means "now" (nothing holds
    /// them back) or, with nothing pending, never.
    fn due(&self) -> Option<Instant> {
        let opened = self.opened?;
        match self.policy {
            Batching::Drain => None,
            Batching::Fixed { window } => Some(opened + window),
            Batching::Adaptive { window } => {
                let token = self
                    .paced
                    .and_then(|paced| paced.checked_sub(self.tolerance(window)));
                Some(
                    token
                        .map_or(opened, |token| token.max(opened))
                        .min(opened + window),
                )
            }
        }
    }

    /// How far ahead of its pace the adaptive policy may run: the burst, less one.
    fn tolerance(&self, window: Duration) -> Duration {
        window * (ADAPTIVE_BURST - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Encoder, Frame};

    const LIMIT: usize = 1472;
    const MS: Duration = Duration::from_millis(1);

    fn us(micros: u64) -> Duration {
        Duration::from_micros(micros)
    }

    fn frame(index: usize) -> Frame {
        Frame::classic(
            u32::try_from(index).unwrap() & 0x7ff,
            &(index as u64).to_le_bytes(),
        )
        .unwrap()
    }

    /// One datagram's worth of frames and when it left.
    #[derive(Debug)]
    struct Sent {
        at: Instant,
        frames: Vec<usize>,
    }

    /// Runs a batcher the way the endpoint does: frames arrive at the given offsets (a frame
    /// whose offset is not after the previous one's is already waiting in the socket when that
    /// one is read), the socket is drained, then the batcher decides. A hold ends at its
    /// deadline or when the next frame arrives, whichever comes first.
    fn simulate(policy: Batching, arrivals: &[Duration]) -> (Vec<Sent>, Instant) {
        let start = Instant::now();
        let mut batcher = Batcher::new(policy, LIMIT, 512);
        let mut pending: Vec<usize> = Vec::new();
        let mut out = Vec::new();
        let mut hold: Option<Instant> = None;
        let send = |batcher: &mut Batcher, pending: &mut Vec<usize>, out: &mut Vec<Sent>, at| {
            out.push(Sent {
                at,
                frames: std::mem::take(pending),
            });
            batcher.sent(at);
        };
        let mut index = 0;
        while index < arrivals.len() {
            let arrival = start + arrivals[index];
            if let Some(deadline) = hold.take()
                && deadline <= arrival
            {
                send(&mut batcher, &mut pending, &mut out, deadline);
            }
            // Read this frame and every frame already waiting at that moment.
            let now = arrival;
            loop {
                let len = frame(index).encoded_len();
                if batcher.sends_before(len) {
                    send(&mut batcher, &mut pending, &mut out, now);
                }
                pending.push(index);
                if batcher.push(now, len) == Next::Send {
                    send(&mut batcher, &mut pending, &mut out, now);
                }
                index += 1;
                if index >= arrivals.len() || start + arrivals[index] > now {
                    break;
                }
            }
            match batcher.idle(now) {
                Next::Send => send(&mut batcher, &mut pending, &mut out, now),
                Next::HoldUntil(deadline) => hold = Some(deadline),
                Next::Read => {}
            }
        }
        if let Some(deadline) = hold {
            send(&mut batcher, &mut pending, &mut out, deadline);
        }
        assert!(pending.is_empty(), "frames left behind: {pending:?}");
        (out, start)
    }

    /// Checks what holds under every policy: every frame leaves once and in order, and each
    /// send is non-empty. Returns the datagrams the batches encode to.
    fn check_order_and_count(sends: &[Sent], total: usize) -> usize {
        let order: Vec<usize> = sends.iter().flat_map(|s| s.frames.clone()).collect();
        assert_eq!(
            order,
            (0..total).collect::<Vec<_>>(),
            "lost, doubled or reordered"
        );
        assert!(sends.iter().all(|s| !s.frames.is_empty()), "an empty send");
        let mut encoder = Encoder::new(LIMIT).unwrap();
        sends
            .iter()
            .map(|s| {
                let frames: Vec<Frame> = s.frames.iter().map(|&i| frame(i)).collect();
                encoder.encode_all(&frames).len()
            })
            .sum()
    }

    /// A deterministic arrival pattern: idle stretches, steady streams and bursts.
    fn mixed_arrivals() -> Vec<Duration> {
        let mut arrivals = Vec::new();
        let mut t = 0u64;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            t += match state % 10 {
                0 => 5_000 + state % 20_000, // idle for a while
                1..=3 => 0,                  // part of a burst
                4..=6 => 20 + state % 100,   // fast stream
                _ => 100 + state % 1_500,    // around the window
            };
            arrivals.push(us(t));
        }
        arrivals
    }

    #[test]
    fn a_frame_on_an_idle_link_leaves_at_once() {
        let policy = Batching::default();
        let start = Instant::now();
        let mut batcher = Batcher::new(policy, LIMIT, 512);
        assert_eq!(batcher.push(start, 13), Next::Read);
        assert_eq!(batcher.idle(start), Next::Send);
        batcher.sent(start);
        // Three more in quick succession still leave at once (the burst)...
        for i in 1..u64::from(ADAPTIVE_BURST) {
            let now = start + us(100 * i);
            assert_eq!(batcher.push(now, 13), Next::Read);
            assert_eq!(batcher.idle(now), Next::Send);
            batcher.sent(now);
        }
        // ... the next one waits for the pacing, a window after the first, and no longer.
        let now = start + us(400);
        assert_eq!(batcher.push(now, 13), Next::Read);
        assert_eq!(batcher.idle(now), Next::HoldUntil(start + MS));

        // Sparse frames (every 5 ms) never wait.
        let arrivals: Vec<Duration> = (0..100).map(|i| 5 * i * MS).collect();
        let (sends, start) = simulate(policy, &arrivals);
        assert_eq!(sends.len(), 100);
        for (send, arrival) in sends.iter().zip(&arrivals) {
            assert_eq!(send.at, start + *arrival);
        }
    }

    #[test]
    fn a_light_stream_with_jitter_is_never_held() {
        // 1,000 frames/s on average, but 0.6 to 1.4 ms apart.
        let mut t = 0;
        let arrivals: Vec<Duration> = (0..2_000u64)
            .map(|i| {
                t += [600, 1_400, 900, 1_100, 700, 1_300][(i % 6) as usize];
                us(t)
            })
            .collect();
        let (sends, start) = simulate(Batching::default(), &arrivals);
        assert_eq!(check_order_and_count(&sends, arrivals.len()), 2_000);
        for (send, arrival) in sends.iter().zip(&arrivals) {
            assert_eq!(send.at, start + *arrival, "held");
        }
    }

    #[test]
    fn a_burst_becomes_few_full_datagrams() {
        // 1,000 frames of 13 bytes all waiting at once: 112 fit a 1472-byte datagram.
        let arrivals = vec![Duration::ZERO; 1_000];
        let (sends, _) = simulate(Batching::default(), &arrivals);
        let datagrams = check_order_and_count(&sends, 1_000);
        assert_eq!(datagrams, 1_000usize.div_ceil(112));
        assert_eq!(sends.len(), datagrams, "one batch is one datagram");
        for send in &sends[..sends.len() - 1] {
            assert_eq!(send.frames.len(), 112, "all but the last are full");
        }
        // The old default cuts the same burst into 512-frame batches, each split by the encoder
        // into 4 full datagrams and a partial one.
        let (drain, _) = simulate(Batching::Drain, &arrivals);
        assert_eq!(check_order_and_count(&drain, 1_000), 10);
    }

    #[test]
    fn a_steady_stream_becomes_one_datagram_per_window() {
        // 7,400 frames/s (a saturated 1 Mbit/s bus) for one second.
        let arrivals: Vec<Duration> = (0..7_400u64).map(|i| us(i * 1_000_000 / 7_400)).collect();
        let (adaptive, _) = simulate(Batching::default(), &arrivals);
        let datagrams = check_order_and_count(&adaptive, 7_400);
        assert!(
            (900..=1_100).contains(&datagrams),
            "{datagrams} datagrams for 1 s at 7,400 frames/s with a 1 ms window"
        );
        let (drain, _) = simulate(Batching::Drain, &arrivals);
        assert_eq!(check_order_and_count(&drain, 7_400), 7_400);
    }

    #[test]
    fn no_frame_waits_past_the_window_and_order_is_kept() {
        let arrivals = mixed_arrivals();
        for policy in [
            Batching::default(),
            Batching::Adaptive { window: 5 * MS },
            Batching::Fixed { window: MS },
            Batching::Drain,
        ] {
            let (sends, start) = simulate(policy, &arrivals);
            let datagrams = check_order_and_count(&sends, arrivals.len());
            let mut waited_longest = Duration::ZERO;
            for send in &sends {
                for &index in &send.frames {
                    let waited = send.at - (start + arrivals[index]);
                    assert!(
                        waited <= policy.window(),
                        "{policy}: frame {index} waited {waited:?}"
                    );
                    waited_longest = waited_longest.max(waited);
                }
            }
            if policy != Batching::Drain {
                assert!(
                    waited_longest > policy.window() / 2,
                    "{policy}: the pattern should make frames wait"
                );
            }
            if let Batching::Adaptive { window } = policy {
                assert_eq!(sends.len(), datagrams, "{policy}: a batch is one datagram");
                // The pacing bounds the rate of datagrams that are not full: one more than the
                // burst takes at least a window.
                let partial: Vec<Instant> = sends
                    .iter()
                    .filter(|send| send.frames.len() < 112)
                    .map(|send| send.at)
                    .collect();
                for run in partial.windows(ADAPTIVE_BURST as usize + 1) {
                    let span = run[run.len() - 1] - run[0];
                    assert!(span >= window, "{policy}: a burst over {span:?}");
                }
            }
        }
    }

    #[test]
    fn batches_are_bounded_by_max_frames() {
        let start = Instant::now();
        for policy in [
            Batching::default(),
            Batching::Drain,
            Batching::Fixed { window: MS },
        ] {
            let mut batcher = Batcher::new(policy, LIMIT, 3);
            assert_eq!(batcher.push(start, 5), Next::Read);
            assert_eq!(batcher.push(start, 5), Next::Read);
            assert_eq!(batcher.push(start, 5), Next::Send, "{policy}");
        }
    }

    #[test]
    fn fd_frames_fill_a_datagram_by_bytes() {
        // A 64-byte FD frame takes 70 bytes: 20 fit (5 + 20 * 70 = 1405), the 21st does not.
        let start = Instant::now();
        let mut batcher = Batcher::new(Batching::default(), LIMIT, 512);
        batcher.sent(start);
        for _ in 0..20 {
            assert!(!batcher.sends_before(70));
            assert_eq!(batcher.push(start, 70), Next::Read);
        }
        assert!(
            batcher.sends_before(70),
            "the 21st frame goes in the next datagram"
        );
        assert!(!batcher.sends_before(67), "a smaller one still fits");
        // Under the other policies the encoder splits the batch instead.
        let mut fixed = Batcher::new(Batching::Fixed { window: MS }, LIMIT, 512);
        for _ in 0..20 {
            fixed.push(start, 70);
        }
        assert!(!fixed.sends_before(70));
    }

    #[test]
    fn the_fixed_window_waits_even_on_an_idle_link() {
        let start = Instant::now();
        let mut batcher = Batcher::new(Batching::Fixed { window: MS }, LIMIT, 512);
        assert_eq!(batcher.push(start, 13), Next::Read);
        assert_eq!(batcher.idle(start), Next::HoldUntil(start + MS));
        assert_eq!(batcher.push(start + MS, 13), Next::Send);
        let mut drain = Batcher::new(Batching::Drain, LIMIT, 512);
        assert_eq!(drain.idle(start), Next::Read, "nothing pending");
        drain.push(start, 13);
        assert_eq!(drain.idle(start), Next::Send);
    }
}
