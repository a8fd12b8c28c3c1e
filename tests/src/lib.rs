//! End-to-end tests that run the real binaries; the tests live in `tests/*.rs`.
