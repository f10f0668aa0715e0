#[cfg(test)] // the whole file is the test module; marks it for tools that scan for test code
use super::*;
use rcgen::{CertificateParams, KeyPair, PKCS_ED25519};
use std::os::unix::fs::PermissionsExt;

fn opts() -> AuthorityOptions {
    AuthorityOptions {
        trust_domain: "cluster.local".into(),
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(7200),
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

fn parse_leaf(pem: &str) -> (Vec<u8>,) {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    (der.as_ref().to_vec(),)
}

#[test]
fn first_start_creates_root_and_restart_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = Authority::load_or_create(dir.path(), opts()).unwrap();
    let root1 = a.root_pem().to_owned();
    let mode = fs::metadata(dir.path().join(KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "CA key must be owner-only");
    let mode = fs::metadata(dir.path().join(TOKEN_KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "token key must be owner-only");
    assert_eq!(
        fs::read_to_string(dir.path().join(ROOT_FILE)).unwrap(),
        root1
    );
    // A token minted before the restart still authenticates after it.
    let token = a
        .issue_token("default", "sleep", Duration::from_secs(60))
        .unwrap();
    drop(a);
    let b = Authority::load_or_create(dir.path(), opts()).unwrap();
    assert_eq!(b.root_pem(), root1);
    assert_eq!(
        b.authenticate(&token, SystemTime::now()).unwrap(),
        id("default", "sleep")
    );
    // The root is a 10-year P-256 CA.
    let (der,) = parse_leaf(&root1);
    let (_, root) = X509Certificate::from_der(&der).unwrap();
    assert!(root.is_ca());
    let life = root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
    assert!(life >= ROOT_TTL.as_secs() as i64, "root lifetime {life}");
}

#[test]
fn half_written_data_dir_is_reported_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    Authority::load_or_create(dir.path(), opts()).unwrap();
    fs::remove_file(dir.path().join(CHAIN_FILE)).unwrap();
    let err = Authority::load_or_create(dir.path(), opts()).unwrap_err();
    assert!(
        err.to_string()
            .contains("found ca-key.pem but not cert-chain.pem"),
        "{err}"
    );
    assert!(
        dir.path().join(KEY_FILE).exists(),
        "key must not be touched"
    );
}

#[test]
fn signs_a_csr_for_the_token_identity() {
    let dir = tempfile::tempdir().unwrap();
    let a = Authority::load_or_create(dir.path(), opts()).unwrap();
    let me = id("default", "httpbin");
    let kc = crate::csr::generate(&me).unwrap();
    let now = SystemTime::now();
    let chain = a.sign_csr(&kc.csr_pem, &me, 1800, now).unwrap();
    assert_eq!(chain.len(), 2, "leaf then root");
    assert_eq!(chain[1], a.root_pem());
    let (der,) = parse_leaf(&chain[0]);
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    let uris: Vec<_> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert_eq!(uris, vec![format!("URI({:?})", me.as_str())]);
    assert!(!leaf.is_ca());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(nb < now_s, "notBefore backdated");
    assert_eq!(na - now_s, 1800);
    // The issued chain works as credentials with the key the CSR was made from.
    let creds = crate::tls::Credentials::from_pem(&chain, &kc.key_pem).unwrap();
    assert_eq!(creds.identity(), &me);
}

#[test]
fn validity_defaults_caps_and_refuses_absurd_values() {
    let dir = tempfile::tempdir().unwrap();
    let a = Authority::load_or_create(dir.path(), opts()).unwrap();
    let me = id("ns", "sa");
    let kc = crate::csr::generate(&me).unwrap();
    let now = SystemTime::now();
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let life = |secs| {
        let chain = a.sign_csr(&kc.csr_pem, &me, secs, now).unwrap();
        let (der,) = parse_leaf(&chain[0]);
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        leaf.validity().not_after.timestamp() - now_s
    };
    assert_eq!(life(0), 3600, "0 asks for the default");
    assert_eq!(life(10 * 365 * 86400), 7200, "capped at the maximum");
    for bad in [-1, i64::MIN, i64::MAX] {
        let err = a.sign_csr(&kc.csr_pem, &me, bad, now).unwrap_err();
        assert!(matches!(err, SignError::Validity(..)), "{bad}: {err}");
    }
}

#[test]
fn refuses_csr_naming_another_identity() {
    let dir = tempfile::tempdir().unwrap();
    let a = Authority::load_or_create(dir.path(), opts()).unwrap();
    let kc = crate::csr::generate(&id("default", "admin")).unwrap();
    let err = a
        .sign_csr(&kc.csr_pem, &id("default", "sleep"), 0, SystemTime::now())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "CSR asks for identity spiffe://cluster.local/ns/default/sa/admin but the caller is \
         authenticated as spiffe://cluster.local/ns/default/sa/sleep"
    );
}

#[test]
fn csr_without_sans_gets_the_token_identity() {
    let dir = tempfile::tempdir().unwrap();
    let a = Authority::load_or_create(dir.path(), opts()).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let me = id("default", "sleep");
    let chain = a.sign_csr(&csr, &me, 0, SystemTime::now()).unwrap();
    let creds = crate::tls::Credentials::from_pem(&chain, &key.serialize_pem()).unwrap();
    assert_eq!(creds.identity(), &me);
}

fn dns_sans(pem: &str) -> Vec<String> {
    let (der,) = parse_leaf(pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn pilot_gets_its_webhook_service_names_and_nobody_else_gets_dns_names() {
    let dir = tempfile::tempdir().unwrap();
    let a = Authority::load_or_create(dir.path(), opts()).unwrap();
    let names = crate::dns::service_names("weft-pilot", "weft-system");
    let pilot = id("weft-system", "pilot");
    let kc = crate::csr::generate_with_dns(&pilot, &names).unwrap();
    let chain = a
        .sign_csr(&kc.csr_pem, &pilot, 0, SystemTime::now())
        .unwrap();
    assert_eq!(dns_sans(&chain[0]), names);
    let creds = crate::tls::Credentials::from_pem(&chain, &kc.key_pem).unwrap();
    assert_eq!(
        creds.identity(),
        &pilot,
        "the SPIFFE identity is still there"
    );

    // A workload asking for pilot's names; pilot asking for another namespace's or an outside name.
    for (who, name) in [
        (id("default", "sleep"), "weft-pilot.weft-system.svc"),
        (id("default", "sleep"), "sleep.default.svc"),
        (id("weft-system", "weft-ca"), "weft-pilot.weft-system.svc"),
        (pilot.clone(), "kubernetes.default.svc"),
        (pilot.clone(), "weft-pilot.weft-system.svc.example.com"),
        (pilot.clone(), "example.com"),
    ] {
        let kc = crate::csr::generate_with_dns(&who, &[name.to_string()]).unwrap();
        let err = a
            .sign_csr(&kc.csr_pem, &who, 0, SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, SignError::DnsName(_)), "{who} {name}: {err}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn refuses_malformed_csrs_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let a = Authority::load_or_create(dir.path(), opts()).unwrap();
    let me = id("ns", "sa");
    let now = SystemTime::now();
    let good = crate::csr::generate(&me).unwrap().csr_pem;

    let err = a.sign_csr("hello", &me, 0, now).unwrap_err();
    assert!(matches!(err, SignError::CsrPem), "{err}");

    let garbage = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
    let err = a.sign_csr(garbage, &me, 0, now).unwrap_err();
    assert!(matches!(err, SignError::CsrDer(_)), "{err}");

    // Flip a byte inside the signature: still parses, no longer verifies.
    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    let n = bytes.len();
    bytes[n - 5] ^= 0x01;
    let tampered = pem_wrap("CERTIFICATE REQUEST", &bytes);
    let err = a.sign_csr(&tampered, &me, 0, now).unwrap_err();
    assert!(
        matches!(err, SignError::CsrSignature | SignError::CsrDer(_)),
        "{err}"
    );

    let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let ed_csr = params.serialize_request(&ed).unwrap().pem().unwrap();
    let err = a.sign_csr(&ed_csr, &me, 0, now).unwrap_err();
    assert!(matches!(err, SignError::KeyType(_)), "{err}");
    assert!(err.to_string().contains("ECDSA P-256"), "{err}");

    let huge = format!("{good}{}", "A".repeat(MAX_CSR_LEN));
    let err = a.sign_csr(&huge, &me, 0, now).unwrap_err();
    assert!(matches!(err, SignError::CsrTooLarge(_)), "{err}");
}

fn pem_wrap(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
}

/// An operator's offline root and an intermediate for weft, as `cacerts` would hold them.
pub(crate) fn operator_ca() -> (String, String, String) {
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut rp = CertificateParams::default();
    rp.distinguished_name = DistinguishedName::new();
    rp.distinguished_name
        .push(DnType::CommonName, "operator root");
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(rp, root_key);

    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ip = CertificateParams::default();
    ip.distinguished_name = DistinguishedName::new();
    ip.distinguished_name
        .push(DnType::CommonName, "weft intermediate");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip.use_authority_key_identifier_extension = true;
    let int = ip.signed_by(&int_key, &root_issuer).unwrap();
    (
        format!("{}{}", int.pem(), root.pem()),
        int_key.serialize_pem(),
        root.pem(),
    )
}

#[test]
fn plugged_in_intermediate_yields_chains_to_the_operator_root() {
    let (chain_pem, key_pem, root_pem) = operator_ca();
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("chain.pem"), &chain_pem).unwrap();
    fs::write(src.path().join("key.pem"), &key_pem).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A self-signed CA existed before: the import replaces it.
    Authority::load_or_create(dir.path(), opts()).unwrap();
    let out = Authority::import(
        dir.path(),
        &src.path().join("chain.pem"),
        &src.path().join("key.pem"),
    )
    .unwrap();
    assert_eq!(out, ImportOutcome::Replaced);
    let again = Authority::import(
        dir.path(),
        &src.path().join("chain.pem"),
        &src.path().join("key.pem"),
    )
    .unwrap();
    assert_eq!(again, ImportOutcome::Unchanged);

    let a = Authority::load_or_create(dir.path(), opts()).unwrap();
    assert_eq!(a.root_pem(), root_pem);
    let me = id("default", "sleep");
    let kc = crate::csr::generate(&me).unwrap();
    let chain = a.sign_csr(&kc.csr_pem, &me, 0, SystemTime::now()).unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(chain[2], root_pem);

    // rustls (webpki) accepts the leaf given only the operator's root and the intermediate.
    verify_leaf(&chain, &root_pem);
}

/// Verifies `chain` (leaf first, root last, as the CA returns it) with rustls (webpki) against
/// `root_pem` alone, the intermediates taken from the chain; returns the leaf.
pub(crate) fn verify_leaf(chain: &[String], root_pem: &str) -> CertificateDer<'static> {
    let bundle = crate::tls::TrustBundle::from_pem(root_pem).unwrap();
    let ders: Vec<CertificateDer<'static>> = chain
        .iter()
        .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
        .collect();
    let parsed = rustls::server::ParsedCertificate::try_from(&ders[0]).unwrap();
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &bundle.roots(),
        &ders[1..ders.len() - 1],
        rustls_pki_types::UnixTime::now(),
        crate::tls::provider().signature_verification_algorithms.all,
    )
    .unwrap();
    ders[0].clone()
}

#[test]
fn import_refuses_inconsistent_material() {
    let (chain_pem, key_pem, root_pem) = operator_ca();
    let (_, other_key, _) = operator_ca();
    let src = tempfile::tempdir().unwrap();
    let p = |n: &str| src.path().join(n);
    fs::write(p("chain.pem"), &chain_pem).unwrap();
    fs::write(p("other-key.pem"), &other_key).unwrap();
    fs::write(p("key.pem"), &key_pem).unwrap();
    // The intermediate alone: the chain does not end with a self-signed root.
    let int_only = chain_pem.replace(&root_pem, "");
    fs::write(p("int-only.pem"), &int_only).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let err = Authority::import(dir.path(), &p("chain.pem"), &p("other-key.pem")).unwrap_err();
    assert!(err.to_string().contains("key does not match"), "{err}");
    let err = Authority::import(dir.path(), &p("int-only.pem"), &p("key.pem")).unwrap_err();
    assert!(err.to_string().contains("self-signed root"), "{err}");
    let err = Authority::import(dir.path(), &p("missing.pem"), &p("key.pem")).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");

    // A workload (non-CA) certificate cannot be plugged in as a CA.
    let a = Authority::load_or_create(&dir.path().join("x"), opts()).unwrap();
    let me = id("ns", "sa");
    let kc = crate::csr::generate(&me).unwrap();
    let leaf_chain = a.sign_csr(&kc.csr_pem, &me, 0, SystemTime::now()).unwrap();
    fs::write(p("leaf.pem"), leaf_chain.concat()).unwrap();
    fs::write(p("leaf-key.pem"), &kc.key_pem).unwrap();
    let err = Authority::import(dir.path(), &p("leaf.pem"), &p("leaf-key.pem")).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
    assert!(
        !dir.path().join(KEY_FILE).exists(),
        "nothing written on refusal"
    );
}

#[test]
fn tokens_are_only_issued_for_valid_identities() {
    let dir = tempfile::tempdir().unwrap();
    let a = Authority::load_or_create(dir.path(), opts()).unwrap();
    assert!(
        a.issue_token("ns", "bad/sa", Duration::from_secs(60))
            .is_err()
    );
    assert!(a.issue_token("", "sa", Duration::from_secs(60)).is_err());
}

/// Writes `operator_ca()`'s material in Istio's plug-in layout (the `cacerts` Secret's keys).
fn write_cacerts(dir: &Path, (chain_pem, key_pem, root_pem): &(String, String, String)) {
    let ca_cert = chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    fs::write(dir.join(CA_CERT_FILE), ca_cert).unwrap();
    fs::write(dir.join(KEY_FILE), key_pem).unwrap();
    fs::write(dir.join(CHAIN_FILE), chain_pem).unwrap();
    fs::write(dir.join(ROOT_FILE), root_pem).unwrap();
}

fn files_in(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let mut all: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), fs::read(e.path()).unwrap())
        })
        .collect();
    all.sort();
    all
}

#[test]
fn replicas_loading_one_cacerts_secret_issue_leaves_under_one_root() {
    let material = operator_ca();
    let cacerts = tempfile::tempdir().unwrap();
    write_cacerts(cacerts.path(), &material);
    let before = files_in(cacerts.path());
    let root_pem = &material.2;

    let a = Authority::load_cacerts(cacerts.path(), None, opts()).unwrap();
    let b = Authority::load_cacerts(cacerts.path(), None, opts()).unwrap();
    assert_eq!(
        files_in(cacerts.path()),
        before,
        "nothing written to the Secret"
    );
    let bundle = crate::tls::TrustBundle::from_pem(root_pem).unwrap();
    let verifier = crate::tls::SpiffeClientVerifier::new(&bundle, "cluster.local", true);
    for (replica, sa) in [(&a, "sleep"), (&b, "httpbin")] {
        assert_eq!(replica.root_pem(), root_pem.as_str());
        let me = id("default", sa);
        let kc = crate::csr::generate(&me).unwrap();
        let chain = replica
            .sign_csr(&kc.csr_pem, &me, 0, SystemTime::now())
            .unwrap();
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        let leaf = verify_leaf(&chain, root_pem);
        // The mesh's own verifier (what a sidecar's server side uses) accepts it too.
        let intermediate = CertificateDer::from_pem_slice(chain[1].as_bytes()).unwrap();
        rustls::server::danger::ClientCertVerifier::verify_client_cert(
            &verifier,
            &leaf,
            &[intermediate],
            rustls_pki_types::UnixTime::now(),
        )
        .unwrap();
    }

    // Istio lets cert-chain.pem stop before the root: it is completed from root-cert.pem.
    let ca_cert = fs::read_to_string(cacerts.path().join(CA_CERT_FILE)).unwrap();
    fs::write(cacerts.path().join(CHAIN_FILE), &ca_cert).unwrap();
    let c = Authority::load_cacerts(cacerts.path(), None, opts()).unwrap();
    let me = id("default", "sleep");
    let kc = crate::csr::generate(&me).unwrap();
    let chain = c.sign_csr(&kc.csr_pem, &me, 0, SystemTime::now()).unwrap();
    assert_eq!(chain.len(), 3);
    verify_leaf(&chain, root_pem);

    // The weft token key, when kept, lives in the data directory and survives restarts.
    let data = tempfile::tempdir().unwrap();
    let d1 = Authority::load_cacerts(cacerts.path(), Some(data.path()), opts()).unwrap();
    let token = d1
        .issue_token("default", "sleep", Duration::from_secs(60))
        .unwrap();
    let d2 = Authority::load_cacerts(cacerts.path(), Some(data.path()), opts()).unwrap();
    assert!(d2.authenticate(&token, SystemTime::now()).is_ok());
    assert!(a.authenticate(&token, SystemTime::now()).is_err());
}

#[test]
fn inconsistent_cacerts_are_refused_at_start() {
    let material = operator_ca();
    let other = operator_ca();
    let refuse = |edit: &dyn Fn(&Path), want: &str| {
        let dir = tempfile::tempdir().unwrap();
        write_cacerts(dir.path(), &material);
        edit(dir.path());
        let err = Authority::load_cacerts(dir.path(), None, opts()).unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
    };
    refuse(
        &|d| fs::write(d.join(KEY_FILE), &other.1).unwrap(),
        "key does not match",
    );
    refuse(
        &|d| fs::write(d.join(ROOT_FILE), &other.2).unwrap(),
        "does not end at root-cert.pem",
    );
    // cert-chain.pem without its root, and root-cert.pem from another CA.
    refuse(
        &|d| {
            let ca_cert = fs::read_to_string(d.join(CA_CERT_FILE)).unwrap();
            fs::write(d.join(CHAIN_FILE), ca_cert).unwrap();
            fs::write(d.join(ROOT_FILE), &other.2).unwrap();
        },
        "does not end at root-cert.pem",
    );
    refuse(
        &|d| fs::write(d.join(CA_CERT_FILE), &other.2).unwrap(),
        "must start with the certificate of ca-cert.pem",
    );
    refuse(
        &|d| fs::write(d.join(ROOT_FILE), &material.0).unwrap(),
        "exactly one certificate",
    );
    // root-cert.pem is the intermediate: not self-signed.
    refuse(
        &|d| {
            let ca_cert = fs::read_to_string(d.join(CA_CERT_FILE)).unwrap();
            fs::write(d.join(ROOT_FILE), &ca_cert).unwrap();
        },
        "self-signed root",
    );
    for file in [CA_CERT_FILE, KEY_FILE, CHAIN_FILE, ROOT_FILE] {
        refuse(&|d| fs::remove_file(d.join(file)).unwrap(), file);
    }
    refuse(
        &|d| fs::write(d.join(ROOT_FILE), "not a certificate").unwrap(),
        "contains no certificate",
    );
}
