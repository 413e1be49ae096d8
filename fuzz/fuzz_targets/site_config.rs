//! Fuzz the site directory parsers: arbitrary bytes as `site.toml`, a machine file and a
//! profile file. They must report problems, never panic.
//!
//! Run: `cargo fuzz run site_config` (from `fuzz/`). The crate's proptest
//! `arbitrary_text_never_panics` runs the same check in CI.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The loader rejects non-UTF-8 files before parsing, so only text reaches the parsers.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for p in corral_site::check_site_toml_str(text)
        .into_iter()
        .chain(corral_site::check_machine_str("fuzz", text))
        .chain(corral_site::check_profile_str("fuzz", text))
    {
        // Displaying exercises the location arithmetic too.
        let _ = p.to_string();
    }
});
