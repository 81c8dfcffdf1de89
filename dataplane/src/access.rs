//! Member access control: the transmit allow-list, the receive filters and listen-only, as tc
//! classifiers on the host end of a member's vxcan pair.
//!
//! A pod joins a bus through a vxcan pair whose host end is meshed with can-gw rules. The
//! host end gets a `clsact` qdisc with, per hook, up to three `basic` classifiers:
//! - on **ingress** (frames the pod sent, before can-gw sees them) the transmit allow-list;
//! - on **egress** (frames can-gw sends towards the pod) the receive filters.
//!
//! On a hook, priority [`PRIO_ALLOW_CLASSIC`] holds the allow-list for Classic frames
//! (protocol `ETH_P_CAN`) and [`PRIO_ALLOW_FD`] the same list for FD frames (`ETH_P_CANFD`),
//! both an `em_canid` ematch tree with no action (a match ends classification with "pass");
//! [`PRIO_DROP_ALL`] is a catch-all (`ETH_P_ALL`) with a `gact drop` action whose statistics
//! count the frames refused. Matching the allow-lists per protocol keeps CAN XL frames away
//! from `em_canid`, which would read an XL priority field as an 11-bit identifier: they reach
//! the catch-all and are dropped. Every filter carries the handle [`FILTER_HANDLE`], so the
//! driver recognises its own filters when it reconciles.
//!
//! Why tc and not can-gw filters: a can-gw rule carries a single filter, so a list of N entries
//! needs N rules per destination, and overlapping entries would forward a frame several times.
//! Everything lives in the host namespace: the pod cannot remove it, even with `CAP_NET_ADMIN`.
//!
//! Kernel facts this module relies on (`net/sched/em_canid.c`, `net/sched/ematch.c`):
//! - `em_canid` takes an array of `struct can_filter` (at most [`MAX_ENTRIES`]). Standard
//!   entries fill an 11-bit bitmap, extended entries (`CAN_EFF_FLAG` in `can_id`) are compared
//!   one by one; a standard frame is only ever checked against standard entries and an
//!   extended frame against extended ones. `CAN_INV_FILTER` is **ignored**, so an inverted
//!   entry becomes an ematch of its own with the tree's `TCF_EM_INVERT` flag, OR-ed with the
//!   rest. The RTR flag is never compared: a remote frame is treated like a data frame.
//! - FD frames carry the identifier at the same offset as Classic ones and are matched alike.
//!
//! Everything is applied through a [`RouteSocket`] in the namespace of the host end.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use nix::errno::Errno;
use tracing::{debug, warn};

use crate::netlink::{
    AttributeBuffer, NLM_F_CREATE, NLM_F_REPLACE, NetlinkError, RouteSocket, attributes, read_u16,
    read_u32,
};

// Message types from `include/uapi/linux/rtnetlink.h`.
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;

// `TCA_*` attributes of a tc object (rtnetlink.h).
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;

// `TCA_BASIC_*` (pkt_cls.h).
const TCA_BASIC_EMATCHES: u16 = 2;
const TCA_BASIC_ACT: u16 = 3;
const TCA_BASIC_PCNT: u16 = 5;

// Ematch tree (pkt_cls.h).
const TCA_EMATCH_TREE_HDR: u16 = 1;
const TCA_EMATCH_TREE_LIST: u16 = 2;
const TCF_EM_REL_OR: u16 = 1 << 1;
const TCF_EM_REL_MASK: u16 = 3;
const TCF_EM_INVERT: u16 = 1 << 2;
const TCF_EM_CANID: u16 = 7;

// Actions (pkt_cls.h, tc_act/tc_gact.h, gen_stats.h).
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_ACT_STATS: u16 = 4;
const TCA_GACT_PARMS: u16 = 2;
const TC_ACT_SHOT: i32 = 2;
const TCA_STATS_BASIC: u16 = 1;
const TCA_STATS_PKT64: u16 = 8;

// Handles (pkt_sched.h): clsact sits at `TC_H_CLSACT` with handle `ffff:`; its two hooks are
// the minor numbers `TC_H_MIN_INGRESS` and `TC_H_MIN_EGRESS`.
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;
const HOOK_INGRESS: u32 = 0xffff_fff2;
const HOOK_EGRESS: u32 = 0xffff_fff3;

// Link-layer protocols (if_ether.h), host order; the tcmsg carries them in network order.
const ETH_P_ALL: u16 = 0x0003;
const ETH_P_CAN: u16 = 0x000c;
const ETH_P_CANFD: u16 = 0x000d;

// linux/can.h
const CAN_EFF_FLAG: u32 = 0x8000_0000;
const CAN_SFF_MASK: u32 = 0x0000_07ff;
const CAN_EFF_MASK: u32 = 0x1fff_ffff;

/// The most entries one list may hold: `em_canid`'s limit (`EM_CAN_RULES_MAX`).
pub const MAX_ENTRIES: usize = 500;
/// tc priority of the allow-list for Classic frames on either hook.
pub const PRIO_ALLOW_CLASSIC: u16 = 1;
/// tc priority of the allow-list for FD frames on either hook.
pub const PRIO_ALLOW_FD: u16 = 2;
/// tc priority of the catch-all `gact drop` on either hook.
pub const PRIO_DROP_ALL: u16 = 3;
/// The handle of every filter this module installs ("CA0D"), by which it recognises them.
pub const FILTER_HANDLE: u32 = 0xca0d;

/// One entry of an allow-list or a receive filter list, at kernel level.
///
/// A frame matches when it has the entry's format (standard 11-bit or extended 29-bit
/// identifier) and `frame_id & mask == id & mask`; `invert` turns that around, so an inverted
/// standard entry matches every extended frame. RTR and FD frames are matched by identifier
/// like any other.
///
/// ```
/// use can_dra_dataplane::access::CanMatch;
/// const EFF: u32 = 0x8000_0000;
/// let entry = CanMatch::standard(0x120, 0x7f0);
/// assert!(entry.matches(0x12f));
/// assert!(!entry.matches(0x130));
/// assert!(!entry.matches(0x12f | EFF), "an 11-bit entry never lets a 29-bit frame through");
/// assert!(entry.inverted().matches(0x12f | EFF));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CanMatch {
    /// Identifier bits to compare (no flag bits).
    pub id: u32,
    /// Which identifier bits are compared.
    pub mask: u32,
    /// Whether the entry is for extended (29-bit) frames; otherwise standard (11-bit) ones.
    pub extended: bool,
    /// Whether the entry matches every frame it would not match otherwise.
    pub invert: bool,
}

impl CanMatch {
    /// An entry for standard frames.
    pub const fn standard(id: u32, mask: u32) -> Self {
        Self {
            id,
            mask,
            extended: false,
            invert: false,
        }
    }

    /// An entry for extended frames.
    pub const fn extended(id: u32, mask: u32) -> Self {
        Self {
            id,
            mask,
            extended: true,
            invert: false,
        }
    }

    /// The same entry, inverted.
    pub const fn inverted(self) -> Self {
        Self {
            invert: !self.invert,
            ..self
        }
    }

    /// The identifier bits of the entry's format.
    const fn width_mask(&self) -> u32 {
        if self.extended {
            CAN_EFF_MASK
        } else {
            CAN_SFF_MASK
        }
    }

    /// Whether a frame whose `can_id` word is `can_id` (SocketCAN layout, `CAN_EFF_FLAG` in the
    /// top bit) matches, following the kernel's `em_canid` rules plus the ematch inversion.
    pub const fn matches(&self, can_id: u32) -> bool {
        let extended = can_id & CAN_EFF_FLAG != 0;
        let id = if extended {
            can_id & CAN_EFF_MASK
        } else {
            can_id & CAN_SFF_MASK
        };
        let hit = extended == self.extended && (id ^ self.id) & self.mask == 0;
        hit != self.invert
    }

    fn validate(&self) -> Result<(), &'static str> {
        if self.id & !self.width_mask() != 0 {
            return Err(if self.extended {
                "identifier does not fit 29 bits"
            } else {
                "identifier does not fit 11 bits"
            });
        }
        if self.mask & !self.width_mask() != 0 {
            return Err(if self.extended {
                "mask does not fit 29 bits"
            } else {
                "mask does not fit 11 bits"
            });
        }
        Ok(())
    }

    /// The kernel `struct can_filter` for this entry (inversion is carried by the ematch).
    ///
    /// The mask also carries `CAN_EFF_FLAG`, as iproute2 writes it: `em_canid` ignores it for
    /// standard entries and compares two set flags for extended ones, and `tc filter show`
    /// then prints a full-width mask the short way, exactly like a list made with `tc`.
    fn can_filter(&self) -> [u8; 8] {
        let can_id = if self.extended {
            self.id | CAN_EFF_FLAG
        } else {
            self.id
        };
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&can_id.to_ne_bytes());
        bytes[4..].copy_from_slice(&(self.mask | CAN_EFF_FLAG).to_ne_bytes());
        bytes
    }

    /// The entry a kernel `struct can_filter` stands for, flag bits dropped.
    fn from_can_filter(can_id: u32, can_mask: u32, invert: bool) -> Self {
        let extended = can_id & CAN_EFF_FLAG != 0;
        let width = if extended { CAN_EFF_MASK } else { CAN_SFF_MASK };
        Self {
            id: can_id & width,
            mask: can_mask & width,
            extended,
            invert,
        }
    }
}

impl fmt::Display for CanMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let invert = if self.invert { "!" } else { "" };
        let width = if self.extended { "ext" } else { "std" };
        write!(f, "{invert}{:#x}/{:#x} ({width})", self.id, self.mask)
    }
}

/// What a member may put on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TxPolicy {
    /// Every frame.
    #[default]
    All,
    /// Only frames matching at least one entry; everything else is dropped and counted.
    /// An empty list allows nothing.
    Allow(Vec<CanMatch>),
    /// Nothing (listen-only): every frame is dropped and counted.
    Nothing,
}

/// The access policy of one member, applied on the host end of its vxcan pair.
///
/// ```
/// use can_dra_dataplane::access::{AccessPolicy, CanMatch, TxPolicy};
/// let policy = AccessPolicy {
///     transmit: TxPolicy::Allow(vec![CanMatch::standard(0x100, 0x700)]),
///     receive: Some(vec![CanMatch::extended(0x18fe_0000, 0x1fff_0000)]),
/// };
/// assert!(policy.validate().is_ok());
/// assert_eq!(AccessPolicy::default().transmit, TxPolicy::All);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessPolicy {
    /// Frames the member may transmit.
    pub transmit: TxPolicy,
    /// Frames the member receives: `None` for every frame, otherwise only frames matching at
    /// least one entry (an empty list receives nothing). Refused frames are counted.
    pub receive: Option<Vec<CanMatch>>,
}

impl AccessPolicy {
    /// A listen-only member that receives every frame.
    pub fn listen_only() -> Self {
        Self {
            transmit: TxPolicy::Nothing,
            receive: None,
        }
    }

    /// Checks every entry (identifier and mask within the entry's width) and the list sizes,
    /// without touching the kernel.
    pub fn validate(&self) -> Result<(), AccessError> {
        if let TxPolicy::Allow(entries) = &self.transmit {
            validate_entries(Direction::Transmit, entries)?;
        }
        if let Some(entries) = &self.receive {
            validate_entries(Direction::Receive, entries)?;
        }
        Ok(())
    }

    /// The canonical form of this policy, as [`read`] reports it: entries sorted and
    /// de-duplicated, an empty allow-list shown as [`TxPolicy::Nothing`].
    pub fn normalized(&self) -> Self {
        let transmit = match &self.transmit {
            TxPolicy::All => TxPolicy::All,
            TxPolicy::Nothing => TxPolicy::Nothing,
            TxPolicy::Allow(entries) if entries.is_empty() => TxPolicy::Nothing,
            TxPolicy::Allow(entries) => TxPolicy::Allow(canonical(entries)),
        };
        Self {
            transmit,
            receive: self.receive.as_deref().map(canonical),
        }
    }

    fn plans(&self) -> [HookPlan; 2] {
        let normal = self.normalized();
        let transmit = match normal.transmit {
            TxPolicy::All => HookPlan::default(),
            TxPolicy::Nothing => HookPlan {
                allow: None,
                drop: true,
            },
            TxPolicy::Allow(entries) => HookPlan {
                allow: Some(entries),
                drop: true,
            },
        };
        let receive = match normal.receive {
            None => HookPlan::default(),
            Some(entries) => HookPlan {
                allow: (!entries.is_empty()).then_some(entries),
                drop: true,
            },
        };
        [transmit, receive]
    }
}

fn canonical(entries: &[CanMatch]) -> Vec<CanMatch> {
    entries
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn validate_entries(direction: Direction, entries: &[CanMatch]) -> Result<(), AccessError> {
    if entries.len() > MAX_ENTRIES {
        return Err(AccessError::TooManyEntries {
            direction,
            count: entries.len(),
            max: MAX_ENTRIES,
        });
    }
    for (index, entry) in entries.iter().enumerate() {
        entry
            .validate()
            .map_err(|reason| AccessError::InvalidEntry {
                direction,
                index,
                entry: *entry,
                reason,
            })?;
    }
    Ok(())
}

/// Frame counters of a member's access filters, since the filters were (re)installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccessCounters {
    /// Frames the member sent that matched its allow-list.
    pub transmit_passed: u64,
    /// Frames the member sent that were dropped (outside the allow-list, or listen-only).
    pub transmit_dropped: u64,
    /// Frames towards the member that matched its receive filters.
    pub receive_passed: u64,
    /// Frames towards the member that its receive filters refused.
    pub receive_dropped: u64,
}

/// The direction a list applies to, as seen from the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Frames the member sends: the ingress hook of the host end.
    Transmit,
    /// Frames the member receives: the egress hook of the host end.
    Receive,
}

impl Direction {
    const BOTH: [Self; 2] = [Self::Transmit, Self::Receive];

    const fn hook(self) -> u32 {
        match self {
            Self::Transmit => HOOK_INGRESS,
            Self::Receive => HOOK_EGRESS,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Transmit => "transmit",
            Self::Receive => "receive",
        })
    }
}

/// Errors from installing, reading or removing access filters.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// An entry's identifier or mask does not fit its format.
    #[error("{direction} filter entry {index} ({entry}): {reason}")]
    InvalidEntry {
        /// Which list.
        direction: Direction,
        /// Position of the entry in the list.
        index: usize,
        /// The entry.
        entry: CanMatch,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A list is longer than `em_canid` accepts.
    #[error("{direction} filter list has {count} entries, more than the kernel limit of {max}")]
    TooManyEntries {
        /// Which list.
        direction: Direction,
        /// How many entries were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The interface index cannot name an interface.
    #[error("access filters: ifindex {ifindex} names no interface")]
    InvalidIfindex {
        /// The index given.
        ifindex: u32,
    },
    /// A kernel module the filters need is neither loaded nor loadable.
    #[error(
        "{operation} on ifindex {ifindex}: kernel module {module} is missing (ENOENT); load it with `modprobe {module}`"
    )]
    ModuleMissing {
        /// The interface.
        ifindex: u32,
        /// What was being done.
        operation: String,
        /// The module (or the candidates, `a or b`, when the kernel's answer does not say which).
        module: String,
    },
    /// The interface does not exist (any more).
    #[error("{operation} on ifindex {ifindex}: interface not found (ENODEV)")]
    NoDevice {
        /// The interface.
        ifindex: u32,
        /// What was being done.
        operation: String,
    },
    /// The caller lacks `CAP_NET_ADMIN` in the interface's namespace.
    #[error("{operation} on ifindex {ifindex}: permission denied, CAP_NET_ADMIN is needed (EPERM)")]
    PermissionDenied {
        /// The interface.
        ifindex: u32,
        /// What was being done.
        operation: String,
    },
    /// Any other kernel or transport error.
    #[error("{operation} on ifindex {ifindex}: {source}")]
    Kernel {
        /// The interface.
        ifindex: u32,
        /// What was being done.
        operation: String,
        /// The underlying error.
        #[source]
        source: NetlinkError,
    },
    /// Filters at this module's priorities are not in a shape it installs (made by someone
    /// else, or half-installed). [`apply`] replaces them.
    #[error("access filters on ifindex {ifindex}: {detail}")]
    Unrecognised {
        /// The interface.
        ifindex: u32,
        /// What was found.
        detail: String,
    },
}

/// Installs `policy` on the host end `ifindex`, replacing whatever access filters are there.
///
/// Idempotent: filters already as wanted are left alone (their counters keep counting); the
/// rest are replaced in an order that never lets a refused frame through during the change.
/// With nothing to filter in either direction the `clsact` qdisc itself is removed (unless
/// filters of others sit on it). The policy is validated before the kernel is touched; if a
/// step fails, the filters found before the call are restored.
pub fn apply(
    socket: &mut RouteSocket,
    ifindex: u32,
    policy: &AccessPolicy,
) -> Result<(), AccessError> {
    policy.validate()?;
    check_ifindex(ifindex)?;
    let before = read_hooks(socket, ifindex)?;
    let plans = policy.plans();
    if let Err(error) = apply_plans(socket, ifindex, &plans, &before) {
        let restore = before.clone().map(|state| state.as_plan());
        let outcome = read_hooks(socket, ifindex)
            .and_then(|now| apply_plans(socket, ifindex, &restore, &now));
        if let Err(undo) = outcome {
            warn!(ifindex, %undo, "restoring the previous access filters failed");
        }
        return Err(error);
    }
    debug!(ifindex, ?policy, "access policy applied");
    Ok(())
}

/// Removes every access filter of this module from the host end `ifindex`, and the `clsact`
/// qdisc if nothing else uses it. Succeeds when there is nothing to remove.
pub fn clear(socket: &mut RouteSocket, ifindex: u32) -> Result<(), AccessError> {
    check_ifindex(ifindex)?;
    let before = read_hooks(socket, ifindex)?;
    apply_plans(socket, ifindex, &Default::default(), &before)
}

/// Reads the policy installed on the host end `ifindex`, in [`AccessPolicy::normalized`] form.
///
/// Fails with [`AccessError::Unrecognised`] when the filters at this module's priorities are
/// not a shape [`apply`] produces; [`apply`] repairs that.
pub fn read(socket: &mut RouteSocket, ifindex: u32) -> Result<AccessPolicy, AccessError> {
    check_ifindex(ifindex)?;
    let [transmit, receive] = read_hooks(socket, ifindex)?;
    let unrecognised = |direction: Direction, detail: String| AccessError::Unrecognised {
        ifindex,
        detail: format!("{direction} hook: {detail}"),
    };
    let transmit = match transmit
        .recognised()
        .map_err(|detail| unrecognised(Direction::Transmit, detail))?
    {
        HookPlan { drop: false, .. } => TxPolicy::All,
        HookPlan {
            allow: None,
            drop: true,
        } => TxPolicy::Nothing,
        HookPlan {
            allow: Some(entries),
            drop: true,
        } => TxPolicy::Allow(entries),
    };
    let receive = match receive
        .recognised()
        .map_err(|detail| unrecognised(Direction::Receive, detail))?
    {
        HookPlan { drop: false, .. } => None,
        HookPlan { allow, drop: true } => Some(allow.unwrap_or_default()),
    };
    Ok(AccessPolicy { transmit, receive })
}

/// Reads the frame counters of the access filters on the host end `ifindex`. Directions
/// without filters count zero.
pub fn counters(socket: &mut RouteSocket, ifindex: u32) -> Result<AccessCounters, AccessError> {
    check_ifindex(ifindex)?;
    let [transmit, receive] = read_hooks(socket, ifindex)?;
    Ok(AccessCounters {
        transmit_passed: transmit.passed,
        transmit_dropped: transmit.dropped,
        receive_passed: receive.passed,
        receive_dropped: receive.dropped,
    })
}

fn check_ifindex(ifindex: u32) -> Result<(), AccessError> {
    if ifindex == 0 || i32::try_from(ifindex).is_err() {
        return Err(AccessError::InvalidIfindex { ifindex });
    }
    Ok(())
}

/// What one hook should hold: an allow-list (both protocols) and whether the catch-all drop is
/// there. `allow` without `drop` is never planned: it would filter nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct HookPlan {
    allow: Option<Vec<CanMatch>>,
    drop: bool,
}

/// What one hook holds, as far as this module is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct HookState {
    classic: Option<Vec<CanMatch>>,
    fd: Option<Vec<CanMatch>>,
    drop: bool,
    /// Our priorities holding something this module does not install.
    unrecognised: BTreeSet<u16>,
    /// Filters of others on this hook.
    foreign: usize,
    passed: u64,
    dropped: u64,
}

impl HookState {
    fn recognised(&self) -> Result<HookPlan, String> {
        if let Some(prio) = self.unrecognised.first() {
            return Err(format!("priority {prio} holds a filter of unknown shape"));
        }
        if self.classic != self.fd {
            return Err("the Classic and FD allow-lists differ".to_string());
        }
        if self.classic.is_some() && !self.drop {
            return Err("an allow-list without its drop-all filter".to_string());
        }
        Ok(HookPlan {
            allow: self.classic.clone(),
            drop: self.drop,
        })
    }

    /// The plan that recreates what is recognised here (used to undo a failed change).
    fn as_plan(&self) -> HookPlan {
        HookPlan {
            allow: self.classic.clone().or_else(|| self.fd.clone()),
            drop: self.drop,
        }
    }

    fn is_empty(&self) -> bool {
        self.classic.is_none() && self.fd.is_none() && !self.drop && self.unrecognised.is_empty()
    }
}

fn apply_plans(
    socket: &mut RouteSocket,
    ifindex: u32,
    plans: &[HookPlan; 2],
    states: &[HookState; 2],
) -> Result<(), AccessError> {
    let wanted = plans.iter().any(|plan| plan.drop);
    if wanted {
        run(
            socket,
            ifindex,
            "adding the clsact qdisc",
            &["sch_ingress"],
            RTM_NEWQDISC,
            NLM_F_CREATE,
            &clsact_request(ifindex),
        )?;
    }
    for ((direction, plan), state) in Direction::BOTH.into_iter().zip(plans).zip(states) {
        apply_hook(socket, ifindex, direction, plan, state)?;
    }
    let foreign: usize = states.iter().map(|state| state.foreign).sum();
    let ours_before = states.iter().any(|state| !state.is_empty());
    if !wanted && foreign == 0 && ours_before {
        remove_clsact(socket, ifindex)?;
    }
    Ok(())
}

fn apply_hook(
    socket: &mut RouteSocket,
    ifindex: u32,
    direction: Direction,
    plan: &HookPlan,
    state: &HookState,
) -> Result<(), AccessError> {
    let mut state = state.clone();
    for prio in std::mem::take(&mut state.unrecognised) {
        delete_filter(socket, ifindex, direction, prio)?;
        match prio {
            PRIO_ALLOW_CLASSIC => state.classic = None,
            PRIO_ALLOW_FD => state.fd = None,
            _ => state.drop = false,
        }
    }
    // Order matters: the drop-all goes first when the hook opens up and last when it closes,
    // and allow-lists are swapped in place, so no refused frame slips through meanwhile.
    if !plan.drop && state.drop {
        delete_filter(socket, ifindex, direction, PRIO_DROP_ALL)?;
    }
    for (prio, protocol, installed) in [
        (PRIO_ALLOW_CLASSIC, ETH_P_CAN, &state.classic),
        (PRIO_ALLOW_FD, ETH_P_CANFD, &state.fd),
    ] {
        match &plan.allow {
            Some(entries) if installed.as_ref() != Some(entries) => {
                let operation = format!(
                    "installing the {direction} allow-list for {} frames",
                    protocol_name(protocol)
                );
                run(
                    socket,
                    ifindex,
                    &operation,
                    &["cls_basic", "em_canid"],
                    RTM_NEWTFILTER,
                    NLM_F_CREATE | NLM_F_REPLACE,
                    &allow_filter_request(ifindex, direction, prio, protocol, entries),
                )?;
            }
            None if installed.is_some() => delete_filter(socket, ifindex, direction, prio)?,
            _ => {}
        }
    }
    if plan.drop && !state.drop {
        run(
            socket,
            ifindex,
            &format!("installing the {direction} drop-all filter"),
            &["cls_basic", "act_gact"],
            RTM_NEWTFILTER,
            NLM_F_CREATE | NLM_F_REPLACE,
            &drop_filter_request(ifindex, direction),
        )?;
    }
    Ok(())
}

fn protocol_name(protocol: u16) -> &'static str {
    match protocol {
        ETH_P_CAN => "Classic",
        ETH_P_CANFD => "FD",
        _ => "all",
    }
}

fn delete_filter(
    socket: &mut RouteSocket,
    ifindex: u32,
    direction: Direction,
    prio: u16,
) -> Result<(), AccessError> {
    let operation = format!("removing the {direction} filter at priority {prio}");
    // A whole priority goes at once: protocol 0 and handle 0 match whatever is there.
    let request = tcmsg(ifindex, 0, direction.hook(), u32::from(prio) << 16);
    match run(
        socket,
        ifindex,
        &operation,
        &[],
        RTM_DELTFILTER,
        0,
        &request,
    ) {
        Err(AccessError::Kernel { source, .. }) if source.errno() == Some(Errno::ENOENT) => Ok(()),
        other => other,
    }
}

fn remove_clsact(socket: &mut RouteSocket, ifindex: u32) -> Result<(), AccessError> {
    let request = tcmsg(ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0);
    match run(
        socket,
        ifindex,
        "removing the clsact qdisc",
        &[],
        RTM_DELQDISC,
        0,
        &request,
    ) {
        // Already gone, or replaced by someone else's ingress qdisc: nothing of ours is left.
        Err(AccessError::Kernel { source, .. })
            if matches!(source.errno(), Some(Errno::ENOENT | Errno::EINVAL)) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Sends one request and maps the kernel's answer to an [`AccessError`]. `modules` are the
/// kernel modules whose absence this request reports as `ENOENT`.
fn run(
    socket: &mut RouteSocket,
    ifindex: u32,
    operation: &str,
    modules: &[&str],
    message_type: u16,
    flags: u16,
    payload: &[u8],
) -> Result<(), AccessError> {
    socket
        .request(message_type, flags, payload)
        .map(drop)
        .map_err(|source| classify(ifindex, operation, modules, source))
}

fn classify(ifindex: u32, operation: &str, modules: &[&str], source: NetlinkError) -> AccessError {
    let operation = operation.to_string();
    match source.errno() {
        Some(Errno::ENODEV) => AccessError::NoDevice { ifindex, operation },
        Some(Errno::EPERM) => AccessError::PermissionDenied { ifindex, operation },
        Some(Errno::ENOENT) if !modules.is_empty() => AccessError::ModuleMissing {
            ifindex,
            operation,
            module: missing_module(modules, Path::new("/sys/module")),
        },
        _ => AccessError::Kernel {
            ifindex,
            operation,
            source,
        },
    }
}

/// Names the module to blame among `candidates`: those not loaded (no directory under
/// `sys_module`), or all of them when that does not narrow it down (built-in modules).
fn missing_module(candidates: &[&str], sys_module: &Path) -> String {
    let absent: Vec<&str> = candidates
        .iter()
        .copied()
        .filter(|name| !sys_module.join(name).exists())
        .collect();
    if absent.is_empty() {
        candidates.join(" or ")
    } else {
        absent.join(" or ")
    }
}

/// `struct tcmsg`: family (AF_UNSPEC), 3 pad bytes, ifindex, handle, parent, info.
fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(20);
    bytes.extend_from_slice(&[0, 0, 0, 0]);
    bytes.extend_from_slice(&ifindex.to_ne_bytes());
    bytes.extend_from_slice(&handle.to_ne_bytes());
    bytes.extend_from_slice(&parent.to_ne_bytes());
    bytes.extend_from_slice(&info.to_ne_bytes());
    bytes
}

/// A filter's `tcm_info`: priority in the upper half, protocol (network order) in the lower.
fn filter_info(prio: u16, protocol: u16) -> u32 {
    (u32::from(prio) << 16) | u32::from(protocol.to_be())
}

fn clsact_request(ifindex: u32) -> Vec<u8> {
    let mut request = tcmsg(ifindex, CLSACT_HANDLE, TC_H_CLSACT, 0);
    let mut attributes = AttributeBuffer::default();
    attributes.push_str(TCA_KIND, "clsact");
    request.extend_from_slice(attributes.as_bytes());
    request
}

/// The ematch tree of an allow-list: one `em_canid` match with every plain entry, then one
/// inverted match per inverted entry, all OR-ed. `entries` must not be empty.
fn ematch_tree(buffer: &mut AttributeBuffer, entries: &[CanMatch]) {
    let plain: Vec<&CanMatch> = entries.iter().filter(|entry| !entry.invert).collect();
    let mut matches: Vec<(u16, Vec<&CanMatch>)> = Vec::new();
    if !plain.is_empty() {
        matches.push((0, plain));
    }
    for entry in entries.iter().filter(|entry| entry.invert) {
        matches.push((TCF_EM_INVERT, vec![entry]));
    }
    // At most MAX_ENTRIES + 1 matches (validated), far below u16::MAX.
    let count = u16::try_from(matches.len()).unwrap_or(u16::MAX);
    let mut header = [0u8; 4];
    header[..2].copy_from_slice(&count.to_ne_bytes());
    // progid (TCF_EM_PROG_TC) stays 0.
    buffer.push(TCA_EMATCH_TREE_HDR, &header);
    buffer.push_nested(TCA_EMATCH_TREE_LIST, |list| {
        let last = matches.len().saturating_sub(1);
        for (index, (invert, filters)) in matches.iter().enumerate() {
            let relation = if index == last { 0 } else { TCF_EM_REL_OR };
            // struct tcf_ematch_hdr: matchid, kind, flags, pad.
            let mut item = Vec::with_capacity(8 + 8 * filters.len());
            item.extend_from_slice(&0u16.to_ne_bytes());
            item.extend_from_slice(&TCF_EM_CANID.to_ne_bytes());
            item.extend_from_slice(&(relation | invert).to_ne_bytes());
            item.extend_from_slice(&0u16.to_ne_bytes());
            for filter in filters {
                item.extend_from_slice(&filter.can_filter());
            }
            // The kernel insists on plain types 1..=n here, without the nested flag.
            let kind = u16::try_from(index + 1).unwrap_or(u16::MAX);
            list.push(kind, &item);
        }
    });
}

fn allow_filter_request(
    ifindex: u32,
    direction: Direction,
    prio: u16,
    protocol: u16,
    entries: &[CanMatch],
) -> Vec<u8> {
    let mut request = tcmsg(
        ifindex,
        FILTER_HANDLE,
        direction.hook(),
        filter_info(prio, protocol),
    );
    let mut attributes = AttributeBuffer::default();
    attributes.push_str(TCA_KIND, "basic");
    attributes.push_nested(TCA_OPTIONS, |options| {
        options.push_nested(TCA_BASIC_EMATCHES, |tree| ematch_tree(tree, entries));
    });
    request.extend_from_slice(attributes.as_bytes());
    request
}

fn drop_filter_request(ifindex: u32, direction: Direction) -> Vec<u8> {
    let mut request = tcmsg(
        ifindex,
        FILTER_HANDLE,
        direction.hook(),
        filter_info(PRIO_DROP_ALL, ETH_P_ALL),
    );
    let mut attributes = AttributeBuffer::default();
    attributes.push_str(TCA_KIND, "basic");
    attributes.push_nested(TCA_OPTIONS, |options| {
        options.push_nested(TCA_BASIC_ACT, |actions| {
            // Actions are numbered by their order, starting at 1.
            actions.push_nested(1, |action| {
                action.push_str(TCA_ACT_KIND, "gact");
                action.push_nested(TCA_ACT_OPTIONS, |gact| {
                    // struct tc_gact: index, capab, action, refcnt, bindcnt.
                    let mut parms = [0u8; 20];
                    parms[8..12].copy_from_slice(&TC_ACT_SHOT.to_ne_bytes());
                    gact.push(TCA_GACT_PARMS, &parms);
                });
            });
        });
    });
    request.extend_from_slice(attributes.as_bytes());
    request
}

fn read_hooks(socket: &mut RouteSocket, ifindex: u32) -> Result<[HookState; 2], AccessError> {
    let mut states: [HookState; 2] = Default::default();
    for (direction, state) in Direction::BOTH.into_iter().zip(states.iter_mut()) {
        let operation = format!("listing the {direction} filters");
        let request = tcmsg(ifindex, 0, direction.hook(), 0);
        let replies = match socket.dump(RTM_GETTFILTER, &request) {
            // The kernel sizes a dump's first buffer after the socket's earlier receives; on a
            // fresh socket a long allow-list does not fit it. The failed answer itself was
            // received with a large buffer, so a second attempt gets room.
            Err(error) if error.errno() == Some(Errno::EMSGSIZE) => {
                socket.dump(RTM_GETTFILTER, &request)
            }
            other => other,
        }
        .map_err(|source| classify(ifindex, &operation, &[], source))?;
        for reply in replies
            .iter()
            .filter(|reply| reply.message_type == RTM_NEWTFILTER)
        {
            let filter = parse_filter(&reply.payload).map_err(|source| AccessError::Kernel {
                ifindex,
                operation: operation.clone(),
                source,
            })?;
            state.absorb(&filter);
        }
    }
    Ok(states)
}

/// One filter from a dump, with the parts this module looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DumpedFilter {
    handle: u32,
    prio: u16,
    protocol: u16,
    kind: String,
    /// `Some` when the filter is an `em_canid` allow-list.
    entries: Option<Vec<CanMatch>>,
    /// The filter's only action is `gact drop`.
    drops: bool,
    /// Frames that matched (`TCA_BASIC_PCNT` rhit).
    hits: u64,
    /// Frames the action handled.
    action_packets: u64,
    /// Something in the options this module does not produce.
    odd: bool,
}

impl HookState {
    fn absorb(&mut self, filter: &DumpedFilter) {
        // Handle 0: the per-priority header a dump lists before the filters themselves.
        if filter.handle == 0 {
            return;
        }
        let ours_prio = matches!(
            filter.prio,
            PRIO_ALLOW_CLASSIC | PRIO_ALLOW_FD | PRIO_DROP_ALL
        );
        if filter.handle != FILTER_HANDLE || !ours_prio {
            self.foreign += 1;
            return;
        }
        let basic = filter.kind == "basic" && !filter.odd;
        match (filter.prio, filter.protocol, &filter.entries) {
            (PRIO_ALLOW_CLASSIC, ETH_P_CAN, Some(entries)) if basic && !filter.drops => {
                self.classic = Some(canonical(entries));
                self.passed += filter.hits;
            }
            (PRIO_ALLOW_FD, ETH_P_CANFD, Some(entries)) if basic && !filter.drops => {
                self.fd = Some(canonical(entries));
                self.passed += filter.hits;
            }
            (PRIO_DROP_ALL, ETH_P_ALL, None) if basic && filter.drops => {
                self.drop = true;
                self.dropped += filter.action_packets;
            }
            _ => {
                self.unrecognised.insert(filter.prio);
            }
        }
    }
}

fn malformed(what: &str) -> NetlinkError {
    NetlinkError::Malformed(what.to_string())
}

fn parse_filter(payload: &[u8]) -> Result<DumpedFilter, NetlinkError> {
    let header = payload
        .get(..20)
        .ok_or_else(|| malformed("filter message shorter than a tcmsg"))?;
    let info = read_u32(header, 16)?;
    let mut filter = DumpedFilter {
        handle: read_u32(header, 8)?,
        prio: u16::try_from(info >> 16).unwrap_or(u16::MAX),
        protocol: u16::from_be(u16::try_from(info & 0xffff).unwrap_or(0)),
        ..DumpedFilter::default()
    };
    let mut options = None;
    for attribute in attributes(&payload[20..]) {
        match attribute? {
            (TCA_KIND, kind) => {
                filter.kind = String::from_utf8_lossy(kind)
                    .trim_end_matches('\0')
                    .to_string();
            }
            (TCA_OPTIONS, bytes) => options = Some(bytes),
            _ => {}
        }
    }
    if filter.kind == "basic"
        && let Some(options) = options
    {
        parse_basic_options(options, &mut filter)?;
    }
    Ok(filter)
}

fn parse_basic_options(options: &[u8], filter: &mut DumpedFilter) -> Result<(), NetlinkError> {
    for attribute in attributes(options) {
        match attribute? {
            // The kernel dumps an empty tree for a filter without ematches.
            (TCA_BASIC_EMATCHES, tree) => match parse_ematch_tree(tree)? {
                Some(entries) if entries.is_empty() => {}
                Some(entries) => filter.entries = Some(entries),
                None => filter.odd = true,
            },
            (TCA_BASIC_ACT, actions) => {
                let mut count = 0;
                for action in attributes(actions) {
                    let (_, action) = action?;
                    count += 1;
                    let (drops, packets) = parse_gact(action)?;
                    filter.drops = drops;
                    filter.action_packets = packets;
                }
                filter.odd |= count != 1 || !filter.drops;
            }
            (TCA_BASIC_PCNT, counts) => {
                // struct tc_basic_pcnt { u64 rcnt; u64 rhit; }
                filter.hits = counts
                    .get(8..16)
                    .and_then(|bytes| bytes.try_into().ok())
                    .map(u64::from_ne_bytes)
                    .ok_or_else(|| malformed("TCA_BASIC_PCNT shorter than 16 bytes"))?;
            }
            // Classid, police: never set by this module.
            (1 | 4, _) => filter.odd = true,
            _ => {}
        }
    }
    Ok(())
}

/// Reads an ematch tree back into entries (none for an empty tree); `None` when it is not a
/// shape [`ematch_tree`] makes (another ematch kind, AND relations, an inverted match of several
/// entries).
fn parse_ematch_tree(tree: &[u8]) -> Result<Option<Vec<CanMatch>>, NetlinkError> {
    let mut entries = Vec::new();
    let mut declared = None;
    let mut seen = 0usize;
    for attribute in attributes(tree) {
        match attribute? {
            (TCA_EMATCH_TREE_HDR, header) => declared = Some(read_u16(header, 0)?),
            (TCA_EMATCH_TREE_LIST, list) => {
                let items: Vec<&[u8]> = attributes(list)
                    .map(|item| item.map(|(_, bytes)| bytes))
                    .collect::<Result<_, _>>()?;
                for (index, item) in items.iter().enumerate() {
                    seen += 1;
                    let kind = read_u16(item, 2)?;
                    let flags = read_u16(item, 4)?;
                    let relation = flags & TCF_EM_REL_MASK;
                    let wanted_relation = if index + 1 == items.len() {
                        0
                    } else {
                        TCF_EM_REL_OR
                    };
                    let filters = item.get(8..).unwrap_or_default();
                    if kind != TCF_EM_CANID
                        || relation != wanted_relation
                        || filters.is_empty()
                        || filters.len() % 8 != 0
                    {
                        return Ok(None);
                    }
                    let invert = flags & TCF_EM_INVERT != 0;
                    if invert && filters.len() != 8 {
                        return Ok(None);
                    }
                    for chunk in filters.chunks_exact(8) {
                        entries.push(CanMatch::from_can_filter(
                            read_u32(chunk, 0)?,
                            read_u32(chunk, 4)?,
                            invert,
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    if declared.map(usize::from) != Some(seen) {
        return Ok(None);
    }
    Ok(Some(entries))
}

/// Reads one action: whether it is `gact drop`, and how many packets it handled.
fn parse_gact(action: &[u8]) -> Result<(bool, u64), NetlinkError> {
    let mut gact = false;
    let mut shot = false;
    let mut packets = 0u64;
    let mut packets64 = None;
    for attribute in attributes(action) {
        match attribute? {
            (TCA_ACT_KIND, kind) => gact = kind.strip_suffix(b"\0").unwrap_or(kind) == b"gact",
            (TCA_ACT_OPTIONS, options) => {
                for option in attributes(options) {
                    if let (TCA_GACT_PARMS, parms) = option? {
                        shot = read_u32(parms, 8)?.to_ne_bytes() == TC_ACT_SHOT.to_ne_bytes();
                    }
                }
            }
            (TCA_ACT_STATS, stats) => {
                for stat in attributes(stats) {
                    match stat? {
                        // struct gnet_stats_basic { u64 bytes; u32 packets; } (16 with padding)
                        (TCA_STATS_BASIC, basic) => packets = u64::from(read_u32(basic, 8)?),
                        // Present when the packet count outgrew 32 bits.
                        (TCA_STATS_PKT64, count) => {
                            packets64 = count
                                .get(..8)
                                .and_then(|bytes| bytes.try_into().ok())
                                .map(u64::from_ne_bytes);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok((gact && shot, packets64.unwrap_or(packets)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends host-endian words, so expectations read like the C structs they encode.
    fn u16s(bytes: &mut Vec<u8>, values: &[u16]) {
        for value in values {
            bytes.extend_from_slice(&value.to_ne_bytes());
        }
    }

    fn u32s(bytes: &mut Vec<u8>, values: &[u32]) {
        for value in values {
            bytes.extend_from_slice(&value.to_ne_bytes());
        }
    }

    #[test]
    fn allow_filter_request_is_byte_exact() {
        // Transmit allow-list on ifindex 7 for Classic frames:
        //   0x123/0x7ff (std), 0x18fe0000/0x1fff0000 (ext), !0x100/0x700 (std, inverted).
        let entries = [
            CanMatch::standard(0x123, 0x7ff),
            CanMatch::extended(0x18fe_0000, 0x1fff_0000),
            CanMatch::standard(0x100, 0x700).inverted(),
        ];
        let request = allow_filter_request(7, Direction::Transmit, 1, ETH_P_CAN, &entries);

        let mut expected = Vec::new();
        // tcmsg: AF_UNSPEC + padding, ifindex 7, handle 0xca0d, parent ffff:fff2 (ingress),
        // info = prio 1 << 16 | htons(ETH_P_CAN) (0x000c in network order).
        expected.extend_from_slice(&[0, 0, 0, 0]);
        u32s(
            &mut expected,
            &[
                7,
                0xca0d,
                0xffff_fff2,
                (1 << 16) | u32::from(0x000cu16.to_be()),
            ],
        );
        // TCA_KIND "basic\0": 4 + 6 = 10 bytes, padded to 12.
        u16s(&mut expected, &[10, 1]);
        expected.extend_from_slice(b"basic\0\0\0");
        // Lengths, innermost first (each attribute: 4-byte header + payload, 4-aligned):
        //   item 1 = 4 + 8 (tcf_ematch_hdr) + 2 * 8 (two can_filter) = 28
        //   item 2 = 4 + 8 + 8 = 20
        //   TCA_EMATCH_TREE_LIST = 4 + 28 + 20 = 52; TCA_EMATCH_TREE_HDR = 4 + 4 = 8
        //   TCA_BASIC_EMATCHES = 4 + 8 + 52 = 64; TCA_OPTIONS = 4 + 64 = 68.
        u16s(&mut expected, &[68, 2 | 0x8000]);
        u16s(&mut expected, &[64, 2 | 0x8000]);
        // TCA_EMATCH_TREE_HDR: nmatches 2 (the plain entries share one match), progid 0.
        u16s(&mut expected, &[8, 1, 2, 0]);
        u16s(&mut expected, &[52, 2 | 0x8000]);
        // Item 1 (type 1, no nested flag): matchid 0, kind 7 (canid), flags OR (2), pad;
        // filters in list order, masks with CAN_EFF_FLAG (0x80000000) as iproute2 writes them:
        // {0x123, 0x800007ff}, {0x18fe0000 | EFF, 0x9fff0000}.
        u16s(&mut expected, &[28, 1, 0, 7, 2, 0]);
        u32s(
            &mut expected,
            &[0x123, 0x8000_07ff, 0x98fe_0000, 0x9fff_0000],
        );
        // Item 2: last (relation END) and inverted (4); filter {0x100, 0x80000700}.
        u16s(&mut expected, &[20, 2, 0, 7, 4, 0]);
        u32s(&mut expected, &[0x100, 0x8000_0700]);

        assert_eq!(request, expected);
    }

    #[test]
    fn drop_filter_request_is_byte_exact() {
        let request = drop_filter_request(9, Direction::Receive);
        let mut expected = Vec::new();
        // tcmsg: ifindex 9, handle 0xca0d, parent ffff:fff3 (egress),
        // info = prio 3 << 16 | htons(ETH_P_ALL).
        expected.extend_from_slice(&[0, 0, 0, 0]);
        u32s(
            &mut expected,
            &[
                9,
                0xca0d,
                0xffff_fff3,
                (3 << 16) | u32::from(0x0003u16.to_be()),
            ],
        );
        u16s(&mut expected, &[10, 1]);
        expected.extend_from_slice(b"basic\0\0\0");
        // TCA_GACT_PARMS = 4 + 20 = 24; TCA_ACT_OPTIONS = 4 + 24 = 28;
        // TCA_ACT_KIND "gact\0" = 9, padded 12; action 1 = 4 + 12 + 28 = 44;
        // TCA_BASIC_ACT = 4 + 44 = 48; TCA_OPTIONS = 4 + 48 = 52.
        u16s(&mut expected, &[52, 2 | 0x8000]);
        u16s(&mut expected, &[48, 3 | 0x8000]);
        u16s(&mut expected, &[44, 1 | 0x8000]);
        u16s(&mut expected, &[9, 1]);
        expected.extend_from_slice(b"gact\0\0\0\0");
        u16s(&mut expected, &[28, 2 | 0x8000]);
        u16s(&mut expected, &[24, 2]);
        // struct tc_gact: index 0, capab 0, action TC_ACT_SHOT (2), refcnt 0, bindcnt 0.
        u32s(&mut expected, &[0, 0, 2, 0, 0]);
        assert_eq!(request, expected);
    }

    #[test]
    fn clsact_request_is_byte_exact() {
        let mut expected = vec![0, 0, 0, 0];
        // ifindex 4, handle ffff:0, parent TC_H_CLSACT, info 0; TCA_KIND "clsact\0" (11 -> 12).
        u32s(&mut expected, &[4, 0xffff_0000, 0xffff_fff1, 0]);
        u16s(&mut expected, &[11, 1]);
        expected.extend_from_slice(b"clsact\0\0");
        assert_eq!(clsact_request(4), expected);
    }

    /// A dump reply as the kernel writes it: the request's tcmsg and kind, the options
    /// followed by the statistics the kernel adds.
    fn dumped(request: &[u8], pcnt_hits: u64, action_packets: Option<u32>) -> Vec<u8> {
        let mut reply = request[..20].to_vec();
        let mut kernel = AttributeBuffer::default();
        kernel.push_str(TCA_KIND, "basic");
        kernel.push_u32(11, 0); // TCA_CHAIN
        let sent_options = attributes(&request[20..])
            .filter_map(Result::ok)
            .find(|(kind, _)| *kind == TCA_OPTIONS)
            .map(|(_, bytes)| bytes.to_vec())
            .unwrap();
        kernel.push_nested(TCA_OPTIONS, |options| {
            for (kind, bytes) in attributes(&sent_options).filter_map(Result::ok) {
                if kind == TCA_BASIC_ACT {
                    options.push_nested(TCA_BASIC_ACT, |actions| {
                        actions.push_nested(1, |action| {
                            action.push_str(TCA_ACT_KIND, "gact");
                            action.push_nested(TCA_ACT_STATS, |stats| {
                                let mut basic = Vec::new();
                                basic.extend_from_slice(&96u64.to_ne_bytes());
                                basic.extend_from_slice(&action_packets.unwrap().to_ne_bytes());
                                basic.extend_from_slice(&[0; 4]);
                                stats.push(TCA_STATS_BASIC, &basic);
                            });
                            action.push_nested(TCA_ACT_OPTIONS, |gact| {
                                gact.push(1, &[0; 32]); // TCA_GACT_TM
                                let mut parms = [0u8; 20];
                                parms[8..12].copy_from_slice(&2i32.to_ne_bytes());
                                gact.push(TCA_GACT_PARMS, &parms);
                            });
                        });
                    });
                } else {
                    options.push(kind, bytes);
                }
            }
            // Like the kernel, dump an empty ematch tree for a filter sent without one.
            if !attributes(&sent_options)
                .filter_map(Result::ok)
                .any(|(kind, _)| kind == TCA_BASIC_EMATCHES)
            {
                options.push_nested(TCA_BASIC_EMATCHES, |tree| {
                    tree.push(TCA_EMATCH_TREE_HDR, &[0, 0, 0, 0]);
                    tree.push(TCA_EMATCH_TREE_LIST, &[]);
                });
            }
            let mut pcnt = Vec::new();
            pcnt.extend_from_slice(&(pcnt_hits + 5).to_ne_bytes());
            pcnt.extend_from_slice(&pcnt_hits.to_ne_bytes());
            options.push(TCA_BASIC_PCNT, &pcnt);
        });
        reply.extend_from_slice(kernel.as_bytes());
        reply
    }

    #[test]
    fn dumps_of_our_filters_read_back_as_the_policy_and_counters() {
        let entries = vec![
            CanMatch::extended(0x18fe_0000, 0x1fff_0000),
            CanMatch::standard(0x100, 0x700).inverted(),
            CanMatch::standard(0x123, 0x7ff),
        ];
        let mut state = HookState::default();
        for (prio, protocol, hits) in [(1, ETH_P_CAN, 40), (2, ETH_P_CANFD, 2)] {
            let request = allow_filter_request(7, Direction::Transmit, prio, protocol, &entries);
            state.absorb(&parse_filter(&dumped(&request, hits, None)).unwrap());
        }
        let request = drop_filter_request(7, Direction::Transmit);
        state.absorb(&parse_filter(&dumped(&request, 6, Some(6))).unwrap());
        // A priority header (handle 0) and someone else's filter.
        let mut header = tcmsg(7, 0, HOOK_INGRESS, filter_info(1, ETH_P_CAN));
        let mut kind = AttributeBuffer::default();
        kind.push_str(TCA_KIND, "basic");
        header.extend_from_slice(kind.as_bytes());
        state.absorb(&parse_filter(&header).unwrap());
        let mut other = tcmsg(7, 1, HOOK_INGRESS, filter_info(49152, ETH_P_ALL));
        other.extend_from_slice(kind.as_bytes());
        state.absorb(&parse_filter(&other).unwrap());

        assert_eq!(
            state.recognised(),
            Ok(HookPlan {
                allow: Some(canonical(&entries)),
                drop: true
            })
        );
        assert_eq!(state.foreign, 1);
        assert_eq!((state.passed, state.dropped), (42, 6));
    }

    #[test]
    fn a_filter_at_our_priority_with_other_contents_is_unrecognised() {
        // Our handle and priority, but an allow-list filed under the wrong protocol.
        let request = allow_filter_request(
            7,
            Direction::Receive,
            PRIO_ALLOW_CLASSIC,
            ETH_P_CANFD,
            &[CanMatch::standard(1, 0x7ff)],
        );
        let mut state = HookState::default();
        state.absorb(&parse_filter(&dumped(&request, 0, None)).unwrap());
        assert!(state.unrecognised.contains(&PRIO_ALLOW_CLASSIC));
        assert!(state.recognised().is_err());
    }

    #[test]
    fn an_allow_list_without_drop_all_is_not_a_policy() {
        let request = allow_filter_request(
            7,
            Direction::Transmit,
            PRIO_ALLOW_CLASSIC,
            ETH_P_CAN,
            &[CanMatch::standard(1, 0x7ff)],
        );
        let mut state = HookState::default();
        state.absorb(&parse_filter(&dumped(&request, 0, None)).unwrap());
        let fd = allow_filter_request(
            7,
            Direction::Transmit,
            PRIO_ALLOW_FD,
            ETH_P_CANFD,
            &[CanMatch::standard(1, 0x7ff)],
        );
        state.absorb(&parse_filter(&dumped(&fd, 0, None)).unwrap());
        assert_eq!(
            state.recognised(),
            Err("an allow-list without its drop-all filter".to_string())
        );
    }

    #[test]
    fn plans_follow_the_policy() {
        let entry = CanMatch::standard(0x10, 0x7ff);
        let open = AccessPolicy::default().plans();
        assert_eq!(open, [HookPlan::default(), HookPlan::default()]);
        let listen = AccessPolicy::listen_only().plans();
        assert_eq!(
            listen[0],
            HookPlan {
                allow: None,
                drop: true
            }
        );
        let filtered = AccessPolicy {
            transmit: TxPolicy::Allow(vec![entry, entry]),
            receive: Some(vec![]),
        }
        .plans();
        assert_eq!(filtered[0].allow, Some(vec![entry]), "duplicates removed");
        assert_eq!(
            filtered[1],
            HookPlan {
                allow: None,
                drop: true
            },
            "an empty receive list receives nothing"
        );
    }

    #[test]
    fn validation_rejects_wide_ids_masks_and_long_lists() {
        let wide_id = AccessPolicy {
            transmit: TxPolicy::Allow(vec![
                CanMatch::standard(0x7ff, 0x7ff),
                CanMatch::standard(0x800, 0x7ff),
            ]),
            receive: None,
        };
        let error = wide_id.validate().unwrap_err();
        assert!(
            matches!(
                error,
                AccessError::InvalidEntry {
                    direction: Direction::Transmit,
                    index: 1,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "transmit filter entry 1 (0x800/0x7ff (std)): identifier does not fit 11 bits"
        );

        let wide_mask = AccessPolicy {
            transmit: TxPolicy::All,
            receive: Some(vec![CanMatch::extended(0, 0x3fff_ffff)]),
        };
        assert!(matches!(
            wide_mask.validate(),
            Err(AccessError::InvalidEntry {
                direction: Direction::Receive,
                reason: "mask does not fit 29 bits",
                ..
            })
        ));

        let extended_ok = CanMatch::extended(0x1fff_ffff, 0x1fff_ffff);
        assert!(extended_ok.validate().is_ok());

        let too_many = AccessPolicy {
            transmit: TxPolicy::Allow(vec![CanMatch::standard(1, 0x7ff); MAX_ENTRIES + 1]),
            receive: None,
        };
        assert!(matches!(
            too_many.validate(),
            Err(AccessError::TooManyEntries {
                count: 501,
                max: 500,
                ..
            })
        ));
    }

    #[test]
    fn matching_follows_em_canid() {
        const EFF: u32 = CAN_EFF_FLAG;
        const RTR: u32 = 0x4000_0000;
        let standard = CanMatch::standard(0x123, 0x7ff);
        assert!(standard.matches(0x123));
        assert!(standard.matches(0x123 | RTR), "RTR is not compared");
        assert!(!standard.matches(0x123 | EFF));
        let extended = CanMatch::extended(0x123, 0x1fff_ffff);
        assert!(extended.matches(0x123 | EFF));
        assert!(!extended.matches(0x123));
        let any_standard = CanMatch::standard(0, 0);
        assert!(any_standard.matches(0x7ff));
        assert!(!any_standard.matches(EFF));
        assert!(any_standard.inverted().matches(EFF | 5));
    }

    #[test]
    fn missing_module_names_the_unloaded_candidate() {
        let sys = tempfile_dir();
        std::fs::create_dir(sys.join("cls_basic")).unwrap();
        assert_eq!(missing_module(&["cls_basic", "em_canid"], &sys), "em_canid");
        std::fs::create_dir(sys.join("em_canid")).unwrap();
        assert_eq!(
            missing_module(&["cls_basic", "em_canid"], &sys),
            "cls_basic or em_canid"
        );
        std::fs::remove_dir_all(&sys).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "can-dra-access-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn enoent_on_a_filter_names_the_module() {
        let error = classify(
            5,
            "installing the transmit drop-all filter",
            &["act_gact_not_a_real_module"],
            NetlinkError::Kernel {
                errno: Errno::ENOENT,
            },
        );
        assert_eq!(
            error.to_string(),
            "installing the transmit drop-all filter on ifindex 5: kernel module \
             act_gact_not_a_real_module is missing (ENOENT); load it with \
             `modprobe act_gact_not_a_real_module`"
        );
        let gone = classify(
            5,
            "adding the clsact qdisc",
            &["sch_ingress"],
            NetlinkError::Kernel {
                errno: Errno::ENODEV,
            },
        );
        assert!(matches!(gone, AccessError::NoDevice { ifindex: 5, .. }));
    }

    #[test]
    fn bad_ifindex_is_refused_before_the_kernel() {
        assert!(matches!(
            check_ifindex(0),
            Err(AccessError::InvalidIfindex { ifindex: 0 })
        ));
        assert!(check_ifindex(u32::MAX).is_err());
        assert!(check_ifindex(3).is_ok());
    }
}
