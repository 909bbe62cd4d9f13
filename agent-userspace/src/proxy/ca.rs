//! The local certificate authority that signs the certificates the proxy shows sandboxes.
//!
//! Created on first start in the daemon's CA directory (directory 0700, `ca.pem` 0644,
//! `ca-key.pem` 0600) and loaded on later starts, so that sandboxes keep trusting the
//! same CA. Leaf certificates are minted on demand per server name and cached.
//!
//! [`CertAuthority::leaf_for`] signs whatever name it is given: callers must have checked
//! the name against policy first (the proxy does so with the route's `host_allowed`
//! before asking for a leaf). Nothing here decides which names may be impersonated.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// Common name of the CA certificate.
pub const CA_COMMON_NAME: &str = "egressd local CA";
/// File name of the CA certificate (public, 0644).
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";

const CA_VALIDITY: Duration = Duration::days(3650);
const LEAF_VALIDITY: Duration = Duration::days(7);
/// A cached leaf closer than this to expiry is replaced.
const LEAF_RENEW_BEFORE: Duration = Duration::days(1);
/// Tolerance for clients whose clock is slightly behind.
const BACKDATE: Duration = Duration::hours(1);
/// Cached leaves kept at most; names come from policy, but patterns can allow many.
const MAX_CACHED_LEAVES: usize = 1024;

/// Failures of the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file or directory operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A CA file exists but is not usable.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// The private key file is open to other users.
    #[error(
        "{path} has mode {mode:04o}, readable or writable by group or others; it must be \
         0600 (chmod 600 {path})"
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// Generating or signing a certificate failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// Turning a key into a TLS signing key failed.
    #[error("TLS signing key: {0}")]
    Key(#[from] rustls::Error),
    /// The requested server name cannot be put in a certificate.
    #[error("server name {name:?}: {reason}")]
    Name { name: String, reason: &'static str },
}

struct CachedLeaf {
    key: Arc<CertifiedKey>,
    not_after: OffsetDateTime,
    /// Last handed out: a full cache loses the leaf used longest ago.
    used: std::time::Instant,
}

/// The local CA: its certificate, its signing key and a cache of minted leaves.
pub struct CertAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
    provider: Arc<CryptoProvider>,
    leaves: Mutex<HashMap<String, CachedLeaf>>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Loads the CA from `dir`, or creates it there (and `dir` itself) when neither file
    /// exists. One file without the other is an error: silently replacing a CA would
    /// break every sandbox that trusts it.
    pub fn load_or_create(dir: impl AsRef<Path>) -> Result<Self, CaError> {
        let dir = dir.as_ref();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CaError::Io {
                op: "creating CA directory",
                path: dir.to_owned(),
                source,
            })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            CaError::Io {
                op: "setting mode 0700 on",
                path: dir.to_owned(),
                source,
            }
        })?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let exists = |p: &Path| {
            p.try_exists().map_err(|source| CaError::Io {
                op: "checking",
                path: p.to_owned(),
                source,
            })
        };
        match (exists(&cert_path)?, exists(&key_path)?) {
            (false, false) => Self::create(&cert_path, &key_path),
            (true, true) => Self::load(&cert_path, &key_path),
            (true, false) => Err(CaError::Invalid {
                path: key_path,
                reason: format!(
                    "missing while {} exists; restore it, or remove both to create a new CA",
                    cert_path.display()
                ),
            }),
            (false, true) => Err(CaError::Invalid {
                path: cert_path,
                reason: format!(
                    "missing while {} exists; restore it, or remove both to create a new CA",
                    key_path.display()
                ),
            }),
        }
    }

    fn create(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_COMMON_NAME);
        dn.push(DnType::OrganizationName, "egressd");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        // Key first: a crash in between leaves a key without a certificate, which the
        // next start reports rather than overwriting.
        write_new_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new_file(cert_path, cert_pem.as_bytes(), 0o644)?;
        Self::from_parts(cert_pem, key, params.not_after, cert_path)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let meta = fs::metadata(key_path).map_err(|source| CaError::Io {
            op: "reading metadata of",
            path: key_path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CaError::Permissions {
                path: key_path.to_owned(),
                mode,
            });
        }
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| CaError::Io {
                op: "reading",
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert_path)?;
        let key_pem = zeroize::Zeroizing::new(read(key_path)?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_path.to_owned(),
            reason: format!("not a usable PEM private key: {e}"),
        })?;
        let not_after = ca_not_after(&cert_pem).map_err(|reason| CaError::Invalid {
            path: cert_path.to_owned(),
            reason,
        })?;
        if not_after <= OffsetDateTime::now_utc() {
            return Err(CaError::Invalid {
                path: cert_path.to_owned(),
                reason: format!(
                    "the CA certificate expired at {not_after}; remove {} and {} to create a \
                     new one (sandboxes must then trust the new ca.pem)",
                    cert_path.display(),
                    key_path.display()
                ),
            });
        }
        Self::from_parts(cert_pem, key, not_after, cert_path)
    }

    fn from_parts(
        cert_pem: String,
        key: KeyPair,
        not_after: OffsetDateTime,
        cert_path: &Path,
    ) -> Result<Self, CaError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let invalid = |reason: String| CaError::Invalid {
            path: cert_path.to_owned(),
            reason,
        };
        // The certificate and key must belong together, or every leaf would fail to
        // verify in the sandbox with an obscure error.
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
        let signing = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))?;
        CertifiedKey::new(vec![cert_der], signing)
            .keys_match()
            .map_err(|e| invalid(format!("does not match {CA_KEY_FILE}: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| invalid(format!("not a usable CA certificate: {e}")))?;
        Ok(Self {
            cert_pem,
            issuer,
            not_after,
            provider,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate in PEM, for sandboxes to trust.
    pub fn ca_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// A certificate and key for `server_name` (normalised: lower case, no trailing
    /// dot), signed by this CA, valid 7 days, cached per name.
    ///
    /// This signs any name it is given: the caller must already have checked that the
    /// name is allowed by policy.
    pub fn leaf_for(&self, server_name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let name = crate::credentials::normalize_host(server_name);
        check_name(&name)?;
        let now = OffsetDateTime::now_utc();
        {
            let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(leaf) = leaves.get_mut(&name) {
                if leaf.not_after - now > LEAF_RENEW_BEFORE {
                    leaf.used = std::time::Instant::now();
                    return Ok(leaf.key.clone());
                }
            }
        }
        // Minted without the lock: two connections racing for a new name mint twice,
        // which is harmless and keeps other names from waiting.
        let (key, not_after) = self.mint(&name, now)?;
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if leaves.len() >= MAX_CACHED_LEAVES {
            leaves.retain(|_, leaf| leaf.not_after - now > LEAF_RENEW_BEFORE);
            // The one used longest ago goes, not all: a sandbox minting names for a
            // wildcard rule must not make every other sandbox's names be minted again.
            if leaves.len() >= MAX_CACHED_LEAVES {
                super::evict_least_used(&mut leaves, |leaf| leaf.used);
            }
        }
        leaves.insert(
            name,
            CachedLeaf {
                key: key.clone(),
                not_after,
                used: std::time::Instant::now(),
            },
        );
        Ok(key)
    }

    fn mint(
        &self,
        name: &str,
        now: OffsetDateTime,
    ) -> Result<(Arc<CertifiedKey>, OffsetDateTime), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = (now + LEAF_VALIDITY).min(self.not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        let signing = self
            .provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))?;
        Ok((
            Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)),
            params.not_after,
        ))
    }
}

/// The end of validity of a PEM CA certificate, checking that it is one.
fn ca_not_after(pem: &str) -> Result<OffsetDateTime, String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    if !cert.is_ca() {
        return Err("not a CA certificate (basicConstraints CA:FALSE or missing)".to_owned());
    }
    OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map_err(|e| format!("invalid notAfter: {e}"))
}

fn check_name(name: &str) -> Result<(), CaError> {
    let reason = if name.is_empty() {
        Some("is empty")
    } else if name.len() > 253 {
        Some("is longer than 253 bytes")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        Some("is not a DNS name")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CaError::Name {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Writes `contents` to a temporary file created with `mode`, then renames it into
/// place, so that a reader never sees a partial file and the key is never briefly
/// readable by others.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let io = |op: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| CaError::Io {
            op,
            path: p,
            source,
        }
    };
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing stale", &tmp)(e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    // The umask may have narrowed the mode; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io("setting mode of", &tmp))?;
    file.write_all(contents).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(io("renaming into place", path))?;
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn created_once_then_loaded_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let ca = CertAuthority::load_or_create(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_CERT_FILE)), 0o644);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert!(ca.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let der = CertificateDer::from_pem_slice(ca.ca_pem().as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(cert.is_ca());
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), CA_COMMON_NAME);
        let not_after = ca_not_after(&ca.ca_pem()).unwrap();
        let years = (not_after - OffsetDateTime::now_utc()).whole_days() / 365;
        assert_eq!(years, 9, "about ten years");
        let key = fs::read_to_string(dir.join(CA_KEY_FILE)).unwrap();
        assert_eq!(
            KeyPair::from_pem(&key).unwrap().algorithm(),
            &PKCS_ECDSA_P256_SHA256
        );

        let again = CertAuthority::load_or_create(&dir).unwrap();
        assert_eq!(again.ca_pem(), ca.ca_pem());
    }

    #[test]
    fn key_open_to_others_or_missing_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        CertAuthority::load_or_create(dir).unwrap();
        let key = dir.join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = CertAuthority::load_or_create(dir).unwrap_err();
        assert!(
            matches!(err, CaError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        fs::remove_file(&key).unwrap();
        let err = CertAuthority::load_or_create(dir).unwrap_err();
        assert!(err.to_string().contains("remove both"), "{err}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        CertAuthority::load_or_create(a.path()).unwrap();
        CertAuthority::load_or_create(b.path()).unwrap();
        fs::copy(a.path().join(CA_KEY_FILE), b.path().join(CA_KEY_FILE)).unwrap();
        let err = CertAuthority::load_or_create(b.path()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn leaves_are_cached_per_name_and_verify_against_the_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertAuthority::load_or_create(tmp.path()).unwrap();
        let a = ca.leaf_for("API.example.com.").unwrap();
        let b = ca.leaf_for("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = ca.leaf_for("other.example.com").unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        a.keys_match().unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.ca_pem().as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let name = rustls_pki_types::ServerName::try_from("api.example.com").unwrap();
        let now = rustls_pki_types::UnixTime::now();
        use rustls::client::danger::ServerCertVerifier as _;
        verifier
            .verify_server_cert(&a.cert[0], &[], &name, &[], now)
            .unwrap();
        let wrong = rustls_pki_types::ServerName::try_from("other.example.com").unwrap();
        assert!(verifier
            .verify_server_cert(&a.cert[0], &[], &wrong, &[], now)
            .is_err());

        assert!(ca.leaf_for("").is_err());
        assert!(ca.leaf_for("a b.example.com").is_err());
    }

    /// A full cache loses the leaf used longest ago for a new name, not every leaf: a
    /// sandbox minting names through a wildcard rule does not make others' names (in use)
    /// be minted again.
    #[test]
    fn a_full_leaf_cache_loses_one_leaf_not_all() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertAuthority::load_or_create(tmp.path()).unwrap();
        let first = ca.leaf_for("first.example.com").unwrap();
        let kept = ca.leaf_for("kept.example.com").unwrap();
        for i in 0..MAX_CACHED_LEAVES {
            ca.leaf_for(&format!("n{i}.wild.example.com")).unwrap();
            if i % 64 == 0 {
                // In use meanwhile.
                ca.leaf_for("kept.example.com").unwrap();
            }
        }
        assert!(Arc::ptr_eq(
            &kept,
            &ca.leaf_for("kept.example.com").unwrap()
        ));
        assert!(!Arc::ptr_eq(
            &first,
            &ca.leaf_for("first.example.com").unwrap()
        ));
    }
}
