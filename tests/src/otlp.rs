//! The Python OTLP receivers of the span-export tests (`tests/python/otlp_receiver.py`: grpcio with TLS
//! server credentials, or http.server + ssl), and a test CA with a server certificate for them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Proc;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/otlp_receiver.py");

/// A running receiver; dropping it kills it.
#[derive(Debug)]
pub struct Receiver {
    proc: Proc,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Receiver {
    /// Starts `otlp_receiver.py ARGS` with the venv's Python on 127.0.0.1 (a free port).
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(crate::venv().join("bin/python"));
        cmd.arg(SCRIPT).args(["--listen", "127.0.0.1:0"]).args(args);
        let (proc, addr) = Proc::spawn_listening(name, cmd, dir)?;
        Ok(Self {
            proc,
            addr: addr.to_string(),
        })
    }

    /// Everything it printed so far (export events and spans), as JSON.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.proc
            .stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The export requests it answered (`{"n", "transport", "authorized", ...}`).
    pub fn exports(&self) -> Vec<serde_json::Value> {
        self.lines()
            .into_iter()
            .filter_map(|l| l.get("export").cloned())
            .collect()
    }

    /// The spans it kept.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        self.lines()
            .into_iter()
            .filter(|l| l.get("trace_id").is_some())
            .collect()
    }

    /// Waits (bounded: 20 s, room for the exporter's retries) until the spans satisfy `pred`.
    pub fn wait_spans(
        &self,
        what: &str,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans();
            if pred(&spans) {
                return Ok(spans);
            }
            if Instant::now() > deadline {
                bail!(
                    "the receiver never saw {what}; exports: {:#?}; spans: {spans:#?}; stderr:\n{}",
                    self.exports(),
                    self.proc.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A test CA's root and a server certificate for 127.0.0.1 signed by it, as PEM files.
#[derive(Debug)]
pub struct TestTls {
    /// The root (what `OTEL_EXPORTER_OTLP_CERTIFICATE` names).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's key.
    pub key: PathBuf,
    /// A client certificate signed by the same CA (mTLS to the collector).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

/// Writes a fresh test CA, a 127.0.0.1/localhost server certificate and a client certificate into
/// `dir`.
pub fn test_tls(dir: &Path) -> Result<TestTls> {
    use rcgen::{
        BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "weft test collector CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec!["localhost".to_owned()])?;
    server
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let cert = server.signed_by(&key, &issuer)?;
    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::new(vec!["weft-sidecar".to_owned()])?;
    client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &issuer)?;
    let out = TestTls {
        ca: dir.join("collector-ca.pem"),
        cert: dir.join("collector.pem"),
        key: dir.join("collector-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    std::fs::write(&out.client_cert, client_cert.pem()).context("write the client certificate")?;
    std::fs::write(&out.client_key, client_key.serialize_pem()).context("write the client key")?;
    std::fs::write(&out.ca, ca_cert.pem()).context("write the CA")?;
    std::fs::write(&out.cert, cert.pem()).context("write the certificate")?;
    std::fs::write(&out.key, key.serialize_pem()).context("write the key")?;
    Ok(out)
}
