//! A test certificate authority made at test time with the `openssl` command line.
//!
//! The origins in the world present certificates from a [`TestCa`]; the daemon trusts it
//! as its `proxy.upstream_ca`, and a client that pins an origin trusts only it. Keys are
//! ECDSA P-256 and everything lives in the CA's own [`TempDir`], removed on drop. The
//! CA's key never leaves that directory and nothing in the sandbox is given it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{run_checked, TempDir};

/// A certificate issued by a [`TestCa`].
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed CA that issues server certificates.
#[derive(Debug)]
pub struct TestCa {
    dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
    label: String,
}

impl TestCa {
    /// Creates a CA named `egress test CA <label>`, valid for two days.
    pub fn new(label: &str) -> Result<Self> {
        let dir = TempDir::new(&format!("ca-{label}"))?;
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca.key");
        run_checked(
            Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .arg("ec_paramgen_curve:P-256")
                .args(["-nodes", "-days", "2", "-subj"])
                .arg(format!("/CN=egress test CA {label}"))
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
        )
        .context("openssl: make the test CA")?;
        Ok(Self {
            dir,
            cert,
            key,
            label: label.to_string(),
        })
    }

    /// The CA certificate (PEM), for trust stores.
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    pub fn cert_pem(&self) -> Result<String> {
        std::fs::read_to_string(&self.cert).with_context(|| format!("read {}", self.cert.display()))
    }

    /// Issues a server certificate for `names` (subject alternative names: DNS names, or
    /// IP addresses for names that parse as one; the first is also the common name),
    /// stored as `<stem>.pem` / `<stem>.key`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> Result<Leaf> {
        let Some(first) = names.first() else {
            bail!("a certificate needs at least one name");
        };
        if stem.is_empty() || !stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("bad certificate stem {stem:?}");
        }
        let d = self.dir.path();
        let (cert, key, csr, ext) = (
            d.join(format!("{stem}.pem")),
            d.join(format!("{stem}.key")),
            d.join(format!("{stem}.csr")),
            d.join(format!("{stem}.ext")),
        );
        let sans: Vec<String> = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => format!("IP:{ip}"),
                Err(_) => format!("DNS:{n}"),
            })
            .collect();
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
                sans.join(",")
            ),
        )
        .with_context(|| format!("write {}", ext.display()))?;
        run_checked(
            Command::new("openssl")
                .args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
                .arg("ec_paramgen_curve:P-256")
                .args(["-nodes", "-subj"])
                .arg(format!("/CN={first}"))
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr),
        )
        .with_context(|| format!("openssl: key and CSR for {names:?}"))?;
        run_checked(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-set_serial"])
                .arg(format!(
                    "0x{:x}{:x}",
                    std::process::id(),
                    crate::util::next_id()
                ))
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&self.cert)
                .arg("-CAkey")
                .arg(&self.key)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&cert),
        )
        .with_context(|| format!("openssl: sign {names:?} with CA {}", self.label))?;
        Ok(Leaf { cert, key })
    }
}

/// `sha256//<base64>` of a certificate's public key (SPKI), as curl's `--pinnedpubkey`
/// takes it.
pub fn spki_pin(cert: &Path) -> Result<String> {
    let out = run_checked(
        Command::new("sh")
            .arg("-c")
            .arg(
                r#"openssl x509 -in "$1" -pubkey -noout | openssl pkey -pubin -outform der \
           | openssl dgst -sha256 -binary | openssl base64 -A"#,
            )
            .arg("sh")
            .arg(cert),
    )
    .with_context(|| format!("SPKI hash of {}", cert.display()))?;
    let b64 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if b64.len() != 44 {
        bail!("unexpected SPKI hash {b64:?} for {}", cert.display());
    }
    Ok(format!("sha256//{b64}"))
}

/// A random lowercase hex string of `bytes` random bytes (from `/dev/urandom`).
pub fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
