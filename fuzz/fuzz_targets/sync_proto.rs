//! Fuzz the sync wire decoder: any bytes must decode to a checked message or an error, and
//! every path in a decoded message must be a plain relative path; the range exchange
//! ([`corral_sync::ranges`]) round-trips a decoded listing and refuses any other answer
//! without panicking; the receiver's direct read of `Data` frames agrees with the decoder.
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
        if let corral_sync::proto::Message::Scan { k, .. } = &m {
            assert!(*k >= 1 && *k <= corral_sync::ranges::MAX_K);
        }
        // A listing and any bitmap against it: the range answer is checked, never panics,
        // and a child holding exactly the master's entries lists none of them.
        if let corral_sync::proto::Message::Entries(es) = &m {
            let mut master = corral_sync::manifest::Manifest {
                entries: es.clone(),
            };
            master.sort();
            let key = [0u8; 32];
            let ds = corral_sync::ranges::digests(&key, &master.entries, 2);
            let (bits, listed) =
                corral_sync::ranges::answer(&key, 2, &ds, &master.entries).unwrap();
            let unique = master.entries.windows(2).all(|w| w[0].path != w[1].path);
            if unique {
                assert!(listed.is_empty());
                let back = corral_sync::ranges::rebuild(&master.entries, 2, &bits, listed).unwrap();
                assert_eq!(back, master);
            }
            let _ = corral_sync::ranges::rebuild(&master.entries, 2, data, master.entries.clone());
        }
        // What decodes re-encodes.
        let f = corral_sync::proto::encode(&m).unwrap();
        assert_eq!(corral_sync::proto::decode(&f[4..]).unwrap(), m);
    }
    if let Ok(b) = corral_sync::proto::decompress(data, 1 << 20) {
        assert!(b.len() <= 1 << 20);
    }
    // The receiver's direct read of Data frames: any stream of frames yields checked frames
    // or an error; a chunk never exceeds its bound, and a Data frame read directly carries
    // what the same frame decoded as a message carries.
    let mut framed = corral_sync::proto::Framed::new(data, Vec::new());
    while let Ok(f) = framed.recv_data(4096) {
        if let corral_sync::proto::Frame::Data { bytes, .. } = f {
            assert!(bytes.len() <= 4096);
        }
    }
    if data.len() >= 4 {
        let whole = corral_sync::proto::Framed::new(data, Vec::new()).recv();
        let direct = corral_sync::proto::Framed::new(data, Vec::new()).recv_data(1 << 20);
        if let (Ok(corral_sync::proto::Message::Data { hash, payload }), Ok(f)) = (whole, direct) {
            match f {
                corral_sync::proto::Frame::Data { hash: h, bytes } => {
                    assert_eq!(h, hash);
                    assert_eq!(
                        corral_sync::proto::decompress(&payload, 1 << 20).ok(),
                        Some(bytes)
                    );
                }
                f => panic!("a Data frame read as {f:?}"),
            }
        }
    }
});
