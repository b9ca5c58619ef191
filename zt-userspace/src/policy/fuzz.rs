//! Property test of the parser: on arbitrary bytes and on random TOML-ish text,
//! [`load_sources`] never panics, and every diagnostic points inside the input
//! (`path:line:column` with the line and column within the text).

use std::io;
use std::path::{Path, PathBuf};

use super::*;

/// Resolves everything, so that validation goes as far as it can.
struct Everything;

impl Resolve for Everything {
    fn uid_of(&self, _: &str) -> Option<u32> {
        Some(1000)
    }
    fn gid_of(&self, _: &str) -> Option<u32> {
        Some(1000)
    }
    fn exe(&self, _: &Path) -> io::Result<ExeKey> {
        Ok(ExeKey { dev: 1, ino: 2 })
    }
    fn cgroup_id(&self, rel: &str) -> io::Result<u64> {
        if rel.starts_with('/') || rel.contains("..") || rel.is_empty() {
            Err(io::Error::from(io::ErrorKind::InvalidInput))
        } else {
            Ok(rel.len() as u64 + 10)
        }
    }
}

/// xorshift64*: small, deterministic, good enough to pick tokens.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const TOKENS: &[&str] = &[
    "version",
    "mode",
    "identity",
    "network",
    "rule",
    "action",
    "direction",
    "peer",
    "ports",
    "proto",
    "cidrs",
    "exe",
    "uid",
    "gid",
    "user",
    "group",
    "cgroup",
    "raw",
    "log",
    "web",
    "any",
    "\"enforce\"",
    "\"audit\"",
    "\"allow\"",
    "\"deny\"",
    "\"ingress\"",
    "\"egress\"",
    "\"tcp\"",
    "\"udp\"",
    "\"icmp\"",
    "\"any\"",
    "\"web\"",
    "\"lan\"",
    "\"10.0.0.0/8\"",
    "\"::/0\"",
    "\"::ffff:10.0.0.0/104\"",
    "\"127.0.0.1\"",
    "\"1-65535\"",
    "\"80-\"",
    "\"/usr/bin/x\"",
    "\"a/b\"",
    "\"/abs\"",
    "\"..\"",
    "1",
    "0",
    "-1",
    "65536",
    "99999999999999999999",
    "1.5",
    "true",
    "false",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    ",",
    ".",
    "\"",
    "'",
    "\n",
    "\n",
    "\n",
    " ",
    " ",
    "\t",
    "#",
    "é",
    "\u{0}",
    "\r\n",
    "\"\"\"",
    "[identity.web]",
    "[network.lan]",
    "[[rule]]",
    "version = 1\n",
    "identity = \"web\"\n",
    "peer = \"lan\"\n",
    "ports = [80, \"8000-8100\"]\n",
    "action = \"allow\"\n",
    "uid = 33\n",
    "cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]\n",
];

/// Checks that loading `text` neither panics nor reports a position outside it.
fn check(text: &str) {
    let path = PathBuf::from("f.toml");
    let sources = vec![(path.clone(), text.to_string())];
    let diags = match load_sources(&sources, &Everything) {
        Ok((_, warnings)) => warnings,
        Err(errors) => {
            assert!(!errors.is_empty());
            errors
        }
    };
    let lines: Vec<&str> = text.split('\n').collect();
    for d in &diags {
        assert_eq!(d.path, path, "{d}");
        assert!(
            d.line >= 1 && d.line <= lines.len(),
            "line out of range: {d}\n--- input ---\n{text:?}"
        );
        let width = lines[d.line - 1].chars().count();
        assert!(
            d.column >= 1 && d.column <= width + 1,
            "column out of range: {d}\n--- input ---\n{text:?}"
        );
        let shown = d.to_string();
        assert!(
            shown.starts_with(&format!("f.toml:{}:{}: ", d.line, d.column)),
            "{shown}"
        );
    }
}

fn seed() -> u64 {
    std::env::var("ZT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001)
}

#[test]
fn arbitrary_bytes_never_panic() {
    let seed = seed();
    let mut rng = Rng(seed | 1);
    for case in 0..2000 {
        let len = rng.below(200);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let r = std::panic::catch_unwind(|| check(&text));
        assert!(r.is_ok(), "seed {seed} case {case}: {text:?}");
    }
}

#[test]
fn toml_ish_text_never_panics() {
    let seed = seed();
    let mut rng = Rng(seed | 1);
    for case in 0..2000 {
        let mut text = String::new();
        if rng.below(4) != 0 {
            text.push_str("version = 1\n");
        }
        for _ in 0..rng.below(60) {
            let tok = rng.pick(TOKENS);
            text.push_str(tok);
            if rng.below(3) == 0 {
                text.push(' ');
            }
        }
        // Sometimes cut the text anywhere (on a char boundary).
        if rng.below(5) == 0 && !text.is_empty() {
            let mut at = rng.below(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text.truncate(at);
        }
        let r = std::panic::catch_unwind(|| check(&text));
        assert!(r.is_ok(), "seed {seed} case {case}: {text:?}");
    }
}

#[test]
fn structured_policies_never_panic() {
    // Well-formed skeletons with random values: reaches validation, not only the parser.
    let seed = seed();
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let values = [
        "\"allow\"",
        "\"deny\"",
        "\"x\"",
        "1",
        "[]",
        "[80]",
        "[0]",
        "[\"1-2\"]",
        "[\"2-1\"]",
        "[65535, 65536]",
        "\"tcp\"",
        "\"icmp\"",
        "\"web\"",
        "\"any\"",
        "\"lan\"",
        "\"10.0.0.0/33\"",
        "\"::ffff:1.2.3.4\"",
        "\"ingress\"",
        "true",
        "{}",
        "\"\"",
    ];
    let keys = [
        "action",
        "identity",
        "peer",
        "ports",
        "proto",
        "direction",
        "log",
        "mode",
        "cidrs",
        "uid",
        "user",
        "gid",
        "group",
        "exe",
        "cgroup",
        "raw",
        "zzz",
    ];
    for case in 0..2000 {
        let mut text = String::from("version = 1\n");
        for _ in 0..rng.below(6) {
            let table = rng.pick(&["[identity.web]", "[network.lan]", "[[rule]]", "[x]"]);
            text.push_str(table);
            text.push('\n');
            for _ in 0..rng.below(6) {
                let k = rng.pick(&keys);
                let v = rng.pick(&values);
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        let r = std::panic::catch_unwind(|| check(&text));
        assert!(r.is_ok(), "seed {seed} case {case}:\n{text}");
    }
}
