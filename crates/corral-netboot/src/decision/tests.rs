//! Boot decisions per lifecycle state and firmware.

use super::*;
use corral_model::LifecycleState as S;

pub(crate) fn site_dir(discovery: bool) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let w = |p: &str, t: &str| {
        let p = d.path().join(p);
        fs_err::create_dir_all(p.parent().unwrap()).unwrap();
        fs_err::write(p, t).unwrap();
    };
    w(
        "site.toml",
        &format!(
            "[server]\nname = \"t\"\n[dhcp]\nmode = \"off\"\n[[dhcp.network]]\ncidr = \"10.9.0.0/24\"\n{}",
            if discovery {
                "[discovery]\nprofile = \"discover\"\nenrol = true\n"
            } else {
                ""
            }
        ),
    );
    w(
        "profiles/debian.toml",
        "[boot]\nkernel = \"k\"\ninitrd = [\"a.img\", \"b.img\"]\ncmdline = \"h={{ hostname }}\"\n",
    );
    w(
        "profiles/discover.toml",
        "[boot]\nipxe_template = \"templates/d.ipxe\"\n",
    );
    w("profiles/disk.toml", "description = \"no boot\"\n");
    w("templates/d.ipxe", "#!ipxe\necho discover {{ mac }}\n");
    w(
        "machines/web01.toml",
        "mac = \"52:54:00:00:00:01\"\nprofile = \"debian\"\nip = \"10.9.0.11\"\n[vars]\ndisk = \"/dev/vda\"\n",
    );
    w(
        "machines/nas.toml",
        "mac = \"52:54:00:00:00:02\"\nprofile = \"disk\"\n",
    );
    d
}

fn site(discovery: bool) -> (tempfile::TempDir, Site) {
    let d = site_dir(discovery);
    let s = Site::load(d.path()).unwrap();
    (d, s)
}

const WEB01: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
const NAS: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
const STRANGER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x99]);

fn req(mac: MacAddr, client: ClientKind, platform: Platform, proxy: bool) -> BootRequest {
    BootRequest {
        mac,
        client,
        platform,
        ip: None,
        proxy,
    }
}

fn urls() -> UrlBase {
    UrlBase::new(Ipv4Addr::new(10, 9, 0, 1), 8080, "snponly.efi")
}

#[test]
fn declared_machine_lifecycle() {
    let (_d, s) = site(false);
    let p = plan_for(&s, WEB01, None);
    assert_eq!(p.plan, Plan::Install("debian".into()));
    assert_eq!(p.new_state, Some(S::Install));
    for st in [S::New, S::Discovered] {
        assert_eq!(
            plan_for(&s, WEB01, Some(st)).plan,
            Plan::Install("debian".into())
        );
    }
    let p = plan_for(&s, WEB01, Some(S::Install));
    assert_eq!(
        (p.plan, p.new_state),
        (Plan::Install("debian".into()), None)
    );
    let p = plan_for(&s, WEB01, Some(S::Installed));
    assert_eq!((p.plan, p.new_state), (Plan::Local, Some(S::Local)));
    let p = plan_for(&s, WEB01, Some(S::Local));
    assert_eq!((p.plan, p.new_state), (Plan::Local, None));
    // A profile without [boot] always boots from disk.
    assert_eq!(plan_for(&s, NAS, None).plan, Plan::Local);
}

#[test]
fn unknown_machines_get_the_discovery_profile_or_nothing() {
    let (_d, s) = site(true);
    let p = plan_for(&s, STRANGER, None);
    assert_eq!(p.plan, Plan::Discover("discover".into()));
    assert_eq!(p.new_state, Some(S::Discovered));
    let (_d, s) = site(false);
    let d = decide(
        &s,
        None,
        &req(STRANGER, ClientKind::Pxe, Platform::Bios, false),
        &urls(),
    );
    assert_eq!(d.answer, Answer::Ignore);
    assert!(d.reason.contains("no [discovery] profile"), "{}", d.reason);
}

#[test]
fn firmware_table_per_client() {
    let (_d, s) = site(false);
    let u = urls();
    let d = decide(
        &s,
        None,
        &req(WEB01, ClientKind::Pxe, Platform::Bios, false),
        &u,
    );
    assert_eq!(
        d.answer,
        Answer::Tftp {
            filename: "undionly.kpxe".into()
        }
    );
    assert!(
        d.reason.contains("matched machine web01") && d.reason.contains("undionly.kpxe"),
        "{}",
        d.reason
    );
    let d = decide(
        &s,
        None,
        &req(WEB01, ClientKind::Pxe, Platform::UefiX64, false),
        &u,
    );
    assert_eq!(
        d.answer,
        Answer::Tftp {
            filename: "snponly.efi".into()
        }
    );
    let d = decide(
        &s,
        None,
        &req(WEB01, ClientKind::HttpClient, Platform::UefiX64, false),
        &u,
    );
    assert_eq!(
        d.answer,
        Answer::Http {
            url: "http://10.9.0.1:8080/ipxe-bin/snponly.efi".into()
        }
    );
    let d = decide(
        &s,
        None,
        &req(WEB01, ClientKind::Ipxe, Platform::Bios, true),
        &u,
    );
    assert_eq!(
        d.answer,
        Answer::Http {
            url: "http://10.9.0.1:8080/ipxe/52:54:00:00:00:01".into()
        }
    );
    let ipxe_efi = UrlBase::new(Ipv4Addr::new(10, 9, 0, 1), 8080, "ipxe.efi");
    let d = decide(
        &s,
        None,
        &req(WEB01, ClientKind::Pxe, Platform::UefiX64, false),
        &ipxe_efi,
    );
    assert_eq!(
        d.answer,
        Answer::Tftp {
            filename: "ipxe.efi".into()
        }
    );
    let d = decide(
        &s,
        None,
        &req(WEB01, ClientKind::Pxe, Platform::UefiArm64, false),
        &u,
    );
    assert_eq!(d.answer, Answer::Ignore);
}

#[test]
fn installed_machines_boot_locally_on_every_dhcp_path() {
    let (_d, s) = site(false);
    let u = urls();
    for st in [S::Installed, S::Local] {
        for proxy in [false, true] {
            for (c, p) in [
                (ClientKind::Pxe, Platform::Bios),
                (ClientKind::Pxe, Platform::UefiX64),
                (ClientKind::HttpClient, Platform::UefiX64),
            ] {
                let d = decide(&s, Some(st), &req(WEB01, c, p, proxy), &u);
                assert_eq!(d.answer, Answer::LocalBoot, "{st} {c} {p} proxy={proxy}");
            }
            // iPXE gets its script, which for a local machine boots the disk.
            let d = decide(
                &s,
                Some(st),
                &req(WEB01, ClientKind::Ipxe, Platform::Bios, proxy),
                &u,
            );
            assert!(matches!(d.answer, Answer::Http { .. }));
            assert_eq!(d.plan.plan, Plan::Local);
        }
    }
}

#[test]
fn scripts_render_machine_variables() {
    let (_d, s) = site(true);
    let u = urls();
    let plan = plan_for(&s, WEB01, Some(S::Install));
    let v = crate::script::vars(
        &s,
        WEB01,
        Some("10.9.0.11".parse().unwrap()),
        &plan,
        corral_model::SessionId(0xab),
        &u,
        Some("10.9.0.1:514".into()),
    );
    assert_eq!(v.cmdline, "h=web01");
    let (text, origin) = crate::script::render(&s, &plan, &v).unwrap();
    assert_eq!(origin, "built-in install template");
    assert!(text.starts_with("#!ipxe\n"), "{text}");
    assert!(text.contains("kernel http://10.9.0.1:8080/boot/k h=web01 corral.done=http://10.9.0.1:8080/api/v1/machines/52:54:00:00:00:01/done corral.session=00000000000000ab corral.syslog=10.9.0.1:514\n"), "{text}");
    assert!(
        text.contains(
            "initrd http://10.9.0.1:8080/boot/a.img\ninitrd http://10.9.0.1:8080/boot/b.img\n"
        ),
        "{text}"
    );
    let plan = plan_for(&s, STRANGER, None);
    let v = crate::script::vars(
        &s,
        STRANGER,
        None,
        &plan,
        corral_model::SessionId(1),
        &u,
        None,
    );
    let (text, _) = crate::script::render(&s, &plan, &v).unwrap();
    assert_eq!(text, "#!ipxe\necho discover 52:54:00:00:00:99\n");
    let plan = plan_for(&s, WEB01, Some(S::Local));
    let v = crate::script::vars(&s, WEB01, None, &plan, corral_model::SessionId(1), &u, None);
    let (text, _) = crate::script::render(&s, &plan, &v).unwrap();
    assert!(
        text.contains("sanboot --no-describe --drive 0x80") && text.contains("\nexit\n"),
        "{text}"
    );
}
