//! Fuzz VirusTotal v3 report, MITRE tree and behaviour summary parsing. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use threatlake::feeds::vt::{
    parse_behaviour_summary, parse_mitre_trees, parse_report, Kind, LookupRow,
};

fuzz_target!(|data: &[u8]| {
    let mut row = LookupRow::new(
        Kind::File,
        "0".repeat(64).as_str(),
        "b",
        "2026-01-01T00:00:00Z",
    );
    let _ = parse_report(data, &mut row);
    let _ = parse_mitre_trees(data, "x", "b", "2026-01-01T00:00:00Z");
    let _ = parse_behaviour_summary(data, "x", "b", "2026-01-01T00:00:00Z");
});
