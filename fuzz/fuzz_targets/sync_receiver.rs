//! Fuzz the receiver end of a sync conversation with a hostile byte stream: it must end in
//! an error or success, never a panic, and never write outside its root.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = tempfile::tempdir() else { return };
    let root = t.path().join("root");
    let _ = std::fs::create_dir(&root);
    // A valid hello and scan first, then the fuzzer's frames (the root is empty: the
    // receiver sends its whole manifest and waits for steps, no range exchange).
    let mut input = Vec::new();
    for m in [
        corral_sync::proto::Message::Hello {
            version: corral_sync::proto::VERSION,
            options: Default::default(),
        },
        corral_sync::proto::Message::Scan {
            key: [0; 32],
            k: corral_sync::ranges::RANGE_K,
        },
    ] {
        input.extend(corral_sync::proto::encode(&m).unwrap());
    }
    input.extend_from_slice(data);
    let mut out = Vec::new();
    let mut f = corral_sync::proto::Framed::new(&input[..], &mut out);
    let _ = corral_sync::session::serve(&root, &mut f, &Default::default());
    for e in std::fs::read_dir(t.path()).unwrap() {
        assert_eq!(e.unwrap().file_name(), "root", "wrote outside the root");
    }
});
