//! Fuzz the ATT&CK bundle path: gunzip, UTF-8 check, STIX parse and validation, normalisation
//! (citation cleaning, markdown, relationships) into Arrow batches. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use threatlake::attack::{prepare, BundleLimits};

fuzz_target!(|data: &[u8]| {
    let limits = BundleLimits {
        max_bytes: 8 << 20,
        max_objects: 20_000,
    };
    let _ = prepare(
        "fuzz.json",
        bytes::Bytes::copy_from_slice(data),
        None,
        None,
        &limits,
    );
});
