//! CA signing benchmark (filled in next).
fn main() {}
