//! The conditions page: every condition type and reason (also the Event reasons) declared as a
//! constant in `api::conditions`, with its doc comment. Rust keeps no doc comments at run time, so
//! this reads them from the module's source, compiled in: each `///` block and the `pub const NAME:
//! &str = "Word";` it documents, and nested `pub mod` blocks as sections.

use std::fmt::Write;

use super::markdown::{code, generated, heading, text};

/// The source the constants are read from.
const API_SOURCE: &str = include_str!("../../api/mod.rs");

/// One documented word.
#[derive(Debug, PartialEq, Eq)]
struct Word {
    value: String,
    doc: String,
}

/// A module of words: the top one holds the condition types, nested ones (`reasons`) the rest.
#[derive(Debug, PartialEq, Eq)]
struct Section {
    name: String,
    doc: String,
    words: Vec<Word>,
}

/// `"Word"` from `pub const NAME: &str = "Word";`.
fn str_const(line: &str) -> Option<String> {
    let rest = line.strip_prefix("pub const ")?;
    let (_, rest) = rest.split_once(": &str = \"")?;
    let value = rest.strip_suffix("\";")?;
    Some(value.to_owned())
}

/// The sections of `pub mod conditions` in `source`, or `None` when it has no such module.
fn parse(source: &str) -> Option<Vec<Section>> {
    let mut lines = source.lines().map(str::trim).skip_while(|l| *l != "pub mod conditions {");
    lines.next()?;
    let mut sections = vec![Section { name: "conditions".to_owned(), doc: String::new(), words: Vec::new() }];
    // Indexes into `sections` of the modules we are inside, innermost last.
    let mut open = vec![0];
    let mut doc: Vec<&str> = Vec::new();
    for line in lines {
        if let Some(comment) = line.strip_prefix("///") {
            doc.push(comment.strip_prefix(' ').unwrap_or(comment));
            continue;
        }
        let text = doc.join("\n");
        doc.clear();
        if let Some(name) = line.strip_prefix("pub mod ").and_then(|l| l.strip_suffix(" {")) {
            sections.push(Section { name: name.to_owned(), doc: text, words: Vec::new() });
            open.push(sections.len() - 1);
        } else if let Some(value) = str_const(line) {
            let current = *open.last()?;
            sections[current].words.push(Word { value, doc: text });
        } else if line == "}" {
            open.pop();
            if open.is_empty() {
                return Some(sections);
            }
        }
    }
    None
}

fn render(sections: &[Section]) -> String {
    let mut page = String::from("# Conditions and reasons\n\n");
    page.push_str(&generated("the constants in src/api (api::conditions)"));
    page.push_str(
        "`status.conditions` of a MinecraftServer holds one entry per condition type (`kubectl get mcs \
         NAME -o yaml`, `kubectl describe mcs NAME`); each has a status (`True`, `False`), a reason from \
         the list below and a message for people. The Events the agent records for the server's \
         transitions have the reasons of the last section. [Troubleshooting](../troubleshooting.md) \
         says what to do about each failure.\n\n",
    );
    for section in sections {
        let (title, prefix) = if section.name == "conditions" {
            ("Condition types".to_owned(), "type")
        } else {
            let mut name = section.name.clone();
            if let Some(first) = name.get_mut(0..1) {
                first.make_ascii_uppercase();
            }
            // Event reasons share words with condition reasons (BackupFailed): their own anchors.
            (name, if section.name == "events" { "event" } else { "reason" })
        };
        let _ = writeln!(page, "## {title}\n");
        if !section.doc.is_empty() {
            let _ = writeln!(page, "{}\n", text(&section.doc));
        }
        for word in &section.words {
            page.push_str(&heading(3, &code(&word.value), &format!("{prefix}-{}", word.value)));
            let _ = writeln!(page, "{}\n", text(&word.doc));
        }
    }
    page
}

/// The page, or `None` while `src/api` declares no condition constants.
pub(super) fn page() -> anyhow::Result<Option<String>> {
    match parse(API_SOURCE) {
        None => Ok(None),
        Some(sections) if sections.iter().all(|s| s.words.is_empty()) => {
            anyhow::bail!("api::conditions declares no `pub const NAME: &str` this generator can read")
        }
        Some(sections) => Ok(Some(render(&sections))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#"
pub struct Other;

/// The condition types and reasons.
pub mod conditions {
    /// The server runs and answers (agent).
    pub const READY: &str = "Ready";
    /// The spec's pack is applied,
    /// on two lines.
    pub const PACK_APPLIED: &str = "PackApplied";
    /// Not a word.
    pub const AGENT_TYPES: [&str; 2] = [READY, PACK_APPLIED];

    /// Condition reasons, also Event reasons.
    pub mod reasons {
        /// Ready: the server printed `Done (`.
        pub const RUNNING: &str = "Running";
    }
}

/// After the module.
pub const LATER: &str = "Later";
"#;

    #[test]
    fn words_are_read_with_their_docs_and_sections() {
        let sections = parse(SOURCE).unwrap_or_default();
        assert_eq!(
            sections,
            [
                Section {
                    name: "conditions".into(),
                    doc: String::new(),
                    words: vec![
                        Word { value: "Ready".into(), doc: "The server runs and answers (agent).".into() },
                        Word { value: "PackApplied".into(), doc: "The spec's pack is applied,\non two lines.".into() },
                    ],
                },
                Section {
                    name: "reasons".into(),
                    doc: "Condition reasons, also Event reasons.".into(),
                    words: vec![Word { value: "Running".into(), doc: "Ready: the server printed `Done (`.".into() }],
                },
            ]
        );
        let page = render(&sections);
        assert!(
            page.contains("<a id=\"type-Ready\"></a>\n### `Ready`\n\nThe server runs and answers (agent)."),
            "{page}"
        );
        assert!(page.contains("## Reasons\n\nCondition reasons, also Event reasons."), "{page}");
        assert!(page.contains("<a id=\"reason-Running\"></a>\n### `Running`"), "{page}");
        assert!(!page.contains("Later"), "{page}");
    }

    #[test]
    fn no_module_no_page() {
        assert_eq!(parse("pub const READY: &str = \"Ready\";"), None);
    }
}
