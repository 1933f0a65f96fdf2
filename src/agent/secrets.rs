//! Secrets as files. The operator mounts every Secret the spec references read-only under one
//! directory (`SECRETS/NAME/KEY`, docs/design/pod-contract.md); the agent maps each `*SecretRef` to
//! its file with no API call, and the runner reads files as it does standalone. Files are read on
//! every use, so a rotated Secret is picked up (the hub token and S3 keys on the next request, the
//! RCON password at the next server start).

use std::path::{Path, PathBuf};

use crate::api::{MinecraftServerSpec, RconSpec};

/// Where the agent finds the files of the Secrets its spec references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFiles {
    dir: Option<PathBuf>,
    server: String,
    rcon_password_file: Option<PathBuf>,
}

/// The RCON port when the spec names none (the CRD's default).
const DEFAULT_RCON_PORT: u16 = 25575;

impl SecretFiles {
    /// Secrets mounted under `dir` (none outside a pod: every reference is then refused with the
    /// standalone runner's message), for server `server`; `rcon_password_file` is the effective RCON
    /// password file when the operator names it (`ATLAS_RCON_PASSWORD_FILE`).
    pub fn new(dir: Option<PathBuf>, server: &str, rcon_password_file: Option<PathBuf>) -> Self {
        Self { dir, server: server.to_owned(), rcon_password_file }
    }

    fn file(&self, name: &str, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|dir| dir.join(name).join(key))
    }

    /// Points every `*SecretRef` of `spec` at its mounted file: `rcon.passwordSecretRef` (or the
    /// generated `NAME-rcon` Secret when there is none) to `rcon.passwordFile`,
    /// `pack.source.hub.tokenSecretRef` to `tokenFile`, and
    /// `backup.store.s3.credentialsSecretRef` to `credentialsFile` (the Secret's directory, one file
    /// per key). The references stay as they are, so the spec still reads as its author wrote it.
    pub fn dereference(&self, spec: &mut MinecraftServerSpec) {
        let rcon_file = match spec.rcon.as_ref().and_then(|r| r.password_secret_ref.as_ref()) {
            Some(secret) => self.file(&secret.name, &secret.key),
            None => self.rcon_password_file.clone().or_else(|| self.file(&format!("{}-rcon", self.server), "password")),
        };
        if let Some(file) = rcon_file {
            let rcon = spec.rcon.get_or_insert(RconSpec {
                port: DEFAULT_RCON_PORT,
                password_secret_ref: None,
                password_file: None,
            });
            rcon.password_file = Some(path_text(&file));
        }
        if let Some(hub) = spec.pack.as_mut().and_then(|p| p.source.hub.as_mut())
            && let Some(file) = hub.token_secret_ref.as_ref().and_then(|s| self.file(&s.name, &s.key))
        {
            hub.token_file = Some(path_text(&file));
        }
        if let Some(s3) = spec.backup.as_mut().and_then(|b| b.store.as_mut()).and_then(|s| s.s3.as_mut())
            && let Some(dir) =
                s3.credentials_secret_ref.as_ref().and_then(|s| self.dir.as_ref().map(|d| d.join(&s.name)))
        {
            s3.credentials_file = Some(path_text(&dir));
        }
    }
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<MinecraftServerSpec, serde_yaml::Error> {
        serde_yaml::from_str(&format!("eula: true\nserver: {{type: vanilla}}\n{yaml}"))
    }

    #[test]
    fn every_reference_maps_to_its_file_under_the_secrets_dir() -> Result<(), serde_yaml::Error> {
        let files = SecretFiles::new(Some("/var/run/atlas/secrets".into()), "survival", None);
        let mut full = spec(
            "rcon: {passwordSecretRef: {name: rc, key: pw}}\n\
             pack: {source: {hub: {url: 'https://hub', pack: p, tokenSecretRef: {name: hub, key: token}}}}\n\
             backup: {store: {s3: {bucket: bkt, credentialsSecretRef: {name: s3}}}}\n",
        )?;
        files.dereference(&mut full);
        assert_eq!(full.rcon.as_ref().and_then(|r| r.password_file.as_deref()), Some("/var/run/atlas/secrets/rc/pw"));
        let hub = full.pack.as_ref().and_then(|p| p.source.hub.as_ref());
        assert_eq!(hub.and_then(|h| h.token_file.as_deref()), Some("/var/run/atlas/secrets/hub/token"));
        let s3 = full.backup.as_ref().and_then(|b| b.store.as_ref()).and_then(|s| s.s3.as_ref());
        assert_eq!(s3.and_then(|s| s.credentials_file.as_deref()), Some("/var/run/atlas/secrets/s3"));
        // The references themselves are kept.
        assert!(full.rcon.as_ref().is_some_and(|r| r.password_secret_ref.is_some()));
        Ok(())
    }

    #[test]
    fn without_an_rcon_reference_the_generated_secret_is_used() -> Result<(), serde_yaml::Error> {
        let files = SecretFiles::new(Some("/s".into()), "survival", None);
        let mut bare = spec("")?;
        files.dereference(&mut bare);
        let rcon = bare.rcon.as_ref();
        assert_eq!(rcon.map(|r| r.port), Some(25575));
        assert_eq!(rcon.and_then(|r| r.password_file.as_deref()), Some("/s/survival-rcon/password"));
        // The operator's ATLAS_RCON_PASSWORD_FILE wins when it is given.
        let named = SecretFiles::new(Some("/s".into()), "survival", Some("/s/other/pw".into()));
        let mut bare = spec("rcon: {port: 25580}")?;
        named.dereference(&mut bare);
        assert_eq!(bare.rcon.as_ref().map(|r| r.port), Some(25580));
        assert_eq!(bare.rcon.as_ref().and_then(|r| r.password_file.as_deref()), Some("/s/other/pw"));
        Ok(())
    }

    #[test]
    fn outside_a_pod_nothing_is_rewritten() -> Result<(), serde_yaml::Error> {
        let files = SecretFiles::new(None, "survival", None);
        let original = spec("pack: {source: {hub: {url: 'https://hub', pack: p, tokenSecretRef: {name: h, key: t}}}}")?;
        let mut copy = original.clone();
        files.dereference(&mut copy);
        assert_eq!(copy, original);
        Ok(())
    }
}
