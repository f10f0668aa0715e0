//! The webhooks' parsing of AdmissionReviews from outside, for the cargo-fuzz target
//! `admission_review` in `fuzz/` (feature `fuzzing`) and for the unit test that replays the
//! committed corpus (`fuzz/corpus/admission_review`) through the same function.

// A broken invariant panics on purpose here: a panic is what libFuzzer reports.
#![allow(clippy::expect_used)]

use super::Admission;

/// Both handlers on `data`: a body is refused with a reason or answered with an AdmissionReview
/// that carries the request's uid; never a panic.
pub fn admission_review(data: &[u8]) {
    let admission = Admission::new(crate::inject::Options::default());
    for answer in [admission.inject(data), admission.validate(data)] {
        match answer {
            Ok(json) => {
                let review: serde_json::Value =
                    serde_json::from_slice(&json).expect("the answer is JSON"); // ok: a fuzz oracle (built for tests and `cargo fuzz` only): a panic is the finding
                assert!(
                    review
                        .pointer("/response/uid")
                        .and_then(|u| u.as_str())
                        .is_some_and(|u| !u.is_empty()),
                    "an answer without the request's uid: {review}"
                );
            }
            Err(reason) => assert!(!reason.0.is_empty(), "refused without a reason"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_corpus_replays_without_panics() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/corpus/admission_review"
        );
        let mut n = 0;
        for entry in std::fs::read_dir(dir).expect("the corpus directory") {
            let data = std::fs::read(entry.expect("an entry").path()).expect("a corpus file");
            super::admission_review(&data);
            n += 1;
        }
        assert!(n >= 3, "only {n} corpus files in {dir}");
    }
}
