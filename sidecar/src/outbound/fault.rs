//! Stage 2: fault injection (VirtualService `fault`): a delay before the request goes on, or an
//! answer instead of it, each for its share of requests. Flags `DI` and `FI`, as Envoy's.

use crate::errors::ProxyError;
use crate::route::Fault;
use crate::telemetry::record::{Flags, Record};

/// Delays or aborts the request as `fault` says, rolling each percentage.
pub async fn inject(fault: Option<&Fault>, record: &mut Record<'_>) -> Result<(), ProxyError> {
    let Some(fault) = fault else {
        return Ok(());
    };
    if let Some((delay, pct)) = fault.delay
        && roll(pct)
    {
        record.flags.set(Flags::DI);
        // Boxed: a Sleep is large, and most requests never wait on one.
        Box::pin(tokio::time::sleep(delay)).await;
    }
    if let Some((status, pct)) = fault.abort
        && roll(pct)
    {
        return Err(ProxyError::FaultAbort(status));
    }
    Ok(())
}

fn roll(percent: f64) -> bool {
    percent >= 100.0 || fastrand::f64() * 100.0 < percent
}
