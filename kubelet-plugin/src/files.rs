//! Crash-safe file writes shared by the checkpoint and the CDI specs.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// Writes `contents` to `path` so that readers see either the old file or the new one, never
/// a torn one, even across a crash: write a temporary file in the same directory, fsync it,
/// rename it over the target, then fsync the directory so the rename itself is durable.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let directory = path.parent().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} has no parent directory", path.display()),
        )
    })?;
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    fs::create_dir_all(directory)?;
    // A leading dot keeps half-written files out of CDI's directory scan.
    let temporary = directory.join(format!(
        "{}{}",
        temporary_prefix(&file_name.to_string_lossy()),
        std::process::id()
    ));
    let result = (|| {
        let mut file = File::create(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        File::open(directory)?.sync_all()
    })();
    if result.is_err() {
        // Leave nothing half-made behind; the original error is what matters.
        let _ = fs::remove_file(&temporary);
    }
    result
}

/// The temporary file [`write_atomically`] uses for `file_name`, less its pid suffix.
fn temporary_prefix(file_name: &str) -> String {
    format!(".{file_name}.tmp-")
}

/// Removes the temporary files [`write_atomically`] left in `directory` for targets whose name
/// starts with `target_prefix`, when the process that wrote them is gone: a daemon killed in
/// the middle of a write leaves one behind, and the next never reuses its name. Files of a
/// live writer (say the other daemon of a rolling update) are left alone. Returns the removed
/// files; a missing directory has none.
pub fn remove_stale_temporaries(
    directory: &Path,
    target_prefix: &str,
) -> std::io::Result<Vec<std::path::PathBuf>> {
    let entries = match fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let prefix = format!(".{target_prefix}");
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) {
            continue;
        }
        let Some(Ok(pid)) = name.rsplit_once(".tmp-").map(|(_, pid)| pid.parse::<u32>()) else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists();
        if !alive {
            remove_if_present(&entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// Removes a file; a file that is already gone is not an error (unprepare is idempotent).
pub fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("state.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn temporaries_of_dead_writers_are_removed_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let live = std::process::id();
        let names = [
            format!(".vendor-can_uid-1.json.tmp-{dead}"),
            format!(".vendor-can_uid-2.json.tmp-{live}"),
            format!(".other-thing.json.tmp-{dead}"),
            "vendor-can_uid-3.json".to_owned(),
        ];
        for name in &names {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        let removed = remove_stale_temporaries(dir.path(), "vendor-can_").unwrap();
        assert_eq!(removed, vec![dir.path().join(&names[0])]);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = names[1..].to_vec();
        want.sort();
        assert_eq!(left, want);
        assert!(
            remove_stale_temporaries(&dir.path().join("absent"), "x")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn removing_a_missing_file_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        remove_if_present(&dir.path().join("absent")).unwrap();
    }
}
