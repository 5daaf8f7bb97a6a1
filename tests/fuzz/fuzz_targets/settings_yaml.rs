//! Fuzz settings YAML decoding (serde_yaml_ng, deny_unknown_fields). Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = threatlake::Settings::from_yaml(text, "fuzz.yaml");
    }
});
