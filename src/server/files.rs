//! Small files the runner owns in the data dir: `eula.txt`, the RCON password, and atomic writes.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::distr::{Alphanumeric, SampleString};

use super::ServerError;
use super::cache::sync_dir;
use crate::api::RconSpec;

/// Where a generated RCON password is kept, relative to the data dir.
pub const RCON_PASSWORD_FILE: &str = ".atlas/rcon-password";

const PASSWORD_LEN: usize = 32;

/// Writes `bytes` to `path` so that readers see the old or the new content, never a mix: a
/// temporary file in the same directory, fsynced, renamed over, and the directory fsynced.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), ServerError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}-{}.tmp", std::process::id(), super::http::unique()));
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        if let Some(mode) = mode {
            options.mode(mode);
        }
        let mut file = options.open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    let renamed = written.and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&temp);
        return Err(ServerError::io(path, e));
    }
    sync_dir(&dir)
}

/// Writes `eula.txt` with `eula=true` when `accepted`; otherwise refuses, leaving any existing file.
pub fn write_eula(data_dir: &Path, accepted: bool) -> Result<(), ServerError> {
    if !accepted {
        return Err(ServerError::Eula);
    }
    let path = data_dir.join("eula.txt");
    let body = "# Accepted in spec.eula (https://aka.ms/MinecraftEULA); written by Atlas Runner.\neula=true\n";
    if std::fs::read_to_string(&path).is_ok_and(|old| old == body) {
        return Ok(());
    }
    atomic_write(&path, body.as_bytes(), None)
}

/// The RCON password: read from `spec.passwordFile` when set (absolute, or relative to the data
/// dir), else generated once and kept in `DATA/.atlas/rcon-password` (mode 0600).
pub fn rcon_password(data_dir: &Path, spec: Option<&RconSpec>) -> Result<String, ServerError> {
    if let Some(file) = spec.and_then(|s| s.password_file.as_deref()) {
        let path = data_dir.join(file);
        let text = std::fs::read_to_string(&path).map_err(|e| ServerError::RconPassword {
            reason: format!("cannot read spec.rcon.passwordFile {}: {e}; create it or fix the path", path.display()),
        })?;
        let password = text.trim_end_matches(['\r', '\n']);
        return check_password(password, &path).map(|()| password.to_owned());
    }
    if spec.is_some_and(|s| s.password_secret_ref.is_some()) {
        // The agent and operator read the Secret and hand it over as a file; a bare secret ref here
        // means nobody did, and generating a different password would lock them out.
        return Err(ServerError::RconPassword {
            reason: "spec.rcon.passwordSecretRef is only read by the in-pod agent; for the standalone runner set spec.rcon.passwordFile".into(),
        });
    }
    let path = data_dir.join(RCON_PASSWORD_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 16 => {
            // Tighten a file someone loosened; the password guards a console with operator rights.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| ServerError::io(&path, e))?;
            return Ok(text.trim().to_owned());
        }
        Ok(_) => {
            tracing::warn!(path = %path.display(), "stored RCON password is empty or too short; generating a new one")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ServerError::io(&path, e)),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ServerError::io(parent, e))?;
    }
    let password = Alphanumeric.sample_string(&mut rand::rng(), PASSWORD_LEN);
    atomic_write(&path, format!("{password}\n").as_bytes(), Some(0o600))?;
    Ok(password)
}

fn check_password(password: &str, path: &Path) -> Result<(), ServerError> {
    if password.is_empty() || password.contains(['\n', '\r']) {
        return Err(ServerError::RconPassword {
            reason: format!("{} must hold the password on a single non-empty line", path.display()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::test_dir as temp_dir;

    #[test]
    fn eula_is_written_only_when_accepted() -> anyhow::Result<()> {
        let tmp = temp_dir("eula")?;
        let dir = tmp.path();
        let refused = write_eula(dir, false);
        assert!(matches!(refused, Err(ServerError::Eula)));
        assert!(refused.err().is_some_and(|e| e.to_string().contains("spec.eula: true")));
        assert!(!dir.join("eula.txt").exists());
        write_eula(dir, true)?;
        assert!(std::fs::read_to_string(dir.join("eula.txt"))?.lines().any(|l| l == "eula=true"));
        Ok(())
    }

    #[test]
    fn generated_rcon_password_is_private_and_reused() -> anyhow::Result<()> {
        let tmp = temp_dir("rcon")?;
        let dir = tmp.path();
        let first = rcon_password(dir, None)?;
        assert!(first.len() >= 24 && first.chars().all(|c| c.is_ascii_alphanumeric()), "{first}");
        let mode = std::fs::metadata(dir.join(RCON_PASSWORD_FILE))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(rcon_password(dir, None)?, first);
        Ok(())
    }

    #[test]
    fn rcon_password_file_is_used_when_set() -> anyhow::Result<()> {
        let tmp = temp_dir("rcon-file")?;
        let dir = tmp.path();
        std::fs::write(dir.join("pw"), "s3cret-pass\n")?;
        let spec = RconSpec { port: 25575, password_secret_ref: None, password_file: Some("pw".into()) };
        assert_eq!(rcon_password(dir, Some(&spec))?, "s3cret-pass");
        let missing = RconSpec { password_file: Some("nope".into()), ..spec };
        let err = rcon_password(dir, Some(&missing)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("passwordFile") && err.contains("nope"), "{err}");
        Ok(())
    }
}
