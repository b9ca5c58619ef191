//! `ztd`'s configuration file (`/etc/zt/ztd.toml`): every long flag can also be set there,
//! so configuration management can drop a file instead of editing the unit.
//!
//! The file is generic on purpose: each key is a long flag name (`log-allowed` or
//! `log_allowed`), each value what the flag takes — a string or number, an array for a
//! repeatable flag, `true`/`false` for a switch. The keys are turned into arguments and
//! parsed by the same clap definition as the command line, *under* it: a flag given on the
//! command line replaces the file's value (for a repeatable flag, all of the file's values).
//! A flag added to `ztd` later works in the file without a change here.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{parser::ValueSource, ArgAction, CommandFactory, FromArgMatches};
use toml::Spanned;

use crate::policy::diag::{closest, LineIndex};

/// Where `ztd` looks for its configuration file when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/zt/ztd.toml";

/// The id (and long name) of the flag that names the configuration file.
pub const CONFIG_FLAG: &str = "config";

/// A configuration file that cannot be used. Nothing is started when this happens.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the configuration file: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The command line itself is wrong, or asks for `--help`/`--version`.
    #[error(transparent)]
    Clap(#[from] clap::Error),
}

impl ConfigError {
    /// Exit status: 0 for `--help`/`--version`, 2 for a usage or configuration error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ConfigError::Clap(e) if !e.use_stderr() => 0,
            _ => 2,
        }
    }
}

/// Parse `argv` (program name first) into `T`, with the settings of the configuration file
/// named by `--config` (default [`DEFAULT_CONFIG`]) merged under the command line. A missing
/// default file is fine; a missing file named with `--config` is an error.
pub fn parse_with_config<T: CommandFactory + FromArgMatches>(
    argv: Vec<OsString>,
) -> Result<T, ConfigError> {
    let cmd = T::command();
    let cli = cmd.clone().try_get_matches_from(&argv)?;
    let explicit = cli.value_source(CONFIG_FLAG) == Some(ValueSource::CommandLine);
    let path = cli
        .get_one::<PathBuf>(CONFIG_FLAG)
        .cloned()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    let from_file = config_args(&cmd, &path, &text, &|id| {
        cli.value_source(id) == Some(ValueSource::CommandLine)
    })?;
    let mut merged = Vec::with_capacity(argv.len() + from_file.len());
    let mut argv = argv.into_iter();
    merged.extend(argv.next());
    merged.extend(from_file);
    merged.extend(argv);
    let matches = cmd.try_get_matches_from(merged)?;
    Ok(T::from_arg_matches(&matches)?)
}

/// A string setting of the installed configuration file ([`DEFAULT_CONFIG`]), for tools
/// that must agree with ztd (ztctl's `--socket` and `--bpffs` defaults). A missing or
/// unreadable file, or a missing key, is `None`: ztd itself reports a broken file.
pub fn installed_setting(key: &str) -> Option<String> {
    setting_in(&std::fs::read_to_string(DEFAULT_CONFIG).ok()?, key)
}

fn setting_in(text: &str, key: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(text).ok()?;
    let value = table
        .get(key)
        .or_else(|| table.get(&key.replace('-', "_")))?;
    value.as_str().map(str::to_string)
}

/// The arguments the file's settings stand for, skipping flags for which `on_command_line`
/// is true. Every setting is checked against `cmd` on its own, so an error points at it.
pub fn config_args(
    cmd: &clap::Command,
    path: &Path,
    text: &str,
    on_command_line: &dyn Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigError> {
    let index = LineIndex::new(text);
    let invalid = |offset: usize, message: String| {
        let loc = index.loc(offset);
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line: loc.line,
            column: loc.column,
            message,
        }
    };
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
        toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            invalid(offset, format!("TOML syntax: {}", e.message()))
        })?;
    let settable: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(|a| a.get_long().is_some() && !is_reserved(a.get_id().as_str()))
        .collect();
    let mut out = Vec::new();
    // In file order, so that errors come out where the operator reads them first.
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    for (key, value) in entries {
        let name = key.get_ref().replace('_', "-");
        let Some(arg) = settable
            .iter()
            .find(|a| a.get_long() == Some(name.as_str()))
        else {
            let names: Vec<&str> = settable.iter().filter_map(|a| a.get_long()).collect();
            let hint = match closest(&name, names.iter().copied()) {
                Some(c) => format!(" (did you mean `{c}`?)"),
                None => String::new(),
            };
            return Err(invalid(
                key.span().start,
                format!(
                    "unknown setting `{}`{hint}: the keys are ztd's long flag names: {}",
                    key.get_ref(),
                    names.join(", ")
                ),
            ));
        };
        let flag = format!("--{name}");
        let args = setting_args(arg, &flag, value.get_ref())
            .map_err(|m| invalid(value.span().start, format!("`{}`: {m}", key.get_ref())))?;
        // Check the setting alone against the real definition (value parsers, choices).
        let mut alone = vec![OsString::from(cmd.get_name())];
        alone.extend(args.iter().cloned());
        if let Err(e) = cmd.clone().try_get_matches_from(alone) {
            return Err(invalid(
                value.span().start,
                format!("`{}`: {}", key.get_ref(), clap_message(&e)),
            ));
        }
        if !on_command_line(arg.get_id().as_str()) {
            out.extend(args);
        }
    }
    Ok(out)
}

/// Flags that make no sense in the file.
fn is_reserved(id: &str) -> bool {
    matches!(id, "help" | "version" | CONFIG_FLAG)
}

/// The arguments for one setting, or what is wrong with its type.
fn setting_args(arg: &clap::Arg, flag: &str, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let takes_values = arg.get_action().takes_values();
    if !takes_values {
        return match (arg.get_action(), value) {
            (ArgAction::SetTrue, toml::Value::Boolean(true))
            | (ArgAction::SetFalse, toml::Value::Boolean(false)) => Ok(vec![flag.into()]),
            (ArgAction::SetTrue | ArgAction::SetFalse, toml::Value::Boolean(_)) => Ok(vec![]),
            (ArgAction::Count, toml::Value::Integer(n)) if (0..=255).contains(n) => {
                Ok(vec![flag.into(); *n as usize])
            }
            (ArgAction::Count, _) => Err(format!(
                "expected a count (a small integer), found {}",
                type_name(value)
            )),
            _ => Err(format!(
                "is a switch: expected true or false, found {}",
                type_name(value)
            )),
        };
    }
    let repeatable = matches!(arg.get_action(), ArgAction::Append);
    match value {
        toml::Value::Array(items) if repeatable => items
            .iter()
            .map(|v| scalar(v).map(|s| OsString::from(format!("{flag}={s}"))))
            .collect(),
        toml::Value::Array(_) => Err("takes a single value, not an array".to_string()),
        v => scalar(v).map(|s| vec![OsString::from(format!("{flag}={s}"))]),
    }
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        other => Err(format!(
            "expected a string or a number, found {}",
            type_name(other)
        )),
    }
}

fn type_name(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// clap's message without its `error:` prefix, usage and help hint.
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    let mut msg = first.trim_start_matches("error: ").to_string();
    if let Some(values) = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("[possible values: "))
    {
        msg.push_str(&format!(
            " (possible values: {}",
            values.trim_end_matches(']')
        ));
        msg.push(')');
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    #[command(name = "ztd")]
    struct Args {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, default_value = "/etc/zt/policies")]
        policy: Vec<PathBuf>,
        #[arg(long, value_parser = ["enforce", "audit"], default_value = "enforce")]
        mode: String,
        #[arg(long)]
        log_allowed: bool,
        #[arg(long)]
        xdp: Vec<String>,
        #[arg(long, default_value_t = 10)]
        history: usize,
        #[arg(long)]
        cgroup: Option<PathBuf>,
    }

    fn parse(file: &str, cli: &[&str]) -> Result<Args, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ztd.toml");
        std::fs::write(&path, file).expect("write");
        let mut argv: Vec<OsString> = vec!["ztd".into(), "--config".into(), path.into()];
        argv.extend(cli.iter().map(OsString::from));
        parse_with_config::<Args>(argv)
    }

    fn invalid(file: &str) -> (usize, usize, String) {
        match parse(file, &[]) {
            Err(ConfigError::Invalid {
                line,
                column,
                message,
                ..
            }) => (line, column, message),
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    #[test]
    fn file_settings_apply() {
        let a = parse(
            "policy = [\"/a\", \"/b\"]\nmode = \"audit\"\nlog-allowed = true\nxdp = [\"eth1\"]\nhistory = 5\ncgroup = \"/sys/fs/cgroup/x\"\n",
            &[],
        )
        .expect("valid");
        assert_eq!(a.policy, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(a.mode, "audit");
        assert!(a.log_allowed);
        assert_eq!(a.xdp, ["eth1"]);
        assert_eq!(a.history, 5);
        assert_eq!(a.cgroup, Some(PathBuf::from("/sys/fs/cgroup/x")));
    }

    #[test]
    fn flags_win_over_the_file() {
        let a = parse(
            "policy = [\"/a\", \"/b\"]\nmode = \"audit\"\nhistory = 5\n",
            &["--policy", "/c", "--mode", "enforce"],
        )
        .expect("valid");
        assert_eq!(
            a.policy,
            [PathBuf::from("/c")],
            "the flag replaces every file value"
        );
        assert_eq!(a.mode, "enforce");
        assert_eq!(a.history, 5, "settings not on the command line still apply");
    }

    #[test]
    fn underscores_and_false_switches() {
        let a = parse("log_allowed = false\n", &[]).expect("valid");
        assert!(!a.log_allowed);
        let a = parse("log_allowed = true\n", &[]).expect("valid");
        assert!(a.log_allowed);
    }

    #[test]
    fn defaults_without_a_file() {
        let a = parse("", &[]).expect("empty file");
        assert_eq!(a.policy, [PathBuf::from("/etc/zt/policies")]);
        assert_eq!(a.mode, "enforce");
    }

    #[test]
    fn unknown_keys_point_at_the_key() {
        let (line, column, message) = invalid("mode = \"audit\"\n  polcy = [\"/a\"]\n");
        assert_eq!((line, column), (2, 3));
        assert!(message.contains("unknown setting `polcy`"), "{message}");
        assert!(message.contains("did you mean `policy`"), "{message}");
        let (_, _, message) = invalid("config = \"/x\"\n");
        assert!(message.contains("unknown setting `config`"), "{message}");
    }

    #[test]
    fn bad_types_and_values_point_at_the_value() {
        let (line, column, message) = invalid("log-allowed = \"yes\"\n");
        assert_eq!((line, column), (1, 15));
        assert!(message.contains("expected true or false"), "{message}");
        let (line, column, message) = invalid("\nmode = \"strict\"\n");
        assert_eq!((line, column), (2, 8));
        assert!(message.contains("strict"), "{message}");
        assert!(message.contains("enforce, audit"), "{message}");
        let (_, _, message) = invalid("mode = [\"audit\"]\n");
        assert!(message.contains("single value"), "{message}");
        let (_, _, message) = invalid("history = \"many\"\n");
        assert!(message.contains("many"), "{message}");
        let (_, _, message) = invalid("xdp = [{ name = \"eth0\" }]\n");
        assert!(message.contains("a table"), "{message}");
    }

    #[test]
    fn syntax_errors_have_a_location() {
        let (line, _, message) = invalid("mode = \"audit\"\npolicy = [\n");
        assert!(line >= 2, "line {line}");
        assert!(message.starts_with("TOML syntax"), "{message}");
    }

    #[test]
    fn missing_files() {
        let argv = |p: &str| -> Vec<OsString> { vec!["ztd".into(), "--config".into(), p.into()] };
        match parse_with_config::<Args>(argv("/nonexistent/ztd.toml")) {
            Err(e @ ConfigError::Read { .. }) => {
                assert!(e.to_string().starts_with("/nonexistent/ztd.toml: "), "{e}");
                assert_eq!(e.exit_code(), 2);
            }
            other => panic!("an explicit missing file is an error: {other:?}"),
        }
    }

    #[derive(Debug, Parser)]
    #[command(name = "ztd")]
    struct ElsewhereArgs {
        #[arg(long, default_value = "/nonexistent-zt-test/ztd.toml")]
        config: PathBuf,
        #[arg(long, default_value = "enforce")]
        mode: String,
    }

    #[test]
    fn a_missing_default_file_is_fine() {
        let a = parse_with_config::<ElsewhereArgs>(vec!["ztd".into()]).expect("no file");
        assert_eq!(a.mode, "enforce");
        let a =
            parse_with_config::<ElsewhereArgs>(vec!["ztd".into(), "--mode".into(), "audit".into()])
                .expect("no file");
        assert_eq!(a.mode, "audit");
    }

    #[test]
    fn single_settings_for_ztctl() {
        let text = "socket = \"/run/x.sock\"\nlog_format = \"json\"\nhistory = 5\n";
        assert_eq!(setting_in(text, "socket").as_deref(), Some("/run/x.sock"));
        assert_eq!(setting_in(text, "log-format").as_deref(), Some("json"));
        assert_eq!(setting_in(text, "history"), None, "strings only");
        assert_eq!(setting_in(text, "bpffs"), None);
        assert_eq!(
            setting_in("socket = [", "socket"),
            None,
            "a broken file is ignored"
        );
    }

    #[test]
    fn help_is_not_an_error() {
        match parse("", &["--help"]) {
            Err(e) => assert_eq!(e.exit_code(), 0),
            Ok(_) => panic!("--help parses to an exit"),
        }
    }
}
