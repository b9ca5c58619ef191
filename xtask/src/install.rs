//! `cargo xtask install` and `cargo xtask deb`: zt as a service. Both lay out the same
//! assets — the binaries, the systemd unit, man pages (ztd(8) and ztctl(8) generated from
//! the clap definitions, zt-policy(5) from docs/policy.md), shell completions, the default
//! policy and an example ztd.toml — and never need root to generate them.
//!
//! The `check_*` functions are `cargo xtask test` steps: they install into a throwaway
//! directory and unpack the package, and compare the files with the documented list.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    mdman, setup,
    util::{self, Ctx},
};

/// What `install` lays out under `--prefix` (relative paths), sorted.
pub const PREFIX_FILES: &[&str] = &[
    "bin/ztctl",
    "bin/ztd",
    "lib/systemd/system/ztd.service",
    "share/bash-completion/completions/ztctl",
    "share/doc/zt/examples/admin-tools.toml",
    "share/doc/zt/examples/block-list.toml",
    "share/doc/zt/examples/cron-no-network.toml",
    "share/doc/zt/examples/nginx-to-database.toml",
    "share/doc/zt/examples/sshd-from-admins.toml",
    "share/doc/zt/examples/unit-identity.toml",
    "share/fish/vendor_completions.d/ztctl.fish",
    "share/man/man5/zt-policy.5",
    "share/man/man8/ztctl.8",
    "share/man/man8/ztd.8",
    "share/zsh/site-functions/_ztctl",
];

/// What `install` lays out under `--etc` when absent (relative paths), sorted.
pub const ETC_FILES: &[&str] = &["zt/policies/default.toml", "zt/ztd.toml"];

/// The files of the Debian package (absolute paths), sorted.
pub const DEB_FILES: &[&str] = &[
    "/etc/zt/policies/default.toml",
    "/etc/zt/ztd.toml",
    "/lib/systemd/system/ztd.service",
    "/usr/bin/ztctl",
    "/usr/bin/ztd",
    "/usr/share/bash-completion/completions/ztctl",
    "/usr/share/doc/zt/copyright",
    "/usr/share/doc/zt/examples/admin-tools.toml",
    "/usr/share/doc/zt/examples/block-list.toml",
    "/usr/share/doc/zt/examples/cron-no-network.toml",
    "/usr/share/doc/zt/examples/nginx-to-database.toml",
    "/usr/share/doc/zt/examples/sshd-from-admins.toml",
    "/usr/share/doc/zt/examples/unit-identity.toml",
    "/usr/share/fish/vendor_completions.d/ztctl.fish",
    "/usr/share/man/man5/zt-policy.5.gz",
    "/usr/share/man/man8/ztctl.8.gz",
    "/usr/share/man/man8/ztd.8.gz",
    "/usr/share/zsh/vendor-completions/_ztctl",
];

/// The package's conffiles: dpkg keeps an operator's edits on upgrade.
pub const DEB_CONFFILES: &[&str] = &["/etc/zt/policies/default.toml", "/etc/zt/ztd.toml"];

/// Generated assets, in `dir`: `ztd.8`, `ztctl.8`, `zt-policy.5`, `ztctl.bash`, `_ztctl`,
/// `ztctl.fish`, `ztd.service` (with `bindir` in its commands).
pub fn generate_assets(ctx: &Ctx, dir: &Path, bindir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let release = ctx.release_dir();
    let gen = |bin: &str, args: &[&str], out: &str| -> Result<()> {
        let mut cmd = Command::new(release.join(bin));
        cmd.args(args);
        let line = util::show(&cmd);
        let output = cmd
            .output()
            .with_context(|| format!("running `{line}` (build first: cargo xtask build)"))?;
        if !output.status.success() || output.stdout.is_empty() {
            bail!(
                "`{line}` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        write(&dir.join(out), &output.stdout)
    };
    gen("ztd", &["--generate-man"], "ztd.8")?;
    gen("ztctl", &["--generate-man"], "ztctl.8")?;
    gen("ztctl", &["--generate-completions", "bash"], "ztctl.bash")?;
    gen("ztctl", &["--generate-completions", "zsh"], "_ztctl")?;
    gen("ztctl", &["--generate-completions", "fish"], "ztctl.fish")?;

    let doc = ctx.root.join("docs/policy.md");
    let markdown =
        std::fs::read_to_string(&doc).with_context(|| format!("reading {}", doc.display()))?;
    let version = env!("CARGO_PKG_VERSION");
    let man = mdman::to_man(&markdown, "5", &format!("zt {version}"), "zt manual")
        .with_context(|| doc.display().to_string())?;
    write(&dir.join("zt-policy.5"), man.as_bytes())?;

    let unit_in = ctx.root.join("deploy/systemd/ztd.service.in");
    let unit = std::fs::read_to_string(&unit_in)
        .with_context(|| format!("reading {}", unit_in.display()))?;
    let bindir = bindir
        .to_str()
        .context("the bin directory must be valid UTF-8 (it goes into the unit)")?;
    write(
        &dir.join("ztd.service"),
        unit.replace("@bindir@", bindir).as_bytes(),
    )?;
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Copy `from` to `to` with `mode`, creating the parent directories.
fn put(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Replace, not overwrite in place: a running ztd keeps its (old) executable.
    let tmp = to.with_extension("zt-install-tmp");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
    println!("install: {}", to.display());
    Ok(())
}

/// The example policies shipped as documentation.
fn examples(ctx: &Ctx) -> Result<Vec<PathBuf>> {
    let dir = ctx.root.join("policies/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Lay out the (already built) release binaries and the assets under `prefix` and `etc`.
/// Policies and ztd.toml under `etc` are created only when absent.
pub fn install(ctx: &Ctx, prefix: &Path, etc: &Path) -> Result<()> {
    let prefix = std::path::absolute(prefix).context("resolving --prefix")?;
    let etc = std::path::absolute(etc).context("resolving --etc")?;
    let assets = ctx.target_dir.join("install-assets");
    let bindir = prefix.join("bin");
    generate_assets(ctx, &assets, &bindir)?;
    let release = ctx.release_dir();
    put(&release.join("ztd"), &bindir.join("ztd"), 0o755)?;
    put(&release.join("ztctl"), &bindir.join("ztctl"), 0o755)?;
    let files: [(&str, &str); 7] = [
        ("ztd.service", "lib/systemd/system/ztd.service"),
        ("ztd.8", "share/man/man8/ztd.8"),
        ("ztctl.8", "share/man/man8/ztctl.8"),
        ("zt-policy.5", "share/man/man5/zt-policy.5"),
        ("ztctl.bash", "share/bash-completion/completions/ztctl"),
        ("_ztctl", "share/zsh/site-functions/_ztctl"),
        ("ztctl.fish", "share/fish/vendor_completions.d/ztctl.fish"),
    ];
    for (from, to) in files {
        put(&assets.join(from), &prefix.join(to), 0o644)?;
    }
    for example in examples(ctx)? {
        let name = example.file_name().context("example without a name")?;
        put(
            &example,
            &prefix.join("share/doc/zt/examples").join(name),
            0o644,
        )?;
    }
    let policies = etc.join("zt/policies");
    if policies.exists() {
        println!(
            "install: {} exists: left as it is (the shipped default is in {})",
            policies.display(),
            ctx.root.join("policies/default.toml").display()
        );
    } else {
        put(
            &ctx.root.join("policies/default.toml"),
            &policies.join("default.toml"),
            0o644,
        )?;
    }
    let config = etc.join("zt/ztd.toml");
    if config.exists() {
        println!("install: {} exists: left as it is", config.display());
    } else {
        put(&ctx.root.join("deploy/ztd.toml"), &config, 0o644)?;
    }
    println!(
        "install: done. Next: `systemctl daemon-reload`, review {} and {}, then `systemctl enable --now ztd` (starts in audit mode).",
        config.display(),
        policies.display()
    );
    Ok(())
}

/// `cargo xtask install`: setup, release build, then [`install`].
pub fn install_task(ctx: &Ctx, prefix: &Path, etc: &Path) -> Result<()> {
    setup::setup(ctx)?;
    build_release(ctx)?;
    install(ctx, prefix, etc)
}

pub fn build_release(ctx: &Ctx) -> Result<()> {
    util::run(
        ctx.cargo()
            .args(["build", "--release", "-p", "zt-userspace", "--bins"]),
    )
}

/// The directory `cargo deb` reads the generated assets from (see zt-userspace/Cargo.toml).
pub fn deb_assets_dir(ctx: &Ctx) -> PathBuf {
    ctx.release_dir().join("deb-assets")
}

/// Install cargo-deb if `cargo deb` is not there (compiles once, a minute or two).
fn ensure_cargo_deb(ctx: &Ctx) -> Result<()> {
    let there = ctx
        .cargo()
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if there {
        return Ok(());
    }
    println!("deb: cargo-deb is missing; installing it (once)");
    util::run(ctx.cargo().args(["install", "cargo-deb", "--locked"]))
}

/// Build the .deb from the release binaries; returns its path.
pub fn deb(ctx: &Ctx) -> Result<PathBuf> {
    ensure_cargo_deb(ctx)?;
    let assets = deb_assets_dir(ctx);
    generate_assets(ctx, &assets, Path::new("/usr/bin"))?;
    for page in ["ztd.8", "ztctl.8", "zt-policy.5"] {
        gzip(&assets.join(page))?;
    }
    let out_dir = ctx.target_dir.join("debian");
    std::fs::create_dir_all(&out_dir)?;
    let out = Command::new("cargo")
        .current_dir(&ctx.root)
        .args(["deb", "-p", "zt-userspace", "--no-build", "--output"])
        .arg(&out_dir)
        .output()
        .context("running cargo deb")?;
    if !out.status.success() {
        bail!(
            "cargo deb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
        .context("cargo deb did not print the package path")?;
    println!("deb: {}", path.display());
    Ok(path)
}

/// `cargo xtask deb`: setup, release build, then [`deb`].
pub fn deb_task(ctx: &Ctx) -> Result<()> {
    setup::setup(ctx)?;
    build_release(ctx)?;
    deb(ctx).map(|_| ())
}

/// `gzip -9n` in place, keeping the original (`PATH.gz` next to it).
fn gzip(path: &Path) -> Result<()> {
    let out = Command::new("gzip")
        .args(["-9", "-n", "-k", "-f"])
        .arg(path)
        .status()
        .context("running gzip")?;
    util::check(out, &format!("gzip {}", path.display()))
}

/// Every regular file under `root`, as paths relative to it.
fn files_under(root: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
                out.insert(rel);
            }
        }
    }
    Ok(out)
}

fn expect_files(what: &str, found: &BTreeSet<String>, expected: &[&str]) -> Result<()> {
    let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    if *found != expected {
        let missing: Vec<_> = expected.difference(found).collect();
        let extra: Vec<_> = found.difference(&expected).collect();
        bail!("{what}: missing {missing:?}, unexpected {extra:?}");
    }
    println!(
        "check: {what}: exactly the {} documented files",
        found.len()
    );
    Ok(())
}

/// Render a man page as a reader would (`man -l`), failing on any warning.
fn render_man(page: &Path) -> Result<String> {
    let out = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .env("MAN_KEEP_STDERR", "1")
        .env("LC_ALL", "C.UTF-8")
        .output()
        .context("running `man -l` (Debian package man-db)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !stderr.trim().is_empty() {
        bail!(
            "man -l {} failed ({}): {stderr}",
            page.display(),
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let line = util::show(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo xtask test` step: install into a throwaway prefix and etc, check the exact file
/// list, the modes, that the binaries answer `--help`, that the man pages render, the
/// completions load in their shells, the unit verifies, and a second install keeps an
/// operator's policies.
pub fn check_install(ctx: &Ctx) -> Result<()> {
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let prefix = tmp.path().join("prefix");
    let etc = tmp.path().join("etc");
    install(ctx, &prefix, &etc)?;
    expect_files("install --prefix", &files_under(&prefix)?, PREFIX_FILES)?;
    expect_files("install --etc", &files_under(&etc)?, ETC_FILES)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        for bin in ["bin/ztd", "bin/ztctl"] {
            let mode = std::fs::metadata(prefix.join(bin))?.permissions().mode() & 0o777;
            if mode != 0o755 {
                bail!("{bin} has mode {mode:o}, expected 755");
            }
        }
    }
    for bin in ["ztd", "ztctl"] {
        let help = run_ok(Command::new(prefix.join("bin").join(bin)).arg("--help"))?;
        if !help.contains("Usage:") || !help.contains("Exit status") {
            bail!("{bin} --help lacks its usage or exit status:\n{help}");
        }
    }
    for (page, needles) in [
        (
            "share/man/man8/ztd.8",
            &[
                "EXIT STATUS",
                "--config",
                "/etc/zt/ztd.toml",
                "NOTIFY_SOCKET",
            ][..],
        ),
        (
            "share/man/man8/ztctl.8",
            &["EXIT STATUS", "check", "unload"][..],
        ),
        (
            "share/man/man5/zt-policy.5",
            &[
                "NAME",
                "IDENTITIES",
                "RULES",
                "LIMITS",
                "proto",
                "version = 1",
            ][..],
        ),
    ] {
        let text = render_man(&prefix.join(page))?;
        for n in needles {
            if !text.contains(n) {
                bail!("man {page}: `{n}` not in the rendered page:\n{text}");
            }
        }
    }
    println!("check: the three man pages render without warnings");
    let shells: [(&str, &[&str]); 3] = [
        ("bash", &["-n"]),
        ("zsh", &["-n"]),
        ("fish", &["--no-execute"]),
    ];
    let completions = [
        "share/bash-completion/completions/ztctl",
        "share/zsh/site-functions/_ztctl",
        "share/fish/vendor_completions.d/ztctl.fish",
    ];
    for ((shell, args), file) in shells.iter().zip(completions) {
        let text = std::fs::read_to_string(prefix.join(file))?;
        if !text.contains("ztctl") || !text.contains("check") {
            bail!("{file} does not complete ztctl's commands");
        }
        // Parsed by the shell itself (Debian packages bash, zsh, fish: see .ci/run).
        run_ok(Command::new(shell).args(*args).arg(prefix.join(file))).with_context(|| {
            format!("{file}: {shell} does not accept it (is {shell} installed?)")
        })?;
        println!("check: {file}: {shell} accepts it");
    }
    let unit = std::fs::read_to_string(prefix.join("lib/systemd/system/ztd.service"))?;
    let exec = format!("ExecStart={}/bin/ztd\n", prefix.display());
    if !unit.contains(&exec) || !unit.contains("Type=notify") || unit.contains("@bindir@") {
        bail!(
            "ztd.service does not run {}/bin/ztd as Type=notify:\n{unit}",
            prefix.display()
        );
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        run_ok(
            Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(prefix.join("lib/systemd/system/ztd.service")),
        )?;
        println!("check: systemd-analyze verify accepts ztd.service");
    } else {
        println!("check: systemd-analyze not installed: ztd.service not verified");
    }
    // The shipped configuration and policies are valid for the installed binaries.
    run_ok(
        Command::new(prefix.join("bin/ztctl"))
            .arg("check")
            .arg(etc.join("zt/policies")),
    )?;
    // An operator's policies and settings survive a second install.
    std::fs::write(
        etc.join("zt/policies/default.toml"),
        "# mine\nversion = 1\n",
    )?;
    std::fs::write(etc.join("zt/ztd.toml"), "# mine\n")?;
    install(ctx, &prefix, &etc)?;
    for f in ["zt/policies/default.toml", "zt/ztd.toml"] {
        if !std::fs::read_to_string(etc.join(f))?.starts_with("# mine") {
            bail!("a second install overwrote {f}");
        }
    }
    println!("check: a second install keeps the operator's policies and ztd.toml");
    Ok(())
}

/// `cargo xtask test` step: build the .deb, unpack it into a throwaway root (`dpkg -x`),
/// and check the exact file list, the control fields, conffiles and maintainer scripts.
pub fn check_deb(ctx: &Ctx) -> Result<()> {
    let deb_path = deb(ctx)?;
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let root = tmp.path().join("root");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb_path).arg(&root))?;
    let found: BTreeSet<String> = files_under(&root)?
        .into_iter()
        .map(|f| format!("/{f}"))
        .collect();
    expect_files("zt .deb", &found, DEB_FILES)?;
    let field = |name: &str| -> Result<String> {
        Ok(
            run_ok(Command::new("dpkg-deb").arg("-f").arg(&deb_path).arg(name))?
                .trim()
                .to_string(),
        )
    };
    let expect = |name: &str, ok: &dyn Fn(&str) -> bool| -> Result<()> {
        let v = field(name)?;
        if !ok(&v) {
            bail!("zt .deb: unexpected {name}: {v:?}");
        }
        Ok(())
    };
    expect("Package", &|v| v == "zt")?;
    expect("Version", &|v| v.starts_with(env!("CARGO_PKG_VERSION")))?;
    expect("Architecture", &|v| !v.is_empty())?;
    expect("Section", &|v| v == "net")?;
    expect("Depends", &|v| v.contains("libc6"))?;
    expect("Description", &|v| v.contains("firewall"))?;
    expect("Maintainer", &|v| !v.is_empty())?;
    let info = run_ok(Command::new("dpkg-deb").arg("-I").arg(&deb_path))?;
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        if !info.contains(script) {
            bail!("zt .deb has no {script}:\n{info}");
        }
    }
    let control = tmp.path().join("control");
    run_ok(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb_path)
            .arg(&control),
    )?;
    let conffiles: BTreeSet<String> = std::fs::read_to_string(control.join("conffiles"))?
        .lines()
        .map(str::to_string)
        .collect();
    let expected: BTreeSet<String> = DEB_CONFFILES.iter().map(|s| s.to_string()).collect();
    if conffiles != expected {
        bail!("zt .deb conffiles: {conffiles:?}, expected {expected:?}");
    }
    let postinst = std::fs::read_to_string(control.join("postinst"))?;
    // Commands only, not comments.
    let postinst: String = postinst
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let starts = [
        "systemctl enable",
        "systemctl start",
        "deb-systemd-invoke start",
    ];
    if !postinst.contains("daemon-reload") || starts.iter().any(|s| postinst.contains(s)) {
        bail!("postinst must reload systemd and never enable or start ztd:\n{postinst}");
    }
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/ztd.service"))?;
    if !unit.contains("ExecStart=/usr/bin/ztd\n") {
        bail!("the packaged unit does not run /usr/bin/ztd:\n{unit}");
    }
    let help = run_ok(Command::new(root.join("usr/bin/ztctl")).arg("--help"))?;
    if !help.contains("Usage:") {
        bail!("the packaged ztctl --help:\n{help}");
    }
    run_ok(
        Command::new(root.join("usr/bin/ztctl"))
            .arg("check")
            .arg(root.join("etc/zt/policies")),
    )?;
    render_man(&root.join("usr/share/man/man5/zt-policy.5.gz"))?;
    println!(
        "check: {} unpacks to the documented files; fields, conffiles and scripts as expected",
        deb_path.display()
    );
    Ok(())
}
