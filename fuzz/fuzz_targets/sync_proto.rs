//! Fuzz the sync wire decoder: any bytes must decode to a checked message or an error, and
//! every path in a decoded message must be a plain relative path.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = corral_sync::proto::frame_len(data[..4].try_into().unwrap());
    }
    if let Ok(m) = corral_sync::proto::decode(data) {
        if let corral_sync::proto::Message::Apply(op) = &m {
            assert!(corral_sync::manifest::check_rel_path(op.path()));
        }
        // What decodes re-encodes.
        let f = corral_sync::proto::encode(&m).unwrap();
        assert_eq!(corral_sync::proto::decode(&f[4..]).unwrap(), m);
    }
    if let Ok(b) = corral_sync::proto::decompress(data, 1 << 20) {
        assert!(b.len() <= 1 << 20);
    }
});
