//! `pilot serve --mesh-config FILE`: the mesh settings as a YAML file (on Kubernetes, the
//! ConfigMap `weft-mesh` mounted by `pilot install`'s Deployment), Istio's `meshConfig` in spirit:
//!
//! ```yaml
//! trustDomain: cluster.local
//! traceSampling: 1.0          # percent of new traces, 0..100
//! mirrorShadowSuffix: true
//! otlpEndpoint: http://jaeger-collector.weft-system.svc:4317   # injected sidecars export here
//! ```
//!
//! Every key is optional; an unknown key is an error (a misspelt setting must not be ignored).
//! A setting comes from one place: giving a key's flag (`--trust-domain`, `--trace-sampling`,
//! `--mirror-shadow-suffix`) together with `--mesh-config` is refused by the flag parser, so no
//! precedence rule has to be remembered. The file is read once at start: restart pilot after
//! editing it (`kubectl rollout restart deploy/weft-pilot -n weft-system`).

use std::path::Path;

/// The file's keys.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfig {
    /// SPIFFE trust domain.
    pub trust_domain: Option<String>,
    /// Percent of new traces sampled, 0..=100 (Istio's default: 1).
    pub trace_sampling: Option<f64>,
    /// Append `-shadow` to mirrored requests' host.
    pub mirror_shadow_suffix: Option<bool>,
    /// OTLP/gRPC endpoint injected sidecars export spans to.
    pub otlp_endpoint: Option<String>,
}

/// Why the file was refused.
#[derive(Debug, thiserror::Error)]
pub enum MeshConfigError {
    /// Unreadable.
    #[error("cannot read the mesh config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not the expected YAML.
    #[error("mesh config {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The parser's words, or the value refused.
        message: String,
    },
}

impl MeshConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, MeshConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeshConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| MeshConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and checks the text (an empty document is all defaults).
    pub fn parse(text: &str) -> Result<Self, String> {
        let blank = text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        if blank {
            return Ok(Self::default());
        }
        let config: Self = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        if let Some(p) = config.trace_sampling
            && !(0.0..=100.0).contains(&p)
        {
            return Err(format!("traceSampling must be 0..100, got {p}"));
        }
        if config
            .trust_domain
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err("trustDomain must not be empty".into());
        }
        if let Some(endpoint) = &config.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(format!(
                "otlpEndpoint must be an http:// or https:// URL, got {endpoint:?}"
            ));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_install_configmap_parses_with_istios_sampling() {
        let text = crate::install::mesh_config_yaml(&crate::install::Options::default());
        let config = MeshConfig::parse(&text).unwrap();
        assert_eq!(config.trace_sampling, Some(1.0));
        assert_eq!(config.trust_domain.as_deref(), Some("cluster.local"));
        assert_eq!(config.mirror_shadow_suffix, Some(true));
        assert_eq!(
            config.otlp_endpoint.as_deref(),
            Some("http://jaeger-collector.weft-system.svc:4317")
        );
    }

    #[test]
    fn keys_are_optional_and_checked() {
        assert_eq!(MeshConfig::parse("").unwrap(), MeshConfig::default());
        assert_eq!(
            MeshConfig::parse("# nothing\n").unwrap(),
            MeshConfig::default()
        );
        assert_eq!(
            MeshConfig::parse("traceSampling: 5\n")
                .unwrap()
                .trace_sampling,
            Some(5.0)
        );
        for (bad, why) in [
            ("traceSampling: 101\n", "0..100"),
            ("traceSamplng: 1\n", "traceSamplng"),
            ("traceSampling: lots\n", ""),
            ("trustDomain: \" \"\n", "trustDomain"),
            ("otlpEndpoint: jaeger:4317\n", "otlpEndpoint"),
        ] {
            let error = MeshConfig::parse(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
