//! `MemberConfig`: the opaque claim parameters that say how a pod joins a CAN bus, and
//! `ResolvedMember`, the same settings with every default applied.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decode::{self, API_VERSION};
use crate::error::{ConfigError, FieldPath};
use crate::value::{
    Bitrate, CanId, InterfaceName, MAX_DATA_BITRATE, MAX_NOMINAL_BITRATE, MIN_NOMINAL_BITRATE,
    Percent, TimeSpan,
};

/// The `kind` of a [`MemberConfig`] document.
pub const MEMBER_CONFIG_KIND: &str = "MemberConfig";

/// Most filters one list may hold; each becomes a kernel rule or filter entry per member.
pub const MAX_FILTERS: usize = 64;

/// Longest delay a shaping direction accepts.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// Largest jitter a shaping direction accepts: netem's cap of `INT_MAX` nanoseconds (about
/// 2.147 s), which the node's data plane enforces too.
pub const MAX_JITTER: Duration = Duration::from_nanos(i32::MAX as u64);

/// How a pod joins a CAN bus: the opaque parameters of a claim or device class for this driver.
///
/// Every field except `apiVersion`/`kind` is optional, so that a class config and a claim config can be
/// [overlaid](MemberConfig::overlay); [`resolve`](MemberConfig::resolve) applies the defaults.
/// Parsing is strict: unknown fields and bad values are errors that name the field.
///
/// ```
/// use can_dra_api::{Access, MemberConfig};
///
/// let config = MemberConfig::from_yaml_str(
///     "apiVersion: can.dra.dev/v1alpha1
/// kind: MemberConfig
/// access: listenOnly
/// shaping:
///   rx:
///     delay: 10ms
///     loss: 0.5%
/// ",
/// )?;
/// let member = config.resolve(0)?;
/// assert_eq!(member.interface_name.as_str(), "can0");
/// assert_eq!(member.access, Access::ListenOnly);
/// assert_eq!(member.shaping.rx.delay.as_millis(), 10);
///
/// let err = MemberConfig::from_json_str(
///     r#"{"apiVersion":"can.dra.dev/v1alpha1","kind":"MemberConfig","shaping":{"rx":{"loss":"120%"}}}"#,
/// )
/// .unwrap_err();
/// assert_eq!(err.to_string(), "shaping.rx.loss: 120% is above 100%");
/// # Ok::<(), can_dra_api::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemberConfig {
    /// Must be `can.dra.dev/v1alpha1`.
    #[serde(default)]
    pub api_version: String,
    /// Must be `MemberConfig`.
    #[serde(default)]
    pub kind: String,
    /// Interface name inside the pod; default `can<N>` with N the request's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<InterfaceName>,
    /// Whether the pod may transmit; default [`Access::ReadWrite`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    /// Classic or FD; absent means "follow the bus".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_format: Option<FrameFormat>,
    /// Frames delivered to the pod; absent or empty means all frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_filters: Option<Vec<FilterConfig>>,
    /// Frames the pod may put on the bus; absent means all frames, empty is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transmit_allow: Option<Vec<FilterConfig>>,
    /// Traffic shaping towards (`rx`) and from (`tx`) the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping: Option<ShapingConfig>,
}

impl Default for MemberConfig {
    /// An empty config with the right `apiVersion` and `kind`: every setting takes its default.
    fn default() -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kind: MEMBER_CONFIG_KIND.to_owned(),
            interface_name: None,
            access: None,
            frame_format: None,
            receive_filters: None,
            transmit_allow: None,
            shaping: None,
        }
    }
}

/// Whether a member may transmit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Access {
    /// The pod receives and transmits.
    #[default]
    ReadWrite,
    /// The pod only receives; nothing it sends reaches the bus.
    ListenOnly,
}

/// The frame format a member uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FrameFormat {
    /// Classic CAN only: the member never receives FD frames.
    Classic,
    /// CAN FD (which includes classic frames).
    Fd,
}

/// One filter as written in a document: `{id, mask, extended, invert}`.
///
/// A frame matches when `frame_id & mask == id & mask` and its format (standard or extended) is the
/// filter's; `invert` turns that around.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterConfig {
    /// The identifier to compare against.
    pub id: CanId,
    /// Bits of the identifier that must match; default all bits of the id width (exact match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<CanId>,
    /// `true` for 29-bit (extended) identifiers; default `false` (11-bit).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extended: bool,
    /// `true` to match every frame the filter would otherwise not match.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

/// Shaping per direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShapingConfig {
    /// Frames towards the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx: Option<DirectionConfig>,
    /// Frames the pod sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx: Option<DirectionConfig>,
}

/// Shaping of one direction; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirectionConfig {
    /// Emulated bus bitrate (nominal, 1 kbit/s to 1 Mbit/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitrate: Option<Bitrate>,
    /// Emulated FD data-phase bitrate (up to 16 Mbit/s, not below `bitrate`); needs `bitrate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_bitrate: Option<Bitrate>,
    /// Added latency, at most 10 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<TimeSpan>,
    /// Random variation of the delay; needs `delay`, must not exceed it, and at most
    /// [`MAX_JITTER`] (about 2.147 s, netem's limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<TimeSpan>,
    /// Share of frames dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<Percent>,
    /// Share of frames delivered twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<Percent>,
}

impl MemberConfig {
    /// Parses and validates a JSON document.
    ///
    /// ```
    /// use can_dra_api::MemberConfig;
    /// let err = MemberConfig::from_json_str(
    ///     r#"{"apiVersion":"can.dra.dev/v1alpha1","kind":"MemberConfig","interfaceName":"eth0/1"}"#,
    /// )
    /// .unwrap_err();
    /// assert_eq!(err.field(), "interfaceName");
    /// assert_eq!(err.to_string(), r#"interfaceName: "eth0/1" contains '/'"#);
    /// ```
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = decode::json_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates a JSON value, such as the `parameters` of an opaque device configuration.
    ///
    /// ```
    /// use can_dra_api::MemberConfig;
    /// let raw = serde_json::json!({
    ///     "apiVersion": "can.dra.dev/v1alpha1",
    ///     "kind": "MemberConfig",
    ///     "receiveFilters": [{"id": "0x100", "mask": "0x700"}],
    /// });
    /// let config = MemberConfig::from_json_value(&raw)?;
    /// let member = config.resolve(1)?;
    /// assert_eq!(member.interface_name.as_str(), "can1");
    /// assert!(member.receive_filters[0].matches(0x1AB, false));
    /// # Ok::<(), can_dra_api::ConfigError>(())
    /// ```
    pub fn from_json_value(value: &serde_json::Value) -> Result<Self, ConfigError> {
        let config: Self = decode::json_value(value)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates a YAML document (exactly one).
    pub fn from_yaml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = decode::yaml_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Combines two configs: every field set in `later` wins, the rest comes from `self`.
    ///
    /// Shaping merges field by field inside each direction (a claim can change `rx.delay` and keep the
    /// class's `rx.loss`); filter lists are replaced whole. Drivers apply class configs first, then
    /// claim configs, so fold the list in that order. The result can break a rule that neither part
    /// breaks alone (say `access: listenOnly` from one and `transmitAllow` from the other), which
    /// [`resolve`](Self::resolve) reports.
    ///
    /// ```
    /// use can_dra_api::{Access, MemberConfig};
    /// let class = MemberConfig { access: Some(Access::ListenOnly), ..MemberConfig::default() };
    /// let claim = MemberConfig { interface_name: Some("vcan7".parse().unwrap()), ..MemberConfig::default() };
    /// let merged = [class, claim].iter().fold(MemberConfig::default(), |acc, c| acc.overlay(c));
    /// let member = merged.resolve(0)?;
    /// assert_eq!((member.interface_name.as_str(), member.access), ("vcan7", Access::ListenOnly));
    /// # Ok::<(), can_dra_api::ConfigError>(())
    /// ```
    pub fn overlay(&self, later: &MemberConfig) -> MemberConfig {
        MemberConfig {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            interface_name: later
                .interface_name
                .clone()
                .or_else(|| self.interface_name.clone()),
            access: later.access.or(self.access),
            frame_format: later.frame_format.or(self.frame_format),
            receive_filters: later
                .receive_filters
                .clone()
                .or_else(|| self.receive_filters.clone()),
            transmit_allow: later
                .transmit_allow
                .clone()
                .or_else(|| self.transmit_allow.clone()),
            shaping: match (&self.shaping, &later.shaping) {
                (Some(a), Some(b)) => Some(a.overlay(b)),
                (a, b) => b.clone().or_else(|| a.clone()),
            },
        }
    }

    /// Checks every rule, including those that relate two fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        decode::check_type_meta(&self.api_version, &self.kind, MEMBER_CONFIG_KIND)?;
        let root = FieldPath::root();
        let access = self.access.unwrap_or_default();
        if let Some(filters) = &self.receive_filters {
            validate_filters(&root.key("receiveFilters"), filters)?;
        }
        if let Some(filters) = &self.transmit_allow {
            let path = root.key("transmitAllow");
            if access == Access::ListenOnly {
                return Err(path.error(
                    "cannot be combined with access: listenOnly (a listen-only member transmits nothing)",
                ));
            }
            if filters.is_empty() {
                return Err(path.error(
                    "an empty list would block every frame; use access: listenOnly for a member that never transmits",
                ));
            }
            validate_filters(&path, filters)?;
        }
        if let Some(shaping) = &self.shaping {
            let path = root.key("shaping");
            for (name, dir) in [("rx", &shaping.rx), ("tx", &shaping.tx)] {
                if let Some(dir) = dir {
                    dir.validate(&path.key(name), self.frame_format)?;
                }
            }
        }
        Ok(())
    }

    /// Validates the config and applies every default, for the request at `request_index` among the
    /// claim's requests for this driver (which picks the default interface name `can<index>`).
    pub fn resolve(&self, request_index: usize) -> Result<ResolvedMember, ConfigError> {
        self.validate()?;
        let interface_name = match &self.interface_name {
            Some(name) => name.clone(),
            None => format!("can{request_index}").parse().map_err(|e| {
                FieldPath::root().key("interfaceName").error(format!(
                    "the default name for request {request_index} is unusable: {e}"
                ))
            })?,
        };
        let filters = |list: &[FilterConfig]| list.iter().map(FilterConfig::to_filter).collect();
        let shaping = self.shaping.clone().unwrap_or_default();
        let direction = |d: Option<DirectionConfig>| d.map(|d| d.resolve()).unwrap_or_default();
        Ok(ResolvedMember {
            interface_name,
            access: self.access.unwrap_or_default(),
            frame_format: self.frame_format,
            receive_filters: self
                .receive_filters
                .as_deref()
                .map(filters)
                .unwrap_or_default(),
            transmit_allow: self.transmit_allow.as_deref().map(filters),
            shaping: ResolvedShaping {
                rx: direction(shaping.rx),
                tx: direction(shaping.tx),
            },
        })
    }
}

fn validate_filters(path: &FieldPath, filters: &[FilterConfig]) -> Result<(), ConfigError> {
    if filters.len() > MAX_FILTERS {
        return Err(path.error(format!(
            "{} filters given, at most {MAX_FILTERS} are allowed",
            filters.len()
        )));
    }
    for (i, filter) in filters.iter().enumerate() {
        let path = path.index(i);
        filter
            .id
            .check_width(filter.extended)
            .map_err(|e| path.key("id").error(e.to_string()))?;
        if let Some(mask) = filter.mask {
            mask.check_width(filter.extended)
                .map_err(|e| path.key("mask").error(e.to_string()))?;
        }
    }
    Ok(())
}

impl FilterConfig {
    /// The filter with its mask defaulted to the full id width.
    pub fn to_filter(&self) -> CanFilter {
        let width = if self.extended {
            CanId::EFF_MASK
        } else {
            CanId::SFF_MASK
        };
        CanFilter {
            id: self.id.value(),
            mask: self.mask.map_or(width, CanId::value),
            extended: self.extended,
            invert: self.invert,
        }
    }
}

impl ShapingConfig {
    fn overlay(&self, later: &ShapingConfig) -> ShapingConfig {
        let merge = |a: &Option<DirectionConfig>, b: &Option<DirectionConfig>| match (a, b) {
            (Some(a), Some(b)) => Some(a.overlay(b)),
            (a, b) => b.clone().or_else(|| a.clone()),
        };
        ShapingConfig {
            rx: merge(&self.rx, &later.rx),
            tx: merge(&self.tx, &later.tx),
        }
    }
}

impl DirectionConfig {
    fn overlay(&self, later: &DirectionConfig) -> DirectionConfig {
        DirectionConfig {
            bitrate: later.bitrate.or(self.bitrate),
            data_bitrate: later.data_bitrate.or(self.data_bitrate),
            delay: later.delay.or(self.delay),
            jitter: later.jitter.or(self.jitter),
            loss: later.loss.or(self.loss),
            duplicate: later.duplicate.or(self.duplicate),
        }
    }

    fn validate(&self, path: &FieldPath, format: Option<FrameFormat>) -> Result<(), ConfigError> {
        if let Some(rate) = self.bitrate {
            check_nominal_bitrate(&path.key("bitrate"), rate)?;
        }
        if let Some(data) = self.data_bitrate {
            let field = path.key("dataBitrate");
            let Some(nominal) = self.bitrate else {
                return Err(
                    field.error("requires bitrate (the nominal rate of the arbitration phase)")
                );
            };
            if format == Some(FrameFormat::Classic) {
                return Err(field.error(
                    "has no effect with frameFormat: classic (classic frames have no data phase)",
                ));
            }
            check_data_bitrate(&field, nominal, data)?;
        }
        if let Some(delay) = self.delay
            && delay.as_duration() > MAX_DELAY
        {
            return Err(path
                .key("delay")
                .error(format!("{delay} is above {}", TimeSpan::from(MAX_DELAY))));
        }
        if let Some(jitter) = self.jitter {
            let field = path.key("jitter");
            let Some(delay) = self.delay else {
                return Err(
                    field.error("requires delay (jitter varies the delay around its value)")
                );
            };
            if jitter > delay {
                return Err(field.error(format!("{jitter} exceeds delay {delay}")));
            }
            if jitter.as_duration() > MAX_JITTER {
                return Err(field.error(format!(
                    "{jitter} is above {}, the largest jitter the kernel's netem accepts",
                    TimeSpan::from(MAX_JITTER)
                )));
            }
        }
        Ok(())
    }

    fn resolve(&self) -> ShapingDirection {
        ShapingDirection {
            bitrate: self.bitrate,
            data_bitrate: self.data_bitrate,
            delay: self.delay.map(TimeSpan::as_duration).unwrap_or_default(),
            jitter: self.jitter.map(TimeSpan::as_duration).unwrap_or_default(),
            loss: self.loss.unwrap_or_default(),
            duplicate: self.duplicate.unwrap_or_default(),
        }
    }
}

/// Checks a nominal (arbitration-phase) CAN bitrate: 1 kbit/s ..= 1 Mbit/s.
pub(crate) fn check_nominal_bitrate(path: &FieldPath, rate: Bitrate) -> Result<(), ConfigError> {
    if rate < MIN_NOMINAL_BITRATE {
        return Err(path.error(format!("{rate} is below {MIN_NOMINAL_BITRATE}")));
    }
    if rate > MAX_NOMINAL_BITRATE {
        return Err(path.error(format!(
            "{rate} is above {MAX_NOMINAL_BITRATE}, the highest nominal CAN bitrate (an FD data phase goes in dataBitrate)"
        )));
    }
    Ok(())
}

/// Checks an FD data-phase bitrate: not below the nominal bitrate, at most 16 Mbit/s.
pub(crate) fn check_data_bitrate(
    path: &FieldPath,
    nominal: Bitrate,
    data: Bitrate,
) -> Result<(), ConfigError> {
    if data > MAX_DATA_BITRATE {
        return Err(path.error(format!("{data} is above {MAX_DATA_BITRATE}")));
    }
    if data < nominal {
        return Err(path.error(format!(
            "{data} is below the nominal bitrate {nominal}; the data phase is never slower"
        )));
    }
    Ok(())
}

/// A member's settings with every default applied, ready for the data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMember {
    /// Interface name inside the pod.
    pub interface_name: InterfaceName,
    /// Whether the pod may transmit.
    pub access: Access,
    /// Classic or FD; `None` follows the bus.
    pub frame_format: Option<FrameFormat>,
    /// Frames delivered to the pod; empty means all frames.
    pub receive_filters: Vec<CanFilter>,
    /// Frames the pod may send; `None` means all frames (never `Some(empty)`).
    pub transmit_allow: Option<Vec<CanFilter>>,
    /// Shaping in each direction.
    pub shaping: ResolvedShaping,
}

/// Shaping of both directions, with defaults applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedShaping {
    /// Frames towards the pod.
    pub rx: ShapingDirection,
    /// Frames the pod sends.
    pub tx: ShapingDirection,
}

/// Shaping of one direction. Zero delay, jitter, loss and duplication mean "none".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShapingDirection {
    /// Emulated nominal bitrate; `None` means no rate limit.
    pub bitrate: Option<Bitrate>,
    /// Emulated FD data-phase bitrate; `None` means the nominal rate applies to FD frames too.
    pub data_bitrate: Option<Bitrate>,
    /// Added latency.
    pub delay: Duration,
    /// Random variation of the latency (never above `delay`).
    pub jitter: Duration,
    /// Share of frames dropped.
    pub loss: Percent,
    /// Share of frames delivered twice.
    pub duplicate: Percent,
}

impl ShapingDirection {
    /// Whether this direction needs no shaping at all.
    pub fn is_unshaped(&self) -> bool {
        *self == Self::default()
    }
}

/// A resolved CAN filter: `frame_id & mask == id & mask`, for frames of the filter's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CanFilter {
    /// Identifier to compare against (11 or 29 bits).
    pub id: u32,
    /// Identifier bits that must match.
    pub mask: u32,
    /// Whether this filter is for 29-bit identifiers (it never matches the other format).
    pub extended: bool,
    /// Whether the result is inverted.
    pub invert: bool,
}

impl CanFilter {
    /// The kernel's `CAN_EFF_FLAG`, set in ids of extended frames.
    pub const CAN_EFF_FLAG: u32 = 0x8000_0000;
    /// The kernel's `CAN_INV_FILTER`, set in a filter's id to invert it.
    pub const CAN_INV_FILTER: u32 = 0x2000_0000;

    /// Whether a frame with this identifier and format passes the filter.
    pub fn matches(&self, frame_id: u32, frame_extended: bool) -> bool {
        let hit =
            frame_extended == self.extended && (frame_id & self.mask) == (self.id & self.mask);
        hit != self.invert
    }

    /// The filter as a kernel `struct can_filter` pair `(can_id, can_mask)`, as used by can-gw
    /// (`CGW_FILTER`) and `CAN_RAW_FILTER`.
    ///
    /// `CAN_EFF_FLAG` is always part of the mask, so the frame format must match too; the RTR flag is
    /// not, so remote frames are treated like data frames with the same id.
    pub fn kernel_filter(&self) -> (u32, u32) {
        let mut id = self.id;
        if self.extended {
            id |= Self::CAN_EFF_FLAG;
        }
        if self.invert {
            id |= Self::CAN_INV_FILTER;
        }
        (id, self.mask | Self::CAN_EFF_FLAG)
    }
}
