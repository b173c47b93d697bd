//! Group membership for the caller check, read from the host's account files.

use std::fs;

/// Whether `uid` is in group `group`, as its primary group or as a listed member.
pub fn in_group(uid: u32, group: &str) -> bool {
    let (Ok(passwd), Ok(groups)) = (
        fs::read_to_string("/etc/passwd"),
        fs::read_to_string("/etc/group"),
    ) else {
        return false;
    };
    let Some((user, primary)) = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[2].parse() == Ok(uid)).then(|| (f[0].to_string(), f[3].to_string()))
    }) else {
        return false;
    };
    groups.lines().any(|l| {
        let f: Vec<&str> = l.split(':').collect();
        f.len() > 3 && f[0] == group && (f[2] == primary || f[3].split(',').any(|m| m == user))
    })
}
