//! Fuzz the SQL statement splitter and depth guard every user statement passes through (parse on
//! a grown stack, nesting check). Must never panic or overflow the stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = threatlake::sql::parse(text);
    }
});
