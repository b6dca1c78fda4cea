//! A development certificate authority: a CA and per-process certificates
//! with SPIFFE identities, for `MESHKIT_TLS=1 make up` and the tests.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Files of one issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub identity: String,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "meshkit");
    name.push(DnType::CommonName, "meshkit development CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Written whole to a temporary file, then renamed: a process reloading
    // its files never reads half a key.
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn write_public(path: &Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The CA in `dir` (`ca.pem`, `ca.key`), made on first use.
fn ca(dir: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert.exists() && key.exists() {
        let pem = std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
        let key = KeyPair::from_pem(&pem).with_context(|| format!("{} is not a private key", key.display()))?;
        return Ok(Issuer::new(ca_params(), key));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_pair = KeyPair::generate()?;
    let ca = ca_params().self_signed(&key_pair)?;
    write_private(&key, &key_pair.serialize_pem())?;
    write_public(&cert, &ca.pem())?;
    Ok(Issuer::new(ca_params(), key_pair))
}

/// Issues `dir/NAME.pem` and `dir/NAME.key` for each name, signed by the CA
/// in `dir` (made if missing): identity `spiffe://{trust_domain}/{name}`,
/// valid for `localhost`, the name, 127.0.0.1 and ::1, for servers and clients.
/// Issuing a name again replaces its files (a rotation).
pub fn issue(dir: &Path, trust_domain: &str, names: &[&str], days: u32) -> anyhow::Result<Vec<Issued>> {
    let issuer = ca(dir)?;
    let mut out = Vec::new();
    for name in names {
        anyhow::ensure!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'),
            "{name:?} is not a name (a-z, 0-9, - and .)"
        );
        let identity = format!("spiffe://{trust_domain}/{name}");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshkit");
        dn.push(DnType::CommonName, *name);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::URI(identity.as_str().try_into()?),
            SanType::DnsName("localhost".try_into()?),
            SanType::DnsName((*name).try_into()?),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(i64::from(days));
        let key_pair = KeyPair::generate()?;
        let cert = params.signed_by(&key_pair, &issuer)?;
        let issued = Issued { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")), identity };
        // The key first: a reload that sees the new certificate finds its key.
        write_private(&issued.key, &key_pair.serialize_pem())?;
        write_public(&issued.cert, &cert.pem())?;
        out.push(issued);
    }
    Ok(out)
}
