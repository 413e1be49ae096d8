//! User and group names from `/etc/passwd` and `/etc/group` (read once; no NSS, so names
//! served only by LDAP and the like are not mapped: ids are then compared by number).

use std::collections::HashMap;
use std::sync::OnceLock;

#[derive(Debug, Default)]
struct Db {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
    uids: HashMap<String, u32>,
    gids: HashMap<String, u32>,
}

fn parse(text: &str) -> (HashMap<u32, String>, HashMap<String, u32>) {
    let mut by_id = HashMap::new();
    let mut by_name = HashMap::new();
    for line in text.lines() {
        let mut f = line.split(':');
        let (Some(name), Some(_), Some(id)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if let Ok(id) = id.parse::<u32>() {
            by_id.entry(id).or_insert_with(|| name.to_string());
            by_name.entry(name.to_string()).or_insert(id);
        }
    }
    (by_id, by_name)
}

fn db() -> &'static Db {
    static DB: OnceLock<Db> = OnceLock::new();
    DB.get_or_init(|| {
        let p = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let g = std::fs::read_to_string("/etc/group").unwrap_or_default();
        let (users, uids) = parse(&p);
        let (groups, gids) = parse(&g);
        Db {
            users,
            groups,
            uids,
            gids,
        }
    })
}

/// The name of user `uid`.
pub(crate) fn user_name(uid: u32) -> Option<String> {
    db().users.get(&uid).cloned()
}
/// The name of group `gid`.
pub(crate) fn group_name(gid: u32) -> Option<String> {
    db().groups.get(&gid).cloned()
}
/// The local uid for a name, else the sender's number.
pub(crate) fn local_uid(name: Option<&str>, uid: u32) -> u32 {
    name.and_then(|n| db().uids.get(n).copied()).unwrap_or(uid)
}
/// The local gid for a name, else the sender's number.
pub(crate) fn local_gid(name: Option<&str>, gid: u32) -> u32 {
    name.and_then(|n| db().gids.get(n).copied()).unwrap_or(gid)
}
