//! The Kubernetes client: in-cluster service account config, or `KUBECONFIG` (and
//! `~/.kube/config`), as kubectl finds it.

use ::kube::{Client, Config};

/// Why pilot could not talk to the API server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Neither in-cluster config nor a kubeconfig was found or usable.
    #[error(
        "no Kubernetes config: not in a pod (KUBERNETES_SERVICE_HOST unset) and no usable kubeconfig: {0}"
    )]
    Config(#[from] ::kube::config::InferConfigError),
    /// The client could not be built from the config (TLS material, proxy settings).
    #[error("cannot build a Kubernetes client: {0}")]
    Build(#[from] ::kube::Error),
}

/// A client from the in-cluster config or `KUBECONFIG`.
pub async fn infer() -> Result<Client, ClientError> {
    let config = Config::infer().await?;
    tracing::info!(cluster = %config.cluster_url, namespace = %config.default_namespace, "Kubernetes API server");
    Ok(Client::try_from(config)?)
}
