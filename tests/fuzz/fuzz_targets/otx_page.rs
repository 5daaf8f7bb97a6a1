//! Fuzz OTX page and pulse parsing (current and 2015 formats). Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use threatlake::feeds::otx::{parse_page, parse_pulse, Provenance};

fuzz_target!(|data: &[u8]| {
    if let Ok((pulses, _next)) = parse_page(data) {
        let p = Provenance {
            batch_id: "fuzz".into(),
            raw_ref: "fuzz".into(),
            ingested_at: "2026-01-01T00:00:00Z".into(),
        };
        for v in &pulses {
            let _ = parse_pulse(v, &p);
        }
    }
});
