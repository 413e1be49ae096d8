//! The kernel's IPv4 neighbour table (`/proc/net/arp`): which MAC sent a packet from an IP.
//!
//! A PXE client ARPs for our address before its first TFTP or HTTP packet, and Linux keeps
//! an entry for the asker, so the table names the machine even when another server (ProxyDHCP
//! mode) gave it its address.

use std::net::IpAddr;

use corral_model::MacAddr;

/// The MAC of `ip` in this network namespace's ARP table, if present and complete.
pub fn lookup(ip: IpAddr) -> Option<MacAddr> {
    let IpAddr::V4(v4) = ip else { return None };
    let text = fs_err::read_to_string("/proc/net/arp").ok()?;
    parse(&text, &v4.to_string())
}

/// Finds `ip` in the text of `/proc/net/arp`. Pure.
pub fn parse(table: &str, ip: &str) -> Option<MacAddr> {
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // IP address, HW type, Flags (0x2 = complete), HW address, Mask, Device
        (f.len() >= 4 && f[0] == ip && f[2] != "0x0")
            .then(|| f[3].parse::<MacAddr>().ok())
            .flatten()
            .filter(|m| *m != MacAddr([0; 6]))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_proc_net_arp() {
        let t = "IP address       HW type     Flags       HW address            Mask     Device\n\
                 10.0.0.5         0x1         0x2         52:54:00:12:34:56     *        eth0\n\
                 10.0.0.6         0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        assert_eq!(
            super::parse(t, "10.0.0.5"),
            Some("52:54:00:12:34:56".parse().unwrap())
        );
        assert_eq!(super::parse(t, "10.0.0.6"), None);
        assert_eq!(super::parse(t, "10.0.0.7"), None);
    }
}
