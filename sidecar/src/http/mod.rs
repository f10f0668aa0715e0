//! HTTP as the proxy speaks it: the body type every stage moves, header rules, HTTP/1.1 with the
//! pod's app (`h1`), the HTTP/2 hop between sidecars (`peer`), protocol sniffing and upgrades.

pub mod body;
pub mod h1;
pub mod headers;
pub mod peer;
pub mod sniff;
pub mod tunnel;
