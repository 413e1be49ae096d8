//! Who is asking: client classification from options 60, 77, 93, 94, 97 and 175.
//!
//! PXE and its successors identify themselves in options rather than in one field:
//! - option 60 (vendor class, [RFC 2132 §9.13]) starts with `PXEClient` (PXE 2.1 firmware,
//!   [RFC 4578 §2]) or `HTTPClient` (UEFI HTTP Boot, UEFI spec §24.7);
//! - option 93 (client system architecture, [RFC 4578 §2.1]) is a code from IANA's
//!   "Processor Architecture Types" registry, kept here as a table ([`ARCH_TABLE`]);
//! - option 94 (network interface identifier, UNDI version) and 97 (client machine UUID,
//!   [RFC 4578 §2.2, §2.3]);
//! - iPXE sends user class (option 77, [RFC 3004]) `iPXE` and its own encapsulated option 175.
//!
//! [RFC 2132 §9.13]: https://www.rfc-editor.org/rfc/rfc2132#section-9.13
//! [RFC 4578 §2]: https://www.rfc-editor.org/rfc/rfc4578#section-2
//! [RFC 4578 §2.1]: https://www.rfc-editor.org/rfc/rfc4578#section-2.1
//! [RFC 4578 §2.2, §2.3]: https://www.rfc-editor.org/rfc/rfc4578#section-2.2
//! [RFC 3004]: https://www.rfc-editor.org/rfc/rfc3004

use std::fmt;
use std::net::Ipv4Addr;

use corral_model::MacAddr;

use crate::packet::Packet;

/// A processor architecture from option 93 (IANA "Processor Architecture Types").
///
/// Code 9 is "EBC" in the registry, but x64 UEFI firmware in the field (older EDK2 builds and
/// several vendors' ROMs) sends 9 for x64: both 7 and 9 map to [`Arch::UefiX64`], as dnsmasq
/// and ISC configurations in the field do. [`ClientInfo::arch_code`] keeps the raw code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // each variant is documented by its row in ARCH_TABLE
pub enum Arch {
    BiosX86,
    Pc98,
    Itanium,
    DecAlpha,
    ArcX86,
    IntelLeanClient,
    UefiIa32,
    UefiX64,
    Xscale,
    UefiArm32,
    UefiArm64,
    PowerPcOpenFirmware,
    PowerPcEpapr,
    PowerOpalV3,
    HttpUefiIa32,
    HttpUefiX64,
    HttpEbc,
    HttpUefiArm32,
    HttpUefiArm64,
    HttpBiosX86,
    UbootArm32,
    UbootArm64,
    HttpUbootArm32,
    HttpUbootArm64,
    UefiRiscv32,
    HttpUefiRiscv32,
    UefiRiscv64,
    HttpUefiRiscv64,
    UefiRiscv128,
    HttpUefiRiscv128,
    S390Basic,
    S390Extended,
    UefiMips32,
    UefiMips64,
    UefiSunway32,
    UefiSunway64,
    UefiLoongArch32,
    HttpUefiLoongArch32,
    UefiLoongArch64,
    HttpUefiLoongArch64,
    ArmRpiboot,
    /// A code the registry did not assign when this table was written.
    Other(u16),
}

/// The boot environment an architecture code implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// Legacy PC BIOS (PXE ROM): gets a BIOS boot program such as `undionly.kpxe`.
    Bios,
    /// UEFI firmware: gets an EFI boot program such as `snponly.efi`.
    Uefi,
    /// Neither (U-Boot, Open Firmware, s390, rpiboot...).
    Other,
}

/// One row of the architecture table.
#[derive(Debug, Clone, Copy)]
pub struct ArchRow {
    /// The option 93 code.
    pub code: u16,
    /// What it means here.
    pub arch: Arch,
    /// The registry's name.
    pub name: &'static str,
    /// BIOS, UEFI or other.
    pub platform: Platform,
    /// True for the "boot from http" codes (UEFI HTTP Boot and friends).
    pub http: bool,
}

const fn row(code: u16, arch: Arch, name: &'static str, platform: Platform, http: bool) -> ArchRow {
    ArchRow {
        code,
        arch,
        name,
        platform,
        http,
    }
}

use Platform::{Bios, Other as Oth, Uefi};

/// IANA "Processor Architecture Types" (option 93), codes 0-41, as data. Quirk: code 9 (EBC)
/// is mapped to x64 UEFI; see [`Arch`].
pub const ARCH_TABLE: &[ArchRow] = &[
    row(0, Arch::BiosX86, "x86 BIOS", Bios, false),
    row(1, Arch::Pc98, "NEC/PC98", Oth, false),
    row(2, Arch::Itanium, "Itanium", Uefi, false),
    row(3, Arch::DecAlpha, "DEC Alpha", Oth, false),
    row(4, Arch::ArcX86, "Arc x86", Oth, false),
    row(5, Arch::IntelLeanClient, "Intel Lean Client", Oth, false),
    row(6, Arch::UefiIa32, "x86 UEFI", Uefi, false),
    row(7, Arch::UefiX64, "x64 UEFI", Uefi, false),
    row(8, Arch::Xscale, "EFI Xscale", Uefi, false),
    row(9, Arch::UefiX64, "EBC (x64 UEFI in the field)", Uefi, false),
    row(10, Arch::UefiArm32, "ARM 32-bit UEFI", Uefi, false),
    row(11, Arch::UefiArm64, "ARM 64-bit UEFI", Uefi, false),
    row(
        12,
        Arch::PowerPcOpenFirmware,
        "PowerPC Open Firmware",
        Oth,
        false,
    ),
    row(13, Arch::PowerPcEpapr, "PowerPC ePAPR", Oth, false),
    row(14, Arch::PowerOpalV3, "POWER OPAL v3", Oth, false),
    row(
        15,
        Arch::HttpUefiIa32,
        "x86 UEFI boot from HTTP",
        Uefi,
        true,
    ),
    row(16, Arch::HttpUefiX64, "x64 UEFI boot from HTTP", Uefi, true),
    row(17, Arch::HttpEbc, "EBC boot from HTTP", Uefi, true),
    row(
        18,
        Arch::HttpUefiArm32,
        "ARM 32-bit UEFI boot from HTTP",
        Uefi,
        true,
    ),
    row(
        19,
        Arch::HttpUefiArm64,
        "ARM 64-bit UEFI boot from HTTP",
        Uefi,
        true,
    ),
    row(
        20,
        Arch::HttpBiosX86,
        "PC/AT BIOS boot from HTTP",
        Bios,
        true,
    ),
    row(21, Arch::UbootArm32, "ARM 32-bit U-Boot", Oth, false),
    row(22, Arch::UbootArm64, "ARM 64-bit U-Boot", Oth, false),
    row(
        23,
        Arch::HttpUbootArm32,
        "ARM 32-bit U-Boot boot from HTTP",
        Oth,
        true,
    ),
    row(
        24,
        Arch::HttpUbootArm64,
        "ARM 64-bit U-Boot boot from HTTP",
        Oth,
        true,
    ),
    row(25, Arch::UefiRiscv32, "RISC-V 32-bit UEFI", Uefi, false),
    row(
        26,
        Arch::HttpUefiRiscv32,
        "RISC-V 32-bit UEFI boot from HTTP",
        Uefi,
        true,
    ),
    row(27, Arch::UefiRiscv64, "RISC-V 64-bit UEFI", Uefi, false),
    row(
        28,
        Arch::HttpUefiRiscv64,
        "RISC-V 64-bit UEFI boot from HTTP",
        Uefi,
        true,
    ),
    row(29, Arch::UefiRiscv128, "RISC-V 128-bit UEFI", Uefi, false),
    row(
        30,
        Arch::HttpUefiRiscv128,
        "RISC-V 128-bit UEFI boot from HTTP",
        Uefi,
        true,
    ),
    row(31, Arch::S390Basic, "s390 Basic", Oth, false),
    row(32, Arch::S390Extended, "s390 Extended", Oth, false),
    row(33, Arch::UefiMips32, "MIPS 32-bit UEFI", Uefi, false),
    row(34, Arch::UefiMips64, "MIPS 64-bit UEFI", Uefi, false),
    row(35, Arch::UefiSunway32, "Sunway 32-bit UEFI", Uefi, false),
    row(36, Arch::UefiSunway64, "Sunway 64-bit UEFI", Uefi, false),
    row(
        37,
        Arch::UefiLoongArch32,
        "LoongArch 32-bit UEFI",
        Uefi,
        false,
    ),
    row(
        38,
        Arch::HttpUefiLoongArch32,
        "LoongArch 32-bit UEFI boot from HTTP",
        Uefi,
        true,
    ),
    row(
        39,
        Arch::UefiLoongArch64,
        "LoongArch 64-bit UEFI",
        Uefi,
        false,
    ),
    row(
        40,
        Arch::HttpUefiLoongArch64,
        "LoongArch 64-bit UEFI boot from HTTP",
        Uefi,
        true,
    ),
    row(41, Arch::ArmRpiboot, "arm rpiboot", Oth, false),
];

impl Arch {
    /// The architecture for an option 93 code.
    pub fn from_code(code: u16) -> Arch {
        ARCH_TABLE
            .iter()
            .find(|r| r.code == code)
            .map_or(Arch::Other(code), |r| r.arch)
    }

    /// The table row (the first one for [`Arch::UefiX64`], code 7); `None` for [`Arch::Other`].
    pub fn row(self) -> Option<&'static ArchRow> {
        ARCH_TABLE.iter().find(|r| r.arch == self)
    }

    /// The canonical option 93 code.
    pub fn code(self) -> u16 {
        match self {
            Arch::Other(c) => c,
            a => a.row().map_or(0, |r| r.code),
        }
    }

    /// BIOS, UEFI or other.
    pub fn platform(self) -> Platform {
        self.row().map_or(Platform::Other, |r| r.platform)
    }

    /// True for UEFI architectures.
    pub fn is_uefi(self) -> bool {
        self.platform() == Platform::Uefi
    }

    /// True for the "boot from HTTP" codes.
    pub fn is_http(self) -> bool {
        self.row().is_some_and(|r| r.http)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.row() {
            Some(r) => f.write_str(r.name),
            None => write!(f, "architecture {}", self.code()),
        }
    }
}

/// What kind of boot client is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Firmware {
    /// PXE firmware (option 60 `PXEClient...`).
    Pxe,
    /// UEFI HTTP Boot (option 60 `HTTPClient...`).
    HttpClient,
    /// iPXE (user class `iPXE` or option 175): gets an http URL to its script, never a new
    /// iPXE binary (that would loop).
    Ipxe,
    /// A plain DHCP client that does not want to boot from the network.
    None,
}

impl Firmware {
    /// True for clients that want a boot answer.
    pub fn wants_boot(self) -> bool {
        self != Firmware::None
    }

    /// A short name for logs and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Pxe => "pxe",
            Firmware::HttpClient => "httpclient",
            Firmware::Ipxe => "ipxe",
            Firmware::None => "none",
        }
    }
}

/// What the client is, decoded from one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The hardware address (chaddr).
    pub mac: MacAddr,
    /// Option 93, when sent.
    pub arch: Option<Arch>,
    /// PXE, HTTP Boot, iPXE or none.
    pub firmware: Firmware,
    /// Option 60 as text (lossy UTF-8).
    pub vendor_class: Option<String>,
    /// Option 77 as text (RFC 3004 items joined by `,`, or the raw text iPXE sends).
    pub user_class: Option<String>,
    /// Option 12.
    pub hostname: Option<String>,
    /// The relay agent (giaddr) the request came through, if any.
    pub relay: Option<Ipv4Addr>,
    /// The client's own address (ciaddr), if it has one.
    pub ciaddr: Option<Ipv4Addr>,
    /// The raw option 93 code (7 and 9 both give [`Arch::UefiX64`]).
    pub arch_code: Option<u16>,
    /// Option 97 (client machine identifier: type byte + UUID), raw.
    pub machine_id: Option<Vec<u8>>,
    /// Option 94 (UNDI major, minor), when sent.
    pub undi: Option<(u8, u8)>,
}

impl ClientInfo {
    /// Classifies a decoded request.
    pub fn from_packet(p: &Packet) -> Option<ClientInfo> {
        let mac = p.mac()?;
        let arch_code = p
            .opt(93)
            .filter(|v| v.len() >= 2)
            .map(|v| u16::from_be_bytes([v[0], v[1]]));
        let vendor_class = p.opt(60).map(lossy);
        let user_class_raw = p.opt(77);
        let user_items = user_class_raw.map(user_class_items).unwrap_or_default();
        let is_ipxe = user_items.iter().any(|i| i == "iPXE") || p.opt(175).is_some();
        let firmware = if is_ipxe {
            Firmware::Ipxe
        } else {
            match vendor_class.as_deref() {
                Some(v) if v.starts_with("HTTPClient") => Firmware::HttpClient,
                Some(v) if v.starts_with("PXEClient") => Firmware::Pxe,
                _ => Firmware::None,
            }
        };
        let undi = p
            .opt(94)
            .filter(|v| v.len() == 3 && v[0] == 1)
            .map(|v| (v[1], v[2]));
        let ciaddr = p.ciaddr();
        Some(ClientInfo {
            mac,
            arch: arch_code.map(Arch::from_code),
            firmware,
            vendor_class,
            user_class: (!user_items.is_empty()).then(|| user_items.join(",")),
            hostname: p.opt(12).map(lossy).filter(|h| !h.is_empty()),
            relay: p.giaddr(),
            ciaddr,
            arch_code,
            machine_id: p.opt(97).map(<[u8]>::to_vec),
            undi,
        })
    }

    /// BIOS, UEFI or other; clients that send no option 93 are taken as BIOS (PXE 2.1 ROMs
    /// predate it).
    pub fn platform(&self) -> Platform {
        self.arch.map_or(Platform::Bios, Arch::platform)
    }
}

fn lossy(v: &[u8]) -> String {
    // Option text is untrusted: drop NULs and control characters before it reaches logs.
    String::from_utf8_lossy(v)
        .chars()
        .filter(|c| !c.is_control())
        .take(255)
        .collect()
}

/// RFC 3004 user class items (each length-prefixed); iPXE and many clients send the bare
/// text instead, which is taken as one item when the length prefixes do not add up.
fn user_class_items(v: &[u8]) -> Vec<String> {
    let mut items = Vec::new();
    let mut rest = v;
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n);
        if n == 0 || n > tail.len() {
            return vec![lossy(v)];
        }
        items.push(lossy(&tail[..n]));
        rest = &tail[n..];
    }
    if items.is_empty() && !v.is_empty() {
        items.push(lossy(v));
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_complete_and_ordered() {
        for (i, r) in ARCH_TABLE.iter().enumerate() {
            assert_eq!(usize::from(r.code), i);
        }
        assert_eq!(Arch::from_code(7), Arch::UefiX64);
        assert_eq!(Arch::from_code(9), Arch::UefiX64);
        assert_eq!(Arch::from_code(0), Arch::BiosX86);
        assert_eq!(Arch::from_code(16), Arch::HttpUefiX64);
        assert!(Arch::HttpUefiX64.is_http());
        assert_eq!(Arch::from_code(42), Arch::Other(42));
        assert_eq!(Arch::UefiX64.code(), 7);
        assert_eq!(Arch::Other(999).code(), 999);
        assert_eq!(Arch::BiosX86.platform(), Platform::Bios);
        assert!(Arch::UefiArm64.is_uefi());
    }

    #[test]
    fn user_class_forms() {
        assert_eq!(user_class_items(b"iPXE"), vec!["iPXE"]);
        assert_eq!(user_class_items(b"\x04iPXE\x03foo"), vec!["iPXE", "foo"]);
        assert_eq!(
            user_class_items(b"\x09iPXE"),
            vec!["\tiPXE".replace('\t', "")]
        );
    }
}
