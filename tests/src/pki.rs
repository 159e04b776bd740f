//! Certificates made in the test: a CA and leaf certificates for servers and
//! clients, written as PEM files the way cert-manager mounts them.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate authority whose files live in `dir`.
pub struct Pki {
    pub dir: PathBuf,
    pub name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// The files of one issued certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Pki {
    /// A new CA named `name`; its certificate is written to `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        std::fs::create_dir_all(dir).expect("pki dir");
        let pki = Self { dir: dir.to_path_buf(), name: name.to_string(), issuer };
        std::fs::write(pki.ca_file(), pki.issuer.pem()).expect("write CA");
        pki
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `dns_name` (and 127.0.0.1), good for serving and
    /// for client authentication, written to `dir/STEM.pem` and
    /// `dir/STEM-key.pem` (replacing earlier files of that stem).
    pub fn issue(&self, stem: &str, dns_name: &str) -> Issued {
        let mut params = CertificateParams::new(vec![dns_name.to_string()]).expect("params");
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, dns_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let issued = Issued {
            cert_file: self.dir.join(format!("{stem}.pem")),
            key_file: self.dir.join(format!("{stem}-key.pem")),
        };
        // Written beside and renamed into place, as a mounted Secret changes.
        for (path, text) in [(&issued.key_file, key.serialize_pem()), (&issued.cert_file, cert.pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, path).expect("rename");
        }
        issued
    }

    /// The serial-independent identity of a certificate file's leaf: its DER.
    pub fn leaf_der(path: &Path) -> Vec<u8> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::pem_file_iter(path).expect("pem").next().expect("a cert").expect("cert").to_vec()
    }
}
