//! Markdown → man page (roff, `-man` macros, tables through tbl), so that the policy
//! reference is written once (docs/policy.md) and installed as zt-policy(5).
//!
//! Covers what the reference uses: headings (`#` title, `##` sections, `###` subsections),
//! paragraphs, emphasis, inline code, links (their text), bullet and numbered lists, code
//! blocks, and tables.

use anyhow::{bail, Result};
use pulldown_cmark::{Event, HeadingLevel, Options, Parser, Tag, TagEnd};

/// The man page for `markdown`. Its first `# NAME: summary` heading gives the NAME section.
pub fn to_man(markdown: &str, section: &str, source: &str, manual: &str) -> Result<String> {
    let mut r = Roff::default();
    let mut titled = false;
    let mut list_stack: Vec<Option<u64>> = Vec::new();
    let mut table: Option<Table> = None;
    let mut heading: Option<HeadingLevel> = None;
    let mut in_code_block = false;
    for event in Parser::new_ext(markdown, Options::ENABLE_TABLES) {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                r.flush();
                heading = Some(level);
            }
            Event::End(TagEnd::Heading(level)) => {
                let text = std::mem::take(&mut r.inline);
                heading = None;
                match level {
                    HeadingLevel::H1 if !titled => {
                        let plain = strip_fonts(&text);
                        let (name, summary) = plain
                            .split_once(':')
                            .map(|(n, s)| (n.trim().to_string(), s.trim().to_string()))
                            .unwrap_or((plain.trim().to_string(), String::new()));
                        r.out.push_str(&format!(
                            ".TH \"{}\" \"{section}\" \"\" \"{source}\" \"{manual}\"\n.SH NAME\n{} \\- {}\n",
                            name.to_uppercase(),
                            name,
                            summary
                        ));
                        titled = true;
                    }
                    HeadingLevel::H1 | HeadingLevel::H2 => r
                        .out
                        .push_str(&format!(".SH \"{}\"\n", text.to_uppercase())),
                    _ => r.out.push_str(&format!(".SS \"{text}\"\n")),
                }
            }
            Event::Start(Tag::Paragraph) => {
                r.flush();
                if list_stack.is_empty() && table.is_none() {
                    r.out.push_str(".PP\n");
                } else if !r.item_start {
                    r.out.push_str(".IP\n");
                }
                r.item_start = false;
            }
            Event::End(TagEnd::Paragraph) => r.flush(),
            Event::Start(Tag::List(start)) => {
                r.flush();
                if !list_stack.is_empty() {
                    r.out.push_str(".RS\n");
                }
                list_stack.push(start);
            }
            Event::End(TagEnd::List(_)) => {
                r.flush();
                list_stack.pop();
                if !list_stack.is_empty() {
                    r.out.push_str(".RE\n");
                } else {
                    r.out.push_str(".PP\n");
                }
            }
            Event::Start(Tag::Item) => {
                r.flush();
                match list_stack.last_mut() {
                    Some(Some(n)) => {
                        r.out.push_str(&format!(".IP {n}. 4\n"));
                        *n += 1;
                    }
                    _ => r.out.push_str(".IP \\(bu 2\n"),
                }
                r.item_start = true;
            }
            Event::End(TagEnd::Item) => {
                r.flush();
                r.item_start = false;
            }
            Event::Start(Tag::CodeBlock(_)) => {
                r.flush();
                r.out.push_str(".PP\n.RS 4\n.nf\n");
                in_code_block = true;
            }
            Event::End(TagEnd::CodeBlock) => {
                r.out.push_str(".fi\n.RE\n");
                in_code_block = false;
            }
            Event::Start(Tag::Table(aligns)) => {
                r.flush();
                table = Some(Table {
                    columns: aligns.len(),
                    rows: Vec::new(),
                });
            }
            Event::End(TagEnd::Table) => {
                if let Some(t) = table.take() {
                    r.out.push_str(&t.render()?);
                }
            }
            Event::Start(Tag::TableHead) | Event::Start(Tag::TableRow) => {
                if let Some(t) = table.as_mut() {
                    t.rows.push(Vec::new());
                }
            }
            Event::End(TagEnd::TableHead) | Event::End(TagEnd::TableRow) => {}
            Event::Start(Tag::TableCell) => r.inline.clear(),
            Event::End(TagEnd::TableCell) => {
                let cell = escape_lines(&std::mem::take(&mut r.inline));
                if let Some(row) = table.as_mut().and_then(|t| t.rows.last_mut()) {
                    row.push(cell);
                }
            }
            Event::Start(Tag::Strong) => r.inline.push_str("\\fB"),
            Event::End(TagEnd::Strong) => r.inline.push_str("\\fR"),
            Event::Start(Tag::Emphasis) => r.inline.push_str("\\fI"),
            Event::End(TagEnd::Emphasis) => r.inline.push_str("\\fR"),
            Event::Code(code) => {
                r.inline.push_str("\\fB");
                r.inline.push_str(&escape(&code));
                r.inline.push_str("\\fR");
            }
            Event::Text(text) if in_code_block => {
                for line in text.lines() {
                    r.out.push_str(&escape_line_start(&escape(line)));
                    r.out.push('\n');
                }
            }
            Event::Text(text) => {
                let t = escape(&text);
                // Headings are quoted macro arguments: no quotes inside.
                if heading.is_some() {
                    r.inline.push_str(&t.replace('"', "\\(dq"));
                } else {
                    r.inline.push_str(&t);
                }
            }
            Event::SoftBreak => r.inline.push('\n'),
            Event::HardBreak => r.inline.push_str("\n.br\n"),
            Event::Rule => {
                r.flush();
                r.out.push_str(".PP\n");
            }
            Event::Html(_) | Event::InlineHtml(_) => {}
            Event::Start(Tag::Link { .. }) | Event::End(TagEnd::Link) => {}
            other => bail!("docs: unsupported markdown for the man page: {other:?}"),
        }
    }
    r.flush();
    if !titled {
        bail!("docs: the markdown needs a `# name: summary` title");
    }
    // Tables need tbl; this line tells man(1) to run it.
    Ok(format!("'\\\" t\n{}", r.out))
}

#[derive(Default)]
struct Roff {
    out: String,
    inline: String,
    /// The next paragraph is the first of a list item (no `.IP` of its own).
    item_start: bool,
}

impl Roff {
    fn flush(&mut self) {
        let text = std::mem::take(&mut self.inline);
        let text = escape_lines(&text);
        if !text.is_empty() {
            self.out.push_str(&text);
            self.out.push('\n');
        }
    }
}

struct Table {
    columns: usize,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn render(&self) -> Result<String> {
        if self.columns == 0 || self.rows.is_empty() {
            bail!("docs: an empty table");
        }
        // Ragged-right cells: narrow columns cannot be justified.
        let mut out = String::from(".PP\n.na\n.TS\nallbox;\n");
        out.push_str(&vec!["lb"; self.columns].join(" "));
        out.push('\n');
        out.push_str(&vec!["lx"; self.columns].join(" "));
        out.push_str(".\n");
        for row in &self.rows {
            let cells: Vec<String> = (0..self.columns)
                .map(|i| format!("T{{\n{}\nT}}", row.get(i).map(String::as_str).unwrap_or("")))
                .collect();
            out.push_str(&cells.join("\t"));
            out.push('\n');
        }
        out.push_str(".TE\n.ad\n");
        Ok(out)
    }
}

/// Text as roff: backslashes and dashes escaped (so `--flag` copies as typed).
fn escape(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

/// No output line may start with a control character; blank lines are dropped.
fn escape_lines(text: &str) -> String {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty())
        .map(escape_line_start)
        .collect::<Vec<_>>()
        .join("\n")
}

fn escape_line_start(line: &str) -> String {
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line.to_string()
    }
}

fn strip_fonts(text: &str) -> String {
    text.replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\-", "-")
        .replace("\\e", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_the_constructs_the_reference_uses() {
        let md = "# zt-policy: the zt policy format\n\n## Rules\n\nA **bold** and `--code` text.\n.starts with a dot\n\n### Sub\n\n- one\n- two\n\n1. first\n2. second\n\n```toml\nversion = 1\n.x\n```\n\n| key | meaning |\n|---|---|\n| `a` | b c |\n";
        let man = to_man(md, "5", "zt 0.1.0", "zt manual").expect("convert");
        assert!(man.starts_with("'\\\" t\n.TH \"ZT-POLICY\" \"5\""), "{man}");
        assert!(
            man.contains(".SH NAME\nzt-policy \\- the zt policy format\n"),
            "{man}"
        );
        assert!(man.contains(".SH \"RULES\""), "{man}");
        assert!(
            man.contains("A \\fBbold\\fR and \\fB\\-\\-code\\fR text."),
            "{man}"
        );
        assert!(man.contains("\n\\&.starts with a dot"), "{man}");
        assert!(man.contains(".SS \"Sub\""), "{man}");
        assert!(man.contains(".IP \\(bu 2\none\n"), "{man}");
        assert!(man.contains(".IP 1. 4\nfirst\n.IP 2. 4\nsecond\n"), "{man}");
        assert!(man.contains(".nf\nversion = 1\n\\&.x\n.fi"), "{man}");
        assert!(
            man.contains(".TS\nallbox;\nlb lb\nlx lx.\nT{\nkey\nT}\tT{\nmeaning\nT}\n"),
            "{man}"
        );
        assert!(
            man.contains("T{\n\\fBa\\fR\nT}\tT{\nb c\nT}\n.TE\n.ad"),
            "{man}"
        );
    }

    #[test]
    fn a_title_is_required() {
        assert!(to_man("## no title\n", "5", "s", "m").is_err());
    }
}
