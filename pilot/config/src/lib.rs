//! Istio and Kubernetes config model, validation and translation for pilot (pure, no I/O).
