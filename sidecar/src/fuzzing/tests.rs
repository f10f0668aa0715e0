//! The committed fuzz corpora, replayed through the fuzz targets' own functions: a seed (or a crash
//! kept as a regression input) that stops passing fails here, without libFuzzer.

use weft_ca::fuzzing::replay_corpus as replay;

#[test]
fn h1_request_corpus() {
    replay("h1_request", 10, super::h1_request);
}

#[test]
fn h1_response_corpus() {
    replay("h1_response", 5, super::h1_response);
}

#[test]
fn h1_chunked_corpus() {
    replay("h1_chunked", 5, super::h1_chunked);
}

#[test]
fn h1_differential_corpus() {
    replay("h1_differential", 10, super::h1_differential);
}

#[test]
fn framing_corpus() {
    replay("framing", 5, super::framing);
}

#[test]
fn dns_query_corpus() {
    replay("dns_query", 3, super::dns_query);
}

#[test]
fn route_table_corpus() {
    replay("route_table", 3, super::route_table);
}
