//! Shaping: one netem qdisc per link that makes a vxcan end behave like a CAN bus of a given
//! bitrate, with optional delay, jitter, loss and duplication.
//!
//! Pod RX shaping goes on the host-side vxcan end (can-gw sends through the destination's
//! qdisc), pod TX shaping on the pod-side end. Each direction is one [`Shaping`], applied with
//! [`apply`] through a [`RouteSocket`] opened in the namespace of the link.
//!
//! # How a bitrate becomes a qdisc rate
//!
//! Qdiscs meter `skb->len`, which is 16 bytes for every Classic frame and 72 for every CAN FD
//! frame, whatever the payload. A byte rate alone therefore cannot give both kinds their wire
//! time. This module attaches a size table (`stab`) to the root netem qdisc that maps each
//! frame kind to its worst-case wire time, in units of 1/[`UNITS_PER_BIT`] of a nominal bit:
//!
//! - Classic (any skb up to 23 bytes): [`CLASSIC_REFERENCE_BITS`] (135: 8 data bytes, standard
//!   id, worst-case bit stuffing) × 64 units;
//! - CAN FD (24 to 79 bytes): `64 × (33 + 679 × bitrate / data_bitrate)` units, which is
//!   [`FD_REFERENCE_BITS`] (712) × 64 without a faster data phase;
//!
//! and sets netem's serialisation rate to `bitrate × 64` units per second. netem then holds
//! each frame for exactly its wire time after the previous one: a saturating sender gets
//! `bitrate / 135` Classic frames per second (925.9 at 125 kbit/s, 7407.4 at 1 Mbit/s).
//! `docs/shaping.md` derives the numbers and compares this with tbf and netem's
//! `packet_overhead`.
//!
//! # Ordering
//!
//! netem sorts frames by their send time. With a rate set, each frame's send time is at least
//! the previous frame's, so frames stay in order even with jitter; when jitter is asked for
//! without a bitrate, an unlimited rate ([`u64::MAX`] bytes/s, zero serialisation time) is set
//! for the same reason. A CAN bus never reorders one sender's frames, and ISO-TP relies on it.
//! The price: a frame that follows a slower one closely waits for it (FIFO), so bursts see
//! less spread than the configured jitter.
//!
//! Two kernel effects outside the qdisc are measured and described in `docs/shaping.md`: on
//! SMP, the peer's per-CPU receive backlogs can still let a frame overtake another (unless
//! the peer's receive path is steered to one CPU), and a raw socket discards some netem
//! duplicates as repeated deliveries of the same skb, so [`statistics`] is the reliable count
//! of duplicates made.
//!
//! # Recognising our qdisc
//!
//! The qdisc always has the handle [`HANDLE`] (`ca00:`) at the root. [`read`] decodes it back
//! into a [`Shaping`] for reconciliation, [`statistics`] reports its counters, [`clear`]
//! removes it (the link returns to its default, `noqueue` on vxcan). The kernel does not dump
//! the size table's entries, so the FD data bitrate is recorded in the table's `mpu` field,
//! which the kernel stores and reports but does not use once a table is given.

use std::fmt;
use std::time::Duration;

use nix::errno::Errno;
use tracing::debug;

use crate::netlink::{
    AttributeBuffer, NLM_F_CREATE, NLM_F_REPLACE, NetlinkError, RouteSocket, attributes, read_i32,
    read_u16, read_u32,
};

/// `RTM_NEWQDISC`: create or replace a qdisc; also the type of every dump reply.
const RTM_NEWQDISC: u16 = 36;
/// `RTM_DELQDISC`: delete a qdisc.
const RTM_DELQDISC: u16 = 37;
/// `RTM_GETQDISC`: dump qdiscs.
const RTM_GETQDISC: u16 = 38;

/// `TC_H_ROOT`: the parent of a root qdisc.
const TC_H_ROOT: u32 = 0xFFFF_FFFF;
/// The handle of every qdisc this module installs: major `0xca00`, minor 0 (`ca00:` in tc).
pub const HANDLE: u32 = 0xCA00_0000;

// Top-level qdisc attributes, `include/uapi/linux/rtnetlink.h`.
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_STATS: u16 = 3;
const TCA_STATS2: u16 = 7;
const TCA_STAB: u16 = 8;

// `TCA_STATS2` members, `include/uapi/linux/gen_stats.h`.
const TCA_STATS_BASIC: u16 = 1;
const TCA_STATS_QUEUE: u16 = 3;
const TCA_STATS_PKT64: u16 = 8;

// netem attributes that follow the raw `tc_netem_qopt`, `include/uapi/linux/pkt_sched.h`.
const TCA_NETEM_RATE: u16 = 6;
const TCA_NETEM_RATE64: u16 = 8;
const TCA_NETEM_LATENCY64: u16 = 10;
const TCA_NETEM_JITTER64: u16 = 11;

// Size table attributes.
const TCA_STAB_BASE: u16 = 1;
const TCA_STAB_DATA: u16 = 2;

/// `sizeof(struct tcmsg)`.
const TCMSG_LEN: usize = 20;
/// `sizeof(struct tc_netem_qopt)`: six `u32`.
const NETEM_QOPT_LEN: usize = 24;
/// `sizeof(struct tc_sizespec)`.
const SIZESPEC_LEN: usize = 24;
/// `PSCHED_SHIFT`: one psched tick is 2^6 = 64 ns.
const PSCHED_TICK_NS: u128 = 64;
/// `TC_LINKLAYER_ETHERNET`: no cell quantisation (the kernel ignores it once a table is given).
const TC_LINKLAYER_ETHERNET: u32 = 1;

/// Size table geometry: 8-byte cells (`cell_log` 3), ten of them, covering skbs of 0..=79 bytes.
const STAB_CELL_LOG: u8 = 3;
const STAB_SIZE: usize = 10;
/// Cells 0..=2 hold skbs of up to 23 bytes (Classic, 16); cells 3..=9 hold CAN FD (72).
const STAB_FIRST_FD_CELL: usize = 3;
/// `CANFD_MTU`: the largest skb the table is meant for (recorded as the table's `mtu`).
const CANFD_MTU: u32 = 72;

/// Qdisc metering units per nominal bus bit. 712 × 64 = 45 568 still fits the table's `u16`
/// entries, and rounding a data-phase share to a unit costs at most 1/(2 × 64) bit.
pub const UNITS_PER_BIT: u32 = 64;

/// Worst-case length of the reference Classic frame (standard id, 8 data bytes, maximum bit
/// stuffing, interframe space included), in bits.
pub const CLASSIC_REFERENCE_BITS: u32 = 135;
/// Worst-case length of the reference CAN FD frame (standard id, 64 data bytes), in bits.
pub const FD_REFERENCE_BITS: u32 = 712;
/// Netem's probability scale: `u32::MAX` means 100 %.
const PROBABILITY_ONE: u64 = u32::MAX as u64;
/// One million parts per million.
pub const PPM_ONE: u32 = 1_000_000;
/// The default queue limit, in frames.
///
/// Far below `tc`'s 1000 on purpose: a CAN controller queues a handful of frames, not a second
/// of traffic, and after a scheduling stall netem releases every overdue frame at once into
/// the peer's per-CPU backlog, which drops (silently, as `rx_dropped`) beyond
/// `netdev_max_backlog` (1000 by default).
pub const DEFAULT_QUEUE_LIMIT: u32 = 100;
/// netem caps jitter at `INT_MAX` nanoseconds; larger values are rejected here instead.
const MAX_JITTER_NS: u128 = i32::MAX as u128;
/// The rate set when only ordering is wanted: zero serialisation time for any frame.
const ORDER_ONLY_RATE: u64 = u64::MAX;

/// Errors from shaping operations. Messages name the link (by ifindex), the operation and,
/// where known, the parameter.
#[derive(Debug, thiserror::Error)]
pub enum ShapingError {
    /// A parameter is out of range; nothing was sent to the kernel.
    #[error("invalid shaping parameter {parameter}: {reason}")]
    Invalid {
        /// The field of [`Shaping`] at fault.
        parameter: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The kernel does not know the netem qdisc (`ENOENT` on create).
    #[error(
        "{operation} on ifindex {ifindex}: qdisc kind netem is unknown; load the kernel module {module} (ENOENT)"
    )]
    ModuleMissing {
        /// The operation that failed.
        operation: &'static str,
        /// The link.
        ifindex: u32,
        /// The kernel module to load.
        module: &'static str,
    },
    /// No link has this ifindex in the socket's namespace.
    #[error("{operation} on ifindex {ifindex}: interface not found (ENODEV)")]
    NoDevice {
        /// The operation that failed.
        operation: &'static str,
        /// The link.
        ifindex: u32,
    },
    /// The caller lacks `CAP_NET_ADMIN` in the link's namespace.
    #[error(
        "{operation} on ifindex {ifindex}: permission denied, CAP_NET_ADMIN is needed in the link's namespace (EPERM)"
    )]
    PermissionDenied {
        /// The operation that failed.
        operation: &'static str,
        /// The link.
        ifindex: u32,
    },
    /// The kernel rejected the qdisc parameters.
    #[error(
        "{operation} on ifindex {ifindex}: the kernel rejected the netem parameters ({shaping}) (EINVAL)"
    )]
    Rejected {
        /// The operation that failed.
        operation: &'static str,
        /// The link.
        ifindex: u32,
        /// The parameters sent, for the message.
        shaping: String,
    },
    /// Our handle carries a qdisc this module did not build.
    #[error(
        "reading shaping on ifindex {ifindex}: qdisc ca00: is not one this driver builds: {reason}"
    )]
    Unrecognised {
        /// The link.
        ifindex: u32,
        /// What did not match.
        reason: String,
    },
    /// Any other netlink failure.
    #[error("{operation} on ifindex {ifindex}: {source}")]
    Netlink {
        /// The operation that failed.
        operation: &'static str,
        /// The link.
        ifindex: u32,
        /// The underlying error.
        #[source]
        source: NetlinkError,
    },
}

impl ShapingError {
    fn invalid(parameter: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            parameter,
            reason: reason.into(),
        }
    }

    fn from_netlink(operation: &'static str, ifindex: u32, source: NetlinkError) -> Self {
        match source.errno() {
            Some(Errno::ENODEV) => Self::NoDevice { operation, ifindex },
            Some(Errno::EPERM) => Self::PermissionDenied { operation, ifindex },
            _ => Self::Netlink {
                operation,
                ifindex,
                source,
            },
        }
    }
}

/// How one direction of a link is shaped.
///
/// The default is no shaping at all; applying it removes our qdisc.
///
/// ```
/// use std::time::Duration;
/// use can_dra_dataplane::shaping::Shaping;
/// let bus = Shaping {
///     bitrate: Some(125_000),
///     delay: Duration::from_millis(2),
///     loss_ppm: 1_000, // 0.1 %
///     ..Shaping::default()
/// };
/// assert!(bus.validate().is_ok());
/// assert!(!bus.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shaping {
    /// Nominal bus bitrate in bit/s: frames are paced at the worst-case wire time of the
    /// reference frame of their kind. `None`: no rate limit.
    pub bitrate: Option<u32>,
    /// CAN FD data-phase bitrate in bit/s (bit rate switching). Needs `bitrate` and must not be
    /// below it. `None`: FD frames are timed entirely at the nominal bitrate.
    pub data_bitrate: Option<u32>,
    /// Extra one-way delay added to every frame.
    pub delay: Duration,
    /// Uniform random variation of the delay, ± this much. At most `delay` and at most
    /// `i32::MAX` nanoseconds. Never reorders frames (see the module docs).
    pub jitter: Duration,
    /// Random loss, in parts per million (0..=1 000 000).
    pub loss_ppm: u32,
    /// Random duplication, in parts per million (0..=1 000 000).
    pub duplicate_ppm: u32,
    /// How many frames may wait in the qdisc; beyond that, senders get `ENOBUFS` and can-gw
    /// counts the frame as dropped. At least 1.
    pub queue_limit: u32,
}

impl Default for Shaping {
    fn default() -> Self {
        Self {
            bitrate: None,
            data_bitrate: None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss_ppm: 0,
            duplicate_ppm: 0,
            queue_limit: DEFAULT_QUEUE_LIMIT,
        }
    }
}

impl Shaping {
    /// True when this spec changes nothing (no rate, delay, jitter, loss or duplication): then
    /// no qdisc is needed.
    pub fn is_none(&self) -> bool {
        self.bitrate.is_none()
            && self.delay.is_zero()
            && self.jitter.is_zero()
            && self.loss_ppm == 0
            && self.duplicate_ppm == 0
    }

    /// Checks every parameter, naming the first one out of range.
    pub fn validate(&self) -> Result<(), ShapingError> {
        if self.bitrate == Some(0) {
            return Err(ShapingError::invalid("bitrate", "must be at least 1 bit/s"));
        }
        match (self.bitrate, self.data_bitrate) {
            (_, Some(0)) => {
                return Err(ShapingError::invalid(
                    "data_bitrate",
                    "must be at least 1 bit/s",
                ));
            }
            (None, Some(_)) => {
                return Err(ShapingError::invalid(
                    "data_bitrate",
                    "needs a nominal bitrate",
                ));
            }
            (Some(nominal), Some(data)) if data < nominal => {
                return Err(ShapingError::invalid(
                    "data_bitrate",
                    format!("{data} bit/s is below the nominal bitrate {nominal} bit/s"),
                ));
            }
            _ => {}
        }
        if self.delay.as_nanos() > i64::MAX as u128 {
            return Err(ShapingError::invalid(
                "delay",
                format!("{:?} is longer than the kernel can hold", self.delay),
            ));
        }
        if self.jitter > self.delay {
            return Err(ShapingError::invalid(
                "jitter",
                format!(
                    "{:?} exceeds the delay {:?} (a frame cannot arrive before it was sent)",
                    self.jitter, self.delay
                ),
            ));
        }
        if self.jitter.as_nanos() > MAX_JITTER_NS {
            return Err(ShapingError::invalid(
                "jitter",
                format!("{:?} exceeds netem's limit of 2.147 s", self.jitter),
            ));
        }
        if self.loss_ppm > PPM_ONE {
            return Err(ShapingError::invalid(
                "loss_ppm",
                format!("{} is above 1000000 (100 %)", self.loss_ppm),
            ));
        }
        if self.duplicate_ppm > PPM_ONE {
            return Err(ShapingError::invalid(
                "duplicate_ppm",
                format!("{} is above 1000000 (100 %)", self.duplicate_ppm),
            ));
        }
        if self.queue_limit == 0 {
            return Err(ShapingError::invalid(
                "queue_limit",
                "must be at least 1 frame",
            ));
        }
        Ok(())
    }

    /// The rate model for this spec, when it has a bitrate.
    pub fn rate_model(&self) -> Option<RateModel> {
        self.bitrate
            .map(|bitrate| RateModel::new(bitrate, self.data_bitrate))
    }
}

impl fmt::Display for Shaping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bitrate {
            Some(bitrate) => write!(f, "bitrate {bitrate} bit/s")?,
            None => write!(f, "no bitrate")?,
        }
        if let Some(data) = self.data_bitrate {
            write!(f, ", data bitrate {data} bit/s")?;
        }
        write!(
            f,
            ", delay {:?}, jitter {:?}, loss {} ppm, duplicate {} ppm, queue limit {} frames",
            self.delay, self.jitter, self.loss_ppm, self.duplicate_ppm, self.queue_limit
        )
    }
}

/// Worst-case bit count of a Classic CAN frame, interframe space included.
///
/// Bit stuffing is counted at its maximum (one stuff bit after the first five bits, then one
/// per four) over SOF..CRC delimiter, as Linux's `can_frame_bits` does; `data_len` above 8
/// counts as 8.
///
/// ```
/// use can_dra_dataplane::shaping::classic_frame_bits;
/// assert_eq!(classic_frame_bits(8, false), 135);
/// assert_eq!(classic_frame_bits(8, true), 160);
/// assert_eq!(classic_frame_bits(0, false), 55);
/// ```
pub fn classic_frame_bits(data_len: u8, extended_id: bool) -> u32 {
    // SOF, id, RTR/SRR(+IDE, extended id, RTR), IDE/r1, r0, DLC.
    let header = if extended_id { 39 } else { 19 };
    // Data, then CRC-15 and its delimiter.
    let stuffed_region = header + 8 * u32::from(data_len.min(8)) + 16;
    // ACK slot, ACK delimiter, 7-bit EOF, 3-bit intermission.
    stuffed(stuffed_region) + 12
}

/// Worst-case bit counts of a CAN FD frame, split by the bitrate each part runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdFrameBits {
    /// Bits sent at the nominal bitrate: SOF up to BRS (with their stuff bits), then ACK, ACK
    /// delimiter, EOF and intermission.
    pub arbitration: u32,
    /// Bits sent at the data bitrate when BRS is set: ESI, DLC, data, their stuff bits and the
    /// CRC field (stuff count, CRC, fixed stuff bits, delimiter).
    pub data: u32,
}

impl FdFrameBits {
    /// Both parts together: the frame length when both phases run at the same bitrate.
    pub fn total(&self) -> u32 {
        self.arbitration + self.data
    }
}

/// Worst-case bit counts of a CAN FD frame (`data_len` above 64 counts as 64).
///
/// ```
/// use can_dra_dataplane::shaping::fd_frame_bits;
/// let bits = fd_frame_bits(64, false);
/// assert_eq!((bits.arbitration, bits.data, bits.total()), (33, 679, 712));
/// ```
pub fn fd_frame_bits(data_len: u8, extended_id: bool) -> FdFrameBits {
    let data_len = u32::from(data_len.min(64));
    // SOF, id, RRS (SRR, IDE, extended id, RRS), IDE, FDF, res, BRS.
    let arbitration_field = if extended_id { 36 } else { 17 };
    // Then ESI and DLC: the dynamically stuffed region ends with the data.
    let stuffed_region = arbitration_field + 5 + 8 * data_len;
    let all_stuff_bits = stuffed(stuffed_region) - stuffed_region;
    let arbitration_stuff_bits = stuffed(arbitration_field) - arbitration_field;
    // Stuff count, CRC-17 or CRC-21, fixed stuff bits and the CRC delimiter.
    let crc_field = if data_len <= 16 { 28 } else { 33 };
    FdFrameBits {
        arbitration: arbitration_field + arbitration_stuff_bits + 12,
        data: (stuffed_region - arbitration_field)
            + (all_stuff_bits - arbitration_stuff_bits)
            + crc_field,
    }
}

/// `bits` plus the most stuff bits they can carry.
fn stuffed(bits: u32) -> u32 {
    bits + bits.saturating_sub(1) / 4
}

/// How a bitrate maps onto netem's byte-metered rate through the size table.
///
/// ```
/// use can_dra_dataplane::shaping::RateModel;
/// let bus = RateModel::new(1_000_000, None);
/// assert_eq!(bus.classic_frames_per_second().round(), 7407.0);
/// let fd = RateModel::new(500_000, Some(2_000_000));
/// assert_eq!(fd.fd_frame_time().as_nanos(), 405_500);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateModel {
    bitrate: u32,
    data_bitrate: Option<u32>,
}

impl RateModel {
    /// The model for a nominal bitrate and an optional FD data-phase bitrate (bit/s, non-zero).
    pub fn new(bitrate: u32, data_bitrate: Option<u32>) -> Self {
        Self {
            bitrate: bitrate.max(1),
            data_bitrate: data_bitrate.map(|data| data.max(1)),
        }
    }

    /// netem's rate: metering units per second (`bitrate × 64`).
    pub fn units_per_second(&self) -> u64 {
        u64::from(self.bitrate) * u64::from(UNITS_PER_BIT)
    }

    /// Units charged for one Classic frame: 135 bits × 64.
    pub fn classic_units(&self) -> u16 {
        // 135 × 64 = 8640.
        (CLASSIC_REFERENCE_BITS * UNITS_PER_BIT) as u16
    }

    /// Units charged for one CAN FD frame: `64 × (33 + 679 × bitrate / data_bitrate)`, rounded.
    pub fn fd_units(&self) -> u16 {
        let bits = fd_frame_bits(64, false);
        let units = match self.data_bitrate {
            None => u64::from(bits.total()) * u64::from(UNITS_PER_BIT),
            Some(data) => {
                let data = u64::from(data);
                let scaled = u64::from(UNITS_PER_BIT)
                    * (u64::from(bits.arbitration) * data
                        + u64::from(bits.data) * u64::from(self.bitrate));
                (scaled + data / 2) / data
            }
        };
        // With data_bitrate >= bitrate the value is at most 712 × 64 = 45 568; the clamp only
        // guards a model built without validation.
        u16::try_from(units).unwrap_or(u16::MAX)
    }

    /// The size table: the units charged for an skb of each 8-byte cell of length.
    fn size_table(&self) -> [u16; STAB_SIZE] {
        let mut table = [self.fd_units(); STAB_SIZE];
        for entry in &mut table[..STAB_FIRST_FD_CELL] {
            *entry = self.classic_units();
        }
        table
    }

    /// The time netem holds each Classic frame on a saturated link.
    pub fn classic_frame_time(&self) -> Duration {
        self.units_to_time(self.classic_units())
    }

    /// The time netem holds each CAN FD frame on a saturated link.
    pub fn fd_frame_time(&self) -> Duration {
        self.units_to_time(self.fd_units())
    }

    /// Classic frames per second a saturating sender gets.
    pub fn classic_frames_per_second(&self) -> f64 {
        self.units_per_second() as f64 / f64::from(self.classic_units())
    }

    /// CAN FD frames per second a saturating sender gets.
    pub fn fd_frames_per_second(&self) -> f64 {
        self.units_per_second() as f64 / f64::from(self.fd_units())
    }

    fn units_to_time(&self, units: u16) -> Duration {
        // The same integer division netem's packet_time_ns does.
        let nanos = u64::from(units) * 1_000_000_000 / self.units_per_second();
        Duration::from_nanos(nanos)
    }
}

/// Counters of our qdisc on one link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QdiscStatistics {
    /// Frames sent out of the qdisc (duplicates included).
    pub packets: u64,
    /// Bytes sent as the qdisc meters them: with a bitrate these are size-table units, so
    /// `bytes / UNITS_PER_BIT` is the worst-case bus time used, in nominal bits.
    pub bytes: u64,
    /// Frames dropped: random loss plus frames refused because the queue was full.
    pub drops: u32,
    /// Throttle events, as the kernel counts them.
    pub overlimits: u32,
    /// Frames put back at the head of the queue.
    pub requeues: u32,
    /// Frames waiting in the queue now.
    pub queued_frames: u32,
    /// Metered bytes waiting in the queue now.
    pub queued_bytes: u32,
}

/// Applies `shaping` to the link `ifindex` in the socket's namespace, replacing whatever root
/// qdisc is there (ours from an earlier call is changed in place, keeping its counters). A
/// spec that [`Shaping::is_none`] removes our qdisc instead, like [`clear`].
///
/// Parameters are validated first, so a bad spec leaves the link untouched.
pub fn apply(sock: &mut RouteSocket, ifindex: u32, shaping: &Shaping) -> Result<(), ShapingError> {
    const OPERATION: &str = "applying shaping";
    shaping.validate()?;
    let ifindex_i32 = checked_ifindex(ifindex)?;
    if shaping.is_none() {
        return clear(sock, ifindex);
    }
    let request = encode_new_qdisc(ifindex_i32, shaping);
    debug!(ifindex, %shaping, "applying shaping");
    sock.request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE, &request)
        .map_err(|source| match source.errno() {
            Some(Errno::ENOENT) => ShapingError::ModuleMissing {
                operation: OPERATION,
                ifindex,
                module: "sch_netem",
            },
            Some(Errno::EINVAL) => ShapingError::Rejected {
                operation: OPERATION,
                ifindex,
                shaping: shaping.to_string(),
            },
            _ => ShapingError::from_netlink(OPERATION, ifindex, source),
        })?;
    Ok(())
}

/// Removes our qdisc from the link, if it is there; another root qdisc is left alone. The link
/// falls back to its default qdisc (`noqueue` on vxcan).
pub fn clear(sock: &mut RouteSocket, ifindex: u32) -> Result<(), ShapingError> {
    const OPERATION: &str = "clearing shaping";
    let ifindex_i32 = checked_ifindex(ifindex)?;
    if find_ours(sock, ifindex, OPERATION)?.is_none() {
        return Ok(());
    }
    debug!(ifindex, "clearing shaping");
    match sock.request(RTM_DELQDISC, 0, &tcmsg(ifindex_i32)) {
        Ok(_) => Ok(()),
        // Removed by someone else between the dump and the delete.
        Err(error) if error.errno() == Some(Errno::ENOENT) => Ok(()),
        Err(source) => Err(ShapingError::from_netlink(OPERATION, ifindex, source)),
    }
}

/// Reports the shaping our qdisc applies on the link, or `None` when our qdisc is not its root
/// qdisc (nothing, or someone else's).
pub fn read(sock: &mut RouteSocket, ifindex: u32) -> Result<Option<Shaping>, ShapingError> {
    checked_ifindex(ifindex)?;
    find_ours(sock, ifindex, "reading shaping")?
        .map(|qdisc| qdisc.shaping(ifindex))
        .transpose()
}

/// Reports the counters of our qdisc on the link, or `None` when it is not there.
pub fn statistics(
    sock: &mut RouteSocket,
    ifindex: u32,
) -> Result<Option<QdiscStatistics>, ShapingError> {
    checked_ifindex(ifindex)?;
    Ok(find_ours(sock, ifindex, "reading shaping statistics")?.map(|qdisc| qdisc.statistics))
}

fn checked_ifindex(ifindex: u32) -> Result<i32, ShapingError> {
    match i32::try_from(ifindex) {
        Ok(index) if index > 0 => Ok(index),
        _ => Err(ShapingError::invalid(
            "ifindex",
            format!("{ifindex} is not a valid interface index"),
        )),
    }
}

/// Dumps the qdiscs of the namespace and returns ours on `ifindex`, if it is the root qdisc.
fn find_ours(
    sock: &mut RouteSocket,
    ifindex: u32,
    operation: &'static str,
) -> Result<Option<DumpedQdisc>, ShapingError> {
    // The kernel may ignore the ifindex of a dump request; filter here as well.
    let replies = sock
        .dump(RTM_GETQDISC, &tcmsg_header(0, 0, 0))
        .map_err(|source| ShapingError::from_netlink(operation, ifindex, source))?;
    for reply in replies {
        if reply.message_type != RTM_NEWQDISC {
            continue;
        }
        let qdisc = DumpedQdisc::parse(&reply.payload)
            .map_err(|source| ShapingError::from_netlink(operation, ifindex, source))?;
        if qdisc.ifindex == ifindex
            && qdisc.parent == TC_H_ROOT
            && qdisc.handle == HANDLE
            && qdisc.kind == "netem"
        {
            return Ok(Some(qdisc));
        }
    }
    Ok(None)
}

/// `struct tcmsg` for our root qdisc on `ifindex`.
fn tcmsg(ifindex: i32) -> Vec<u8> {
    tcmsg_header(ifindex, HANDLE, TC_H_ROOT)
}

fn tcmsg_header(ifindex: i32, handle: u32, parent: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(TCMSG_LEN);
    // tcm_family (AF_UNSPEC), two padding fields.
    header.extend_from_slice(&[0, 0, 0, 0]);
    header.extend_from_slice(&ifindex.to_ne_bytes());
    header.extend_from_slice(&handle.to_ne_bytes());
    header.extend_from_slice(&parent.to_ne_bytes());
    // tcm_info: unused for qdiscs.
    header.extend_from_slice(&0u32.to_ne_bytes());
    header
}

/// The `RTM_NEWQDISC` payload: tcmsg, kind, netem options and (with a bitrate) the size table.
fn encode_new_qdisc(ifindex: i32, shaping: &Shaping) -> Vec<u8> {
    let mut attributes = AttributeBuffer::default();
    attributes.push_str(TCA_KIND, "netem");
    attributes.push(TCA_OPTIONS, &encode_netem_options(shaping));
    if let Some(model) = shaping.rate_model() {
        attributes.push_nested(TCA_STAB, |stab| {
            stab.push(TCA_STAB_BASE, &encode_sizespec(shaping.data_bitrate));
            stab.push(TCA_STAB_DATA, &encode_size_table(&model));
        });
    }
    let mut payload = tcmsg(ifindex);
    payload.extend_from_slice(attributes.as_bytes());
    payload
}

/// netem's `TCA_OPTIONS`: a raw `tc_netem_qopt`, then attributes (not a nested list).
///
/// Every attribute that netem would otherwise keep from an earlier configuration (the rate) is
/// always sent, so a replace never inherits stale settings.
fn encode_netem_options(shaping: &Shaping) -> Vec<u8> {
    let delay_ns = shaping.delay.as_nanos();
    let jitter_ns = shaping.jitter.as_nanos();
    let mut options = Vec::with_capacity(96);
    // latency and jitter in psched ticks, for kernels without the 64-bit attributes.
    options.extend_from_slice(&ticks(delay_ns).to_ne_bytes());
    options.extend_from_slice(&shaping.queue_limit.to_ne_bytes());
    options.extend_from_slice(&probability(shaping.loss_ppm).to_ne_bytes());
    // gap: no reordering.
    options.extend_from_slice(&0u32.to_ne_bytes());
    options.extend_from_slice(&probability(shaping.duplicate_ppm).to_ne_bytes());
    options.extend_from_slice(&ticks(jitter_ns).to_ne_bytes());

    let rate = match shaping.rate_model() {
        Some(model) => model.units_per_second(),
        None if !shaping.jitter.is_zero() => ORDER_ONLY_RATE,
        None => 0,
    };
    let mut attributes = AttributeBuffer::default();
    // tc_netem_rate: rate (bytes/s, saturated; RATE64 carries larger values), packet_overhead,
    // cell_size, cell_overhead.
    let mut netem_rate = Vec::with_capacity(16);
    netem_rate.extend_from_slice(&u32::try_from(rate).unwrap_or(u32::MAX).to_ne_bytes());
    netem_rate.extend_from_slice(&[0; 12]);
    attributes.push(TCA_NETEM_RATE, &netem_rate);
    if rate > u64::from(u32::MAX) {
        attributes.push(TCA_NETEM_RATE64, &rate.to_ne_bytes());
    }
    attributes.push(TCA_NETEM_LATENCY64, &nanos_i64(delay_ns).to_ne_bytes());
    attributes.push(TCA_NETEM_JITTER64, &nanos_i64(jitter_ns).to_ne_bytes());
    options.extend_from_slice(attributes.as_bytes());
    options
}

/// `struct tc_sizespec` for our table. `mpu` records the data bitrate (see the module docs).
fn encode_sizespec(data_bitrate: Option<u32>) -> Vec<u8> {
    let mut spec = Vec::with_capacity(SIZESPEC_LEN);
    spec.push(STAB_CELL_LOG);
    // size_log: entries are used as they are.
    spec.push(0);
    // cell_align.
    spec.extend_from_slice(&0i16.to_ne_bytes());
    // overhead.
    spec.extend_from_slice(&0i32.to_ne_bytes());
    spec.extend_from_slice(&TC_LINKLAYER_ETHERNET.to_ne_bytes());
    spec.extend_from_slice(&data_bitrate.unwrap_or(0).to_ne_bytes());
    spec.extend_from_slice(&CANFD_MTU.to_ne_bytes());
    spec.extend_from_slice(&(STAB_SIZE as u32).to_ne_bytes());
    spec
}

fn encode_size_table(model: &RateModel) -> Vec<u8> {
    model
        .size_table()
        .iter()
        .flat_map(|entry| entry.to_ne_bytes())
        .collect()
}

fn ticks(nanos: u128) -> u32 {
    u32::try_from(nanos / PSCHED_TICK_NS).unwrap_or(u32::MAX)
}

fn nanos_i64(nanos: u128) -> i64 {
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

/// Parts per million to netem's scale, rounded to nearest (what `tc` sends for a percentage).
fn probability(ppm: u32) -> u32 {
    let scaled = (u64::from(ppm.min(PPM_ONE)) * PROBABILITY_ONE + u64::from(PPM_ONE / 2))
        / u64::from(PPM_ONE);
    u32::try_from(scaled).unwrap_or(u32::MAX)
}

fn ppm(probability: u32) -> u32 {
    let ppm = (u64::from(probability) * u64::from(PPM_ONE) + PROBABILITY_ONE / 2) / PROBABILITY_ONE;
    u32::try_from(ppm).unwrap_or(PPM_ONE)
}

/// One qdisc from a dump, with the parts this module reads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DumpedQdisc {
    ifindex: u32,
    handle: u32,
    parent: u32,
    kind: String,
    options: Vec<u8>,
    stab_base: Option<Vec<u8>>,
    statistics: QdiscStatistics,
}

impl DumpedQdisc {
    fn parse(payload: &[u8]) -> Result<Self, NetlinkError> {
        if payload.len() < TCMSG_LEN {
            return Err(NetlinkError::Malformed(format!(
                "qdisc message of {} bytes is shorter than a tcmsg",
                payload.len()
            )));
        }
        let mut qdisc = Self {
            ifindex: u32::try_from(read_i32(payload, 4)?).unwrap_or(0),
            handle: read_u32(payload, 8)?,
            parent: read_u32(payload, 12)?,
            kind: String::new(),
            options: Vec::new(),
            stab_base: None,
            statistics: QdiscStatistics::default(),
        };
        let mut legacy_stats = None;
        let mut stats2 = None;
        for attribute in attributes(&payload[TCMSG_LEN..]) {
            let (kind, value) = attribute?;
            match kind {
                TCA_KIND => {
                    qdisc.kind = String::from_utf8_lossy(value)
                        .trim_end_matches('\0')
                        .to_string();
                }
                TCA_OPTIONS => qdisc.options = value.to_vec(),
                TCA_STAB => {
                    for nested in attributes(value) {
                        let (nested_kind, nested_value) = nested?;
                        if nested_kind == TCA_STAB_BASE {
                            qdisc.stab_base = Some(nested_value.to_vec());
                        }
                    }
                }
                TCA_STATS => legacy_stats = Some(value),
                TCA_STATS2 => stats2 = Some(value),
                _ => {}
            }
        }
        qdisc.statistics = match (stats2, legacy_stats) {
            (Some(stats2), _) => parse_stats2(stats2)?,
            (None, Some(legacy)) => parse_legacy_stats(legacy)?,
            (None, None) => QdiscStatistics::default(),
        };
        Ok(qdisc)
    }

    /// Decodes our netem options and size table back into the spec that produced them.
    fn shaping(&self, ifindex: u32) -> Result<Shaping, ShapingError> {
        let unrecognised = |reason: String| ShapingError::Unrecognised { ifindex, reason };
        let malformed = |error: NetlinkError| unrecognised(error.to_string());
        if self.options.len() < NETEM_QOPT_LEN {
            return Err(unrecognised(format!(
                "netem options of {} bytes",
                self.options.len()
            )));
        }
        let qopt = |index: usize| read_u32(&self.options, index * 4);
        let mut delay_ns = u64::from(qopt(0).map_err(malformed)?) * PSCHED_TICK_NS as u64;
        let queue_limit = qopt(1).map_err(malformed)?;
        let loss = qopt(2).map_err(malformed)?;
        let gap = qopt(3).map_err(malformed)?;
        let duplicate = qopt(4).map_err(malformed)?;
        let mut jitter_ns = u64::from(qopt(5).map_err(malformed)?) * PSCHED_TICK_NS as u64;
        if gap != 0 {
            return Err(unrecognised(format!("reordering gap {gap}")));
        }
        let mut rate = 0u64;
        for attribute in attributes(&self.options[NETEM_QOPT_LEN..]) {
            let (kind, value) = attribute.map_err(malformed)?;
            match kind {
                TCA_NETEM_RATE => {
                    rate = rate.max(u64::from(read_u32(value, 0).map_err(malformed)?));
                    let overheads = value.get(4..16).unwrap_or_default();
                    if overheads.iter().any(|byte| *byte != 0) {
                        return Err(unrecognised(
                            "netem rate with packet or cell overheads".to_string(),
                        ));
                    }
                }
                TCA_NETEM_RATE64 => rate = rate.max(read_u64(value).map_err(malformed)?),
                TCA_NETEM_LATENCY64 => {
                    delay_ns =
                        u64::try_from(read_u64(value).map_err(malformed)? as i64).unwrap_or(0);
                }
                TCA_NETEM_JITTER64 => {
                    jitter_ns =
                        u64::try_from(read_u64(value).map_err(malformed)? as i64).unwrap_or(0);
                }
                _ => {}
            }
        }
        let (bitrate, data_bitrate) = match &self.stab_base {
            Some(base) => {
                let spec = SizeSpec::parse(base).map_err(malformed)?;
                if spec.cell_log != STAB_CELL_LOG
                    || spec.size_log != 0
                    || spec.cell_align != 0
                    || spec.overhead != 0
                    || spec.tsize as usize != STAB_SIZE
                {
                    return Err(unrecognised(format!(
                        "size table with cell_log {}, size_log {}, cell_align {}, overhead {}, {} entries",
                        spec.cell_log, spec.size_log, spec.cell_align, spec.overhead, spec.tsize
                    )));
                }
                if rate == 0 || !rate.is_multiple_of(u64::from(UNITS_PER_BIT)) {
                    return Err(unrecognised(format!(
                        "rate {rate} is not a whole number of bits per second"
                    )));
                }
                let bitrate = u32::try_from(rate / u64::from(UNITS_PER_BIT))
                    .map_err(|_| unrecognised(format!("rate {rate} is out of range")))?;
                (Some(bitrate), (spec.mpu != 0).then_some(spec.mpu))
            }
            None if rate == 0 || rate == ORDER_ONLY_RATE => (None, None),
            None => {
                return Err(unrecognised(format!(
                    "netem rate {rate} bytes/s without the driver's size table"
                )));
            }
        };
        Ok(Shaping {
            bitrate,
            data_bitrate,
            delay: Duration::from_nanos(delay_ns),
            jitter: Duration::from_nanos(jitter_ns),
            loss_ppm: ppm(loss),
            duplicate_ppm: ppm(duplicate),
            queue_limit,
        })
    }
}

/// The fields of `struct tc_sizespec` this module checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SizeSpec {
    cell_log: u8,
    size_log: u8,
    cell_align: i16,
    overhead: i32,
    mpu: u32,
    tsize: u32,
}

impl SizeSpec {
    fn parse(bytes: &[u8]) -> Result<Self, NetlinkError> {
        let prefix = bytes.get(..2).ok_or_else(|| {
            NetlinkError::Malformed(format!("size table base of {} bytes", bytes.len()))
        })?;
        Ok(Self {
            cell_log: prefix[0],
            size_log: prefix[1],
            cell_align: read_u16(bytes, 2)? as i16,
            overhead: read_i32(bytes, 4)?,
            mpu: read_u32(bytes, 12)?,
            tsize: read_u32(bytes, 20)?,
        })
    }
}

fn read_u64(bytes: &[u8]) -> Result<u64, NetlinkError> {
    bytes
        .get(..8)
        .and_then(|slice| slice.try_into().ok())
        .map(u64::from_ne_bytes)
        .ok_or_else(|| NetlinkError::Malformed(format!("8 bytes expected, have {}", bytes.len())))
}

/// `TCA_STATS2`: `gnet_stats_basic` {u64 bytes, u32 packets}, `gnet_stats_queue` {qlen,
/// backlog, drops, requeues, overlimits}, and a 64-bit packet count when it overflowed.
fn parse_stats2(bytes: &[u8]) -> Result<QdiscStatistics, NetlinkError> {
    let mut statistics = QdiscStatistics::default();
    for attribute in attributes(bytes) {
        let (kind, value) = attribute?;
        match kind {
            TCA_STATS_BASIC => {
                statistics.bytes = read_u64(value)?;
                statistics.packets = statistics.packets.max(u64::from(read_u32(value, 8)?));
            }
            TCA_STATS_PKT64 => statistics.packets = read_u64(value)?,
            TCA_STATS_QUEUE => {
                statistics.queued_frames = read_u32(value, 0)?;
                statistics.queued_bytes = read_u32(value, 4)?;
                statistics.drops = read_u32(value, 8)?;
                statistics.requeues = read_u32(value, 12)?;
                statistics.overlimits = read_u32(value, 16)?;
            }
            _ => {}
        }
    }
    Ok(statistics)
}

/// `TCA_STATS`: `struct tc_stats` {u64 bytes, u32 packets, drops, overlimits, bps, pps, qlen,
/// backlog}.
fn parse_legacy_stats(bytes: &[u8]) -> Result<QdiscStatistics, NetlinkError> {
    Ok(QdiscStatistics {
        bytes: read_u64(bytes)?,
        packets: u64::from(read_u32(bytes, 8)?),
        drops: read_u32(bytes, 12)?,
        overlimits: read_u32(bytes, 16)?,
        requeues: 0,
        queued_frames: read_u32(bytes, 28)?,
        queued_bytes: read_u32(bytes, 32)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(payload: &[u8]) -> DumpedQdisc {
        DumpedQdisc::parse(payload).unwrap()
    }

    #[test]
    fn reference_frames_have_their_worst_case_lengths() {
        // Classic, standard id: stuffed(19 + 64 + 16 = 99) = 99 + 98/4 = 123, + 12 = 135.
        assert_eq!(classic_frame_bits(8, false), CLASSIC_REFERENCE_BITS);
        // Extended id: stuffed(39 + 64 + 16 = 119) = 148, + 12 = 160.
        assert_eq!(classic_frame_bits(8, true), 160);
        // Empty frames: stuffed(35) + 12 = 55, stuffed(55) + 12 = 80.
        assert_eq!(classic_frame_bits(0, false), 55);
        assert_eq!(classic_frame_bits(0, true), 80);
        // A DLC above 8 still carries 8 bytes.
        assert_eq!(classic_frame_bits(15, false), 135);
        // FD, standard id, 64 bytes: stuffed(22 + 512 = 534) = 667, + 33 + 12 = 712.
        // Split: 17 arbitration bits + 4 stuff + 12 tail = 33 nominal; the remaining 679.
        let fd = fd_frame_bits(64, false);
        assert_eq!(
            fd,
            FdFrameBits {
                arbitration: 33,
                data: 679
            }
        );
        assert_eq!(fd.total(), FD_REFERENCE_BITS);
        // FD, standard id, 8 bytes (CRC-17 field of 28): stuffed(86) = 107, + 28 + 12 = 147.
        assert_eq!(fd_frame_bits(8, false).total(), 147);
        // FD, extended id, 64 bytes: stuffed(553) = 691, + 33 + 12 = 736; arbitration
        // 36 + 8 stuff + 12 = 56.
        assert_eq!(
            fd_frame_bits(64, true),
            FdFrameBits {
                arbitration: 56,
                data: 680
            }
        );
    }

    #[test]
    fn bitrates_become_the_frame_rates_of_a_saturated_bus() {
        // 125 kbit/s: 125000 / 135 = 925.9 frames/s, 1.08 ms per frame.
        let slow = RateModel::new(125_000, None);
        assert_eq!(slow.units_per_second(), 8_000_000);
        assert_eq!(slow.classic_units(), 8640);
        assert_eq!(slow.classic_frame_time(), Duration::from_micros(1080));
        assert!((slow.classic_frames_per_second() - 925.926).abs() < 0.001);
        // 1 Mbit/s: 7407 frames/s, 135 µs per frame.
        let fast = RateModel::new(1_000_000, None);
        assert_eq!(fast.classic_frames_per_second().round(), 7407.0);
        assert_eq!(fast.classic_frame_time(), Duration::from_micros(135));
        // FD at 500 kbit/s without a faster data phase: 712 bits, 1.424 ms, 702.2 frames/s.
        let fd = RateModel::new(500_000, None);
        assert_eq!(fd.fd_units(), 712 * 64);
        assert_eq!(fd.fd_frame_time(), Duration::from_micros(1424));
        // FD 500 kbit/s / 2 Mbit/s: 33 / 500k + 679 / 2M = 66 µs + 339.5 µs = 405.5 µs;
        // 64 × (33 + 679 / 4) = 12976 units, 2466.1 frames/s.
        let brs = RateModel::new(500_000, Some(2_000_000));
        assert_eq!(brs.fd_units(), 12_976);
        assert_eq!(brs.fd_frame_time(), Duration::from_nanos(405_500));
        assert!((brs.fd_frames_per_second() - 2466.1).abs() < 0.1);
        // Classic frames do not care about the data phase.
        assert_eq!(brs.classic_frame_time(), Duration::from_micros(270));
        // 1 Mbit/s / 5 Mbit/s: 64 × (33 + 679 / 5) = 64 × 168.8 = 10803.2 → 10803 units.
        assert_eq!(
            RateModel::new(1_000_000, Some(5_000_000)).fd_units(),
            10_803
        );
    }

    #[test]
    fn size_table_charges_classic_cells_and_fd_cells() {
        let table = RateModel::new(125_000, None).size_table();
        // skb->len 16 falls in cell 16 >> 3 = 2, 72 in cell 9.
        assert_eq!(table[16 >> STAB_CELL_LOG], 8640);
        assert_eq!(table[72 >> STAB_CELL_LOG], 45_568);
        assert_eq!(
            table,
            [
                8640, 8640, 8640, 45_568, 45_568, 45_568, 45_568, 45_568, 45_568, 45_568
            ]
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn netem_options_for_delay_and_loss_are_byte_exact() {
        let shaping = Shaping {
            delay: Duration::from_millis(20),
            loss_ppm: 100_000,
            ..Shaping::default()
        };
        let expected: Vec<u8> = [
            // tc_netem_qopt.latency: 20 ms = 20 000 000 ns / 64 = 312 500 ticks = 0x0004c4b4.
            &[0xb4, 0xc4, 0x04, 0x00][..],
            // limit: the default 100 = 0x64.
            &[0x64, 0x00, 0x00, 0x00],
            // loss: round(0.1 × 0xffffffff) = 429 496 730 = 0x1999999a.
            &[0x9a, 0x99, 0x99, 0x19],
            // gap, duplicate, jitter: 0.
            &[0; 12],
            // TCA_NETEM_RATE (6), 20 bytes: rate 0 (no bitrate), no overheads.
            &[20, 0, 6, 0],
            &[0; 16],
            // TCA_NETEM_LATENCY64 (10): 20 000 000 ns = 0x01312d00.
            &[12, 0, 10, 0, 0x00, 0x2d, 0x31, 0x01, 0, 0, 0, 0],
            // TCA_NETEM_JITTER64 (11): 0.
            &[12, 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(encode_netem_options(&shaping), expected);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn qdisc_request_with_bitrate_is_byte_exact() {
        let shaping = Shaping {
            bitrate: Some(125_000),
            duplicate_ppm: 50_000,
            queue_limit: 100,
            ..Shaping::default()
        };
        let expected: Vec<u8> = [
            // tcmsg: AF_UNSPEC + padding, ifindex 7, handle 0xca000000, parent TC_H_ROOT, info.
            &[
                0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0xca, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
            ][..],
            // TCA_KIND (1) "netem\0": 4 + 6 = 10 bytes, padded to 12.
            &[10, 0, 1, 0, b'n', b'e', b't', b'e', b'm', 0, 0, 0],
            // TCA_OPTIONS (2): 4 + 24 + 20 + 12 + 12 = 72 bytes.
            &[72, 0, 2, 0],
            // latency 0, limit 100, loss 0, gap 0.
            &[0, 0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            // duplicate: round(0.05 × 0xffffffff) = 214 748 365 = 0x0ccccccd; jitter 0.
            &[0xcd, 0xcc, 0xcc, 0x0c, 0, 0, 0, 0],
            // TCA_NETEM_RATE: 125 000 × 64 = 8 000 000 units/s = 0x007a1200.
            &[20, 0, 6, 0, 0x00, 0x12, 0x7a, 0x00],
            &[0; 12],
            &[12, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[12, 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            // TCA_STAB (8 | NLA_F_NESTED): 4 + 28 + 24 = 56 bytes.
            &[56, 0, 0x08, 0x80],
            // TCA_STAB_BASE (1): tc_sizespec cell_log 3, size_log 0, cell_align 0, overhead 0,
            // linklayer 1 (ethernet), mpu 0 (no data bitrate), mtu 72, tsize 10.
            &[28, 0, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            &[0, 0, 0, 0, 72, 0, 0, 0, 10, 0, 0, 0],
            // TCA_STAB_DATA (2): 3 Classic cells of 8640 (0x21c0), 7 FD cells of 45 568 (0xb200).
            &[24, 0, 2, 0],
            &[0xc0, 0x21, 0xc0, 0x21, 0xc0, 0x21],
            &[
                0x00, 0xb2, 0x00, 0xb2, 0x00, 0xb2, 0x00, 0xb2, 0x00, 0xb2, 0x00, 0xb2, 0x00, 0xb2,
            ],
        ]
        .concat();
        assert_eq!(encode_new_qdisc(7, &shaping), expected);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn data_bitrate_changes_the_fd_cells_and_is_recorded_as_mpu() {
        let shaping = Shaping {
            bitrate: Some(500_000),
            data_bitrate: Some(2_000_000),
            ..Shaping::default()
        };
        // mpu = 2 000 000 = 0x001e8480.
        assert_eq!(
            encode_sizespec(shaping.data_bitrate),
            [
                3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x80, 0x84, 0x1e, 0x00, 72, 0, 0, 0, 10, 0, 0,
                0
            ]
        );
        let model = shaping.rate_model().unwrap();
        // Classic 8640 = 0x21c0, FD 12 976 = 0x32b0.
        let mut expected = [0xc0, 0x21].repeat(3);
        expected.extend([0xb0, 0x32].repeat(7));
        assert_eq!(encode_size_table(&model), expected);
        // netem rate: 500 000 × 64 = 32 000 000 = 0x01e84800.
        let options = encode_netem_options(&shaping);
        assert_eq!(&options[24..32], &[20, 0, 6, 0, 0x00, 0x48, 0xe8, 0x01]);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn jitter_without_bitrate_sets_an_unlimited_rate_to_keep_order() {
        let shaping = Shaping {
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(5),
            ..Shaping::default()
        };
        let options = encode_netem_options(&shaping);
        // jitter: 5 000 000 ns / 64 = 78 125 ticks = 0x0001312d.
        assert_eq!(&options[20..24], &[0x2d, 0x31, 0x01, 0x00]);
        // TCA_NETEM_RATE saturated at 0xffffffff, then TCA_NETEM_RATE64 (8) = u64::MAX.
        assert_eq!(&options[24..32], &[20, 0, 6, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            &options[44..56],
            &[12, 0, 8, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        // No size table without a bitrate.
        let request = encode_new_qdisc(3, &shaping);
        let qdisc = parsed(&request);
        assert_eq!(qdisc.stab_base, None);
        assert_eq!(qdisc.shaping(3).unwrap(), shaping);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn delete_targets_our_root_handle() {
        assert_eq!(
            tcmsg(12),
            [
                0, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0xca, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn encoded_specs_decode_back_to_themselves() {
        let specs = [
            Shaping {
                bitrate: Some(125_000),
                ..Shaping::default()
            },
            Shaping {
                bitrate: Some(500_000),
                data_bitrate: Some(2_000_000),
                delay: Duration::from_micros(2500),
                jitter: Duration::from_micros(700),
                loss_ppm: 1,
                duplicate_ppm: 999_999,
                queue_limit: 10,
            },
            Shaping {
                delay: Duration::from_secs(3),
                loss_ppm: PPM_ONE,
                ..Shaping::default()
            },
            Shaping {
                // 4 000 000 000 × 64 needs TCA_NETEM_RATE64.
                bitrate: Some(4_000_000_000),
                duplicate_ppm: 123_456,
                ..Shaping::default()
            },
        ];
        for spec in specs {
            spec.validate().unwrap();
            let qdisc = parsed(&encode_new_qdisc(9, &spec));
            assert_eq!(
                (qdisc.ifindex, qdisc.handle, qdisc.parent),
                (9, HANDLE, TC_H_ROOT)
            );
            assert_eq!(qdisc.kind, "netem");
            assert_eq!(qdisc.shaping(9).unwrap(), spec, "{spec}");
        }
    }

    #[test]
    fn every_ppm_survives_the_netem_probability_scale() {
        for value in (0..=PPM_ONE).step_by(7).chain([1, PPM_ONE - 1, PPM_ONE]) {
            assert_eq!(ppm(probability(value)), value);
        }
        assert_eq!(probability(PPM_ONE), u32::MAX);
        assert_eq!(probability(0), 0);
    }

    #[test]
    fn foreign_netem_settings_are_not_mistaken_for_ours() {
        // A rate with a packet overhead (as `tc ... netem rate 1mbit 1` makes).
        let mut request = encode_new_qdisc(4, &Shaping::default());
        // Options start after tcmsg (20) + kind (12) + the options header (4); the rate
        // attribute's packet_overhead follows qopt (24), its header (4) and its rate (4).
        let overhead_at = 20 + 12 + 4 + 24 + 4 + 4;
        request[overhead_at] = 1;
        let error = parsed(&request).shaping(4).unwrap_err();
        assert!(
            matches!(error, ShapingError::Unrecognised { ifindex: 4, .. }),
            "{error}"
        );

        // A rate without our size table.
        let mut options = encode_netem_options(&Shaping::default());
        options[28..32].copy_from_slice(&1000u32.to_ne_bytes());
        let qdisc = DumpedQdisc {
            ifindex: 4,
            handle: HANDLE,
            parent: TC_H_ROOT,
            kind: "netem".to_string(),
            options,
            stab_base: None,
            statistics: QdiscStatistics::default(),
        };
        let error = qdisc.shaping(4).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("without the driver's size table"),
            "{error}"
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn statistics_are_read_from_stats2() {
        let mut payload = tcmsg(5);
        payload.extend_from_slice(&[10, 0, 1, 0, b'n', b'e', b't', b'e', b'm', 0, 0, 0]);
        let stats2: Vec<u8> = [
            // TCA_STATS2 (7), nested: 4 + 20 + 24 = 48 bytes.
            &[48, 0, 7, 0x80][..],
            // TCA_STATS_BASIC (1): bytes 345 600 (40 frames × 8640 units), packets 40, padding.
            &[
                20, 0, 1, 0, 0x00, 0x46, 0x05, 0, 0, 0, 0, 0, 40, 0, 0, 0, 0, 0, 0, 0,
            ],
            // TCA_STATS_QUEUE (3): qlen 2, backlog 17 280, drops 5, requeues 0, overlimits 1.
            &[
                24, 0, 3, 0, 2, 0, 0, 0, 0x80, 0x43, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
            ],
        ]
        .concat();
        payload.extend_from_slice(&stats2);
        assert_eq!(
            parsed(&payload).statistics,
            QdiscStatistics {
                packets: 40,
                bytes: 345_600,
                drops: 5,
                overlimits: 1,
                requeues: 0,
                queued_frames: 2,
                queued_bytes: 17_280,
            }
        );
    }

    #[test]
    fn invalid_parameters_are_named() {
        let cases = [
            (
                Shaping {
                    bitrate: Some(0),
                    ..Shaping::default()
                },
                "bitrate",
            ),
            (
                Shaping {
                    data_bitrate: Some(2_000_000),
                    ..Shaping::default()
                },
                "data_bitrate",
            ),
            (
                Shaping {
                    bitrate: Some(500_000),
                    data_bitrate: Some(250_000),
                    ..Shaping::default()
                },
                "data_bitrate",
            ),
            (
                Shaping {
                    delay: Duration::from_millis(1),
                    jitter: Duration::from_millis(2),
                    ..Shaping::default()
                },
                "jitter",
            ),
            (
                Shaping {
                    delay: Duration::from_secs(10),
                    jitter: Duration::from_secs(3),
                    ..Shaping::default()
                },
                "jitter",
            ),
            (
                Shaping {
                    loss_ppm: PPM_ONE + 1,
                    ..Shaping::default()
                },
                "loss_ppm",
            ),
            (
                Shaping {
                    duplicate_ppm: u32::MAX,
                    ..Shaping::default()
                },
                "duplicate_ppm",
            ),
            (
                Shaping {
                    bitrate: Some(1000),
                    queue_limit: 0,
                    ..Shaping::default()
                },
                "queue_limit",
            ),
        ];
        for (spec, parameter) in cases {
            match spec.validate() {
                Err(ShapingError::Invalid {
                    parameter: named, ..
                }) => {
                    assert_eq!(named, parameter, "{spec}");
                }
                other => panic!("{spec}: expected an invalid {parameter}, got {other:?}"),
            }
        }
    }

    #[test]
    fn bad_input_is_rejected_before_any_socket_is_touched() {
        // Validation runs before the socket is used, so even a socket in this (unprivileged,
        // CAN-less) namespace sees no request.
        let mut socket = RouteSocket::open().unwrap();
        let error = apply(
            &mut socket,
            1,
            &Shaping {
                loss_ppm: 2 * PPM_ONE,
                ..Shaping::default()
            },
        )
        .unwrap_err();
        assert!(error.to_string().contains("loss_ppm"), "{error}");
        let error = apply(&mut socket, 0, &Shaping::default()).unwrap_err();
        assert!(error.to_string().contains("ifindex"), "{error}");
    }

    #[test]
    fn empty_spec_means_no_shaping() {
        assert!(Shaping::default().is_none());
        assert!(
            Shaping {
                queue_limit: 5,
                ..Shaping::default()
            }
            .is_none()
        );
        assert!(
            !Shaping {
                duplicate_ppm: 1,
                ..Shaping::default()
            }
            .is_none()
        );
    }
}
