//! Fuzzes the syslog datagram parser (RFC 3164 / RFC 5424) and the HTTP Range and path
//! checks of the netboot engine: errors, never a panic or a path that is not plain.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = corral_netboot::syslog::parse(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let len = data.len() as u64 * 1000;
        if let corral_netboot::files::RangeAnswer::Partial(r) =
            corral_netboot::files::parse_range(s, len)
        {
            assert!(r.start < r.end && r.end <= len);
        }
        if let Ok(p) = corral_netboot::files::plain_relative(s) {
            assert!(
                p.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            );
        }
    }
});
