//! Fuzz the master end of a sync conversation (`session::push`) with a hostile child: after a
//! valid hello, the child's answer (its whole manifest or its range digests, its listing of
//! the ranges asked for, the report) is the fuzzer's bytes. The master must end in an error or
//! success, never a panic, and never change its own tree.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

/// Every path beneath `root` with its contents (directories as `None`), sorted.
fn listing(root: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                out.push((rel, None));
                dirs.push(p);
            } else {
                out.push((rel, Some(std::fs::read(&p).unwrap())));
            }
        }
    }
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(t) = tempfile::tempdir() else { return };
    let src = t.path().join("src");
    // A small tree, so that a child manifest listing some of its paths plans real steps.
    if std::fs::create_dir_all(src.join("d")).is_err()
        || std::fs::write(src.join("a"), b"abc").is_err()
        || std::fs::write(src.join("d/b"), vec![7u8; 10_000]).is_err()
    {
        return;
    }
    let before = listing(&src);
    let mut input = corral_sync::proto::encode(&corral_sync::proto::Message::Hello {
        version: corral_sync::proto::VERSION,
        options: Default::default(),
    })
    .unwrap();
    input.extend_from_slice(data);
    let mut out = Vec::new();
    let mut f = corral_sync::proto::Framed::new(&input[..], &mut out);
    let _ = corral_sync::session::push(
        &src,
        &mut f,
        &corral_sync::filter::IncludeAll,
        &Default::default(),
        &mut |_| {},
    );
    assert!(listing(&src) == before, "the master changed its own tree");
});
