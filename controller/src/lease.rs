//! Leader election over a `coordination.k8s.io/v1` Lease, so that only one controller replica
//! publishes bus pools at a time.
//!
//! [`decide`] is the whole policy, as a pure function of the stored Lease and the clock: create
//! the Lease if there is none, renew it if we hold it, take it over if its holder let it expire,
//! and otherwise follow. [`LeaderLease`] applies the decision with optimistic concurrency (a
//! replace carries the read `resourceVersion`), so two candidates racing for an expired Lease
//! cannot both win: the loser gets a conflict and follows.

use std::fmt;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};

/// What a candidate should do with the Lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseDecision {
    /// There is no Lease: create it with this spec.
    Create(LeaseSpec),
    /// We hold it: write this spec (a fresh renew time).
    Renew(LeaseSpec),
    /// It has no live holder: write this spec to take it over.
    TakeOver(LeaseSpec),
    /// Someone else holds it and it has not expired.
    Follow {
        /// The current holder.
        holder: String,
    },
}

fn millis(time: Option<&MicroTime>) -> Option<i64> {
    time.map(|t| t.0.as_millisecond())
}

/// Decides what `identity` should do with the Lease `current` (if any) at `now`, holding it for
/// `duration` at a time.
///
/// ```
/// use std::time::Duration;
/// use can_dra_controller::lease::{LeaseDecision, decide};
/// use k8s_openapi::jiff::Timestamp;
/// let decision = decide(None, "pod-a", Duration::from_secs(15), Timestamp::UNIX_EPOCH);
/// assert!(matches!(decision, LeaseDecision::Create(_)));
/// ```
pub fn decide(
    current: Option<&LeaseSpec>,
    identity: &str,
    duration: Duration,
    now: Timestamp,
) -> LeaseDecision {
    let seconds = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
    let fresh = |previous: Option<&LeaseSpec>, transitions: i32| LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: Some(seconds),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..previous.cloned().unwrap_or_default()
    };
    let Some(spec) = current else {
        return LeaseDecision::Create(fresh(None, 0));
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return LeaseDecision::Renew(LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(seconds),
            ..spec.clone()
        });
    }
    let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1000;
    let last = millis(spec.renew_time.as_ref()).or(millis(spec.acquire_time.as_ref()));
    let expired = last.is_none_or(|last| last.saturating_add(held_for) <= now.as_millisecond());
    if holder.is_empty() || expired {
        let transitions = spec.lease_transitions.unwrap_or(0).saturating_add(1);
        return LeaseDecision::TakeOver(fresh(Some(spec), transitions));
    }
    LeaseDecision::Follow {
        holder: holder.to_owned(),
    }
}

/// The Lease could not be read or written (not a lost race, which is "not leading").
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} Lease {namespace}/{name}: {source}")]
pub struct LeaseError {
    /// `read`, `create` or `update`.
    pub action: &'static str,
    /// The Lease namespace.
    pub namespace: String,
    /// The Lease name.
    pub name: String,
    /// The client error.
    #[source]
    pub source: kube::Error,
}

/// One candidate for the leadership a Lease stands for.
#[derive(Clone)]
pub struct LeaderLease {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
}

impl fmt::Debug for LeaderLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderLease")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

impl LeaderLease {
    /// A candidate `identity` for Lease `namespace/name`, held `duration` per renewal.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    /// How long one acquisition or renewal holds.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    fn error(&self, action: &'static str, source: kube::Error) -> LeaseError {
        LeaseError {
            action,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    /// Acquires or renews the Lease; `Ok(true)` while this candidate leads.
    pub async fn try_lead(&self) -> Result<bool, LeaseError> {
        let stored = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.error("read", e))?;
        let decision = decide(
            stored.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            self.duration,
            Timestamp::now(),
        );
        let (spec, create) = match decision {
            LeaseDecision::Follow { holder } => {
                tracing::debug!(%holder, "another controller leads");
                return Ok(false);
            }
            LeaseDecision::Create(spec) => (spec, true),
            LeaseDecision::TakeOver(spec) => {
                tracing::info!(identity = %self.identity, "taking over the expired leader Lease");
                (spec, false)
            }
            LeaseDecision::Renew(spec) => (spec, false),
        };
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..stored.map(|l| l.metadata).unwrap_or_default()
            },
            spec: Some(spec),
        };
        let written = if create {
            self.api
                .create(&PostParams::default(), &lease)
                .await
                .map_err(|e| ("create", e))
        } else {
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map_err(|e| ("update", e))
        };
        match written {
            Ok(_) => Ok(true),
            // Another candidate wrote first (409), or the Lease vanished meanwhile (404).
            Err((_, kube::Error::Api(status))) if status.code == 409 || status.code == 404 => {
                Ok(false)
            }
            Err((action, source)) => Err(self.error(action, source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(15);

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(at(0))),
            renew_time: Some(MicroTime(at(renewed))),
            lease_transitions: Some(2),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn no_lease_is_created_for_us() {
        let LeaseDecision::Create(spec) = decide(None, "a", HOLD, at(100)) else {
            panic!("expected Create");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.renew_time, Some(MicroTime(at(100))));
    }

    #[test]
    fn our_lease_is_renewed_keeping_its_history() {
        let LeaseDecision::Renew(spec) = decide(Some(&held_by("a", 90)), "a", HOLD, at(100)) else {
            panic!("expected Renew");
        };
        assert_eq!(spec.renew_time, Some(MicroTime(at(100))));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(0))));
        assert_eq!(spec.lease_transitions, Some(2));
    }

    #[test]
    fn a_live_holder_is_followed_until_its_lease_expires() {
        let lease = held_by("b", 90);
        assert_eq!(
            decide(Some(&lease), "a", HOLD, at(104)),
            LeaseDecision::Follow { holder: "b".into() }
        );
        let LeaseDecision::TakeOver(spec) = decide(Some(&lease), "a", HOLD, at(105)) else {
            panic!("expected TakeOver at expiry");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(3));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(105))));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut lease = held_by("b", 99);
        lease.holder_identity = None;
        assert!(matches!(
            decide(Some(&lease), "a", HOLD, at(100)),
            LeaseDecision::TakeOver(_)
        ));
    }
}
