//! CDI specs: how a prepared claim reaches the container runtime.
//!
//! One spec file per claim, `<vendor>-<class>_<claim uid>.json` in the CDI directory, with one
//! CDI device per allocated can-dra device. Each device carries the environment a workload
//! reads (the interface name inside the pod) and a `createRuntime` hook: the runtime runs it
//! once the container's network namespace exists, and the hook asks the node daemon to attach
//! the member there. The kubelet passes the fully qualified ids (`vendor/class=name`) to the
//! runtime.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files;

/// The CDI class of can-dra devices.
pub const CDI_CLASS: &str = "can";

/// How long the runtime lets the hook run before failing the container (seconds). The hook
/// itself gives up earlier, with a message, so this is only the last line of defence.
pub const HOOK_TIMEOUT_SECONDS: u32 = 30;

/// Errors writing or removing CDI specs.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    /// A name would not be a valid CDI device name.
    #[error("CDI device name {name:?} is invalid: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The spec file could not be written or removed.
    #[error("CDI spec {path}: {source}")]
    Io {
        /// The spec file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The spec could not be encoded.
    #[error("encoding CDI spec: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A CDI spec document (the subset of the CDI schema can-dra emits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    /// The minimum CDI version the content needs.
    pub cdi_version: String,
    /// `vendor/class`.
    pub kind: String,
    /// The devices of one claim.
    pub devices: Vec<Device>,
}

/// One CDI device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    /// Device name, unique in the spec's kind.
    pub name: String,
    /// What the runtime changes in the container.
    pub container_edits: ContainerEdits,
}

/// The container edits can-dra uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerEdits {
    /// `KEY=VALUE` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// OCI hooks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
}

/// An OCI hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hook {
    /// `createRuntime`, `createContainer`, ...
    pub hook_name: String,
    /// Absolute path of the executable on the host.
    pub path: String,
    /// Arguments, `argv[0]` included.
    pub args: Vec<String>,
    /// Seconds before the runtime kills the hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
}

/// One device of a prepared claim, as the CDI spec needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimDevice {
    /// The request this device serves (subrequest part stripped).
    pub request: String,
    /// The ResourceSlice pool.
    pub pool: String,
    /// The device name in the pool.
    pub device: String,
    /// The interface name inside the pod.
    pub interface_name: String,
}

/// Writes and removes the per-claim CDI specs of one driver.
#[derive(Debug, Clone)]
pub struct CdiWriter {
    directory: PathBuf,
    vendor: String,
    hook_path: PathBuf,
    hook_socket: Option<PathBuf>,
}

impl CdiWriter {
    /// A writer for `driver_name` (vendor `k8s.<driver>`) into `directory`, whose specs call the
    /// hook binary at `hook_path`.
    pub fn new(
        directory: impl Into<PathBuf>,
        driver_name: &str,
        hook_path: impl Into<PathBuf>,
    ) -> Self {
        Self {
            directory: directory.into(),
            vendor: format!("k8s.{driver_name}"),
            hook_path: hook_path.into(),
            hook_socket: None,
        }
    }

    /// Makes the specs tell the hook where the daemon's hook socket is (`--socket`). Needed
    /// whenever the socket is not at the hook's built-in default, which only holds for the
    /// default driver name and kubelet plugin directory.
    pub fn with_hook_socket(mut self, socket: impl Into<PathBuf>) -> Self {
        self.hook_socket = Some(socket.into());
        self
    }

    /// `vendor/class`, e.g. `k8s.can.dra.dev/can`.
    pub fn kind(&self) -> String {
        format!("{}/{CDI_CLASS}", self.vendor)
    }

    /// The spec file of a claim.
    pub fn spec_path(&self, claim_uid: &str) -> PathBuf {
        self.directory
            .join(format!("{}-{CDI_CLASS}_{claim_uid}.json", self.vendor))
    }

    /// The CDI device name of one device of a claim: unique per claim and device.
    pub fn device_name(claim_uid: &str, pool: &str, device: &str) -> String {
        // Pools of cluster-wide buses contain '/', which CDI names do not allow.
        let pool = pool.replace('/', ".");
        format!("{claim_uid}-{pool}-{device}")
    }

    /// Builds the spec of a claim (pure; see [`CdiWriter::write`]).
    pub fn spec(&self, claim_uid: &str, devices: &[ClaimDevice]) -> Result<Spec, CdiError> {
        let devices = devices
            .iter()
            .map(|device| {
                let name = Self::device_name(claim_uid, &device.pool, &device.device);
                validate_device_name(&name)?;
                let mut args = vec![
                    "can-dra-cdi-hook".to_string(),
                    "--claim".to_string(),
                    claim_uid.to_string(),
                    "--pool".to_string(),
                    device.pool.clone(),
                    "--device".to_string(),
                    device.device.clone(),
                ];
                if let Some(socket) = &self.hook_socket {
                    args.extend(["--socket".to_string(), socket.display().to_string()]);
                }
                Ok(Device {
                    name,
                    container_edits: ContainerEdits {
                        env: vec![
                            format!("CAN_DRA_INTERFACE={}", device.interface_name),
                            format!(
                                "CAN_DRA_INTERFACE_{}={}",
                                env_suffix(&device.request),
                                device.interface_name
                            ),
                        ],
                        hooks: vec![Hook {
                            hook_name: "createRuntime".to_string(),
                            path: self.hook_path.display().to_string(),
                            args,
                            timeout: Some(HOOK_TIMEOUT_SECONDS),
                        }],
                    },
                })
            })
            .collect::<Result<Vec<_>, CdiError>>()?;
        let mut spec = Spec {
            cdi_version: String::new(),
            kind: self.kind(),
            devices,
        };
        spec.cdi_version = minimum_version(&spec).to_string();
        Ok(spec)
    }

    /// Writes the claim's spec atomically and returns the fully qualified CDI device ids, in
    /// the order of `devices`. Writing the same claim again replaces the file with identical
    /// content.
    pub fn write(&self, claim_uid: &str, devices: &[ClaimDevice]) -> Result<Vec<String>, CdiError> {
        let spec = self.spec(claim_uid, devices)?;
        let path = self.spec_path(claim_uid);
        let bytes = serde_json::to_vec_pretty(&spec)?;
        files::write_atomically(&path, &bytes).map_err(|source| CdiError::Io { path, source })?;
        Ok(spec
            .devices
            .iter()
            .map(|device| format!("{}={}", spec.kind, device.name))
            .collect())
    }

    /// Makes sure the claim's spec is on disk as [`CdiWriter::write`] would write it, and says
    /// whether it had to be written (missing or different): after a node reboot the CDI
    /// directory (a tmpfs) is empty while the checkpoint survives, and the kubelet does not
    /// prepare again a claim it believes prepared. Returns the ids, as `write` does.
    pub fn restore(
        &self,
        claim_uid: &str,
        devices: &[ClaimDevice],
    ) -> Result<(Vec<String>, bool), CdiError> {
        let spec = self.spec(claim_uid, devices)?;
        let path = self.spec_path(claim_uid);
        let bytes = serde_json::to_vec_pretty(&spec)?;
        let ids = spec
            .devices
            .iter()
            .map(|device| format!("{}={}", spec.kind, device.name))
            .collect();
        match std::fs::read(&path) {
            Ok(found) if found == bytes => return Ok((ids, false)),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CdiError::Io { path, source }),
        }
        files::write_atomically(&path, &bytes).map_err(|source| CdiError::Io { path, source })?;
        Ok((ids, true))
    }

    /// Removes the claim's spec; a spec that is already gone is fine.
    pub fn remove(&self, claim_uid: &str) -> Result<(), CdiError> {
        let path = self.spec_path(claim_uid);
        files::remove_if_present(&path).map_err(|source| CdiError::Io { path, source })
    }

    /// The claim UIDs that have a spec of ours in the directory (for clean-up after a crash).
    pub fn claims_with_specs(&self) -> Result<Vec<String>, CdiError> {
        let prefix = format!("{}-{CDI_CLASS}_", self.vendor);
        let entries = match std::fs::read_dir(&self.directory) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(CdiError::Io {
                    path: self.directory.clone(),
                    source,
                });
            }
        };
        let mut claims: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                name.strip_prefix(&prefix)?
                    .strip_suffix(".json")
                    .map(str::to_string)
            })
            .collect();
        claims.sort();
        Ok(claims)
    }

    /// Removes the temporary files of spec writes that a killed daemon left behind (see
    /// [`files::remove_stale_temporaries`]); returns them.
    pub fn remove_stale_temporaries(&self) -> Result<Vec<PathBuf>, CdiError> {
        files::remove_stale_temporaries(&self.directory, &format!("{}-{CDI_CLASS}_", self.vendor))
            .map_err(|source| CdiError::Io {
                path: self.directory.clone(),
                source,
            })
    }

    /// The directory specs are written to.
    pub fn directory(&self) -> &Path {
        &self.directory
    }
}

/// The smallest CDI version whose schema covers `spec` (CDI `MinimumRequiredVersion` rules for
/// the fields can-dra uses): device names starting with a digit need 0.5.0; env and hooks are
/// in every version from 0.3.0 on.
pub fn minimum_version(spec: &Spec) -> &'static str {
    let digit_first = spec
        .devices
        .iter()
        .any(|device| device.name.starts_with(|c: char| c.is_ascii_digit()));
    if digit_first { "0.5.0" } else { "0.3.0" }
}

fn validate_device_name(name: &str) -> Result<(), CdiError> {
    let invalid = |reason| CdiError::InvalidName {
        name: name.to_string(),
        reason,
    };
    let first = name.chars().next().ok_or_else(|| invalid("it is empty"))?;
    let last = name.chars().last().unwrap_or(first);
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err(invalid("it must start and end with a letter or digit"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
    {
        return Err(invalid(
            "only letters, digits, '_', '.', ':' and '-' are allowed",
        ));
    }
    Ok(())
}

/// An environment-variable-safe form of a request name (`can-a` → `CAN_A`).
fn env_suffix(request: &str) -> String {
    request
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(request: &str, device: &str) -> ClaimDevice {
        ClaimDevice {
            request: request.to_string(),
            pool: "node-1".to_string(),
            device: device.to_string(),
            interface_name: "can0".to_string(),
        }
    }

    #[test]
    fn writes_one_spec_per_claim_with_env_and_hook() {
        let dir = tempfile::tempdir().unwrap();
        let writer = CdiWriter::new(
            dir.path(),
            "can.dra.dev",
            "/opt/can-dra/bin/can-dra-cdi-hook",
        );
        let ids = writer
            .write("a1b2-c3", &[device("bus", "can0-m0")])
            .unwrap();
        assert_eq!(ids, vec!["k8s.can.dra.dev/can=a1b2-c3-node-1-can0-m0"]);
        let written: Spec = serde_json::from_slice(
            &std::fs::read(dir.path().join("k8s.can.dra.dev-can_a1b2-c3.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(written.kind, "k8s.can.dra.dev/can");
        assert_eq!(written.cdi_version, "0.3.0");
        let edits = &written.devices[0].container_edits;
        assert_eq!(
            edits.env,
            vec!["CAN_DRA_INTERFACE=can0", "CAN_DRA_INTERFACE_BUS=can0"]
        );
        assert_eq!(edits.hooks[0].hook_name, "createRuntime");
        assert_eq!(edits.hooks[0].path, "/opt/can-dra/bin/can-dra-cdi-hook");
        assert_eq!(
            edits.hooks[0].args,
            vec![
                "can-dra-cdi-hook",
                "--claim",
                "a1b2-c3",
                "--pool",
                "node-1",
                "--device",
                "can0-m0"
            ]
        );
    }

    #[test]
    fn a_hook_socket_is_passed_to_the_hook() {
        let writer = CdiWriter::new("/nonexistent", "example.com", "/hook")
            .with_hook_socket("/var/lib/kubelet/plugins/example.com/hook.sock");
        let spec = writer.spec("uid", &[device("bus", "can0-m0")]).unwrap();
        let args = &spec.devices[0].container_edits.hooks[0].args;
        assert_eq!(
            args[args.len() - 2..],
            ["--socket", "/var/lib/kubelet/plugins/example.com/hook.sock"]
        );
    }

    #[test]
    fn a_uid_starting_with_a_digit_needs_cdi_0_5_0() {
        let writer = CdiWriter::new("/nonexistent", "can.dra.dev", "/hook");
        let spec = writer.spec("0f3e", &[device("bus", "can0-m0")]).unwrap();
        assert_eq!(spec.cdi_version, "0.5.0");
    }

    #[test]
    fn writing_twice_is_identical_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let writer = CdiWriter::new(dir.path(), "can.dra.dev", "/hook");
        let devices = [device("a", "can0-m0"), device("b", "can0-m1")];
        let first = writer.write("uid-1", &devices).unwrap();
        let bytes = std::fs::read(writer.spec_path("uid-1")).unwrap();
        assert_eq!(writer.write("uid-1", &devices).unwrap(), first);
        assert_eq!(std::fs::read(writer.spec_path("uid-1")).unwrap(), bytes);
        assert_eq!(writer.claims_with_specs().unwrap(), vec!["uid-1"]);
        writer.remove("uid-1").unwrap();
        writer.remove("uid-1").unwrap();
        assert!(writer.claims_with_specs().unwrap().is_empty());
    }

    #[test]
    fn restore_writes_a_missing_or_changed_spec_and_leaves_a_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let writer = CdiWriter::new(dir.path(), "can.dra.dev", "/hook");
        let devices = [device("a", "can0-m0"), device("b", "can0-m1")];
        let ids = writer.write("uid-1", &devices).unwrap();
        let bytes = std::fs::read(writer.spec_path("uid-1")).unwrap();
        assert_eq!(
            writer.restore("uid-1", &devices).unwrap(),
            (ids.clone(), false)
        );
        std::fs::remove_file(writer.spec_path("uid-1")).unwrap();
        assert_eq!(
            writer.restore("uid-1", &devices).unwrap(),
            (ids.clone(), true)
        );
        assert_eq!(std::fs::read(writer.spec_path("uid-1")).unwrap(), bytes);
        std::fs::write(writer.spec_path("uid-1"), b"{}").unwrap();
        assert_eq!(writer.restore("uid-1", &devices).unwrap(), (ids, true));
        assert_eq!(std::fs::read(writer.spec_path("uid-1")).unwrap(), bytes);
    }

    #[test]
    fn pools_with_slashes_become_valid_device_names() {
        let writer = CdiWriter::new("/nonexistent", "can.dra.dev", "/hook");
        let mut shared = device("bus", "m3");
        shared.pool = "cluster/bus-a".to_string();
        let spec = writer.spec("uid", &[shared]).unwrap();
        assert_eq!(spec.devices[0].name, "uid-cluster.bus-a-m3");
    }

    #[test]
    fn invalid_names_are_rejected_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let writer = CdiWriter::new(dir.path(), "can.dra.dev", "/hook");
        let error = writer
            .write("uid", &[device("bus", "bad name-")])
            .unwrap_err();
        assert!(
            error.to_string().contains("\"uid-node-1-bad name-\""),
            "{error}"
        );
        assert!(
            writer.claims_with_specs().unwrap().is_empty(),
            "nothing written"
        );
    }
}
