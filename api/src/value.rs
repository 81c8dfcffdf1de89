//! Value types that appear in configuration documents: bitrates, percentages, time spans, CAN ids and
//! interface names.
//!
//! Each type parses from the string forms users write (`FromStr`), prints one canonical form (`Display`)
//! and goes through serde as that string. Only intrinsic rules are checked here (a percentage above 100 %,
//! an id wider than 29 bits); rules that depend on where a value is used (the bitrate range of a CAN bus,
//! the 10 s delay limit) are checked by the documents that use them, so their errors can name the field.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a single value failed to parse.
///
/// The messages are written to follow a field path, as in `shaping.rx.loss: 120% is above 100%`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The input is empty.
    #[error("is empty")]
    Empty,
    /// The input does not have the shape of this kind of value.
    #[error("{input:?} is not {what} (examples: {examples})")]
    Syntax {
        /// What the user wrote.
        input: String,
        /// The kind of value expected, with its article ("a bitrate").
        what: &'static str,
        /// Valid spellings to copy from.
        examples: &'static str,
    },
    /// A number was given where a unit or sign is mandatory.
    #[error("{input} needs a unit (write {hint:?})")]
    MissingUnit {
        /// What the user wrote.
        input: String,
        /// The same value with the unit added.
        hint: String,
    },
    /// The value has more decimal places than the type can hold.
    #[error("{input:?} is more precise than {limit}")]
    TooPrecise {
        /// What the user wrote.
        input: String,
        /// The finest step the type supports.
        limit: &'static str,
    },
    /// The value is above the largest value the type can hold.
    #[error("{value} is above {max}")]
    AboveMax {
        /// The value, in canonical form where one exists.
        value: String,
        /// The limit, in canonical form.
        max: String,
    },
    /// The value is below the smallest value the type can hold.
    #[error("{value} is below {min}")]
    BelowMin {
        /// The value, in canonical form where one exists.
        value: String,
        /// The limit, in canonical form.
        min: String,
    },
    /// A CAN id or mask is wider than the identifier it belongs to.
    #[error("{value} does not fit in {bits} bits{hint}")]
    TooWide {
        /// The value in hex.
        value: String,
        /// The identifier width, 11 or 29.
        bits: u32,
        /// Extra advice, starting with a space, or empty.
        hint: &'static str,
    },
    /// An interface name or pattern breaks a naming rule.
    #[error("{input:?} {rule}")]
    BadName {
        /// What the user wrote.
        input: String,
        /// The rule that was broken, as a phrase ("contains '/'").
        rule: String,
    },
}

/// A number written in decimal with an optional fractional part, scaled to an integer.
///
/// `parse_scaled("1.5", 3)` is 1500. Fractions finer than `10^-scale` are rejected rather than rounded,
/// because silently changing a configured value is worse than asking for a coarser one.
fn parse_scaled(num: &str, scale: u32) -> Result<u128, ScaleIssue> {
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (num, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int_part) || frac_part.is_some_and(|f| !all_digits(f)) {
        return Err(ScaleIssue::Syntax);
    }
    let mut value: u128 = 0;
    for b in int_part.bytes() {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u128::from(b - b'0')))
            .ok_or(ScaleIssue::Overflow)?;
    }
    let frac = frac_part.unwrap_or("").trim_end_matches('0');
    let frac_len = u32::try_from(frac.len()).map_err(|_| ScaleIssue::TooPrecise)?;
    if frac_len > scale {
        return Err(ScaleIssue::TooPrecise);
    }
    let mut frac_value: u128 = 0;
    for b in frac.bytes() {
        frac_value = frac_value * 10 + u128::from(b - b'0');
    }
    let pow = |e: u32| 10u128.checked_pow(e).ok_or(ScaleIssue::Overflow);
    value
        .checked_mul(pow(scale)?)
        .and_then(|v| v.checked_add(frac_value * 10u128.pow(scale - frac_len)))
        .ok_or(ScaleIssue::Overflow)
}

/// Formats `value / 10^scale` in decimal without trailing zeros (`fmt_scaled(1500, 3)` is `1.5`).
fn fmt_scaled(value: u128, scale: u32) -> String {
    let div = 10u128.pow(scale);
    let int = value / div;
    let frac = value % div;
    if frac == 0 {
        return int.to_string();
    }
    let digits = format!("{frac:0width$}", width = scale as usize);
    format!("{int}.{}", digits.trim_end_matches('0'))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScaleIssue {
    Syntax,
    TooPrecise,
    Overflow,
}

/// Splits `"1.5ms"` into `("1.5", "ms")`.
fn split_number(input: &str) -> (&str, &str) {
    let end = input
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(input.len());
    input.split_at(end)
}

/// A bit rate in bits per second, such as a CAN bus bitrate.
///
/// Accepted spellings: a plain number of bits per second (`125000`), or a number with a `k`/`K` or `M`
/// prefix and an optional `bit`, `bps` or `bit/s` unit (`500k`, `500kbit`, `125kbps`, `1M`, `1Mbit`,
/// `1.5Mbit`). The canonical form uses the largest whole prefix: `500kbit`, `1Mbit`, `83333bit`.
///
/// ```
/// use can_dra_api::Bitrate;
/// let rate: Bitrate = "125kbps".parse().unwrap();
/// assert_eq!(rate.bits_per_second(), 125_000);
/// assert_eq!(rate.to_string(), "125kbit");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bitrate(u32);

impl Bitrate {
    /// Builds a bitrate from bits per second; `None` for zero.
    pub const fn from_bits_per_second(bps: u32) -> Option<Self> {
        if bps == 0 { None } else { Some(Self(bps)) }
    }

    /// The rate in bits per second.
    pub const fn bits_per_second(self) -> u32 {
        self.0
    }

    const fn raw(bps: u32) -> Self {
        Self(bps)
    }
}

/// 1 kbit/s, the slowest nominal bitrate the driver accepts.
pub(crate) const MIN_NOMINAL_BITRATE: Bitrate = Bitrate::raw(1_000);
/// 1 Mbit/s, the fastest classic CAN (nominal) bitrate.
pub(crate) const MAX_NOMINAL_BITRATE: Bitrate = Bitrate::raw(1_000_000);
/// 16 Mbit/s, the upper end of CAN FD data-phase bitrates the driver accepts.
pub(crate) const MAX_DATA_BITRATE: Bitrate = Bitrate::raw(16_000_000);
/// 500 kbit/s, the default bitrate of a virtual bus.
pub(crate) const DEFAULT_BUS_BITRATE: Bitrate = Bitrate::raw(500_000);

impl FromStr for Bitrate {
    type Err = ValueError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let syntax = || ValueError::Syntax {
            input: input.to_owned(),
            what: "a bitrate",
            examples: "500k, 500kbit, 1M, 1Mbit, 125000, 125kbps",
        };
        if input.is_empty() {
            return Err(ValueError::Empty);
        }
        let (num, unit) = split_number(input);
        let (prefix, rest) = match unit.as_bytes().first() {
            Some(b'k' | b'K') => (3, &unit[1..]),
            Some(b'M') => (6, &unit[1..]),
            _ => (0, unit),
        };
        if !matches!(rest, "" | "bit" | "bps" | "bit/s") {
            return Err(syntax());
        }
        let bps = parse_scaled(num, prefix).map_err(|issue| match issue {
            ScaleIssue::TooPrecise => ValueError::TooPrecise {
                input: input.to_owned(),
                limit: "1 bit/s",
            },
            ScaleIssue::Syntax => syntax(),
            ScaleIssue::Overflow => ValueError::AboveMax {
                value: input.to_owned(),
                max: Bitrate(u32::MAX).to_string(),
            },
        })?;
        from_u128_bps(bps, input)
    }
}

fn from_u128_bps(bps: u128, input: &str) -> Result<Bitrate, ValueError> {
    if bps == 0 {
        return Err(ValueError::BelowMin {
            value: input.to_owned(),
            min: "1bit".to_owned(),
        });
    }
    u32::try_from(bps)
        .map(Bitrate)
        .map_err(|_| ValueError::AboveMax {
            value: input.to_owned(),
            max: Bitrate(u32::MAX).to_string(),
        })
}

impl fmt::Display for Bitrate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b if b % 1_000_000 == 0 => write!(f, "{}Mbit", b / 1_000_000),
            b if b % 1_000 == 0 => write!(f, "{}kbit", b / 1_000),
            b => write!(f, "{b}bit"),
        }
    }
}

impl Serialize for Bitrate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bitrate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BitrateVisitor;
        impl Visitor<'_> for BitrateVisitor {
            type Value = Bitrate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a bitrate such as 500k, 1Mbit or 125000")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Bitrate, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Bitrate, E> {
                from_u128_bps(u128::from(v), &v.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Bitrate, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::custom(ValueError::BelowMin {
                        value: v.to_string(),
                        min: "1bit".to_owned(),
                    })),
                }
            }
        }
        deserializer.deserialize_any(BitrateVisitor)
    }
}

/// A percentage from `0%` to `100%`, with up to four decimal places (`12.5%`, `0.0001%`).
///
/// The `%` sign is required, so that `loss: 5` (a fraction? a percentage?) cannot be misread.
///
/// ```
/// use can_dra_api::Percent;
/// let loss: Percent = "12.50%".parse().unwrap();
/// assert_eq!(loss.to_string(), "12.5%");
/// assert!("120%".parse::<Percent>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Percent(u32);

impl Percent {
    /// No probability at all.
    pub const ZERO: Percent = Percent(0);
    /// Certainty.
    pub const HUNDRED: Percent = Percent(Self::MILLIONTHS_PER_UNIT);
    const MILLIONTHS_PER_UNIT: u32 = 1_000_000;

    /// Builds a percentage from millionths of one (`1_000_000` is 100 %); `None` above 100 %.
    pub const fn from_millionths(millionths: u32) -> Option<Self> {
        if millionths > Self::MILLIONTHS_PER_UNIT {
            None
        } else {
            Some(Self(millionths))
        }
    }

    /// The value in millionths of one: 12.5 % is 125 000. Exact, for integer conversions such as
    /// netem's 32-bit probabilities.
    pub const fn millionths(self) -> u32 {
        self.0
    }

    /// The value as a fraction between 0.0 and 1.0.
    pub fn as_fraction(self) -> f64 {
        f64::from(self.0) / f64::from(Self::MILLIONTHS_PER_UNIT)
    }

    /// Whether this is 0 %.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl FromStr for Percent {
    type Err = ValueError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(ValueError::Empty);
        }
        let syntax = || ValueError::Syntax {
            input: input.to_owned(),
            what: "a percentage",
            examples: "0%, 5%, 12.5%, 100%",
        };
        let Some(num) = input.strip_suffix('%') else {
            if parse_scaled(input, 4).is_ok() {
                return Err(ValueError::MissingUnit {
                    input: input.to_owned(),
                    hint: format!("{input}%"),
                });
            }
            return Err(syntax());
        };
        // Units of 0.0001 %, which are millionths of one.
        let value = parse_scaled(num, 4).map_err(|issue| match issue {
            ScaleIssue::TooPrecise => ValueError::TooPrecise {
                input: input.to_owned(),
                limit: "0.0001%",
            },
            ScaleIssue::Syntax => syntax(),
            ScaleIssue::Overflow => ValueError::AboveMax {
                value: input.to_owned(),
                max: "100%".to_owned(),
            },
        })?;
        match u32::try_from(value) {
            Ok(v) if v <= Self::MILLIONTHS_PER_UNIT => Ok(Percent(v)),
            _ => Err(ValueError::AboveMax {
                value: format!("{}%", fmt_scaled(value, 4)),
                max: "100%".to_owned(),
            }),
        }
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", fmt_scaled(u128::from(self.0), 4))
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrOnlyVisitor::<Percent>::new("a percentage such as 12.5%"))
    }
}

/// A span of time written with a unit: `10ms`, `1.5ms`, `250us`, `1s` (units `s`, `ms`, `us` or `µs`,
/// `ns`; `0` alone is also accepted). Resolution is one nanosecond.
///
/// The canonical form uses the largest unit the value reaches: `1.5ms`, `250us`, `2s`.
///
/// ```
/// use can_dra_api::TimeSpan;
/// use std::time::Duration;
/// let delay: TimeSpan = "1500us".parse().unwrap();
/// assert_eq!(delay.as_duration(), Duration::from_micros(1500));
/// assert_eq!(delay.to_string(), "1.5ms");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TimeSpan(Duration);

impl TimeSpan {
    /// The empty span.
    pub const ZERO: TimeSpan = TimeSpan(Duration::ZERO);

    /// The span as a standard duration.
    pub const fn as_duration(self) -> Duration {
        self.0
    }
}

impl From<Duration> for TimeSpan {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl From<TimeSpan> for Duration {
    fn from(t: TimeSpan) -> Self {
        t.0
    }
}

impl FromStr for TimeSpan {
    type Err = ValueError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(ValueError::Empty);
        }
        if input == "0" {
            return Ok(Self::ZERO);
        }
        let syntax = || ValueError::Syntax {
            input: input.to_owned(),
            what: "a time span",
            examples: "10ms, 1.5ms, 250us, 1s",
        };
        let (num, unit) = split_number(input);
        let scale = match unit {
            "s" => 9,
            "ms" => 6,
            "us" | "µs" => 3,
            "ns" => 0,
            "" if parse_scaled(num, 9).is_ok() => {
                return Err(ValueError::MissingUnit {
                    input: input.to_owned(),
                    hint: format!("{input}ms"),
                });
            }
            _ => return Err(syntax()),
        };
        let nanos = parse_scaled(num, scale).map_err(|issue| match issue {
            ScaleIssue::TooPrecise => ValueError::TooPrecise {
                input: input.to_owned(),
                limit: "1ns",
            },
            ScaleIssue::Syntax => syntax(),
            ScaleIssue::Overflow => ValueError::AboveMax {
                value: input.to_owned(),
                max: TimeSpan(Duration::from_nanos(u64::MAX)).to_string(),
            },
        })?;
        u64::try_from(nanos)
            .map(|n| Self(Duration::from_nanos(n)))
            .map_err(|_| ValueError::AboveMax {
                value: input.to_owned(),
                max: TimeSpan(Duration::from_nanos(u64::MAX)).to_string(),
            })
    }
}

impl fmt::Display for TimeSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        let (scale, unit) = [(9, "s"), (6, "ms"), (3, "us"), (0, "ns")]
            .into_iter()
            .find(|(scale, _)| nanos >= 10u128.pow(*scale))
            .unwrap_or((0, "ns"));
        write!(f, "{}{unit}", fmt_scaled(nanos, scale))
    }
}

impl Serialize for TimeSpan {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeSpan {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrOnlyVisitor::<TimeSpan>::new("a time span such as 10ms"))
    }
}

/// Deserialises a type from its string form, and explains a bare number as a missing unit.
struct StrOnlyVisitor<T> {
    expecting: &'static str,
    target: std::marker::PhantomData<T>,
}

impl<T> StrOnlyVisitor<T> {
    fn new(expecting: &'static str) -> Self {
        Self {
            expecting,
            target: std::marker::PhantomData,
        }
    }
}

impl<T: FromStr<Err = ValueError>> Visitor<'_> for StrOnlyVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
    // A bare number reaches here from JSON/YAML; parsing its text gives the "needs a unit" message.
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
}

/// A CAN identifier or mask value, at most 29 bits wide.
///
/// Written as an integer or as a string in hex (`"0x7FF"`) or decimal (`"2047"`); printed in hex
/// (`0x7FF`). Whether it must also fit in 11 bits depends on the filter it belongs to.
///
/// ```
/// use can_dra_api::CanId;
/// let id: CanId = "0x7ff".parse().unwrap();
/// assert_eq!(id.value(), 2047);
/// assert_eq!(id.to_string(), "0x7FF");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CanId(u32);

impl CanId {
    /// All 11 bits of a standard (SFF) identifier.
    pub const SFF_MASK: u32 = 0x7FF;
    /// All 29 bits of an extended (EFF) identifier.
    pub const EFF_MASK: u32 = 0x1FFF_FFFF;

    /// Builds a value; `None` if it is wider than 29 bits.
    pub const fn new(value: u32) -> Option<Self> {
        if value > Self::EFF_MASK {
            None
        } else {
            Some(Self(value))
        }
    }

    /// The numeric value.
    pub const fn value(self) -> u32 {
        self.0
    }

    /// Checks that the value fits an identifier of the given width.
    pub(crate) fn check_width(self, extended: bool) -> Result<(), ValueError> {
        if !extended && self.0 > Self::SFF_MASK {
            return Err(ValueError::TooWide {
                value: self.to_string(),
                bits: 11,
                hint: " (set extended: true for 29-bit ids)",
            });
        }
        Ok(())
    }

    fn from_u64(v: u64) -> Result<Self, ValueError> {
        u32::try_from(v)
            .ok()
            .and_then(Self::new)
            .ok_or(ValueError::TooWide {
                value: format!("{v:#X}").replacen("0X", "0x", 1),
                bits: 29,
                hint: "",
            })
    }
}

impl FromStr for CanId {
    type Err = ValueError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(ValueError::Empty);
        }
        let syntax = || ValueError::Syntax {
            input: input.to_owned(),
            what: "a CAN id",
            examples: "0x7FF, 0x18DAF110, 2047",
        };
        let hex = input
            .strip_prefix("0x")
            .or_else(|| input.strip_prefix("0X"));
        let (digits, radix) = match hex {
            Some(d) => (d, 16),
            None => (input, 10),
        };
        if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
            return Err(syntax());
        }
        // Leading zeros are harmless, so strip them before the width check.
        let significant = digits.trim_start_matches('0');
        if significant.len() > 16 {
            return Err(ValueError::TooWide {
                value: input.to_owned(),
                bits: 29,
                hint: "",
            });
        }
        let value = u64::from_str_radix(
            if significant.is_empty() {
                "0"
            } else {
                significant
            },
            radix,
        )
        .map_err(|_| syntax())?;
        Self::from_u64(value)
    }
}

impl fmt::Display for CanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:X}", self.0)
    }
}

impl Serialize for CanId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CanId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CanIdVisitor;
        impl Visitor<'_> for CanIdVisitor {
            type Value = CanId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CAN id such as 0x7FF or 2047")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CanId, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CanId, E> {
                CanId::from_u64(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CanId, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::custom(ValueError::BelowMin {
                        value: v.to_string(),
                        min: "0".to_owned(),
                    })),
                }
            }
        }
        deserializer.deserialize_any(CanIdVisitor)
    }
}

/// Prefixes of the link names the driver gives its own links: member host ends (`cdra` + 11 hex
/// digits, `can_dra_dataplane::bus::naming`) and tunnel pairs (`vxtm-<bus>`, `vxtt-<bus>`, the
/// kubelet plugin's `tunnels`). No member or controller may be named so: the driver would take
/// the link for its own, never publish it, and delete it as an orphan.
pub const RESERVED_INTERFACE_PREFIXES: &[&str] = &["cdra", "vxtm-", "vxtt-"];

/// Whether `name` has one of the [`RESERVED_INTERFACE_PREFIXES`].
pub fn is_reserved_interface_name(name: &str) -> bool {
    RESERVED_INTERFACE_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// A Linux network interface name, checked against the kernel's naming rules.
///
/// Rules: 1 to 15 bytes of printable ASCII; no `/`, `:`, `%` or whitespace; not `.`, `..` or `lo`
/// (which exists in every network namespace). `%` is refused because the kernel treats a name
/// containing it as a template and picks a number itself. Names with a prefix the driver
/// reserves for its own links ([`RESERVED_INTERFACE_PREFIXES`]) are refused too.
///
/// ```
/// use can_dra_api::InterfaceName;
/// let err = "cdra0123456789a".parse::<InterfaceName>().unwrap_err();
/// assert!(err.to_string().contains("reserves"), "{err}");
/// ```
///
/// ```
/// use can_dra_api::InterfaceName;
/// let name: InterfaceName = "can0".parse().unwrap();
/// assert_eq!(name.as_str(), "can0");
/// let err = "eth0/1".parse::<InterfaceName>().unwrap_err();
/// assert_eq!(err.to_string(), "\"eth0/1\" contains '/'");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceName(String);

impl InterfaceName {
    /// Longest name the kernel accepts (`IFNAMSIZ` minus the terminating NUL).
    pub const MAX_LEN: usize = 15;

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for InterfaceName {
    type Err = ValueError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let bad = |rule: String| ValueError::BadName {
            input: input.to_owned(),
            rule,
        };
        if input.is_empty() {
            return Err(ValueError::Empty);
        }
        if input.len() > Self::MAX_LEN {
            return Err(bad(format!(
                "is {} bytes long, at most {} are allowed",
                input.len(),
                Self::MAX_LEN
            )));
        }
        if input == "." || input == ".." {
            return Err(bad("is reserved by the kernel".to_owned()));
        }
        if input == "lo" {
            return Err(bad(
                "already exists in every network namespace (the loopback device)".to_owned(),
            ));
        }
        if let Some(prefix) = RESERVED_INTERFACE_PREFIXES
            .iter()
            .find(|prefix| input.starts_with(*prefix))
        {
            return Err(bad(format!(
                "starts with {prefix:?}, which the driver reserves for its own links"
            )));
        }
        for c in input.chars() {
            match c {
                '/' | ':' => return Err(bad(format!("contains '{c}'"))),
                '%' => {
                    return Err(bad(
                        "contains '%', which the kernel treats as a numbering template".to_owned(),
                    ));
                }
                c if c.is_whitespace() => return Err(bad("contains whitespace".to_owned())),
                c if !c.is_ascii_graphic() => {
                    return Err(bad(format!(
                        "contains {c:?}; only printable ASCII is allowed"
                    )));
                }
                _ => {}
            }
        }
        Ok(Self(input.to_owned()))
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for InterfaceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for InterfaceName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for InterfaceName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_decimals_are_exact_or_rejected() {
        assert_eq!(parse_scaled("1.5", 3), Ok(1500));
        assert_eq!(parse_scaled("0.0010", 3), Ok(1));
        assert_eq!(parse_scaled("42", 0), Ok(42));
        assert_eq!(parse_scaled("0.0001", 3), Err(ScaleIssue::TooPrecise));
        for bad in ["", ".5", "5.", "1.2.3", "-1", "1e3", " 1"] {
            assert_eq!(parse_scaled(bad, 3), Err(ScaleIssue::Syntax), "{bad:?}");
        }
        assert_eq!(fmt_scaled(1500, 3), "1.5");
        assert_eq!(fmt_scaled(1, 4), "0.0001");
        assert_eq!(fmt_scaled(2000, 3), "2");
    }

    #[test]
    fn bitrate_spellings() {
        for (input, bps) in [
            ("500k", 500_000),
            ("500kbit", 500_000),
            ("500K", 500_000),
            ("1M", 1_000_000),
            ("1Mbit", 1_000_000),
            ("125000", 125_000),
            ("125kbps", 125_000),
            ("83.333k", 83_333),
            ("2.5Mbit/s", 2_500_000),
            ("10bit", 10),
        ] {
            let rate: Bitrate = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(rate.bits_per_second(), bps, "{input}");
        }
    }

    #[test]
    fn bitrate_rejections_say_why() {
        let msg = |s: &str| s.parse::<Bitrate>().unwrap_err().to_string();
        assert_eq!(
            msg("fast"),
            "\"fast\" is not a bitrate (examples: 500k, 500kbit, 1M, 1Mbit, 125000, 125kbps)"
        );
        assert!(
            msg("500m").contains("is not a bitrate"),
            "lowercase m is milli"
        );
        assert!(
            msg("500kB").contains("is not a bitrate"),
            "bytes are not bits"
        );
        assert_eq!(msg("0k"), "0k is below 1bit");
        assert_eq!(msg("1.0001k"), "\"1.0001k\" is more precise than 1 bit/s");
        assert_eq!(msg("5000M"), "5000M is above 4294967295bit");
        assert_eq!(msg(""), "is empty");
    }

    #[test]
    fn value_types_round_trip_through_display() {
        for s in ["500kbit", "1Mbit", "83333bit", "16Mbit", "1500kbit"] {
            let v: Bitrate = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
            assert_eq!(v.to_string().parse::<Bitrate>().unwrap(), v);
        }
        for s in ["0%", "12.5%", "100%", "0.0001%", "33.3333%"] {
            let v: Percent = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
        }
        for s in [
            "10ms",
            "1.5ms",
            "250us",
            "1s",
            "1.000001s",
            "7ns",
            "0s",
            "999.999us",
        ] {
            let v: TimeSpan = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
        }
        for s in ["0x0", "0x7FF", "0x1FFFFFFF", "0x123"] {
            let v: CanId = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
        }
        // Non-canonical inputs normalise, and the canonical text parses to the same value.
        for (input, canonical) in [
            ("1000k", "1Mbit"),
            ("125kbps", "125kbit"),
            ("1000000", "1Mbit"),
        ] {
            let v: Bitrate = input.parse().unwrap();
            assert_eq!(v.to_string(), canonical);
            assert_eq!(canonical.parse::<Bitrate>().unwrap(), v);
        }
        for (input, canonical) in [
            ("1500us", "1.5ms"),
            ("0.25s", "250ms"),
            ("0", "0s"),
            ("2µs", "2us"),
        ] {
            let v: TimeSpan = input.parse().unwrap();
            assert_eq!(v.to_string(), canonical);
            assert_eq!(canonical.parse::<TimeSpan>().unwrap(), v);
        }
        for (input, canonical) in [("12.50%", "12.5%"), ("007%", "7%")] {
            let v: Percent = input.parse().unwrap();
            assert_eq!(v.to_string(), canonical);
        }
        for (input, canonical) in [("2047", "0x7FF"), ("0x00ff", "0xFF"), ("0X1f", "0x1F")] {
            let v: CanId = input.parse().unwrap();
            assert_eq!(v.to_string(), canonical);
        }
    }

    #[test]
    fn percent_rules() {
        let msg = |s: &str| s.parse::<Percent>().unwrap_err().to_string();
        assert_eq!(msg("120%"), "120% is above 100%");
        assert_eq!(msg("100.5%"), "100.5% is above 100%");
        assert_eq!(msg("5"), "5 needs a unit (write \"5%\")");
        assert_eq!(msg("0.00001%"), "\"0.00001%\" is more precise than 0.0001%");
        assert!(msg("-1%").contains("is not a percentage"));
        assert_eq!("12.5%".parse::<Percent>().unwrap().millionths(), 125_000);
        assert!(("0.5%".parse::<Percent>().unwrap().as_fraction() - 0.005).abs() < 1e-12);
    }

    #[test]
    fn time_span_rules() {
        let msg = |s: &str| s.parse::<TimeSpan>().unwrap_err().to_string();
        assert_eq!(msg("10"), "10 needs a unit (write \"10ms\")");
        assert_eq!(
            msg("10min"),
            "\"10min\" is not a time span (examples: 10ms, 1.5ms, 250us, 1s)"
        );
        assert_eq!(msg("1.0005us"), "\"1.0005us\" is more precise than 1ns");
        assert_eq!(
            "250us".parse::<TimeSpan>().unwrap().as_duration(),
            Duration::from_micros(250)
        );
    }

    #[test]
    fn can_id_rules() {
        let msg = |s: &str| s.parse::<CanId>().unwrap_err().to_string();
        assert_eq!(msg("0x20000000"), "0x20000000 does not fit in 29 bits");
        assert_eq!(
            msg("0xFFFFFFFFFFFFFFFFFF"),
            "0xFFFFFFFFFFFFFFFFFF does not fit in 29 bits"
        );
        assert!(msg("0xG1").contains("is not a CAN id"));
        assert!(msg("0x").contains("is not a CAN id"));
        assert!(msg("-5").contains("is not a CAN id"));
        assert_eq!(
            "0x0000000000000000007ff".parse::<CanId>().unwrap().value(),
            0x7FF
        );
        let wide: CanId = "0x800".parse().unwrap();
        assert_eq!(
            wide.check_width(false).unwrap_err().to_string(),
            "0x800 does not fit in 11 bits (set extended: true for 29-bit ids)"
        );
        assert!(wide.check_width(true).is_ok());
    }

    #[test]
    fn interface_name_rules() {
        let msg = |s: &str| s.parse::<InterfaceName>().unwrap_err().to_string();
        assert_eq!(msg("eth0/1"), "\"eth0/1\" contains '/'");
        assert_eq!(msg("can:0"), "\"can:0\" contains ':'");
        assert_eq!(msg("can 0"), "\"can 0\" contains whitespace");
        assert_eq!(msg(".."), "\"..\" is reserved by the kernel");
        assert_eq!(
            msg("abcdefghijklmnop"),
            "\"abcdefghijklmnop\" is 16 bytes long, at most 15 are allowed"
        );
        assert!(msg("can%d").contains("numbering template"));
        assert!(msg("cän").contains("only printable ASCII"));
        assert!(msg("lo").contains("loopback"));
        assert_eq!(msg(""), "is empty");
        assert_eq!(
            msg("cdra0123456789a"),
            "\"cdra0123456789a\" starts with \"cdra\", which the driver reserves for its own links"
        );
        assert!(msg("cdra0").contains("reserves"));
        assert!(msg("vxtm-body").contains("\"vxtm-\""));
        assert!(msg("vxtt-body").contains("\"vxtt-\""));
        assert!("vxcan0".parse::<InterfaceName>().is_ok());
        assert!("can7".parse::<InterfaceName>().is_ok());
        assert_eq!(
            "abcdefghijklmno"
                .parse::<InterfaceName>()
                .unwrap()
                .as_str()
                .len(),
            15
        );
    }
}
