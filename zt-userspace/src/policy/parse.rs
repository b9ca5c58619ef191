//! Reading policy files and turning one file's TOML into a syntax tree with positions.
//!
//! Everything that can be checked by looking at one file alone is checked here (syntax, keys,
//! types, values, CIDRs, ports), so that each problem is reported at the key or value that
//! caused it. Names across files and the running system are [`super::validate`]'s job.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};
use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;
use zt_common::MAX_CGROUP_LEVEL;

use super::diag::{closest, Diagnostic, LineIndex, Loc};
use super::{Action, Direction, Mode, PortRange, ProtoMatch, POLICY_VERSION};

/// A value and where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct At<T> {
    pub v: T,
    pub loc: Loc,
}

/// A user or group, by name or by number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Account {
    Name(String),
    Id(u32),
}

/// A cgroup path relative to the cgroup2 root, normalized (`a/b`, no empty or `.` parts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CgroupPath {
    pub rel: String,
    pub level: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IdentityAst {
    pub name: String,
    pub loc: Loc,
    pub exe: Option<At<PathBuf>>,
    pub user: Option<At<Account>>,
    pub group: Option<At<Account>>,
    pub cgroup: Option<At<CgroupPath>>,
    /// `sha256 = "..."`: the pinned content hash of `exe`.
    pub sha256: Option<At<[u8; 32]>>,
    /// `unit = "nginx.service"`: a systemd unit, matched by its cgroup.
    pub unit: Option<At<String>>,
    /// `raw = true`.
    pub raw: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NetworkAst {
    pub name: String,
    pub loc: Loc,
    pub cidrs: Vec<IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PeerAst {
    Any,
    Name(String),
    Cidr(IpNet),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RuleAst {
    pub loc: Loc,
    /// `None`: missing or invalid (already reported).
    pub action: Option<Action>,
    pub direction: Direction,
    /// `None`: `any`.
    pub identity: Option<At<String>>,
    pub identity_name: String,
    /// `None`: missing or invalid (already reported).
    pub peer: Option<At<PeerAst>>,
    pub peer_text: String,
    pub ports: Option<Vec<PortRange>>,
    pub proto: ProtoMatch,
    pub log: bool,
}

/// One file, checked on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileAst {
    pub path: PathBuf,
    pub mode: Mode,
    pub identities: Vec<IdentityAst>,
    pub networks: Vec<NetworkAst>,
    pub rules: Vec<RuleAst>,
}

const TOP_KEYS: &[&str] = &["version", "mode", "identity", "network", "rule"];
const IDENTITY_KEYS: &[&str] = &[
    "exe",
    "sha256",
    "user",
    "uid",
    "group",
    "gid",
    "cgroup",
    "unit",
    "user_unit",
    "raw",
];
/// The identity keys that select processes (`raw` only grants a permission, `sha256` only
/// constrains `exe`).
const MATCHING_KEYS: &[&str] = &[
    "exe",
    "user",
    "uid",
    "group",
    "gid",
    "cgroup",
    "unit",
    "user_unit",
];
const NETWORK_KEYS: &[&str] = &["cidrs"];
const RULE_KEYS: &[&str] = &[
    "action",
    "direction",
    "identity",
    "peer",
    "ports",
    "proto",
    "log",
];

/// The policy files named by `paths`, in policy order: a file as given, a directory as its
/// `*.toml` files sorted by name (non-recursive; hidden files skipped, as the shell glob does).
pub(crate) fn discover(paths: &[PathBuf], diags: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    if paths.is_empty() {
        diags.push(Diagnostic::error(
            Path::new(""),
            Loc::START,
            "no policy path given: name a policy file or a directory of *.toml files",
        ));
    }
    let mut files = Vec::new();
    for path in paths {
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) => {
                diags.push(Diagnostic::error(path, Loc::START, unreadable(&e)));
                continue;
            }
        };
        if !meta.is_dir() {
            files.push(path.clone());
            continue;
        }
        let entries = match fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) => {
                diags.push(Diagnostic::error(path, Loc::START, unreadable(&e)));
                continue;
            }
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    diags.push(Diagnostic::error(path, Loc::START, unreadable(&e)));
                    continue;
                }
            };
            let name = entry.file_name();
            let name_str = name.to_string_lossy();
            if name_str.starts_with('.') || !name_str.ends_with(".toml") {
                continue;
            }
            let file = entry.path();
            // Follow symlinks; skip directories and other non-files named *.toml.
            match fs::metadata(&file) {
                Ok(m) if m.is_file() => found.push((name, file)),
                Ok(_) => {}
                Err(e) => diags.push(Diagnostic::error(&file, Loc::START, unreadable(&e))),
            }
        }
        if found.is_empty() {
            diags.push(Diagnostic::error(
                path,
                Loc::START,
                "no *.toml files in this policy directory: put the policy in NAME.toml files \
                 here (hidden files and subdirectories are ignored)",
            ));
        }
        found.sort();
        files.extend(found.into_iter().map(|(_, file)| file));
    }
    // The same file named twice (e.g. a file and its directory) is read once.
    let mut seen = HashSet::new();
    files.retain(|f| seen.insert(fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
    files
}

fn unreadable(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "policy path does not exist: check the path".to_string(),
        io::ErrorKind::PermissionDenied => {
            format!("cannot read policy path ({e}): check its permissions")
        }
        _ => format!("cannot read policy path: {e}"),
    }
}

/// The text of a policy file.
pub(crate) fn read_source(path: &Path) -> Result<String, Diagnostic> {
    let bytes = fs::read(path).map_err(|e| Diagnostic::error(path, Loc::START, unreadable(&e)))?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let prefix = String::from_utf8_lossy(&bytes[..valid]);
        let loc = LineIndex::new(&prefix).loc(valid);
        Diagnostic::error(path, loc, "file is not valid UTF-8: save it as UTF-8 text")
    })
}

/// Parses and checks one file. `None` when it is not valid TOML (the syntax error is reported,
/// the file's semantic checks are skipped).
pub(crate) fn parse_file(path: &Path, text: &str, diags: &mut Vec<Diagnostic>) -> Option<FileAst> {
    if text.len() >= CHUNKED_ABOVE {
        if let Some(file) = parse_chunked(path, text, diags) {
            return Some(file);
        }
    }
    parse_whole(path, text, diags)
}

/// [`parse_file`] in one piece.
fn parse_whole(path: &Path, text: &str, diags: &mut Vec<Diagnostic>) -> Option<FileAst> {
    let mut cx = Cx {
        path,
        lines: LineIndex::new(text),
        diags,
        offset: 0,
    };
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let loc = e.span().map_or(Loc::START, |s| cx.lines.span(&s));
            let mut message = e.message().trim().replace('\n', ", ");
            if message.starts_with("duplicate key") {
                message.push_str(
                    " (a key or [table] may appear only once in a file; write [[rule]] for each \
                     rule)",
                );
            }
            cx.diags.push(Diagnostic::error(
                path,
                loc,
                format!("TOML syntax error: {message}"),
            ));
            return None;
        }
    };
    Some(cx.file(root.get_ref()))
}

/// Files this big are parsed in pieces (see [`parse_chunked`]).
const CHUNKED_ABOVE: usize = 1 << 20;
/// `[[rule]]` sections per piece.
const RULES_PER_CHUNK: usize = 1024;

/// A big file as the part before its first `[[rule]]` line, then pieces of
/// [`RULES_PER_CHUNK`] rules, each parsed on its own: the TOML tree of 100k rules would take
/// hundreds of MiB (the rules' syntax tree is a few dozen bytes each). Exactly the result of
/// parsing the whole file, or `None` (then the whole file is parsed, for its diagnostics):
/// whenever a piece does not parse, holds anything but `[[rule]]` tables, or the first part
/// has a `rule` key of its own. A cut in a wrong place (a `[[rule]]` line inside a multi-line
/// string or array) leaves an unterminated string or array, which does not parse.
fn parse_chunked(path: &Path, text: &str, diags: &mut Vec<Diagnostic>) -> Option<FileAst> {
    let mut cuts = Vec::new();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let code = line.split('#').next().unwrap_or("").trim();
        if code == "[[rule]]" {
            cuts.push(at);
        }
        at += line.len();
    }
    let first = *cuts.first()?;
    let mut local = Vec::new();
    let mut cx = Cx {
        path,
        lines: LineIndex::new(text),
        diags: &mut local,
        offset: 0,
    };
    let prelude = DeTable::parse(&text[..first]).ok()?;
    if prelude.get_ref().contains_key("rule") {
        return None;
    }
    let mut file = cx.file(prelude.get_ref());
    drop(prelude);
    let mut starts: Vec<usize> = cuts.iter().step_by(RULES_PER_CHUNK).copied().collect();
    starts.push(text.len());
    for w in starts.windows(2) {
        let (a, b) = (w[0], w[1]);
        let root = DeTable::parse(&text[a..b]).ok()?;
        let root = root.get_ref();
        if root.len() != 1 {
            return None;
        }
        let rules = root.get("rule")?.get_ref().as_array()?;
        cx.offset = a;
        for r in rules {
            let t = r.get_ref().as_table()?;
            let rule = cx.rule(r.span(), t);
            file.rules.push(rule);
        }
    }
    diags.append(&mut local);
    Some(file)
}

type Entry<'t, 'i> = (&'t Spanned<DeString<'i>>, &'t Spanned<DeValue<'i>>);

/// The entries of a table in the order they were written.
fn entries<'t, 'i>(table: &'t DeTable<'i>) -> Vec<Entry<'t, 'i>> {
    let mut v: Vec<Entry<'t, 'i>> = table.iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

struct Cx<'a> {
    path: &'a Path,
    lines: LineIndex<'a>,
    diags: &'a mut Vec<Diagnostic>,
    /// Where the parsed text starts in the file (spans are relative to it).
    offset: usize,
}

impl Cx<'_> {
    fn loc(&self, span: Range<usize>) -> Loc {
        self.lines
            .span(&(span.start + self.offset..span.end + self.offset))
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let loc = self.loc(span);
        self.diags.push(Diagnostic::error(self.path, loc, message));
    }

    fn error_at(&mut self, loc: Loc, message: impl Into<String>) {
        self.diags.push(Diagnostic::error(self.path, loc, message));
    }

    /// Reports keys outside `allowed`; returns the entries with known keys.
    fn known<'t, 'i>(
        &mut self,
        table: &'t DeTable<'i>,
        allowed: &[&str],
        context: &str,
    ) -> Vec<Entry<'t, 'i>> {
        let mut known = Vec::new();
        for (k, v) in entries(table) {
            if allowed.contains(&k.get_ref().as_ref()) {
                known.push((k, v));
                continue;
            }
            let hint = closest(k.get_ref(), allowed.iter().copied())
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            self.error(
                k.span(),
                format!(
                    "unknown key `{}` in {context}{hint}; allowed keys: {}",
                    k.get_ref(),
                    allowed.join(", ")
                ),
            );
        }
        known
    }

    fn wrong_type(&mut self, key: &str, v: &Spanned<DeValue<'_>>, expected: &str, hint: &str) {
        let found = v.get_ref().type_str();
        let article = if found.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        self.error(
            v.span(),
            format!("`{key}` must be {expected}, not {article} {found}{hint}"),
        );
    }

    fn string<'v>(
        &mut self,
        key: &str,
        v: &'v Spanned<DeValue<'_>>,
        hint: &str,
    ) -> Option<&'v str> {
        let s = v.get_ref().as_str();
        if s.is_none() {
            self.wrong_type(key, v, "a string", hint);
        }
        s
    }

    fn integer(&mut self, key: &str, v: &Spanned<DeValue<'_>>, hint: &str) -> Option<i128> {
        match v.get_ref().as_integer() {
            // Too large for i128 cannot be a valid value anyway.
            Some(i) => Some(i128::from_str_radix(i.as_str(), i.radix()).unwrap_or(i128::MAX)),
            None => {
                self.wrong_type(key, v, "an integer", hint);
                None
            }
        }
    }

    fn file(&mut self, root: &DeTable<'_>) -> FileAst {
        let mut file = FileAst {
            path: self.path.to_path_buf(),
            mode: Mode::Enforce,
            identities: Vec::new(),
            networks: Vec::new(),
            rules: Vec::new(),
        };
        let mut version = false;
        for (k, v) in self.known(root, TOP_KEYS, "the policy file") {
            match k.get_ref().as_ref() {
                "version" => {
                    version = true;
                    match self.integer("version", v, ": write version = 1") {
                        Some(n) if n == i128::from(POLICY_VERSION) => {}
                        Some(n) => self.error(
                            v.span(),
                            format!(
                                "unsupported policy version {n}: this zt reads version = \
                                 {POLICY_VERSION}"
                            ),
                        ),
                        None => {}
                    }
                }
                "mode" => {
                    if let Some(s) = self.string("mode", v, "") {
                        match s {
                            "enforce" => file.mode = Mode::Enforce,
                            "audit" => file.mode = Mode::Audit,
                            _ => self.error(
                                v.span(),
                                format!("invalid mode `{s}`: use \"enforce\" or \"audit\""),
                            ),
                        }
                    }
                }
                "identity" => match v.get_ref().as_table() {
                    Some(t) => {
                        for (name, body) in entries(t) {
                            if let Some(id) = self.identity(name, body) {
                                file.identities.push(id);
                            }
                        }
                    }
                    None => self.wrong_type(
                        "identity",
                        v,
                        "a table of named identities",
                        " (write [identity.NAME] sections)",
                    ),
                },
                "network" => match v.get_ref().as_table() {
                    Some(t) => {
                        for (name, body) in entries(t) {
                            if let Some(net) = self.network(name, body) {
                                file.networks.push(net);
                            }
                        }
                    }
                    None => self.wrong_type(
                        "network",
                        v,
                        "a table of named networks",
                        " (write [network.NAME] sections)",
                    ),
                },
                "rule" => match v.get_ref().as_array() {
                    Some(rules) => {
                        for r in rules {
                            match r.get_ref().as_table() {
                                Some(t) => {
                                    let rule = self.rule(r.span(), t);
                                    file.rules.push(rule);
                                }
                                None => self.wrong_type(
                                    "rule",
                                    r,
                                    "a table",
                                    " (write one [[rule]] section per rule)",
                                ),
                            }
                        }
                    }
                    None => self.wrong_type(
                        "rule",
                        v,
                        "an array of tables",
                        " (write [[rule]], with double brackets, for each rule)",
                    ),
                },
                _ => {}
            }
        }
        if !version {
            self.error(
                0..0,
                "missing `version`: add `version = 1` at the top of the file",
            );
        }
        file
    }

    /// Checks a declared name; reports and returns false if it cannot be used.
    fn name(&mut self, kind: &str, name: &Spanned<DeString<'_>>) -> bool {
        let n = name.get_ref().as_ref();
        if n.is_empty() {
            self.error(name.span(), format!("{kind} name is empty: give it a name"));
            false
        } else if n == "any" {
            self.error(
                name.span(),
                format!(
                    "`any` is a reserved name (it means every {}); choose another {kind} name",
                    if kind == "identity" {
                        "process"
                    } else {
                        "address"
                    }
                ),
            );
            false
        } else if kind == "network" && looks_like_address(n) {
            self.error(
                name.span(),
                format!(
                    "network name `{n}` looks like an address, so rules could not tell them \
                     apart: choose a name with letters"
                ),
            );
            false
        } else {
            true
        }
    }

    fn identity(
        &mut self,
        name: &Spanned<DeString<'_>>,
        body: &Spanned<DeValue<'_>>,
    ) -> Option<IdentityAst> {
        let name_ok = self.name("identity", name);
        let n = name.get_ref().as_ref();
        let Some(table) = body.get_ref().as_table() else {
            if IDENTITY_KEYS.contains(&n) {
                self.error(
                    name.span(),
                    format!(
                        "`{n}` is directly under [identity], but identities need a name: write \
                         [identity.NAME] and put `{n}` under it"
                    ),
                );
                return None;
            }
            self.wrong_type(
                &format!("identity.{n}"),
                body,
                "a table",
                &format!(
                    " (write [identity.{n}] with keys {})",
                    IDENTITY_KEYS.join(", ")
                ),
            );
            return None;
        };
        let mut id = IdentityAst {
            name: n.to_string(),
            loc: self.loc(name.span()),
            exe: None,
            user: None,
            group: None,
            cgroup: None,
            sha256: None,
            unit: None,
            raw: false,
        };
        let known = self.known(table, IDENTITY_KEYS, &format!("identity `{n}`"));
        if known.is_empty() {
            self.error(
                name.span(),
                format!(
                    "identity `{n}` has no keys, so it would match every process: give at least \
                     one of {}, or write identity = \"any\" in the rules instead",
                    MATCHING_KEYS.join(", ")
                ),
            );
        } else if !known
            .iter()
            .any(|(k, _)| MATCHING_KEYS.contains(&k.get_ref().as_ref()))
        {
            self.error(
                name.span(),
                format!(
                    "identity `{n}` has no matching key, so it would match every process: `raw` \
                     only grants a permission and does not select processes; give at least one \
                     of {}",
                    MATCHING_KEYS.join(", ")
                ),
            );
        }
        let mut user_key: Option<&str> = None;
        let mut group_key: Option<&str> = None;
        for (k, v) in known {
            let key = k.get_ref().as_ref();
            let loc = self.loc(v.span());
            match key {
                "exe" => {
                    if let Some(s) = self.string("exe", v, "") {
                        if s.starts_with('/') {
                            id.exe = Some(At {
                                v: PathBuf::from(s),
                                loc,
                            });
                        } else {
                            self.error(
                                v.span(),
                                format!(
                                    "exe `{s}` is not an absolute path: write the full path of \
                                     the executable, e.g. /usr/sbin/nginx"
                                ),
                            );
                        }
                    }
                }
                "user" | "group" => {
                    let numeric = if key == "user" { "uid" } else { "gid" };
                    let hint = format!(" (for a numeric id write {numeric} = N)");
                    if let Some(s) = self.string(key, v, &hint) {
                        if s.is_empty() {
                            self.error(v.span(), format!("`{key}` is empty: give a {key} name"));
                        } else {
                            let acc = Some(At {
                                v: Account::Name(s.to_string()),
                                loc,
                            });
                            self.account(key, k, acc, &mut id, &mut user_key, &mut group_key);
                        }
                    }
                }
                "uid" | "gid" => {
                    let named = if key == "uid" { "user" } else { "group" };
                    let hint = format!(" (for a {named} name write {named} = \"NAME\")");
                    if let Some(n) = self.integer(key, v, &hint) {
                        match u32::try_from(n) {
                            Ok(n) if n != u32::MAX => {
                                let acc = Some(At {
                                    v: Account::Id(n),
                                    loc,
                                });
                                self.account(key, k, acc, &mut id, &mut user_key, &mut group_key);
                            }
                            _ => self.error(
                                v.span(),
                                format!("{key} {n} is out of range: use 0 to 4294967294"),
                            ),
                        }
                    }
                }
                "cgroup" => {
                    if let Some(s) = self.string("cgroup", v, "") {
                        match cgroup_path(s) {
                            Ok(c) => id.cgroup = Some(At { v: c, loc }),
                            Err(msg) => self.error(v.span(), msg),
                        }
                    }
                }
                "sha256" => {
                    if let Some(s) = self.string("sha256", v, "") {
                        match sha256_hex(s) {
                            Some(h) => id.sha256 = Some(At { v: h, loc }),
                            None => self.error(
                                v.span(),
                                format!(
                                    "sha256 `{s}` is not a SHA-256 digest: write the 64 hex \
                                     digits `sha256sum FILE` prints"
                                ),
                            ),
                        }
                    }
                }
                "unit" => {
                    if let Some(s) = self.string("unit", v, "") {
                        match unit_name(s) {
                            Ok(()) if id.unit.is_some() => self.error(
                                v.span(),
                                format!("identity `{n}` has both `unit` and `user_unit`: keep one"),
                            ),
                            Ok(()) => {
                                id.unit = Some(At {
                                    v: s.to_string(),
                                    loc,
                                })
                            }
                            Err(msg) => self.error(v.span(), msg),
                        }
                    }
                }
                "user_unit" => {
                    if let Some(s) = self.string("user_unit", v, "") {
                        match user_unit(s) {
                            Ok(key) if id.unit.is_none() => id.unit = Some(At { v: key, loc }),
                            Ok(_) => self.error(
                                v.span(),
                                format!("identity `{n}` has both `unit` and `user_unit`: keep one"),
                            ),
                            Err(msg) => self.error(v.span(), msg),
                        }
                    }
                }
                "raw" => match v.get_ref().as_bool() {
                    Some(b) => id.raw = b,
                    None => self.wrong_type(
                        "raw",
                        v,
                        "a boolean",
                        " (raw = true lets the identity create raw sockets)",
                    ),
                },
                _ => {}
            }
        }
        if let (Some(sha), None) = (&id.sha256, &id.exe) {
            self.error_at(
                sha.loc,
                format!(
                    "identity `{n}` has `sha256` but no `exe`: sha256 pins the content of the \
                     executable; add exe = \"/path/to/it\" or remove sha256"
                ),
            );
        }
        if let (Some(unit), Some(_)) = (&id.unit, &id.cgroup) {
            self.error_at(
                unit.loc,
                format!(
                    "identity `{n}` has both `unit` and `cgroup`: a unit is matched by its \
                     cgroup; keep only one of them"
                ),
            );
        }
        name_ok.then_some(id)
    }

    /// Stores a user/uid or group/gid, reporting when both forms are given.
    fn account<'k>(
        &mut self,
        key: &'k str,
        k: &Spanned<DeString<'_>>,
        acc: Option<At<Account>>,
        id: &mut IdentityAst,
        user_key: &mut Option<&'k str>,
        group_key: &mut Option<&'k str>,
    ) {
        let (slot, first) = if key == "user" || key == "uid" {
            (&mut id.user, user_key)
        } else {
            (&mut id.group, group_key)
        };
        match first {
            Some(other) => {
                let other = *other;
                self.error(
                    k.span(),
                    format!("both `{other}` and `{key}` are given: keep only one of them"),
                );
            }
            None => {
                *first = Some(key);
                *slot = acc;
            }
        }
    }

    fn network(
        &mut self,
        name: &Spanned<DeString<'_>>,
        body: &Spanned<DeValue<'_>>,
    ) -> Option<NetworkAst> {
        let name_ok = self.name("network", name);
        let n = name.get_ref().as_ref();
        let Some(table) = body.get_ref().as_table() else {
            if NETWORK_KEYS.contains(&n) {
                self.error(
                    name.span(),
                    format!(
                        "`{n}` is directly under [network], but networks need a name: write \
                         [network.NAME] and put `{n}` under it"
                    ),
                );
                return None;
            }
            self.wrong_type(
                &format!("network.{n}"),
                body,
                "a table",
                &format!(" (write [network.{n}] with cidrs = [...])"),
            );
            return None;
        };
        let mut net = NetworkAst {
            name: n.to_string(),
            loc: self.loc(name.span()),
            cidrs: Vec::new(),
        };
        let mut has_cidrs = false;
        for (_, v) in self.known(table, NETWORK_KEYS, &format!("network `{n}`")) {
            has_cidrs = true;
            let Some(items) = v.get_ref().as_array() else {
                self.wrong_type(
                    "cidrs",
                    v,
                    "an array of strings",
                    " (e.g. cidrs = [\"10.0.2.0/24\"])",
                );
                continue;
            };
            if items.is_empty() {
                self.error(
                    v.span(),
                    "`cidrs` is empty: list at least one CIDR or address",
                );
            }
            for item in items {
                if let Some(s) = self.string("cidrs", item, " (quote each CIDR)") {
                    match parse_cidr(s) {
                        Ok(c) if !net.cidrs.contains(&c) => net.cidrs.push(c),
                        Ok(_) => {}
                        Err(msg) => self.error(item.span(), msg),
                    }
                }
            }
        }
        if !has_cidrs {
            self.error(
                name.span(),
                format!("network `{n}` has no `cidrs`: add cidrs = [\"10.0.0.0/24\", ...]"),
            );
        }
        name_ok.then_some(net)
    }

    fn rule(&mut self, span: Range<usize>, table: &DeTable<'_>) -> RuleAst {
        let mut rule = RuleAst {
            loc: self.loc(span.clone()),
            action: None,
            direction: Direction::Egress,
            identity: None,
            identity_name: "any".to_string(),
            peer: None,
            peer_text: String::new(),
            ports: None,
            proto: ProtoMatch::Any,
            log: false,
        };
        let (mut has_action, mut has_peer) = (false, false);
        let mut ports_span = None;
        for (k, v) in self.known(table, RULE_KEYS, "[[rule]]") {
            let loc = self.loc(v.span());
            match k.get_ref().as_ref() {
                "action" => {
                    has_action = true;
                    if let Some(s) = self.string("action", v, "") {
                        match s {
                            "allow" => rule.action = Some(Action::Allow),
                            "deny" => rule.action = Some(Action::Deny),
                            _ => self.error(
                                v.span(),
                                format!("invalid action `{s}`: use \"allow\" or \"deny\""),
                            ),
                        }
                    }
                }
                "direction" => {
                    if let Some(s) = self.string("direction", v, "") {
                        match s {
                            "egress" => rule.direction = Direction::Egress,
                            "ingress" => rule.direction = Direction::Ingress,
                            _ => self.error(
                                v.span(),
                                format!(
                                    "invalid direction `{s}`: use \"egress\" (outgoing, the \
                                     default) or \"ingress\" (incoming)"
                                ),
                            ),
                        }
                    }
                }
                "identity" => {
                    if let Some(s) = self.string("identity", v, "") {
                        rule.identity_name = s.to_string();
                        if s != "any" {
                            rule.identity = Some(At {
                                v: s.to_string(),
                                loc,
                            });
                        }
                    }
                }
                "peer" => {
                    has_peer = true;
                    if let Some(s) = self.string("peer", v, "") {
                        rule.peer_text = s.to_string();
                        let peer = if s == "any" {
                            Some(PeerAst::Any)
                        } else if looks_like_address(s) {
                            match parse_cidr(s) {
                                Ok(c) => Some(PeerAst::Cidr(c)),
                                Err(msg) => {
                                    self.error(v.span(), msg);
                                    None
                                }
                            }
                        } else if s.is_empty() {
                            self.error(
                                v.span(),
                                "`peer` is empty: use \"any\", a network name, or a CIDR",
                            );
                            None
                        } else {
                            Some(PeerAst::Name(s.to_string()))
                        };
                        rule.peer = peer.map(|v| At { v, loc });
                    }
                }
                "ports" => {
                    ports_span = Some(v.span());
                    rule.ports = self.ports(v);
                }
                "proto" => {
                    if let Some(s) = self.string("proto", v, "") {
                        match s {
                            "tcp" => rule.proto = ProtoMatch::Tcp,
                            "udp" => rule.proto = ProtoMatch::Udp,
                            "icmp" => rule.proto = ProtoMatch::Icmp,
                            "any" => rule.proto = ProtoMatch::Any,
                            "icmpv6" | "icmp6" | "ipv6-icmp" | "ping" => self.error(
                                v.span(),
                                format!(
                                    "invalid proto `{s}`: write \"icmp\", which covers ICMP and \
                                     ICMPv6"
                                ),
                            ),
                            _ => self.error(
                                v.span(),
                                format!(
                                    "invalid proto `{s}`: use \"tcp\", \"udp\", \"icmp\" or \
                                     \"any\" (any without ports covers every protocol)"
                                ),
                            ),
                        }
                    }
                }
                "log" => match v.get_ref().as_bool() {
                    Some(b) => rule.log = b,
                    None => self.wrong_type("log", v, "a boolean", " (true or false)"),
                },
                _ => {}
            }
        }
        if let (ProtoMatch::Icmp, Some(ports)) = (rule.proto, ports_span) {
            self.error(
                ports,
                "`ports` cannot be used with proto = \"icmp\": ICMP has no ports; remove \
                 `ports` (an icmp rule covers all ICMP and ICMPv6 traffic with its peer)",
            );
            rule.ports = None;
        }
        if !has_action {
            self.error(
                span.clone(),
                "rule is missing `action`: add action = \"allow\" or action = \"deny\"",
            );
        }
        if !has_peer {
            self.error(
                span,
                "rule is missing `peer`: add peer = \"any\", a network name, or a CIDR",
            );
        }
        rule
    }

    fn ports(&mut self, v: &Spanned<DeValue<'_>>) -> Option<Vec<PortRange>> {
        let Some(items) = v.get_ref().as_array() else {
            self.wrong_type(
                "ports",
                v,
                "an array",
                " (e.g. ports = [443] or ports = [80, \"8000-8100\"]; leave it out for every \
                 port)",
            );
            return None;
        };
        if items.is_empty() {
            self.error(
                v.span(),
                "`ports` is empty, so the rule would match nothing: list ports or leave `ports` \
                 out to match every port",
            );
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            let range = match item.get_ref() {
                DeValue::Integer(i) => {
                    let n = i128::from_str_radix(i.as_str(), i.radix()).unwrap_or(i128::MAX);
                    match u16::try_from(n) {
                        Ok(p) if p >= 1 => Ok(PortRange { first: p, last: p }),
                        _ => Err(format!("port {n} is out of range: ports are 1 to 65535")),
                    }
                }
                DeValue::String(s) => parse_port_range(s),
                _ => {
                    self.wrong_type(
                        "ports",
                        item,
                        "a list of port numbers or \"first-last\" strings",
                        "",
                    );
                    ok = false;
                    continue;
                }
            };
            match range {
                Ok(r) => out.push(r),
                Err(msg) => {
                    self.error(item.span(), msg);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }
}

/// Whether a peer string is meant as an address/CIDR rather than a network name.
pub(crate) fn looks_like_address(s: &str) -> bool {
    s.contains('/')
        || s.contains(':')
        || (!s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// Parses `"a-b"` (or a single port as a string).
pub(crate) fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let bad = || {
        format!(
            "bad port range `{s}`: write \"first-last\" with 1 <= first <= last <= 65535, \
             e.g. \"8000-8100\""
        )
    };
    let port = |t: &str| -> Result<u16, String> {
        let t = t.trim();
        let n: u64 = t.parse().map_err(|_| bad())?;
        match u16::try_from(n) {
            Ok(p) if p >= 1 => Ok(p),
            _ => Err(format!(
                "port {n} in `{s}` is out of range: ports are 1 to 65535"
            )),
        }
    };
    let (first, last) = match s.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if first > last {
        return Err(format!(
            "port range `{s}` is reversed: write \"{last}-{first}\""
        ));
    }
    Ok(PortRange { first, last })
}

/// Parses a CIDR or a plain address (a host: /32 or /128). Host bits must be clear;
/// IPv4-mapped IPv6 (`::ffff:a.b.c.d/N`, N >= 96) becomes the IPv4 CIDR.
pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        let net = IpNet::from_str(s).map_err(|_| {
            format!("`{s}` is not a valid CIDR: write e.g. \"10.0.0.0/24\" or \"fd00::/64\"")
        })?;
        if net != net.trunc() {
            return Err(format!(
                "`{s}` has host bits set: the network address is {}; write that, or {}/{} for \
                 the single host",
                net.trunc(),
                net.addr(),
                net.max_prefix_len()
            ));
        }
        net
    } else {
        let addr = IpAddr::from_str(s).map_err(|_| {
            format!(
                "`{s}` is not a valid address or CIDR: write e.g. \"10.0.0.1\" or \"10.0.0.0/24\""
            )
        })?;
        IpNet::from(addr)
    };
    Ok(unmap(net))
}

/// `::ffff:a.b.c.d/N` (N >= 96) → `a.b.c.d/(N-96)`; anything else unchanged.
fn unmap(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if v6.prefix_len() >= 96 {
            if let Some(v4) = v6.addr().to_ipv4_mapped() {
                if let Ok(n) = Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n);
                }
            }
        }
    }
    net
}

/// A SHA-256 digest written as 64 hex digits (either case).
pub(crate) fn sha256_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Checks a systemd unit name whose cgroup zt can match (`.service`, `.scope`, `.slice`).
pub(crate) fn unit_name(s: &str) -> Result<(), String> {
    let valid_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '\\' | '@' | '-'));
    if s.is_empty() || !valid_chars || s.starts_with('.') {
        return Err(format!(
            "unit `{s}` is not a systemd unit name: write it as systemctl shows it, e.g. \
             \"nginx.service\""
        ));
    }
    if ![".service", ".scope", ".slice"]
        .iter()
        .any(|suffix| s.len() > suffix.len() && s.ends_with(suffix))
    {
        return Err(format!(
            "unit `{s}` has no cgroup of its own: zt matches .service, .scope and .slice units \
             (write e.g. \"nginx.service\")"
        ));
    }
    Ok(())
}

/// Checks `user_unit = "UID:NAME"` (a unit of user UID's systemd manager) and returns the
/// key [`super::resolve::find_unit`] takes: `user@UID.service/NAME`.
pub(crate) fn user_unit(s: &str) -> Result<String, String> {
    let Some((uid, name)) = s.split_once(':') else {
        return Err(format!(
            "user_unit `{s}` must be \"UID:NAME\": the numeric uid of the user whose systemd \
             manager runs the unit, and the unit's name, e.g. \"1000:syncthing.service\""
        ));
    };
    let uid: u32 = uid.parse().map_err(|_| {
        format!(
            "user_unit `{s}`: `{uid}` is not a numeric uid (write e.g. \"1000:{name}\"; \
             `id -u USER` prints it)"
        )
    })?;
    unit_name(name).map_err(|m| format!("user_unit `{s}`: {m}"))?;
    Ok(super::resolve::user_unit_key(uid, name))
}

/// Normalizes a cgroup path relative to the cgroup2 root.
pub(crate) fn cgroup_path(s: &str) -> Result<CgroupPath, String> {
    let parts: Vec<&str> = s
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if s.starts_with('/') {
        return Err(format!(
            "cgroup `{s}` is absolute: write it relative to the cgroup2 root, e.g. \"{}\"",
            parts.join("/")
        ));
    }
    if parts.contains(&"..") {
        return Err(format!(
            "cgroup `{s}` contains `..`: write the path below the cgroup2 root without `..`"
        ));
    }
    if parts.is_empty() {
        return Err(
            "cgroup names the cgroup2 root, which holds every process: name a cgroup below it \
             (e.g. \"system.slice/nginx.service\") or leave `cgroup` out"
                .to_string(),
        );
    }
    let level = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    if level >= MAX_CGROUP_LEVEL {
        return Err(format!(
            "cgroup `{s}` is {level} levels deep; zt matches cgroups at most {} levels below \
             the root: name a shallower ancestor",
            MAX_CGROUP_LEVEL - 1
        ));
    }
    Ok(CgroupPath {
        rel: parts.join("/"),
        level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test CIDR")
    }

    /// A policy of `n` rules after a prelude; `bad`: the rule whose CIDR is invalid.
    fn big(n: usize, bad: Option<usize>) -> String {
        let mut t = String::from("version = 1\nmode = \"audit\"\n[identity.web]\nuid = 7\n");
        for i in 0..n {
            let peer = if Some(i) == bad {
                "10.0.0.300".to_string()
            } else {
                format!("10.{}.{}.0/24", i >> 8 & 0xff, i & 0xff)
            };
            t.push_str(&format!(
                "[[rule]] # {i}\naction = \"allow\"\nidentity = \"web\"\npeer = \"{peer}\"\nports = [{}, \"8000-8100\"]\n",
                1 + i % 60000
            ));
        }
        t
    }

    #[test]
    fn big_files_parse_in_pieces_exactly_as_a_whole() {
        let path = Path::new("big.toml");
        for bad in [None, Some(0), Some(5_000), Some(29_999)] {
            let text = big(30_000, bad);
            assert!(text.len() >= CHUNKED_ABOVE);
            let (mut d1, mut d2) = (Vec::new(), Vec::new());
            let pieces = parse_chunked(path, &text, &mut d1).expect("parsed in pieces");
            let whole = parse_whole(path, &text, &mut d2).expect("parsed");
            assert_eq!(pieces, whole);
            assert_eq!(d1, d2);
            assert_eq!(d1.is_empty(), bad.is_none(), "{d1:?}");
            assert_eq!(pieces.rules.len(), 30_000);
        }
    }

    #[test]
    fn big_files_that_do_not_cut_cleanly_are_parsed_whole() {
        let path = Path::new("big.toml");
        let base = big(30_000, None);
        // A syntax error in the middle, a `[[rule]]` line inside a multi-line string where a
        // piece would start (rule 1023's peer is named `[[rule]]`: valid TOML), a table after
        // the rules, a `rule` key before them.
        let cases = [
            base.replacen(
                "action = \"allow\"\nidentity",
                "action = \"allow\nidentity",
                7_000,
            ),
            base.replacen(
                "peer = \"10.3.255.0/24\"",
                "peer = \"\"\"\n[[rule]]\n\"\"\"",
                1,
            ),
            format!("{base}[network.late]\ncidrs = [\"10.0.0.0/8\"]\n"),
            base.replacen("[identity.web]", "rule = []\n[identity.web]", 1),
        ];
        for (i, text) in cases.iter().enumerate() {
            let (mut d, mut d1, mut d2) = (Vec::new(), Vec::new(), Vec::new());
            let whole = parse_whole(path, text, &mut d2);
            let chunked = parse_chunked(path, text, &mut d);
            assert!(i == 0 || chunked.is_none(), "case {i}: parsed whole");
            match chunked {
                None => assert!(d.is_empty(), "case {i}: a fallback reports nothing itself"),
                Some(pieces) => {
                    assert_eq!(Some(pieces), whole, "case {i}");
                    assert_eq!(d, d2, "case {i}");
                }
            }
            assert_eq!(parse_file(path, text, &mut d1), whole, "case {i}");
            assert_eq!(d1, d2, "case {i}");
        }
    }

    #[test]
    fn cidrs_and_addresses() {
        assert_eq!(parse_cidr("10.0.2.0/24"), Ok(net("10.0.2.0/24")));
        assert_eq!(parse_cidr("10.0.0.1"), Ok(net("10.0.0.1/32")));
        assert_eq!(parse_cidr("::1"), Ok(net("::1/128")));
        assert_eq!(parse_cidr("fd00:2::/64"), Ok(net("fd00:2::/64")));
        let e = parse_cidr("10.0.0.1/24").expect_err("host bits");
        assert!(e.contains("10.0.0.0/24"), "{e}");
        assert!(e.contains("10.0.0.1/32"), "{e}");
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.300").is_err());
    }

    #[test]
    fn ipv4_mapped_cidrs_become_ipv4() {
        assert_eq!(parse_cidr("::ffff:10.0.0.0/104"), Ok(net("10.0.0.0/8")));
        assert_eq!(parse_cidr("::ffff:10.1.2.3"), Ok(net("10.1.2.3/32")));
        assert_eq!(parse_cidr("::ffff:0.0.0.0/96"), Ok(net("0.0.0.0/0")));
        // Shorter than /96 is a real IPv6 CIDR.
        assert_eq!(parse_cidr("::/80"), Ok(net("::/80")));
    }

    #[test]
    fn port_ranges() {
        assert_eq!(
            parse_port_range("8000-8100"),
            Ok(PortRange {
                first: 8000,
                last: 8100
            })
        );
        assert_eq!(
            parse_port_range("1-65535").map(|r| (r.first, r.last)),
            Ok((1, 65535))
        );
        assert_eq!(
            parse_port_range("53").map(|r| (r.first, r.last)),
            Ok((53, 53))
        );
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("10-65536").is_err());
        assert!(parse_port_range("9-8")
            .expect_err("reversed")
            .contains("8-9"));
        assert!(parse_port_range("80-").is_err());
        assert!(parse_port_range("http").is_err());
    }

    #[test]
    fn cgroup_paths() {
        assert_eq!(
            cgroup_path("system.slice/nginx.service/"),
            Ok(CgroupPath {
                rel: "system.slice/nginx.service".into(),
                level: 2
            })
        );
        assert!(cgroup_path("/system.slice")
            .expect_err("absolute")
            .contains("\"system.slice\""));
        assert!(cgroup_path("a/../b").is_err());
        assert!(cgroup_path("").is_err());
        assert!(cgroup_path(".").is_err());
        let deep = vec!["x"; MAX_CGROUP_LEVEL as usize - 1].join("/");
        assert!(cgroup_path(&deep).is_ok());
        let too_deep = vec!["x"; MAX_CGROUP_LEVEL as usize].join("/");
        assert!(cgroup_path(&too_deep).is_err());
    }
}
