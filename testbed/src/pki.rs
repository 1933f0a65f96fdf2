//! The bed's certificates: a cluster CA with the API server's serving certificate and one client
//! certificate per identity, a front-proxy CA, and the service-account signing key.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

/// Where the bed's outside-world CA is, under the installed binaries' directory.
const OUTSIDE_CA_DIR: &str = "outside-ca";
/// Its subject's common name (scripts/testbed-install.sh writes it).
const OUTSIDE_CA_NAME: &str = "atlas-bed outside-world CA";

/// A directory of PEM files and the CA that signed them, able to sign more.
pub struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Pki {
    /// A fresh PKI in `dir`: `ca.crt`, `serving.{crt,key}` for 127.0.0.1, localhost, the in-cluster
    /// names of the API server and every address in `serving_ips`, `admin.{crt,key}` in
    /// `system:masters`, `sa.{key,pub}`, and a front-proxy CA with its client
    /// (`front-proxy-ca.crt`, `front-proxy-client.{crt,key}`).
    pub fn create(dir: &Path, serving_ips: &[String]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (ca_pem, ca) = new_ca("atlas-test-ca")?;
        std::fs::write(dir.join("ca.crt"), ca_pem)?;
        let pki = Self { dir: dir.to_path_buf(), ca };

        let mut names: Vec<String> = ["127.0.0.1", "localhost", "kubernetes", "kubernetes.default"]
            .into_iter()
            .chain(["kubernetes.default.svc", "kubernetes.default.svc.cluster.local"])
            .map(str::to_owned)
            .collect();
        names.extend(serving_ips.iter().cloned());
        pki.server("serving", "kube-apiserver", names)?;
        pki.client("admin", "atlas-test-admin", &["system:masters"])?;

        let sa = KeyPair::generate()?;
        std::fs::write(dir.join("sa.key"), sa.serialize_pem())?;
        std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;

        // The front proxy's own CA: the API server trusts request headers only from its client.
        let (front_pem, front_ca) = new_ca("atlas-test-front-proxy-ca")?;
        std::fs::write(dir.join("front-proxy-ca.crt"), front_pem)?;
        let front = Self { dir: dir.to_path_buf(), ca: front_ca };
        front.client("front-proxy-client", "front-proxy-client", &[])?;
        Ok(pki)
    }

    /// Signs with the bed's outside-world CA (made once by scripts/testbed-install.sh, trusted by the
    /// node's base image and by nothing on the host), for stand-ins of outside HTTPS services under
    /// their real names: writes its certificate (never its key) as `ca.crt` in `dir`, and
    /// [`Pki::server`] then writes leaves the pods trust.
    pub fn outside_world(dir: &Path) -> Result<Self> {
        let ca_dir = crate::bin_dir().join(OUTSIDE_CA_DIR);
        let read = |name: &str| {
            std::fs::read_to_string(ca_dir.join(name)).with_context(|| {
                format!("the bed's outside-world CA {}: {}", ca_dir.join(name).display(), crate::INSTALL_HINT)
            })
        };
        let (cert, key) = (read("ca.crt")?, read("ca.key")?);
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.crt"), cert)?;
        // A leaf names its issuer by the CA's subject, which the install wrote as this one CN.
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, OUTSIDE_CA_NAME);
        Ok(Self { dir: dir.to_path_buf(), ca: Issuer::new(params, KeyPair::from_pem(&key)?) })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of `name` in the directory.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// Writes `NAME.crt` and `NAME.key`: a client certificate for user `cn` in `groups`.
    pub fn client(&self, name: &str, cn: &str, groups: &[&str]) -> Result<()> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        for group in groups {
            params.distinguished_name.push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        self.sign(name, params)
    }

    /// Writes `NAME.crt` and `NAME.key`: a serving certificate for `names` (DNS names or IPs).
    pub fn server(&self, name: &str, cn: &str, names: Vec<String>) -> Result<()> {
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        self.sign(name, params)
    }

    fn sign(&self, name: &str, params: CertificateParams) -> Result<()> {
        let key = KeyPair::generate()?;
        std::fs::write(self.dir.join(format!("{name}.crt")), params.signed_by(&key, &self.ca)?.pem())?;
        std::fs::write(self.dir.join(format!("{name}.key")), key.serialize_pem())?;
        Ok(())
    }

    /// A kubeconfig for the API server at `server` (`https://HOST:PORT`) as the client `name`
    /// (written by [`Pki::client`]).
    pub fn kubeconfig(&self, server: &str, name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: atlas-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {name}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: atlas-test\n  context: {{cluster: atlas-test, user: {name}, namespace: default}}\ncurrent-context: atlas-test\n",
            ca = self.path("ca.crt"),
            crt = self.path(&format!("{name}.crt")),
            key = self.path(&format!("{name}.key")),
        )
    }
}

fn new_ca(cn: &str) -> Result<(String, Issuer<'static, KeyPair>)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate()?;
    let pem = params.self_signed(&key)?.pem();
    Ok((pem, Issuer::new(params, key)))
}
