//! What each kind of firmware is handed: the quirks of PXE, UEFI HTTP Boot and iPXE as one
//! table of data ([`FIRMWARE_TABLE`]) instead of `if`s scattered through the servers.

use std::fmt;

/// How the client identified itself in DHCP (option 60 vendor class, option 77 user class).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    /// Firmware PXE (vendor class `PXEClient`): boots a program fetched over TFTP.
    Pxe,
    /// UEFI HTTP Boot (vendor class `HTTPClient`): boots a program fetched over HTTP.
    HttpClient,
    /// iPXE already running (user class `iPXE`): wants a script URL.
    Ipxe,
}

impl fmt::Display for ClientKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientKind::Pxe => "PXE",
            ClientKind::HttpClient => "UEFI HTTP Boot",
            ClientKind::Ipxe => "iPXE",
        })
    }
}

/// The client's platform, from DHCP option 93 (RFC 4578 §2.1, IANA "Processor Architecture
/// Types"). The DHCP layer maps every IANA code onto one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Platform {
    /// x86 BIOS (code 0).
    Bios,
    /// x86-64 UEFI (codes 7 and 9 — both are seen in the field for x64 — and 16 for HTTP).
    UefiX64,
    /// IA-32 UEFI (codes 6, 15).
    UefiIa32,
    /// ARM 64-bit UEFI (codes 11, 19).
    UefiArm64,
    /// Anything else, with its option 93 code (`None`: option absent).
    Other(Option<u16>),
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Platform::Bios => f.write_str("BIOS"),
            Platform::UefiX64 => f.write_str("UEFI x64"),
            Platform::UefiIa32 => f.write_str("UEFI IA-32"),
            Platform::UefiArm64 => f.write_str("UEFI ARM64"),
            Platform::Other(Some(c)) => write!(f, "architecture {c}"),
            Platform::Other(None) => f.write_str("unknown architecture"),
        }
    }
}

/// Which iPXE binary a rule hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Binary {
    /// `undionly.kpxe`: iPXE for BIOS, driving the card through the PXE ROM's UNDI.
    Undionly,
    /// The x64 UEFI iPXE program: `snponly.efi` by default (uses the firmware's network
    /// driver, works on any card), `ipxe.efi` if configured (its own drivers).
    UefiX64,
}

/// What a client of one kind and platform is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// An iPXE binary by TFTP (file name in the DHCP answer).
    TftpBinary(Binary),
    /// An iPXE binary by HTTP (absolute URL in the DHCP answer).
    HttpBinary(Binary),
    /// The machine's iPXE script by HTTP (absolute URL).
    Script,
}

/// One row of the firmware table.
#[derive(Debug, Clone, Copy)]
pub struct FirmwareRule {
    /// The client kind this row applies to.
    pub client: ClientKind,
    /// The platform it applies to (`None`: any).
    pub platform: Option<Platform>,
    /// What it gets.
    pub step: Step,
    /// Why, for the event's reason.
    pub why: &'static str,
}

/// The firmware table. The first matching row wins; no row means "no boot program for this
/// client" (the client is not answered, and the event says so).
pub const FIRMWARE_TABLE: &[FirmwareRule] = &[
    FirmwareRule {
        client: ClientKind::Ipxe,
        platform: None,
        step: Step::Script,
        why: "iPXE is running: it gets its per-machine script by HTTP (never iPXE again, so no chainload loop)",
    },
    FirmwareRule {
        client: ClientKind::Pxe,
        platform: Some(Platform::Bios),
        step: Step::TftpBinary(Binary::Undionly),
        why: "BIOS PXE chainloads iPXE over TFTP",
    },
    FirmwareRule {
        client: ClientKind::Pxe,
        platform: Some(Platform::UefiX64),
        step: Step::TftpBinary(Binary::UefiX64),
        why: "UEFI x64 PXE chainloads iPXE over TFTP",
    },
    FirmwareRule {
        client: ClientKind::HttpClient,
        platform: Some(Platform::UefiX64),
        step: Step::HttpBinary(Binary::UefiX64),
        why: "UEFI x64 HTTP Boot chainloads iPXE over HTTP",
    },
];

/// The first rule of [`FIRMWARE_TABLE`] for this client, if any.
pub fn rule_for(client: ClientKind, platform: Platform) -> Option<&'static FirmwareRule> {
    FIRMWARE_TABLE
        .iter()
        .find(|r| r.client == client && r.platform.is_none_or(|p| p == platform))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_the_field() {
        let r = rule_for(ClientKind::Pxe, Platform::Bios).unwrap();
        assert_eq!(r.step, Step::TftpBinary(Binary::Undionly));
        let r = rule_for(ClientKind::Pxe, Platform::UefiX64).unwrap();
        assert_eq!(r.step, Step::TftpBinary(Binary::UefiX64));
        let r = rule_for(ClientKind::HttpClient, Platform::UefiX64).unwrap();
        assert_eq!(r.step, Step::HttpBinary(Binary::UefiX64));
        for p in [Platform::Bios, Platform::UefiX64, Platform::Other(None)] {
            assert_eq!(rule_for(ClientKind::Ipxe, p).unwrap().step, Step::Script);
        }
        assert!(rule_for(ClientKind::Pxe, Platform::UefiArm64).is_none());
        assert!(rule_for(ClientKind::HttpClient, Platform::Bios).is_none());
    }
}
