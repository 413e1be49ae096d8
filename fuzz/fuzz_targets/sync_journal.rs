//! Fuzz the in-place update journal decoder (`corral_sync::journal::decode`): the journal is
//! read back from the child's disk, which the child's admin can edit. It must never panic,
//! and whatever it accepts must stay within the bounds it promises.
#![no_main]

use corral_sync::journal::{self, MAX_EXTENT, MAX_XATTRS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((h, ext)) = journal::decode(data) {
        assert!(corral_sync::manifest::check_rel_path(&h.path) && !h.path.is_empty());
        assert!(h.xattrs.len() <= MAX_XATTRS);
        for (off, b) in ext {
            assert!(!b.is_empty() && b.len() <= MAX_EXTENT as usize);
            assert!(off + b.len() as u64 <= h.size, "extent within the old size");
        }
    }
    // Sealed: the same bytes as a committed body (checksum and marker appended), so the
    // fuzzer reaches the parser past the checksum.
    let sealed = journal::seal(data);
    if let Ok((h, ext)) = journal::decode(&sealed) {
        for (off, b) in ext {
            assert!(off + b.len() as u64 <= h.size);
        }
    }
});
