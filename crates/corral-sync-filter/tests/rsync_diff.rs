//! Differential test against the real rsync: random trees and random rule sets; `rsync -r -n -i`
//! (and `--delete` against a destination with extra files) must select exactly what
//! `Matcher::transfers` / `Matcher::may_delete` select when walked the way rsync walks.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests build real trees

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use corral_sync_filter::{FilterOption, MatchOptions, Matcher, Rules};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A tree: relative path -> is_dir.
type Tree = BTreeMap<String, bool>;

const NAMES: &[&str] = &[
    "a", "b", "foo", "bar", "x.o", "y.txt", "core", "a.bak", "sub", ".hid", "[x]", "Ab",
];

fn gen_universe(rng: &mut StdRng) -> Tree {
    fn rec(rng: &mut StdRng, prefix: &str, depth: usize, out: &mut Tree) {
        let n = rng.random_range(1..=5);
        let mut used = BTreeSet::new();
        for _ in 0..n {
            let name = NAMES[rng.random_range(0..NAMES.len())];
            if !used.insert(name) {
                continue;
            }
            let path = if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}/{name}")
            };
            let is_dir = depth < 3 && rng.random_bool(0.45);
            out.insert(path.clone(), is_dir);
            if is_dir {
                rec(rng, &path, depth + 1, out);
            }
        }
    }
    let mut t = Tree::new();
    rec(rng, "", 0, &mut t);
    t
}

/// A subset of `u` closed under parents.
fn subset(rng: &mut StdRng, u: &Tree, keep: f64) -> Tree {
    let mut out = Tree::new();
    for (p, &d) in u {
        let parent_ok = match p.rfind('/') {
            Some(i) => out.get(&p[..i]) == Some(&true),
            None => true,
        };
        if parent_ok && rng.random_bool(keep) {
            out.insert(p.clone(), d);
        }
    }
    out
}

fn gen_pattern(rng: &mut StdRng) -> String {
    let comps = rng.random_range(1..=3);
    let mut parts = Vec::new();
    for _ in 0..comps {
        let c = match rng.random_range(0..12) {
            0 => "*".to_owned(),
            1 => "?".to_owned(),
            2 => "*.o".to_owned(),
            3 => "[ab]*".to_owned(),
            4 => "**".to_owned(),
            5 => "f*".to_owned(),
            _ => NAMES[rng.random_range(0..NAMES.len())].replace('[', "\\["),
        };
        parts.push(c);
    }
    let mut p = parts.join("/");
    if rng.random_bool(0.1) {
        p.push_str("/***");
    }
    if rng.random_bool(0.3) {
        p.insert(0, '/');
    }
    if rng.random_bool(0.2) {
        p.push('/');
    }
    p
}

fn gen_rules(rng: &mut StdRng, delete: bool, allow_dir_merge: bool) -> Vec<String> {
    let prefixes: &[&str] = if delete {
        &[
            "- ", "+ ", "P ", "R ", "H ", "S ", "-s ", "-r ", "+r ", "-! ", "protect ", "risk ",
            "-p ", "hide ", "show ",
        ]
    } else {
        &[
            "- ", "+ ", "H ", "S ", "P ", "R ", "-! ", "+! ", "-s ", "-r ", "+s ", "exclude ",
            "include ", "-,! ", "+_",
        ]
    };
    let n = rng.random_range(1..=6);
    let mut rules = Vec::new();
    for _ in 0..n {
        let pre = prefixes[rng.random_range(0..prefixes.len())];
        rules.push(format!("{pre}{}", gen_pattern(rng)));
    }
    if allow_dir_merge && rng.random_bool(0.35) {
        let m = match rng.random_range(0..7) {
            0 => ": .rf",
            6 => ": /.rf", // like rsync's -F
            1 => "dir-merge,n .rf",
            2 => ":e .rf",
            3 => ":C .rf",
            4 => ":+ .rf",
            _ => ":- .rf",
        };
        let at = rng.random_range(0..=rules.len());
        rules.insert(at, m.to_owned());
    }
    rules
}

fn write_tree(root: &Path, t: &Tree) -> Result<()> {
    std::fs::create_dir_all(root)?;
    for (p, &d) in t {
        let full = root.join(p);
        if d {
            std::fs::create_dir_all(&full)?;
        } else {
            std::fs::write(&full, p.as_bytes())?;
        }
    }
    Ok(())
}

/// Files `.rf` in some directories of `t` (including the root ""), with random rules.
fn gen_merge_files(rng: &mut StdRng, t: &Tree, no_prefix: bool) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let dirs = std::iter::once(String::new()).chain(t.iter().filter(|e| *e.1).map(|e| e.0.clone()));
    for d in dirs {
        if !rng.random_bool(0.5) {
            continue;
        }
        let mut text = String::new();
        for _ in 0..rng.random_range(1..=3) {
            if no_prefix {
                text.push_str(&gen_pattern(rng));
            } else if rng.random_bool(0.1) {
                text.push('!');
            } else {
                let pre = ["- ", "+ ", "H ", "# comment ", "exclude "][rng.random_range(0..5)];
                text.push_str(pre);
                text.push_str(&gen_pattern(rng));
            }
            text.push('\n');
        }
        let path = if d.is_empty() {
            ".rf".to_owned()
        } else {
            format!("{d}/.rf")
        };
        out.insert(path, text);
    }
    out
}

fn run_rsync(src: &Path, dst: &Path, rules: &[String], extra: &[&str]) -> Result<Vec<String>> {
    let mut cmd = Command::new("rsync");
    cmd.arg("-r").arg("-i").args(extra);
    for r in rules {
        cmd.arg(format!("--filter={r}"));
    }
    cmd.arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()));
    let out = cmd.output().context("running rsync (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "rsync failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect())
}

/// The paths rsync itemized as transferred (`>f`, `cd`), skipping `*deleting` lines.
fn parse_itemized(lines: &[String]) -> BTreeSet<String> {
    let mut sent = BTreeSet::new();
    for l in lines {
        if l.starts_with("*deleting") {
            continue;
        } else if l.len() > 12 && l.as_bytes()[11] == b' ' {
            let name = l[12..].trim_end_matches('/');
            if name != "." && !name.is_empty() {
                sent.insert(name.to_owned());
            }
        }
    }
    sent
}

fn children<'a>(t: &'a Tree, dir: &str) -> Vec<(&'a String, bool)> {
    t.iter()
        .filter(|(p, _)| match p.rfind('/') {
            Some(i) => &p[..i] == dir,
            None => dir.is_empty(),
        })
        .map(|(p, &d)| (p, d))
        .collect()
}

fn reader(root: PathBuf) -> impl FnMut(&Path) -> Option<String> {
    move |rel: &Path| std::fs::read_to_string(root.join(rel)).ok()
}

/// Walk `t` as rsync's sender does and return what is transferred.
fn our_sent(t: &Tree, m: &Matcher, root: &Path) -> Result<BTreeSet<String>> {
    let mut read = reader(root.to_owned());
    let rootm = m.for_dir(Path::new(""), &mut read)?;
    let mut out = BTreeSet::new();
    let mut stack = vec![(String::new(), rootm)];
    while let Some((dir, dm)) = stack.pop() {
        for (p, is_dir) in children(t, &dir) {
            if !dm.transfers(Path::new(p), is_dir) {
                continue;
            }
            out.insert(p.clone());
            if is_dir {
                stack.push((p.clone(), dm.for_dir(Path::new(p), &mut read)?));
            }
        }
    }
    Ok(out)
}

/// What rsync --delete removes from `dst` given the sent set. The receiver's per-directory
/// merge files are those of the destination before the run (`dst_merge`).
fn our_deleted(
    dst: &Tree,
    sent: &BTreeSet<String>,
    m: &Matcher,
    dst_merge: &BTreeMap<String, String>,
) -> Result<BTreeSet<String>> {
    type Read<'a> = dyn FnMut(&Path) -> Option<String> + 'a;
    fn del_dir(
        dst: &Tree,
        dir: &str,
        m: &Matcher,
        read: &mut Read<'_>,
        out: &mut BTreeSet<String>,
    ) -> Result<bool> {
        let dm = m.for_dir(Path::new(dir), read)?;
        let mut empty = true;
        for (c, is_dir) in children(dst, dir) {
            if !dm.may_delete_within_deleted(Path::new(c), is_dir) {
                empty = false;
                continue;
            }
            if is_dir && !del_dir(dst, c, &dm, read, out)? {
                empty = false;
                continue;
            }
            out.insert(c.clone());
        }
        Ok(empty)
    }
    fn walk(
        dst: &Tree,
        sent: &BTreeSet<String>,
        dir: &str,
        dm: &Matcher,
        read: &mut Read<'_>,
        out: &mut BTreeSet<String>,
    ) -> Result<()> {
        for (c, is_dir) in children(dst, dir) {
            if sent.contains(c) {
                if is_dir {
                    let cm = dm.for_dir(Path::new(c), read)?;
                    walk(dst, sent, c, &cm, read, out)?;
                }
                continue;
            }
            if !dm.may_delete(Path::new(c), is_dir) {
                continue;
            }
            if is_dir && !del_dir(dst, c, dm, read, out)? {
                continue;
            }
            out.insert(c.clone());
        }
        Ok(())
    }
    let mut read = |p: &Path| dst_merge.get(p.to_str()?).cloned();
    let root = m.for_dir(Path::new(""), &mut read)?;
    let mut out = BTreeSet::new();
    walk(dst, sent, "", &root, &mut read, &mut out)?;
    Ok(out)
}

/// Run `f` for every seed in `seeds` on a few threads (rsync runs are mostly process start-up
/// and pipe waits); the first failure is returned.
fn run_cases(seeds: std::ops::Range<u64>, f: fn(u64) -> Result<()>) -> Result<()> {
    const THREADS: u64 = 4;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let seeds = seeds.clone();
                s.spawn(move || -> Result<()> {
                    for seed in seeds.skip(t as usize).step_by(THREADS as usize) {
                        f(seed)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("case thread panicked"))??;
        }
        Ok(())
    })
}

fn case_count(default: u64) -> u64 {
    std::env::var("FILTER_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rsync_available() -> bool {
    Command::new("rsync").arg("--version").output().is_ok()
}

fn one_case(seed: u64, delete: bool) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let universe = gen_universe(&mut rng);
    let src_t = subset(&mut rng, &universe, 0.85);
    let dst_t = subset(&mut rng, &universe, 0.6);
    let rules = gen_rules(&mut rng, delete, true);
    let delete_excluded = delete && rng.random_bool(0.25);
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    write_tree(&src, &src_t)?;
    let mut src_all = src_t.clone();
    if rules.iter().any(|r| r.contains(".rf")) {
        let no_prefix = rules
            .iter()
            .any(|r| [":- ", ":C ", ":+ "].iter().any(|p| r.starts_with(p)));
        for (p, text) in gen_merge_files(&mut rng, &src_t, no_prefix) {
            std::fs::write(src.join(&p), text)?;
            src_all.insert(p, false);
        }
    }
    let opts: Vec<FilterOption> = rules.iter().cloned().map(FilterOption::Filter).collect();
    let parsed = Rules::from_options(&opts).with_context(|| format!("parsing {rules:?}"))?;
    let m = Matcher::new(
        parsed,
        MatchOptions {
            delete_excluded,
            ..Default::default()
        },
    );
    let ours = our_sent(&src_all, &m, &src)?;
    let ctx = || format!("seed {seed}: rules {rules:?}\nsrc {src_all:?}\ndst {dst_t:?}");
    if delete {
        write_tree(&dst, &dst_t)?;
        let mut dst_t = dst_t.clone();
        let mut dst_merge = BTreeMap::new();
        if rules.iter().any(|r| r.contains(".rf")) {
            let no_prefix = rules
                .iter()
                .any(|r| [":- ", ":C ", ":+ "].iter().any(|p| r.starts_with(p)));
            for (p, text) in gen_merge_files(&mut rng, &dst_t.clone(), no_prefix) {
                std::fs::write(dst.join(&p), &text)?;
                dst_t.insert(p.clone(), false);
                dst_merge.insert(p, text);
            }
        }
        // A real run: `-n` reports non-empty subdirectories of a deleted directory as deleted
        // (its rmdir is skipped), so what is gone afterwards is the truth.
        let mut extra = vec!["--delete"];
        if delete_excluded {
            extra.push("--delete-excluded");
        }
        let lines = run_rsync(&src, &dst, &rules, &extra)?;
        let theirs: BTreeSet<String> = dst_t
            .keys()
            .filter(|p| std::fs::symlink_metadata(dst.join(p)).is_err())
            .cloned()
            .collect();
        let ours_del = our_deleted(&dst_t, &ours, &m, &dst_merge)?;
        if ours_del != theirs {
            bail!(
                "delete mismatch, delete_excluded={delete_excluded}\n{}\ndst merge files {dst_merge:?}\nrsync: {theirs:?}\nours:  {ours_del:?}\nrsync output: {lines:#?}",
                ctx()
            );
        }
    } else {
        let lines = run_rsync(&src, &dst, &rules, &["-n"])?;
        let theirs = parse_itemized(&lines);
        if ours != theirs {
            bail!(
                "transfer mismatch\n{}\nrsync: {theirs:?}\nours:  {ours:?}",
                ctx()
            );
        }
    }
    Ok(())
}

#[test]
fn differential_transfer_against_rsync() -> Result<()> {
    if !rsync_available() {
        eprintln!("SKIPPED differential_transfer_against_rsync: rsync not installed");
        return Ok(());
    }
    let n = case_count(150);
    run_cases(0..n, |seed| one_case(seed, false))
}

#[test]
fn differential_delete_against_rsync() -> Result<()> {
    if !rsync_available() {
        eprintln!("SKIPPED differential_delete_against_rsync: rsync not installed");
        return Ok(());
    }
    let n = case_count(80);
    run_cases(1_000_000..1_000_000 + n, |seed| one_case(seed, true))
}

/// One random command-line option: what rsync gets and what we get.
fn gen_option(rng: &mut StdRng, tmp: &Path, k: usize) -> Result<(String, FilterOption)> {
    let lines = |rng: &mut StdRng| {
        let mut text = String::new();
        for _ in 0..rng.random_range(1..=4) {
            let pre = ["", "", "+ ", "- ", "# c ", "; c "][rng.random_range(0..6)];
            text.push_str(pre);
            text.push_str(&gen_pattern(rng));
            text.push('\n');
        }
        text
    };
    Ok(match rng.random_range(0..11) {
        0 | 1 => {
            let p = gen_pattern(rng);
            let p = if rng.random_bool(0.2) {
                format!("+ {p}")
            } else {
                p
            };
            (format!("--exclude={p}"), FilterOption::Exclude(p))
        }
        2 | 3 => {
            let p = gen_pattern(rng);
            let p = if rng.random_bool(0.2) {
                format!("- {p}")
            } else {
                p
            };
            (format!("--include={p}"), FilterOption::Include(p))
        }
        4 => {
            let text = lines(rng);
            let f = tmp.join(format!("ex{k}"));
            std::fs::write(&f, &text)?;
            let name = f.display().to_string();
            (
                format!("--exclude-from={name}"),
                FilterOption::ExcludeFrom(text, name),
            )
        }
        5 => {
            let text = lines(rng);
            let f = tmp.join(format!("in{k}"));
            std::fs::write(&f, &text)?;
            let name = f.display().to_string();
            (
                format!("--include-from={name}"),
                FilterOption::IncludeFrom(text, name),
            )
        }
        6 => {
            // A merge file, full syntax, possibly with modifiers for its rules.
            let mut text = String::new();
            for _ in 0..rng.random_range(1..=3) {
                let pre = ["- ", "+ ", "H ", "S ", "# x", "include "][rng.random_range(0..6)];
                text.push_str(pre);
                text.push_str(&gen_pattern(rng));
                text.push('\n');
            }
            let f = tmp.join(format!("merge{k}"));
            std::fs::write(&f, &text)?;
            let how = [".", "merge", ".e", "merge,s"][rng.random_range(0..4)];
            let r = format!("{how} {}", f.display());
            (format!("--filter={r}"), FilterOption::Filter(r))
        }
        7 => {
            // A prefix-less merge file ("-" or "+" modifier), optionally word-split.
            let mut text = String::new();
            for _ in 0..rng.random_range(1..=3) {
                text.push_str(&gen_pattern(rng));
                text.push(if rng.random_bool(0.5) { ' ' } else { '\n' });
            }
            let f = tmp.join(format!("np{k}"));
            std::fs::write(&f, &text)?;
            let how = [".-w", ".+w", "merge,-", ".+"][rng.random_range(0..4)];
            let r = format!("{how} {}", f.display());
            (format!("--filter={r}"), FilterOption::Filter(r))
        }
        8 => {
            let r = ["-C", "!", "clear", "-Cs"][rng.random_range(0..4)].to_owned();
            (format!("--filter={r}"), FilterOption::Filter(r))
        }
        _ => {
            let r = format!("- {}", gen_pattern(rng));
            (format!("--filter={r}"), FilterOption::Filter(r))
        }
    })
}

fn one_option_case(seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let universe = gen_universe(&mut rng);
    let src_t = subset(&mut rng, &universe, 0.9);
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    write_tree(&src, &src_t)?;
    let mut args = Vec::new();
    let mut opts = Vec::new();
    for k in 0..rng.random_range(1..=5) {
        let (a, o) = gen_option(&mut rng, tmp.path(), k)?;
        args.push(a);
        opts.push(o);
    }
    let mut read = |p: &Path| std::fs::read_to_string(p).ok();
    let parsed = Rules::from_options_with(&opts, &mut read);
    let out = Command::new("rsync")
        .args(["-r", "-n", "-i"])
        .args(&args)
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", tmp.path().join("dst").display()))
        .output()?;
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            // We refuse the rules: rsync must refuse them too (syntax error, exit code 1).
            if out.status.code() != Some(1) {
                bail!("seed {seed}: we reject {args:?} ({e}) but rsync accepts them");
            }
            return Ok(());
        }
    };
    let m = Matcher::new(parsed, MatchOptions::default());
    let ours = our_sent(&src_t, &m, &src)?;
    if !out.status.success() {
        bail!(
            "seed {seed}: rsync failed on {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lines: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect();
    let theirs = parse_itemized(&lines);
    if ours != theirs {
        bail!(
            "seed {seed}: option mismatch\nargs {args:?}\nsrc {src_t:?}\nrsync: {theirs:?}\nours:  {ours:?}"
        );
    }
    Ok(())
}

#[test]
fn differential_options_against_rsync() -> Result<()> {
    if !rsync_available() {
        eprintln!("SKIPPED differential_options_against_rsync: rsync not installed");
        return Ok(());
    }
    let n = case_count(100);
    run_cases(2_000_000..2_000_000 + n, one_option_case)
}

/// The ISP seed's exclude file (`exclude.example` in the XS4ALL paper) on a system-like tree,
/// as `--exclude-from`, and again with `--delete` against a child with local files.
#[test]
fn isp_seed_exclude_file_matches_rsync() -> Result<()> {
    if !rsync_available() {
        eprintln!("SKIPPED isp_seed_exclude_file_matches_rsync: rsync not installed");
        return Ok(());
    }
    let exclude =
        "/tmp\n/var/mail\n/var/log\n/etc/rc.conf\n+ /var/db/\n+ /var/db/pkg/\n/var/db/*\n";
    let tree: Tree = [
        ("etc", true),
        ("etc/rc.conf", false),
        ("etc/hosts", false),
        ("etc/rc.d", true),
        ("etc/rc.d/rc.conf", false),
        ("tmp", true),
        ("tmp/x", false),
        ("var", true),
        ("var/mail", true),
        ("var/mail/root", false),
        ("var/log", true),
        ("var/log/messages", false),
        ("var/db", true),
        ("var/db/pkg", true),
        ("var/db/pkg/openssh", true),
        ("var/db/pkg/openssh/+CONTENTS", false),
        ("var/db/locate.database", false),
        ("var/db/mysql", true),
        ("var/db/mysql/ibdata", false),
        ("usr", true),
        ("usr/tmp", true),
        ("usr/tmp/keep", false),
        ("usr/local", true),
        ("usr/local/var", true),
        ("usr/local/var/log", false),
    ]
    .into_iter()
    .map(|(p, d)| (p.to_owned(), d))
    .collect();
    let child: Tree = [
        ("etc", true),
        ("etc/rc.conf", false),
        ("etc/local.conf", false),
        ("tmp", true),
        ("tmp/session", false),
        ("var", true),
        ("var/db", true),
        ("var/db/dhcp.leases", false),
        ("var/db/pkg", true),
        ("var/db/pkg/stale", true),
        ("var/db/pkg/stale/+CONTENTS", false),
        ("var/log", true),
        ("var/log/auth.log", false),
        ("usr", true),
        ("usr/old", false),
    ]
    .into_iter()
    .map(|(p, d)| (p.to_owned(), d))
    .collect();
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    let exfile = tmp.path().join("exclude.example");
    std::fs::write(&exfile, exclude)?;
    write_tree(&src, &tree)?;
    write_tree(&dst, &child)?;
    let rules = Rules::from_options(&[FilterOption::ExcludeFrom(
        exclude.to_owned(),
        "exclude.example".to_owned(),
    )])?;
    let m = Matcher::new(rules, MatchOptions::default());
    let ours = our_sent(&tree, &m, &src)?;
    let expect: BTreeSet<String> = [
        "etc",
        "etc/hosts",
        "etc/rc.d",
        "etc/rc.d/rc.conf",
        "var",
        "var/db",
        "var/db/pkg",
        "var/db/pkg/openssh",
        "var/db/pkg/openssh/+CONTENTS",
        "usr",
        "usr/tmp",
        "usr/tmp/keep",
        "usr/local",
        "usr/local/var",
        "usr/local/var/log",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(ours, expect, "our selection of the seed's exclude file");
    let ex = format!("--exclude-from={}", exfile.display());
    let out = Command::new("rsync")
        .args(["-r", "-i", "--delete", &ex])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect();
    // rsync itemizes what it changed; files already equal would be missing, so compare the
    // selection with what exists after the run instead: everything we send exists.
    for p in &ours {
        assert!(dst.join(p).exists(), "rsync did not create {p}: {lines:?}");
    }
    let theirs_deleted: BTreeSet<String> = child
        .keys()
        .filter(|p| std::fs::symlink_metadata(dst.join(p)).is_err())
        .cloned()
        .collect();
    let ours_deleted = our_deleted(&child, &ours, &m, &BTreeMap::new())?;
    assert_eq!(ours_deleted, theirs_deleted, "deletions: {lines:?}");
    // Local configuration the exclude file names survives on the child.
    for keep in [
        "etc/rc.conf",
        "tmp/session",
        "var/log/auth.log",
        "var/db/dhcp.leases",
    ] {
        assert!(dst.join(keep).exists(), "{keep} must be protected");
    }
    // Not excluded, not on the master: deleted.
    for gone in ["etc/local.conf", "usr/old", "var/db/pkg/stale"] {
        assert!(!dst.join(gone).exists(), "{gone} must be deleted");
    }
    Ok(())
}
