//! weft end-to-end harness (filled in with the first cross-process tests).
