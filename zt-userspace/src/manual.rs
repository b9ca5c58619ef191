//! Man pages and shell completions, generated from the binaries' own clap definitions so
//! that they never drift from `--help`. The binaries answer two hidden arguments, used by
//! `cargo xtask install` and `cargo xtask deb` (no root needed):
//!
//! - `--generate-man`: the roff man page on stdout;
//! - `--generate-completions SHELL`: the completion script for `bash`, `zsh` or `fish`.

use std::{ffi::OsString, io::Write, process::ExitCode};

use clap_complete::Shell;

/// The hidden argument that prints the man page.
pub const GENERATE_MAN: &str = "--generate-man";
/// The hidden argument that prints a completion script.
pub const GENERATE_COMPLETIONS: &str = "--generate-completions";

/// Which binary's page: the extra sections differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    Ztd,
    Ztctl,
}

/// If `argv` asks for a man page or completions, write them to stdout and return the exit
/// code; otherwise `None` and the binary goes on.
pub fn generate_if_asked(cmd: clap::Command, page: Page, argv: &[OsString]) -> Option<ExitCode> {
    let first = argv.get(1)?.to_str()?;
    let mut out = std::io::stdout().lock();
    let result = match first {
        GENERATE_MAN => man(cmd, page, &mut out),
        GENERATE_COMPLETIONS => {
            let shell = argv.get(2).and_then(|s| s.to_str());
            match shell.and_then(|s| s.parse::<Shell>().ok()) {
                Some(shell) => {
                    completions(cmd.name(page.name()), shell, &mut out);
                    Ok(())
                }
                None => {
                    eprintln!(
                        "{}: {GENERATE_COMPLETIONS} needs a shell: bash, zsh, fish, elvish or powershell",
                        page.name()
                    );
                    return Some(ExitCode::from(2));
                }
            }
        }
        _ => return None,
    };
    Some(match result.and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: writing the output: {e}", page.name());
            ExitCode::from(1)
        }
    })
}

impl Page {
    fn name(self) -> &'static str {
        match self {
            Page::Ztd => "ztd",
            Page::Ztctl => "ztctl",
        }
    }

    /// Sections after the options, as (title, paragraphs). A paragraph starting with
    /// `TAG\t` is a tagged paragraph (`.TP`), one starting with a code fence line is shown
    /// as it is (`.nf`).
    fn extra_sections(self) -> &'static [(&'static str, &'static [&'static str])] {
        match self {
            Page::Ztd => ZTD_SECTIONS,
            Page::Ztctl => ZTCTL_SECTIONS,
        }
    }
}

/// The man page of `cmd` (section 8), with zt's extra sections.
pub fn man(cmd: clap::Command, page: Page, out: &mut dyn Write) -> std::io::Result<()> {
    let cmd = cmd.name(page.name()).bin_name(page.name());
    let version = cmd.get_version().unwrap_or_default().to_string();
    let man = clap_mangen::Man::new(cmd)
        .section("8")
        .manual("zt manual")
        .source(format!("zt {version}"));
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    for (title, paragraphs) in page.extra_sections() {
        writeln!(out, ".SH \"{}\"", title.to_uppercase())?;
        for p in *paragraphs {
            if let Some(code) = p.strip_prefix("```\n") {
                writeln!(out, ".PP\n.nf\n{}\n.fi", roff_text(code))?;
                continue;
            }
            match p.split_once('\t') {
                Some((tag, body)) => writeln!(out, ".TP\n{}\n{}", roff_text(tag), roff_text(body))?,
                None => writeln!(out, ".PP\n{}", roff_text(p))?,
            }
        }
    }
    man.render_version_section(out)?;
    Ok(())
}

/// The completion script of `cmd` for `shell`.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Plain text as roff: backslashes escaped, no line starting with a control character.
fn roff_text(text: &str) -> String {
    text.replace('\\', "\\e")
        .lines()
        .map(|l| {
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const ZTD_SECTIONS: &[(&str, &[&str])] = &[
    (
        "Configuration file",
        &[
            "Every option can also be set in the configuration file (default /etc/zt/ztd.toml, another with --config; a missing default file is fine). Each key is a long option name without the dashes, each value what the option takes: a string or a number, an array for a repeatable option, true or false for a switch. Options given on the command line win over the file; a repeatable option on the command line replaces all of the file's values. An unknown key, a wrong type or an invalid value stops ztd with the file, line and column, before anything is attached. Write absolute paths: relative ones are taken from ztd's working directory. The file is read at start only.",
            "```\npolicy = [\"/etc/zt/policies\"]\nmode = \"audit\"\nlog-format = \"json\"\nevents-file = \"/var/log/zt/events.jsonl\"\nxdp = [\"eth1\"]",
        ],
    ),
    (
        "Signals",
        &[
            "SIGHUP\tRe-read the policy (as ztctl reload). An invalid policy is refused; the last good one stays enforced.",
            "SIGTERM, SIGINT\tStop the daemon. Enforcement stays in the kernel (pinned under --bpffs) until ztctl unload.",
        ],
    ),
    (
        "Exit status",
        &[
            "0\tStopped by SIGTERM or SIGINT, or by ztctl unload.",
            "1\tCould not start or keep running: not root (the missing capabilities are named), invalid policy (reported as path:line:column: message lines), missing kernel feature, pins or socket unusable, another ztd on the same control socket. Nothing was attached or changed when the policy is invalid.",
            "2\tUsage error: an unknown or invalid command-line option, or an unusable configuration file.",
        ],
    ),
    (
        "Environment",
        &["NOTIFY_SOCKET\tSet by systemd for Type=notify services: ztd sends READY=1 once the policy is enforced, RELOADING=1 and READY=1 around each reload, and STOPPING=1 when it stops. Without it nothing is sent."],
    ),
    (
        "Files",
        &[
            "/etc/zt/ztd.toml\tThe configuration file.",
            "/etc/zt/policies\tThe default policy directory (every *.toml file in it).",
            "/run/zt/ztd.sock\tThe control socket used by ztctl (mode 0600; 0660 and the group of --control-group). Requests are authorised by the peer's credentials: changes from root only, status and events from root and --control-group members.",
            "/sys/fs/bpf/zt\tPinned programs, links and maps.",
            "/lib/systemd/system/ztd.service\tThe systemd unit (systemctl enable --now ztd).",
        ],
    ),
    (
        "See also",
        &["ztctl(8), zt-policy(5), systemctl(1), bpftool(8)"],
    ),
];

const ZTCTL_SECTIONS: &[(&str, &[&str])] = &[
    (
        "Exit status",
        &[
            "0\tSuccess: the policy is valid (check), the daemon is healthy (status), the request was done.",
            "1\tFailure: an invalid policy (reported as path:line:column: message lines), ztd not reachable on the control socket (is it running? are you root?), ztd refused the request, or status found ztd unhealthy.",
            "2\tUsage error: an unknown command or option, or an invalid option value.",
        ],
    ),
    (
        "Files",
        &[
            "/run/zt/ztd.sock\tztd's control socket (--socket); changes from root only, status and events also from members of ztd's --control-group.",
            "/etc/zt/ztd.toml\tztd's configuration: its socket and bpffs settings, if any, are ztctl's defaults for --socket and unload --bpffs.",
            "/etc/zt/policies\tThe default policy directory.",
        ],
    ),
    ("See also", &["ztd(8), zt-policy(5)"]),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roff_escapes() {
        assert_eq!(roff_text("a\\b"), "a\\eb");
        assert_eq!(roff_text(".x\n'y\nz"), "\\&.x\n\\&'y\nz");
    }

    #[test]
    fn pages_have_the_extra_sections() {
        let cmd = clap::Command::new("x").version("1.0").about("about");
        let mut out = Vec::new();
        man(cmd, Page::Ztd, &mut out).expect("render");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains(".TH ztd 8"), "{text}");
        assert!(text.contains(".SH \"EXIT STATUS\""), "{text}");
        assert!(text.contains("/etc/zt/ztd.toml"), "{text}");
    }
}
