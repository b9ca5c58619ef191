//! `sha256` and `unit` identities, and how a disabled identity compiles.

use std::io;
use std::path::{Path, PathBuf};

use super::*;

const GOOD: [u8; 32] = [0xab; 32];

/// `/bin/good` hashes to [`GOOD`], `/bin/other` to something else; `web.service` runs in
/// `system.slice/web.service` (id 7000).
struct Sys {
    lenient: bool,
}

impl Resolve for Sys {
    fn uid_of(&self, user: &str) -> Option<u32> {
        (user == "www").then_some(33)
    }
    fn gid_of(&self, _: &str) -> Option<u32> {
        None
    }
    fn exe(&self, path: &Path) -> io::Result<ExeKey> {
        self.exe_hashed(path).map(|(k, _)| k)
    }
    fn cgroup_id(&self, _: &str) -> io::Result<u64> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    }
    fn exe_hashed(&self, path: &Path) -> io::Result<(ExeKey, [u8; 32])> {
        match path.to_str() {
            Some("/bin/good") => Ok((
                ExeKey {
                    dev: 8 << 20,
                    ino: 10,
                },
                GOOD,
            )),
            Some("/bin/other") => Ok((
                ExeKey {
                    dev: 8 << 20,
                    ino: 11,
                },
                [1; 32],
            )),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
    fn unit_cgroup(&self, unit: &str) -> io::Result<(String, u64)> {
        match unit {
            "web.service" => Ok(("system.slice/web.service".into(), 7000)),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }
    fn lenient(&self) -> bool {
        self.lenient
    }
}

fn load_one(text: &str, lenient: bool) -> Result<(Policy, Vec<Diagnostic>), Vec<Diagnostic>> {
    load_sources(
        &[(PathBuf::from("p.toml"), text.to_string())],
        &Sys { lenient },
    )
}

fn policy(identity: &str) -> String {
    format!(
        "version = 1\n[identity.a]\n{identity}\n[[rule]]\naction = \"allow\"\nidentity = \"a\"\npeer = \"10.0.0.1\"\n"
    )
}

const GOOD_HEX: &str = "abababababababababababababababababababababababababababababababab";

#[test]
fn sha256_that_matches_pins_the_file() {
    let (p, warnings) = load_one(
        &policy(&format!("exe = \"/bin/good\"\nsha256 = \"{GOOD_HEX}\"")),
        false,
    )
    .expect("valid");
    assert!(warnings.is_empty(), "{warnings:?}");
    let id = &p.identities()[0];
    assert_eq!(id.sha256, Some(GOOD));
    assert!(id.problem.is_none() && id.matchable());
    let c = compile(&p).expect("compile");
    assert_eq!(c.exes.len(), 1);
    assert!(c.identities[0].matchable);
}

#[test]
fn sha256_mismatch_disables_the_identity() {
    let (p, warnings) = load_one(
        &policy(&format!(
            "exe = \"/bin/other\"\nsha256 = \"{}\"",
            GOOD_HEX.to_uppercase()
        )),
        false,
    )
    .expect("a mismatch is not a load error");
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].to_string().contains("sha256 mismatch"),
        "{}",
        warnings[0]
    );
    let id = &p.identities()[0];
    assert!(!id.matchable());
    let c = compile(&p).expect("compile");
    assert!(c.exes.is_empty(), "no map entry: it matches nothing");
    assert_eq!(c.config.exe_wildcard & (1 << 1), 0, "not a wildcard either");
    assert!(c.identities[0]
        .problem
        .as_deref()
        .unwrap_or("")
        .contains("sha256 mismatch"));
}

#[test]
fn sha256_needs_exe_and_hex() {
    let errs =
        load_one(&policy(&format!("uid = 1\nsha256 = \"{GOOD_HEX}\"")), false).expect_err("no exe");
    assert!(
        errs.iter().any(|d| d.to_string().contains("but no `exe`")),
        "{errs:?}"
    );
    let errs =
        load_one(&policy("exe = \"/bin/good\"\nsha256 = \"abc\""), false).expect_err("short");
    assert!(
        errs.iter().any(|d| d.to_string().contains("64 hex digits")),
        "{errs:?}"
    );
}

#[test]
fn missing_exe_fails_a_load_but_disables_on_re_resolution() {
    let text = policy("exe = \"/bin/gone\"");
    let errs = load_one(&text, false).expect_err("strict");
    assert!(errs
        .iter()
        .any(|d| d.to_string().contains("does not exist")));
    let (p, _) = load_one(&text, true).expect("lenient");
    assert!(p.identities()[0].problem.is_some());
    let c = compile(&p).expect("compile");
    assert!(c.exes.is_empty() && c.exe_paths.is_empty());
}

#[test]
fn units_resolve_to_their_cgroup() {
    let (p, _) = load_one(&policy("unit = \"web.service\"\nuser = \"www\""), false).expect("valid");
    let id = &p.identities()[0];
    assert_eq!(
        id.cgroup,
        Some(CgroupMatch {
            path: "system.slice/web.service".into(),
            level: 2,
            id: Some(7000)
        })
    );
    assert_eq!((id.uid, id.user_name.as_deref()), (Some(33), Some("www")));
    let c = compile(&p).expect("compile");
    assert_eq!(c.cgroups, vec![(7000, 1 << 1)]);
    assert_eq!(c.config.cgroup_levels, 1 << 2);

    let (p, warnings) = load_one(&policy("unit = \"db.service\""), false).expect("not running");
    assert!(warnings
        .iter()
        .any(|w| w.to_string().contains("has no cgroup now")));
    assert!(!p.identities()[0].matchable());
    assert!(compile(&p).expect("compile").cgroups.is_empty());
}

#[test]
fn bad_units_are_refused() {
    for (unit, want) in [
        ("nginx", "has no cgroup of its own"),
        ("a.socket", "has no cgroup of its own"),
        ("a/b.service", "not a systemd unit name"),
        ("", "not a systemd unit name"),
    ] {
        let errs = load_one(&policy(&format!("unit = \"{unit}\"")), false).expect_err(unit);
        assert!(
            errs.iter().any(|d| d.to_string().contains(want)),
            "{unit}: {errs:?}"
        );
    }
    let errs =
        load_one(&policy("unit = \"web.service\"\ncgroup = \"x\""), false).expect_err("both");
    assert!(errs
        .iter()
        .any(|d| d.to_string().contains("both `unit` and `cgroup`")));
}

#[test]
fn user_units_name_their_user() {
    let (p, _) = load_one(&policy("user_unit = \"1000:sync.service\""), false).expect("valid");
    let id = &p.identities()[0];
    assert_eq!(id.unit.as_deref(), Some("user@1000.service/sync.service"));
    for (value, want, column) in [
        ("sync.service", "must be \"UID:NAME\"", 13),
        ("alice:sync.service", "is not a numeric uid", 13),
        ("1000:sync", "has no cgroup of its own", 13),
        ("1000:a/b.service", "not a systemd unit name", 13),
    ] {
        let errs = load_one(&policy(&format!("user_unit = \"{value}\"")), false).expect_err(value);
        let d = errs
            .iter()
            .find(|d| d.to_string().contains(want))
            .unwrap_or_else(|| panic!("{value}: {errs:?}"));
        // `path:line:column` of the value.
        assert_eq!(d.column, column, "{value}: {d}");
    }
    let errs = load_one(
        &policy("unit = \"web.service\"\nuser_unit = \"1000:web.service\""),
        false,
    )
    .expect_err("both");
    assert!(errs
        .iter()
        .any(|d| d.to_string().contains("both `unit` and `user_unit`")));
}
