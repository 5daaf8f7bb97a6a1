//! Fuzz IOC list parsing: CSV/TSV/JSON lines, refanging, observable classification. Must never
//! panic, and every accepted observable must classify again to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use threatlake::feeds::vt::{classify, parse_iocs};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let (ok, _bad) = parse_iocs(text);
        for o in ok {
            let (_, again) = classify(&o).expect("an accepted observable classifies");
            assert_eq!(again, o, "normalisation is stable");
        }
    }
});
