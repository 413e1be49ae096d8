//! Unit tests: the example site, every problem kind with its exact message, overrides,
//! reload.

use std::path::Path;

use crate::*;

/// A temporary site: the example files, with `changes` written on top (`None` deletes).
fn site(changes: &[(&str, Option<&str>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), false).unwrap();
    for (rel, text) in changes {
        let p = dir.path().join(rel);
        match text {
            Some(t) => {
                fs_err::create_dir_all(p.parent().unwrap()).unwrap();
                fs_err::write(&p, t).unwrap();
            }
            None => fs_err::remove_file(&p).unwrap(),
        }
    }
    dir
}

fn lines(dir: &Path) -> Vec<String> {
    check(dir).iter().map(|p| p.to_string()).collect()
}

#[test]
fn example_is_clean() {
    let d = site(&[]);
    assert_eq!(lines(d.path()), Vec::<String>::new());
}

/// Asserts that checking the example site with `changes` reports exactly `want` (in order).
#[track_caller]
fn expect(changes: &[(&str, Option<&str>)], want: &[&str]) {
    let d = site(changes);
    let got = lines(d.path());
    assert_eq!(got, want, "\ngot:\n{}\n", got.join("\n"));
}

#[test]
fn syntax_error() {
    expect(
        &[("site.toml", Some("[server\nname = 1\n"))],
        &[
            "site.toml:1:8: error: TOML syntax error: unclosed table, expected `]`; see https://toml.io for the syntax",
        ],
    );
}

#[test]
fn every_unknown_key_is_named_with_the_allowed_ones() {
    expect(
        &[(
            "site.toml",
            Some("[server]\nnmae = \"x\"\ncolour = 1\n[dhcp]\nmode = \"off\"\nfoo = 2\n"),
        )],
        &[
            "site.toml:2:1: error: unknown key \"nmae\"; allowed keys here: name, interfaces, advertise, http_port, tftp_port",
            "site.toml:3:1: error: unknown key \"colour\"; allowed keys here: name, interfaces, advertise, http_port, tftp_port",
            "site.toml:6:1: error: unknown key \"foo\"; allowed keys here: mode, network",
        ],
    );
}

#[test]
fn wrong_type_and_unknown_key_in_one_machine() {
    expect(
        &[(
            "machines/web01.toml",
            Some("mac = 5\nprofile = \"debian\"\nextra = 1\n"),
        )],
        &[
            "machines/web01.toml:1:7: error: wrong type: integer `5`, expected a string or a list of strings",
            "machines/web01.toml:3:1: error: unknown key \"extra\"; allowed keys here: mac, hostname, ip, profile, groups, vars",
        ],
    );
}

#[test]
fn bad_mac() {
    expect(
        &[(
            "machines/web01.toml",
            Some("profile = \"debian\"\nmac = \"52:54:zz:00:00:01\"\n"),
        )],
        &[
            "machines/web01.toml:2:7: error: invalid MAC address \"52:54:zz:00:00:01\": expected six hex byte pairs like 52:54:00:12:34:56",
        ],
    );
}

#[test]
fn group_mac() {
    expect(
        &[(
            "machines/web01.toml",
            Some("profile = \"debian\"\nmac = [\"01:00:5e:00:00:01\"]\n"),
        )],
        &[
            "machines/web01.toml:2:8: error: MAC address 01:00:5e:00:00:01 is a group (multicast) address and cannot identify one machine; use the network card's own address",
        ],
    );
}

#[test]
fn bad_cidr_does_not_cascade_into_every_machine() {
    expect(
        &[(
            "site.toml",
            Some(
                "[server]\ninterfaces = [\"eth1\"]\n[dhcp]\nmode = \"full\"\n[[dhcp.network]]\ncidr = \"10.0.0.0/33\"\n",
            ),
        )],
        &[
            "site.toml:4:8: error: DHCP mode is \"full\" but no [[dhcp.network]] is defined; add one with its cidr and pool",
            "site.toml:6:8: error: invalid network \"10.0.0.0/33\": expected an IPv4 network in CIDR form like 10.0.0.0/24",
        ],
    );
}

#[test]
fn cidr_with_host_bits() {
    expect(
        &[(
            "site.toml",
            Some("[[dhcp.network]]\ncidr = \"10.0.0.5/24\"\n"),
        )],
        &["site.toml:2:8: error: network \"10.0.0.5/24\" has host bits set; write 10.0.0.0/24"],
    );
}

#[test]
fn bad_ip() {
    expect(
        &[(
            "machines/web01.toml",
            Some("mac = \"52:54:00:12:34:01\"\nprofile = \"debian\"\nip = \"10.0.0.300\"\n"),
        )],
        &[
            "machines/web01.toml:3:6: error: invalid IPv4 address \"10.0.0.300\": expected four decimal numbers like 10.0.0.5",
        ],
    );
}

#[test]
fn bad_pools() {
    let site_toml = "[[dhcp.network]]\ncidr = \"10.0.0.0/24\"\npool = \"10.0.0.100\"\n\
        [[dhcp.network]]\ncidr = \"10.0.1.0/24\"\npool = \"10.0.1.200-10.0.1.100\"\n\
        [[dhcp.network]]\ncidr = \"10.0.2.0/24\"\npool = \"10.0.2.100-10.0.3.10\"\n\
        [[dhcp.network]]\ncidr = \"10.0.4.0/24\"\npool = \"10.0.4.0-10.0.4.10\"\n";
    expect(
        &[("site.toml", Some(site_toml))],
        &[
            "site.toml:3:8: error: invalid pool \"10.0.0.100\": expected a range of two addresses like 10.0.0.100-10.0.0.199",
            "site.toml:6:8: error: pool \"10.0.1.200-10.0.1.100\" ends before it starts; write the lower address first",
            "site.toml:9:8: error: pool 10.0.2.100-10.0.3.10 is not inside network 10.0.2.0/24; keep both ends between 10.0.2.1 and 10.0.2.254",
            "site.toml:12:8: error: pool 10.0.4.0-10.0.4.10 is not inside network 10.0.4.0/24; keep both ends between 10.0.4.1 and 10.0.4.254",
        ],
    );
}

#[test]
fn bad_durations() {
    expect(
        &[(
            "site.toml",
            Some(
                "[store]\nmax_age = \"90 parsecs\"\n[[dhcp.network]]\ncidr = \"10.0.0.0/24\"\nlease = \"0s\"\n",
            ),
        )],
        &[
            "site.toml:2:11: error: invalid duration \"90 parsecs\": expected a number and a unit like 30m, 12h or 90d",
            "site.toml:5:9: error: duration \"0s\" is zero; give a positive duration like 12h",
        ],
    );
}

#[test]
fn unknown_dhcp_mode() {
    expect(
        &[(
            "site.toml",
            Some("[server]\ninterfaces = [\"eth1\"]\n[dhcp]\nmode = \"relay\"\n"),
        )],
        &["site.toml:4:8: error: unknown DHCP mode \"relay\": expected one of off, proxy, full"],
    );
}

#[test]
fn dhcp_without_interfaces() {
    expect(
        &[("site.toml", Some("[dhcp]\nmode = \"proxy\"\n"))],
        &[
            "site.toml:2:8: error: DHCP mode is \"proxy\" but [server] interfaces is empty; name the interfaces to serve (corral never serves DHCP on an interface not listed) or set mode = \"off\"",
        ],
    );
}

#[test]
fn bad_interface_name() {
    expect(
        &[("site.toml", Some("[server]\ninterfaces = [\"eth 1\"]\n"))],
        &[
            "site.toml:2:15: error: invalid interface name \"eth 1\": expected a Linux interface name like eth0 (1-15 characters, no spaces, '/' or ':')",
        ],
    );
}

#[test]
fn duplicate_mac_ip_hostname() {
    expect(
        &[(
            "machines/web02.toml",
            Some(
                "mac = \"52:54:00:12:34:01\"\nip = \"10.0.0.11\"\nhostname = \"web01\"\nprofile = \"debian\"\n",
            ),
        )],
        &[
            "machines/web02.toml:1:7: error: MAC address 52:54:00:12:34:01 is also used by machine web01 (machines/web01.toml:3:7); each MAC may belong to one machine only",
            "machines/web02.toml:2:6: error: address 10.0.0.11 is also given to machine web01 (machines/web01.toml:4:6); give each machine its own address",
            "machines/web02.toml:3:12: error: hostname \"web01\" is also used by machine web01 (machines/web01.toml); hostnames must be unique",
        ],
    );
}

#[test]
fn ip_outside_every_network() {
    expect(
        &[(
            "machines/web01.toml",
            Some("mac = \"52:54:00:12:34:01\"\nprofile = \"debian\"\nip = \"192.168.5.5\"\n"),
        )],
        &[
            "machines/web01.toml:3:6: error: address 192.168.5.5 is not inside any [[dhcp.network]] in site.toml (10.0.0.0/24); fix the address or add a network",
        ],
    );
}

#[test]
fn unusable_ip_and_ip_in_pool() {
    expect(
        &[
            (
                "machines/web01.toml",
                Some("mac = \"52:54:00:12:34:01\"\nprofile = \"debian\"\nip = \"10.0.0.1\"\n"),
            ),
            (
                "machines/web02.toml",
                Some("mac = \"52:54:00:12:34:02\"\nprofile = \"debian\"\nip = \"10.0.0.150\"\n"),
            ),
        ],
        &[
            "machines/web01.toml:3:6: error: address 10.0.0.1 is the network, broadcast or gateway address of network \"lab\" (10.0.0.0/24); choose a host address between 10.0.0.1 and 10.0.0.254",
            "machines/web02.toml:3:6: warning: address 10.0.0.150 is inside the dynamic pool 10.0.0.100-10.0.0.199 of network \"lab\"; another machine may lease it, so choose an address outside the pool",
        ],
    );
}

#[test]
fn gateway_outside_and_overlapping_networks() {
    let t = "[[dhcp.network]]\ncidr = \"10.0.0.0/24\"\ngateway = \"10.9.0.1\"\n[[dhcp.network]]\ncidr = \"10.0.0.128/25\"\n[[dhcp.network]]\nname = \"10.0.0.0/24\"\ncidr = \"10.1.0.0/24\"\n";
    expect(
        &[("site.toml", Some(t))],
        &[
            "site.toml:3:11: error: gateway 10.9.0.1 is not inside network 10.0.0.0/24; give an address in 10.0.0.0/24",
            "site.toml:5:8: error: network 10.0.0.128/25 overlaps network \"10.0.0.0/24\" (10.0.0.0/24); networks must not overlap",
            "site.toml:6:1: error: network name \"10.0.0.0/24\" is used twice (also 10.0.0.0/24); give each network its own name",
        ],
    );
}

#[test]
fn machine_names_missing_profile() {
    expect(
        &[(
            "machines/web01.toml",
            Some("mac = \"52:54:00:12:34:01\"\nprofile = \"debain\"\n"),
        )],
        &[
            "machines/web01.toml:2:11: error: profile \"debain\" does not exist; create profiles/debain.toml or use one of: debian, discover",
        ],
    );
}

#[test]
fn discovery_profile_missing() {
    expect(
        &[("profiles/discover.toml", None)],
        &[
            "site.toml:54:11: error: discovery profile \"discover\" does not exist; create profiles/discover.toml or use one of: debian",
        ],
    );
    expect(
        &[("site.toml", Some("[discovery]\nenrol = true\n"))],
        &[
            "site.toml: error: [discovery] enrol = true needs a profile for unknown machines; add profile = \"NAME\"",
        ],
    );
}

#[test]
fn missing_keys() {
    expect(
        &[("machines/web01.toml", Some("ip = \"10.0.0.11\"\n"))],
        &[
            "machines/web01.toml: error: missing key \"mac\"; add the machine's MAC address like mac = \"52:54:00:12:34:56\"",
            "machines/web01.toml: error: missing key \"profile\"; name the profile this machine boots, like profile = \"debian\"",
        ],
    );
    expect(
        &[("site.toml", Some("[[dhcp.network]]\nname = \"lab\"\n"))],
        &[
            "site.toml:1:1: error: missing key \"cidr\" in [[dhcp.network]]; add the subnet like cidr = \"10.0.0.0/24\"",
        ],
    );
}

#[test]
fn missing_site_toml_and_missing_dir() {
    expect(
        &[("site.toml", None)],
        &[
            "site.toml: error: missing site.toml; is this a site directory? Create one with `corral site init DIR`",
        ],
    );
    let got: Vec<String> = check("/nonexistent/corral-site")
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(
        got,
        [
            ".: error: site directory /nonexistent/corral-site cannot be read (no such file); create one with `corral site init DIR`"
        ]
    );
}

#[test]
fn unreadable_files() {
    let d = site(&[]);
    fs_err::write(d.path().join("machines/bin.toml"), b"mac = \"\xff\xfe\"\n").unwrap();
    std::os::unix::fs::symlink(
        "/nonexistent/target.toml",
        d.path().join("machines/gone.toml"),
    )
    .unwrap();
    let mut want = vec![
        "machines/bin.toml: error: cannot read file: not valid UTF-8 text; save it as UTF-8".to_owned(),
        "machines/gone.toml: error: cannot read file: no such file; it may be a dangling symlink; fix or remove it".to_owned(),
    ];
    // Root reads anything, so permissions can only be tested as another user.
    if unsafe_free_geteuid_is_root() {
        eprintln!("SKIPPED (needs non-root): permission-denied part of unreadable_files");
    } else {
        use std::os::unix::fs::PermissionsExt;
        let p = d.path().join("machines/locked.toml");
        fs_err::write(&p, "mac = \"52:54:00:00:00:0a\"\n").unwrap();
        fs_err::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
        want.push("machines/locked.toml: error: cannot read file: permission denied; make it readable by the user running corral".to_owned());
    }
    assert_eq!(lines(d.path()), want);
}

/// Whether we run as root, without `unsafe` (`libc::geteuid`): root owns /proc/self.
fn unsafe_free_geteuid_is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn template_missing_and_not_ipxe() {
    expect(
        &[("templates/discover.ipxe", None)],
        &[
            "profiles/discover.toml:11:17: error: iPXE template \"templates/discover.ipxe\" cannot be read (no such file); create it (paths are relative to the site directory) or fix boot.ipxe_template",
        ],
    );
    expect(
        &[("templates/discover.ipxe", Some("kernel x\nboot\n"))],
        &[
            "profiles/discover.toml:11:17: warning: iPXE template \"templates/discover.ipxe\" does not start with #!ipxe; iPXE will not run it as a script",
        ],
    );
}

#[test]
fn invalid_hostnames() {
    expect(
        &[
            (
                "machines/web01.toml",
                Some("mac = \"52:54:00:12:34:01\"\nprofile = \"debian\"\nhostname = \"-web\"\n"),
            ),
            (
                "machines/web_09.toml",
                Some("mac = \"52:54:00:12:34:09\"\nprofile = \"debian\"\n"),
            ),
        ],
        &[
            "machines/web01.toml:3:12: error: invalid hostname \"-web\": use letters, digits and hyphens, 1-63 characters per dot-separated label, not starting or ending with a hyphen",
            "machines/web_09.toml: error: file name \"web_09\" is not a valid hostname; rename the file or set hostname = \"...\"",
        ],
    );
}

#[test]
fn stray_files_warn_but_the_site_loads() {
    let d = site(&[
        ("machines/README.md", Some("notes")),
        ("machines/web01.toml~", Some("old")),
        ("machines/rack2/a.toml", Some("")),
        ("profiles/.swp", Some("hidden: ignored silently")),
    ]);
    let site = Site::load(d.path()).unwrap();
    let got: Vec<String> = site.warnings().iter().map(|p| p.to_string()).collect();
    assert_eq!(
        got,
        [
            "machines/README.md: warning: ignored: not a .toml file; rename it to NAME.toml if it should be loaded",
            "machines/rack2: warning: ignored: a directory where a .toml file is expected; machines/ holds one NAME.toml file per entry",
            "machines/web01.toml~: warning: ignored: not a .toml file; rename it to NAME.toml if it should be loaded",
        ]
    );
    assert_eq!(site.machines().count(), 3);
}

#[test]
fn unknown_after_and_bad_boot() {
    expect(
        &[(
            "profiles/debian.toml",
            Some("[boot]\ninitrd = \"x.img\"\n[install]\nafter = \"dance\"\n"),
        )],
        &[
            "profiles/debian.toml:1:1: error: [boot] boots nothing: give a kernel (and initrd) or an ipxe_template, or remove [boot] to boot from the local disk",
            "profiles/debian.toml:4:9: error: unknown install.after \"dance\": expected one of local, reboot, poweroff, stay",
        ],
    );
}

#[test]
fn every_problem_at_once_across_files() {
    let d = site(&[
        ("site.toml", Some("[dhcp]\nmode = \"full\"\nbogus = 1\n")),
        (
            "machines/web01.toml",
            Some("mac = \"nope\"\nprofile = \"debian\"\n"),
        ),
        (
            "machines/web02.toml",
            Some("mac = \"52:54:00:12:34:02\"\nprofile = \"ghost\"\n"),
        ),
        ("profiles/debian.toml", Some("[boot\n")),
    ]);
    let kinds: Vec<ProblemKind> = check(d.path()).iter().map(|p| p.kind).collect();
    assert_eq!(
        kinds,
        [
            ProblemKind::NoInterfaces,
            ProblemKind::NoNetworks,
            ProblemKind::UnknownKey,
            ProblemKind::Syntax,
            ProblemKind::MissingProfile,
            ProblemKind::BadMac,
            // web01's bad MAC does not hide its other problems.
            ProblemKind::MissingProfile,
            ProblemKind::MissingProfile,
        ],
        "{:#?}",
        lines(d.path())
    );
}

#[test]
fn valid_site_lookups() {
    let d = site(&[]);
    let site = Site::load(d.path()).unwrap();
    assert!(site.warnings().is_empty());
    assert_eq!(site.server.name, "lab");
    assert_eq!(
        site.server.interfaces,
        [InterfaceName::parse("eth1").unwrap()]
    );
    assert_eq!(site.server.advertise, Some("10.0.0.1".parse().unwrap()));
    assert_eq!(site.dhcp.mode, DhcpMode::Full);
    let net = &site.dhcp.networks[0];
    assert_eq!(net.cidr, "10.0.0.0/24".parse().unwrap());
    assert_eq!(net.lease, std::time::Duration::from_secs(12 * 3600));
    assert_eq!(net.pool.unwrap().len(), 100);
    assert_eq!(net.domain.as_ref().unwrap().as_str(), "lab.example");
    assert_eq!(site.paths.boot, d.path().join("boot"));
    assert_eq!(site.paths.ipxe, Path::new("/usr/lib/ipxe"));
    assert_eq!(site.store.path, d.path().join("state/corral.db"));
    assert_eq!(
        site.store.max_age,
        Some(std::time::Duration::from_secs(90 * 86400))
    );
    assert_eq!(site.store.max_events, Some(1_000_000));
    assert!(site.discovery.enrol);

    let mac: corral_model::MacAddr = "52:54:00:12:34:13".parse().unwrap();
    let db = site.machine_by_mac(&mac).unwrap();
    assert_eq!(db.name.as_str(), "db01");
    assert_eq!(db.hostname.as_str(), "db01.lab.example");
    assert_eq!(db.macs.len(), 2);
    assert_eq!(db.vars["disk"], "/dev/nvme0n1");
    assert_eq!(site.machine("web01").unwrap().hostname.as_str(), "web01");
    assert_eq!(site.machine("web01").unwrap().groups, ["web", "rack1"]);
    assert!(site.machine("nope").is_none());
    assert_eq!(
        site.network_for("10.0.0.77".parse().unwrap()).unwrap().name,
        "lab"
    );
    assert!(site.network_for("10.0.1.1".parse().unwrap()).is_none());

    let debian = site.profile("debian").unwrap();
    let boot = debian.boot.as_ref().unwrap();
    assert_eq!(boot.kernel.as_deref(), Some(Path::new("debian-12/vmlinuz")));
    assert_eq!(boot.initrd, [Path::new("debian-12/initrd.img")]);
    assert_eq!(debian.install.after, After::Local);
    let discover = site.profile("discover").unwrap();
    let t = discover
        .boot
        .as_ref()
        .unwrap()
        .ipxe_template
        .as_ref()
        .unwrap();
    assert!(t.text.starts_with("#!ipxe"));
    // Unknown machines get the discovery profile.
    let stranger: corral_model::MacAddr = "52:54:00:99:99:99".parse().unwrap();
    assert_eq!(
        site.profile_for_mac(&stranger).unwrap().name.as_str(),
        "discover"
    );
    assert_eq!(site.profile_for_mac(&mac).unwrap().name.as_str(), "debian");
}

#[test]
fn minimal_site_uses_defaults() {
    let d = tempfile::tempdir().unwrap();
    fs_err::write(d.path().join("site.toml"), "").unwrap();
    fs_err::create_dir_all(d.path().join("boot")).unwrap();
    fs_err::create_dir_all(d.path().join("images")).unwrap();
    fs_err::create_dir_all(d.path().join("trees")).unwrap();
    let site = Site::load(d.path()).unwrap();
    assert_eq!(site.server.http_port, DEFAULT_HTTP_PORT);
    assert_eq!(site.server.tftp_port, DEFAULT_TFTP_PORT);
    assert_eq!(site.dhcp.mode, DhcpMode::Off);
    assert!(site.server.interfaces.is_empty());
    assert_eq!(site.store.max_age, None);
    assert_eq!(site.machines().count(), 0);
    assert!(site.warnings().is_empty(), "{:?}", site.warnings());
}

#[test]
fn missing_paths_dirs_warn() {
    let d = tempfile::tempdir().unwrap();
    fs_err::write(
        d.path().join("site.toml"),
        "[paths]\nboot = \"/nonexistent/boot\"\n",
    )
    .unwrap();
    fs_err::create_dir_all(d.path().join("images")).unwrap();
    fs_err::create_dir_all(d.path().join("trees")).unwrap();
    let site = Site::load(d.path()).unwrap();
    let got: Vec<String> = site.warnings().iter().map(|p| p.to_string()).collect();
    assert_eq!(
        got,
        [
            "site.toml: warning: [paths] boot directory /nonexistent/boot does not exist; create it or change [paths] boot"
        ]
    );
}

#[test]
fn precedence_defaults_file_flags() {
    let d = site(&[]);
    // default < file
    let no_port = fs_err::read_to_string(d.path().join("site.toml"))
        .unwrap()
        .replace("http_port = 8080\n", "");
    fs_err::write(d.path().join("site.toml"), &no_port).unwrap();
    assert_eq!(
        Site::load(d.path()).unwrap().server.http_port,
        DEFAULT_HTTP_PORT
    );
    fs_err::write(
        d.path().join("site.toml"),
        no_port.replace("tftp_port = 69", "tftp_port = 69\nhttp_port = 8081"),
    )
    .unwrap();
    let file = Site::load(d.path()).unwrap();
    assert_eq!(file.server.http_port, 8081);
    // file < flags
    let flags = Overrides {
        http_port: Some(8082),
        interfaces: Some(vec![InterfaceName::parse("veth7").unwrap()]),
        ..Overrides::default()
    };
    let site = file.clone().with_overrides(&flags).unwrap();
    assert_eq!(site.server.http_port, 8082);
    assert_eq!(site.server.interfaces[0].as_str(), "veth7");
    assert_eq!(site.server.tftp_port, 69, "untouched by flags");
    // Flags are validated like the file.
    let err = file.clone().with_interfaces(vec![]).unwrap_err();
    assert_eq!(err.problems()[0].kind, ProblemKind::NoInterfaces);
    // And a handle keeps applying them across reloads.
    let h = SiteHandle::open(d.path(), flags).unwrap();
    assert_eq!(h.current().server.http_port, 8082);
    h.reload().unwrap();
    assert_eq!(h.current().server.http_port, 8082);
}

#[test]
fn reload_picks_up_a_valid_edit() {
    let d = site(&[]);
    let h = SiteHandle::open(d.path(), Overrides::default()).unwrap();
    let before = h.current();
    assert!(!h.changed());
    assert!(matches!(
        h.reload_if_changed().unwrap(),
        ReloadOutcome::Unchanged
    ));
    fs_err::write(
        d.path().join("machines/web03.toml"),
        "mac = \"52:54:00:12:34:04\"\nip = \"10.0.0.13\"\nprofile = \"debian\"\n",
    )
    .unwrap();
    assert!(h.changed());
    match h.reload_if_changed().unwrap() {
        ReloadOutcome::Swapped {
            previous,
            current,
            warnings,
        } => {
            assert!(std::sync::Arc::ptr_eq(&previous, &before));
            assert!(current.machine("web03").is_some());
            assert!(warnings.is_empty());
        }
        ReloadOutcome::Unchanged => panic!("edit not seen"),
    }
    assert!(h.current().machine("web03").is_some());
    // The old snapshot a reader still holds is untouched.
    assert!(before.machine("web03").is_none());
    assert!(!h.changed());
    // A clone sees the same site.
    assert!(h.clone().current().machine("web03").is_some());
}

#[test]
fn invalid_edit_leaves_the_old_site_in_force() {
    let d = site(&[]);
    let h = SiteHandle::open(d.path(), Overrides::default()).unwrap();
    fs_err::write(
        d.path().join("machines/web02.toml"),
        "mac = \"52:54:00:12:34:01\"\nprofile = \"debian\"\n",
    )
    .unwrap();
    assert!(h.changed());
    let err = h.reload_if_changed().unwrap_err();
    let SiteError::Invalid { problems, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].kind, ProblemKind::DuplicateMac);
    assert!(
        err.to_string()
            .ends_with("is invalid: 1 error(s), 0 warning(s)"),
        "{err}"
    );
    // Still the old web02.
    assert_eq!(
        h.current().machine("web02").unwrap().ip,
        Some("10.0.0.12".parse().unwrap())
    );
    // A broken edit is not re-parsed on every poll...
    assert!(!h.changed());
    // ...but fixing it is picked up.
    fs_err::write(
        d.path().join("machines/web02.toml"),
        "mac = \"52:54:00:12:34:02\"\nprofile = \"debian\"\nip = \"10.0.0.32\"\n",
    )
    .unwrap();
    assert!(matches!(
        h.reload_if_changed().unwrap(),
        ReloadOutcome::Swapped { .. }
    ));
    assert_eq!(
        h.current().machine("web02").unwrap().ip,
        Some("10.0.0.32".parse().unwrap())
    );
}

#[test]
fn template_edit_is_a_change() {
    let d = site(&[]);
    let h = SiteHandle::open(d.path(), Overrides::default()).unwrap();
    fs_err::write(
        d.path().join("templates/discover.ipxe"),
        "#!ipxe\necho changed and longer\n",
    )
    .unwrap();
    assert!(h.changed());
    h.reload().unwrap();
    let site = h.current();
    let t = site
        .profile("discover")
        .unwrap()
        .boot
        .as_ref()
        .unwrap()
        .ipxe_template
        .as_ref()
        .unwrap();
    assert!(t.text.contains("changed"));
}

#[test]
fn init_refuses_a_non_empty_dir_without_force() {
    let d = site(&[]);
    let err = init(d.path(), false).unwrap_err();
    assert!(matches!(err, SiteError::NotEmpty { .. }), "{err}");
    fs_err::write(d.path().join("site.toml"), "garbage [").unwrap();
    fs_err::write(d.path().join("notes.txt"), "mine").unwrap();
    let written = init(d.path(), true).unwrap();
    assert_eq!(written.len(), EXAMPLE_FILES.len());
    assert!(check(d.path()).is_empty());
    assert_eq!(
        fs_err::read_to_string(d.path().join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn example_dir_in_the_repo_is_clean() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/site");
    assert_eq!(check(&dir), Vec::<Problem>::new());
}

#[test]
fn string_checkers_report_locations() {
    let p = check_machine_str("web01", "mac = \"zz\"\nprofile = \"x\"\n");
    assert_eq!(
        p[0].to_string(),
        "machines/web01.toml:1:7: error: invalid MAC address \"zz\": expected six hex byte pairs like 52:54:00:12:34:56"
    );
    assert!(check_site_toml_str("").is_empty());
    assert!(check_profile_str("p", "[install]\nafter = \"local\"\n").is_empty());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Arbitrary text never panics the parsers (the fuzz target does the same with bytes).
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = check_site_toml_str(&text);
        let _ = check_machine_str("m", &text);
        let _ = check_profile_str("p", &text);
    }

    /// TOML-shaped text with our keys and random values never panics, and every problem it
    /// yields has a location inside the text.
    #[test]
    fn toml_shaped_text_never_panics(
        key in proptest::sample::select(vec!["mac", "ip", "profile", "hostname", "groups", "cidr", "pool", "mode", "lease"]),
        value in "[\"\\[\\]0-9a-f:.\\-/ ,]{0,40}",
        table in proptest::sample::select(vec!["", "[server]\n", "[dhcp]\n", "[[dhcp.network]]\n", "[store]\n", "[vars]\n", "[boot]\n"]),
    ) {
        let text = format!("{table}{key} = {value}\n");
        for p in check_site_toml_str(&text).into_iter().chain(check_machine_str("m", &text)) {
            if let Some(line) = p.line {
                proptest::prop_assert!(line <= text.lines().count() + 1, "{p}");
            }
        }
    }
}

#[test]
fn a_bad_value_does_not_hide_cross_file_problems() {
    expect(
        &[(
            "machines/web03.toml",
            Some(
                "mac = [\"52:54:00:12:34:01\", \"bad\"]\nip = \"10.0.0.12\"\nprofile = \"debain\"\n",
            ),
        )],
        &[
            "machines/web03.toml:1:8: error: MAC address 52:54:00:12:34:01 is also used by machine web01 (machines/web01.toml:3:7); each MAC may belong to one machine only",
            "machines/web03.toml:1:29: error: invalid MAC address \"bad\": expected six hex byte pairs like 52:54:00:12:34:56",
            "machines/web03.toml:2:6: error: address 10.0.0.12 is also given to machine web02 (machines/web02.toml:2:6); give each machine its own address",
            "machines/web03.toml:3:11: error: profile \"debain\" does not exist; create profiles/debain.toml or use one of: debian, discover",
        ],
    );
}

#[test]
fn structural_errors_inside_arrays_and_tables() {
    expect(
        &[
            (
                "site.toml",
                Some(
                    "[[dhcp.network]]\ncidr = \"10.0.0.0/24\"\nrange = \"x\"\n[[dhcp.network]]\ncidr = \"10.0.1.0/24\"\ndns = [\"10.0.1.1\", 53]\n",
                ),
            ),
            (
                "machines/web01.toml",
                Some(
                    "mac = \"52:54:00:12:34:01\"\nprofile = \"debian\"\n[vars]\ndisk = 1\nos = \"x\"\n",
                ),
            ),
        ],
        &[
            "site.toml:3:1: error: unknown key \"range\"; allowed keys here: name, cidr, gateway, dns, domain, pool, lease",
            "site.toml:6:20: error: wrong type: integer `53`, expected a string",
            "machines/web01.toml:4:8: error: wrong type: integer `1`, expected a string",
        ],
    );
}

mod trees {
    use std::path::Path;

    fn site_with(tree: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        crate::init(d.path(), true).unwrap();
        std::fs::write(d.path().join("trees/t.toml"), tree).unwrap();
        d
    }

    #[test]
    fn example_tree_loads() {
        let d = tempfile::tempdir().unwrap();
        crate::init(d.path(), true).unwrap();
        let t = crate::load_tree(d.path(), "web").unwrap();
        assert_eq!(t.source, Path::new("/srv/trees/web"));
        assert_eq!(t.children.len(), 3);
        assert!(t.children[2].recurse);
        assert_eq!(t.children[2].tree, "web");
        assert_eq!(t.children[0].state_dir, None);
        assert_eq!(
            t.children[1].state_dir.as_deref(),
            Some("/srv/corral-state")
        );
        assert_eq!(t.compress, crate::TreeCompress::Auto);
        assert!(crate::check(d.path()).iter().all(|p| !p.is_error()));
    }

    #[test]
    fn ssh_compress_is_parsed_and_a_bad_value_is_reported() {
        let child = "[[child]]\ndest = \"/x\"\n";
        let d = site_with(&format!("source = \"/a\"\n{child}"));
        assert_eq!(
            crate::load_tree(d.path(), "t").unwrap().compress,
            crate::TreeCompress::Auto,
            "absent: auto"
        );
        for (v, want) in [
            ("auto", crate::TreeCompress::Auto),
            ("always", crate::TreeCompress::Always),
            ("never", crate::TreeCompress::Never),
        ] {
            let d = site_with(&format!(
                "source = \"/a\"\n[ssh]\ncompress = \"{v}\"\n{child}"
            ));
            assert_eq!(crate::load_tree(d.path(), "t").unwrap().compress, want);
        }
        let d = site_with(&format!(
            "source = \"/a\"\n[ssh]\ncompress = \"fast\"\n{child}"
        ));
        let e = crate::load_tree(d.path(), "t").unwrap_err();
        assert!(
            e.iter()
                .any(|p| p.message.contains("compress = \"fast\"") && p.message.contains("never")),
            "{e:?}"
        );
    }

    /// Issue #5: a child's `state_dir` is kept as given when absolute, refused when relative.
    #[test]
    fn a_childs_state_dir_must_be_absolute() {
        let d = site_with(
            "source = \"/a\"\n[[child]]\nhost = \"h\"\ndest = \"/\"\nstate_dir = \"/srv/st\"\n",
        );
        let t = crate::load_tree(d.path(), "t").unwrap();
        assert_eq!(t.children[0].state_dir.as_deref(), Some("/srv/st"));
        let d = site_with(
            "source = \"/a\"\n[[child]]\nhost = \"h\"\ndest = \"/\"\nstate_dir = \"st\"\n",
        );
        let e = crate::load_tree(d.path(), "t").unwrap_err();
        assert!(
            e.iter()
                .any(|p| p.message.contains("state_dir = \"st\"") && p.message.contains("absolute")),
            "{e:?}"
        );
    }

    #[test]
    fn bad_trees_are_reported_by_check() {
        let d = site_with("source = \"relative\"\n[[child]]\ndest = \"x\"\n");
        let errs: Vec<_> = crate::check(d.path())
            .into_iter()
            .filter(|p| p.is_error())
            .collect();
        assert!(
            errs.iter().any(|p| p.message.contains("absolute")),
            "{errs:?}"
        );
        let d = site_with("source = \"/a\"\nbogus = 1\n");
        assert!(crate::load_tree(d.path(), "t").is_err());
        let d = site_with(
            "source = \"/a\"\n[[child]]\nhost = \"h\"\ndest = \"/\"\n[[child]]\nhost = \"h\"\ndest = \"/x\"\n",
        );
        let e = crate::load_tree(d.path(), "t").unwrap_err();
        assert!(
            e.iter().any(|p| p.message.contains("two children")),
            "{e:?}"
        );
        assert!(crate::load_tree(d.path(), "missing").is_err());
    }
}
