//! CA signing throughput: P-256 CSR in, signed chain out, in process on one core and over gRPC/TLS.
//!
//! Baseline measured in the same run: raw ECDSA P-256 signatures per second with ring on one core,
//! the floor under any signing CA (one signature per certificate). The report gives each figure and
//! its ratio to that baseline, so runs on different (shared, noisy) machines compare.
//!
//! Usage: `cargo run --release -p weft-bench --bin ca-sign [-- SECONDS]` (default 3 s per phase).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use weft_ca::authority::{Authority, AuthorityOptions};
use weft_ca::client::CaClient;
use weft_ca::server::ca_identity;
use weft_ca::tls::TrustBundle;
use weft_ca::{SpiffeId, csr};

fn main() -> Result<()> {
    weft_ca::tls::install_default_provider();
    let secs: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("argument: seconds per phase")?
        .unwrap_or(3);
    let phase = Duration::from_secs(secs);

    let baseline = raw_ecdsa_per_sec(phase)?;
    let dir = tempfile::tempdir()?;
    let authority = Arc::new(Authority::load_or_create(
        dir.path(),
        AuthorityOptions::default(),
    )?);
    let id = SpiffeId::new("cluster.local", "default", "bench")?;
    // CSRs are made before timing: the workload does that, not the CA.
    let csrs: Vec<String> = (0..256)
        .map(|_| csr::generate(&id).map(|k| k.csr_pem))
        .collect::<Result<_, _>>()?;

    let in_process = {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < phase {
            let chain = authority.sign_csr(&csrs[(n % 256) as usize], &id, 0, SystemTime::now())?;
            std::hint::black_box(chain);
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };

    let grpc = grpc_per_sec(authority.clone(), &id, &csrs, phase)?;

    println!("# CA signing (P-256 CSR -> leaf + root chain)");
    println!("| measure | per second | ratio to raw ECDSA sign |");
    println!("|---|---|---|");
    println!("| baseline: raw ring ECDSA P-256 sign, 1 core | {baseline:.0} | 1.00 |");
    println!(
        "| in process, 1 core | {in_process:.0} | {:.2} |",
        in_process / baseline
    );
    println!(
        "| over gRPC/TLS, 16 concurrent callers, 2 worker threads | {grpc:.0} | {:.2} |",
        grpc / baseline
    );
    println!();
    println!(
        "goal: >= 2000/s in process on one core: {}",
        if in_process >= 2000.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

fn raw_ecdsa_per_sec(phase: Duration) -> Result<f64> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("keygen"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow::anyhow!("key"))?;
    let msg = [0x5au8; 512];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < phase {
        let sig = key.sign(&rng, &msg).map_err(|_| anyhow::anyhow!("sign"))?;
        std::hint::black_box(sig);
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn grpc_per_sec(
    authority: Arc<Authority>,
    id: &SpiffeId,
    csrs: &[String],
    phase: Duration,
) -> Result<f64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let token = authority.issue_token(
            id.namespace(),
            id.service_account(),
            Duration::from_secs(600),
        )?;
        let bundle = TrustBundle::from_pem(authority.root_pem())?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(weft_ca::server::serve(listener, authority, async {
            let _ = stop_rx.await;
        }));
        let client = CaClient::new(&addr, &bundle, ca_identity("cluster.local")?, &token)?;
        // Warm the connection (TLS handshake) outside the timed window.
        client.create_certificate(&csrs[0], Duration::ZERO).await?;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..16usize {
            let client = client.clone();
            let csrs = csrs.to_vec();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while start.elapsed() < phase {
                    client
                        .create_certificate(&csrs[(w + n as usize) % csrs.len()], Duration::ZERO)
                        .await?;
                    n += 1;
                }
                Ok::<_, anyhow::Error>(n)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        let rate = total as f64 / start.elapsed().as_secs_f64();
        let _ = stop_tx.send(());
        let _ = server.await;
        Ok(rate)
    })
}
