//! Route matching: the first route whose conditions hold, then a weighted destination.

use super::{Action, Match, Route, ServicePort, StringMatch, WeightedCluster};

/// What route matching looks at.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a http::HeaderMap,
}

impl Match {
    /// Whether the request satisfies every condition.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(uri) = &self.uri {
            let ok = if self.ignore_uri_case {
                uri.matches_ignore_case(req.path)
            } else {
                uri.matches(req.path)
            };
            if !ok {
                return false;
            }
        }
        if let Some(m) = &self.method
            && !m.matches(req.method)
        {
            return false;
        }
        for (name, m) in &self.headers {
            // Every value is checked, so `X-Role: user` plus `X-Role: admin` cannot slip past an exact
            // match on one of them (Istio CVE-2026-26308 class): all values must match.
            let mut values = req.headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                return false;
            }
            for v in values {
                match v.to_str() {
                    Ok(v) if m.matches(v) => {}
                    _ => return false,
                }
            }
        }
        for name in &self.without_headers {
            if req.headers.contains_key(name) {
                return false;
            }
        }
        for (name, m) in &self.query_params {
            let found = req.query.and_then(|q| {
                q.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == name).then_some(v)
                })
            });
            match found {
                Some(v) if m.matches(v) => {}
                _ => return false,
            }
        }
        true
    }
}

impl ServicePort {
    /// The first route any of whose matches holds (a route without matches holds for everything).
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))
    }
}

impl Route {
    /// Picks a destination by weight with `roll` uniform in `0..total_weight`.
    pub fn pick(&self, roll: u32) -> Option<&WeightedCluster> {
        let Action::Forward {
            destinations,
            total_weight,
        } = &self.action
        else {
            return None;
        };
        let mut r = roll % (*total_weight).max(1);
        for d in destinations {
            if r < d.weight {
                return Some(d);
            }
            r -= d.weight;
        }
        destinations.last()
    }
}

impl StringMatch {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
            StringMatch::Present => true,
        }
    }

    pub(super) fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StringMatch::Prefix(p) => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            StringMatch::Regex(r) => r.is_match(value),
            StringMatch::Present => true,
        }
    }
}
