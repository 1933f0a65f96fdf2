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
    ///
    /// The pod mounts only the Secrets of the template it was created from; a new template reaches
    /// the pod when the operator replaces it (under `spec.upgrade`). A reference to a Secret the pod
    /// does not mount keeps the file `previous` (the spec the agent runs) used for the same field,
    /// and says so in the returned messages (one line each), so backups, hub checks and server
    /// starts go on with what the pod has until it is replaced.
    pub fn dereference(&self, spec: &mut MinecraftServerSpec, previous: Option<&MinecraftServerSpec>) -> Vec<String> {
        let mut unmounted = Vec::new();
        let rcon_ref = spec.rcon.as_ref().and_then(|r| r.password_secret_ref.as_ref());
        let (rcon_secret, rcon_file) = match rcon_ref {
            Some(secret) => (Some(secret.name.clone()), self.file(&secret.name, &secret.key)),
            None => {
                let generated = format!("{}-rcon", self.server);
                match &self.rcon_password_file {
                    // The operator's own choice for this pod: mounted by construction.
                    Some(file) => (None, Some(file.clone())),
                    None => (Some(generated.clone()), self.file(&generated, "password")),
                }
            }
        };
        let old_rcon = previous.and_then(|p| p.rcon.as_ref()).and_then(|r| r.password_file.clone());
        let rcon_file =
            self.mounted_or_kept("rcon.passwordSecretRef", rcon_secret.as_deref(), rcon_file, old_rcon, &mut unmounted);
        if let Some(file) = rcon_file {
            let rcon = spec.rcon.get_or_insert(RconSpec {
                port: DEFAULT_RCON_PORT,
                password_secret_ref: None,
                password_file: None,
            });
            rcon.password_file = Some(file);
        }
        let old_token = previous
            .and_then(|p| p.pack.as_ref())
            .and_then(|p| p.source.hub.as_ref())
            .and_then(|h| h.token_file.clone());
        if let Some(hub) = spec.pack.as_mut().and_then(|p| p.source.hub.as_mut())
            && let Some(secret) = hub.token_secret_ref.clone()
        {
            let file = self.file(&secret.name, &secret.key);
            let name = "pack.source.hub.tokenSecretRef";
            hub.token_file = self.mounted_or_kept(name, Some(&secret.name), file, old_token, &mut unmounted);
        }
        let old_credentials = previous
            .and_then(|p| p.backup.as_ref())
            .and_then(|b| b.store.as_ref())
            .and_then(|s| s.s3.as_ref())
            .and_then(|s| s.credentials_file.clone());
        if let Some(s3) = spec.backup.as_mut().and_then(|b| b.store.as_mut()).and_then(|s| s.s3.as_mut())
            && let Some(secret) = s3.credentials_secret_ref.clone()
        {
            let dir = self.dir.as_ref().map(|d| d.join(&secret.name));
            let name = "backup.store.s3.credentialsSecretRef";
            s3.credentials_file = self.mounted_or_kept(name, Some(&secret.name), dir, old_credentials, &mut unmounted);
        }
        unmounted
    }

    /// `file` (of Secret `secret`) as text when the pod mounts that Secret, or when there is nothing
    /// to keep instead; else `kept`, with a message in `unmounted`.
    fn mounted_or_kept(
        &self,
        field: &str,
        secret: Option<&str>,
        file: Option<PathBuf>,
        kept: Option<String>,
        unmounted: &mut Vec<String>,
    ) -> Option<String> {
        let file = file.map(|f| path_text(&f));
        let mounted = match (secret, &self.dir) {
            (Some(secret), Some(dir)) => dir.join(secret).is_dir(),
            _ => true,
        };
        match kept {
            Some(kept) if !mounted && file.as_ref() != Some(&kept) => {
                unmounted.push(format!(
                    "spec.{field} names Secret {}, which this pod does not mount; {kept} is used until the operator replaces the pod (see the UpgradePending condition)",
                    secret.unwrap_or_default()
                ));
                Some(kept)
            }
            _ => file,
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
        files.dereference(&mut full, None);
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
        files.dereference(&mut bare, None);
        let rcon = bare.rcon.as_ref();
        assert_eq!(rcon.map(|r| r.port), Some(25575));
        assert_eq!(rcon.and_then(|r| r.password_file.as_deref()), Some("/s/survival-rcon/password"));
        // The operator's ATLAS_RCON_PASSWORD_FILE wins when it is given.
        let named = SecretFiles::new(Some("/s".into()), "survival", Some("/s/other/pw".into()));
        let mut bare = spec("rcon: {port: 25580}")?;
        named.dereference(&mut bare, None);
        assert_eq!(bare.rcon.as_ref().map(|r| r.port), Some(25580));
        assert_eq!(bare.rcon.as_ref().and_then(|r| r.password_file.as_deref()), Some("/s/other/pw"));
        Ok(())
    }

    #[test]
    fn outside_a_pod_nothing_is_rewritten() -> Result<(), serde_yaml::Error> {
        let files = SecretFiles::new(None, "survival", None);
        let original = spec("pack: {source: {hub: {url: 'https://hub', pack: p, tokenSecretRef: {name: h, key: t}}}}")?;
        let mut copy = original.clone();
        files.dereference(&mut copy, None);
        assert_eq!(copy, original);
        Ok(())
    }

    #[test]
    fn a_secret_the_pod_does_not_mount_keeps_the_previous_file_and_says_so() -> Result<(), Box<dyn std::error::Error>> {
        let secrets = tempfile::tempdir()?;
        for name in ["s3", "hub", "rc"] {
            std::fs::create_dir_all(secrets.path().join(name))?;
        }
        let files = SecretFiles::new(Some(secrets.path().to_owned()), "survival", None);
        let refs = |s3: &str, hub: &str, rcon: &str| {
            spec(&format!(
                "rcon: {{passwordSecretRef: {{name: {rcon}, key: pw}}}}\n\
                 pack: {{source: {{hub: {{url: 'https://hub', pack: p, tokenSecretRef: {{name: {hub}, key: token}}}}}}}}\n\
                 backup: {{store: {{s3: {{bucket: bkt, credentialsSecretRef: {{name: {s3}}}}}}}}}\n"
            ))
        };
        let mut running = refs("s3", "hub", "rc")?;
        assert!(files.dereference(&mut running, None).is_empty());
        // Every reference moves to a Secret the pod has not mounted: the files stay as they were.
        let mut moved = refs("s3-v2", "hub-v2", "rc-v2")?;
        let told = files.dereference(&mut moved, Some(&running));
        assert_eq!(told.len(), 3, "{told:?}");
        assert!(told.iter().all(|m| m.contains("does not mount") && !m.contains('\n')), "{told:?}");
        assert!(told[2].contains("s3-v2") && told[2].contains("UpgradePending"), "{told:?}");
        let dir = secrets.path().display();
        assert_eq!(moved.rcon.as_ref().and_then(|r| r.password_file.clone()), Some(format!("{dir}/rc/pw")));
        let s3 = moved.backup.as_ref().and_then(|b| b.store.as_ref()).and_then(|s| s.s3.as_ref());
        assert_eq!(s3.and_then(|s| s.credentials_file.clone()), Some(format!("{dir}/s3")));
        // Once mounted (a replaced pod, or a Secret that was there), the new reference is used.
        std::fs::create_dir_all(secrets.path().join("s3-v2"))?;
        let mut moved = refs("s3-v2", "hub", "rc")?;
        assert!(files.dereference(&mut moved, Some(&running)).is_empty());
        let s3 = moved.backup.as_ref().and_then(|b| b.store.as_ref()).and_then(|s| s.s3.as_ref());
        assert_eq!(s3.and_then(|s| s.credentials_file.clone()), Some(format!("{dir}/s3-v2")));
        Ok(())
    }
}
