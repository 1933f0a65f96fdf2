//! `server.properties`: merging the spec's and the runner's entries into the file the server keeps.
//!
//! The file is Java properties text. The merge edits only the lines of keys it sets, so comments,
//! order, unknown keys and the server's own formatting survive; new keys go at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::ServerError;
use super::files::atomic_write;

/// One logical line of the file: the original text (with its line endings) and, for an entry, its
/// unescaped key and value.
#[derive(Debug)]
struct Line<'a> {
    raw: &'a str,
    entry: Option<(String, String)>,
}

/// Splits `text` into logical lines, joining continuation lines (an odd number of trailing `\`).
fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = start;
        let mut logical = String::new();
        let mut first = true;
        loop {
            let rest = &text[end..];
            let len = rest.find('\n').map_or(rest.len(), |i| i + 1);
            let physical = rest[..len].trim_end_matches(['\n', '\r']);
            end += len;
            let content = physical.trim_start_matches([' ', '\t', '\x0c']);
            if first && (content.is_empty() || content.starts_with(['#', '!'])) {
                break;
            }
            first = false;
            let trailing = content.len() - content.trim_end_matches('\\').len();
            if trailing % 2 == 1 && end < text.len() {
                logical.push_str(&content[..content.len() - 1]);
            } else {
                logical.push_str(content);
                break;
            }
        }
        let entry = (!first).then(|| split_entry(&logical));
        out.push(Line { raw: &text[start..end], entry });
        start = end;
    }
    out
}

/// Splits a logical line into its unescaped key and value.
fn split_entry(line: &str) -> (String, String) {
    let mut escaped = false;
    let mut key_end = line.len();
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if matches!(c, '=' | ':' | ' ' | '\t' | '\x0c') {
            key_end = i;
            break;
        }
    }
    let rest = line[key_end..].trim_start_matches([' ', '\t', '\x0c']);
    let rest = rest.strip_prefix(['=', ':']).unwrap_or(rest);
    let value = rest.trim_start_matches([' ', '\t', '\x0c']);
    (unescape(&line[..key_end]), unescape(value))
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut units: Vec<u16> = Vec::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            flush_utf16(&mut units, &mut out);
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('u') => {
                let hex: String = chars.clone().take(4).collect();
                match u16::from_str_radix(&hex, 16) {
                    Ok(unit) if hex.len() == 4 => {
                        units.push(unit);
                        chars.nth(3);
                    }
                    // Java refuses a malformed \u escape; keep the text rather than fail the start.
                    _ => {
                        flush_utf16(&mut units, &mut out);
                        out.push('u');
                    }
                }
            }
            Some(other) => {
                flush_utf16(&mut units, &mut out);
                out.push(match other {
                    't' => '\t',
                    'n' => '\n',
                    'r' => '\r',
                    'f' => '\x0c',
                    c => c,
                });
            }
            None => {}
        }
    }
    flush_utf16(&mut units, &mut out);
    out
}

fn flush_utf16(units: &mut Vec<u16>, out: &mut String) {
    if !units.is_empty() {
        out.push_str(&String::from_utf16_lossy(units));
        units.clear();
    }
}

/// Escapes as `java.util.Properties.store` does, with non-ASCII as `\uXXXX` so the file reads the
/// same whether the server decodes it as ISO-8859-1 or UTF-8.
fn escape(s: &str, key: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\x0c' => out.push_str("\\f"),
            '=' | ':' | '#' | '!' => {
                out.push('\\');
                out.push(c);
            }
            ' ' if key || i == 0 => out.push_str("\\ "),
            c if (' '..='~').contains(&c) => out.push(c),
            c => {
                let mut units = [0; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }
    }
    out
}

/// Merges entries into properties text: `runner` wins over `spec`, which wins over `existing`.
/// Lines of keys neither sets are kept verbatim (comments, order, unknown keys); a line whose value
/// already matches is kept as written; new keys are appended in key order.
pub fn merge_properties(existing: &str, spec: &BTreeMap<String, String>, runner: &BTreeMap<String, String>) -> String {
    let mut wanted: BTreeMap<&str, &str> = spec.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    wanted.extend(runner.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut seen = BTreeSet::new();
    let mut out = String::with_capacity(existing.len() + 64 * wanted.len());
    for line in lines(existing) {
        let Some((key, value)) = &line.entry else {
            out.push_str(line.raw);
            continue;
        };
        let Some(&want) = wanted.get(key.as_str()) else {
            out.push_str(line.raw);
            continue;
        };
        seen.insert(key.clone());
        if value == want {
            out.push_str(line.raw);
        } else {
            let ending = if line.raw.ends_with("\r\n") { "\r\n" } else { "\n" };
            out.push_str(&format!("{}={}{ending}", escape(key, true), escape(want, false)));
        }
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for (key, value) in wanted {
        if !seen.contains(key) {
            out.push_str(&format!("{}={}\n", escape(key, true), escape(value, false)));
        }
    }
    out
}

/// The entries of properties text (the last of a repeated key wins, as in Java).
pub fn parse_properties(text: &str) -> BTreeMap<String, String> {
    lines(text).into_iter().filter_map(|l| l.entry).collect()
}

/// Merges into `DATA/server.properties` (created if missing), writing it atomically when it changes,
/// and returns the entries the file now holds.
pub fn write_properties(
    data_dir: &Path,
    spec: &BTreeMap<String, String>,
    runner: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ServerError> {
    let path = data_dir.join("server.properties");
    let existing = match std::fs::read(&path) {
        // Minecraft writes UTF-8 today and ISO-8859-1 in old versions; the lossy read only touches
        // bytes of the latter, and those lines are kept byte-for-byte only if valid.
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(ServerError::io(&path, e)),
    };
    let merged = merge_properties(&existing, spec, runner);
    if merged != existing {
        atomic_write(&path, merged.as_bytes(), None)?;
    }
    Ok(parse_properties(&merged))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    const SERVER_PROPERTIES: &str = "#Minecraft server properties\n#Sat Aug 17 12:00:00 UTC 2026\n\
        enable-rcon=false\nmotd=A Minecraft Server\n! a bang comment\nmax-players=20\n\
        my-plugin-key = kept as is\nrcon.password=\nlevel-seed=\n";

    #[test]
    fn merge_keeps_comments_order_and_unknown_keys() {
        let spec = map(&[("motd", "hello"), ("difficulty", "hard"), ("max-players", "20")]);
        let runner = map(&[("enable-rcon", "true"), ("rcon.password", "pw"), ("motd", "runner wins")]);
        let merged = merge_properties(SERVER_PROPERTIES, &spec, &runner);
        assert_eq!(
            merged,
            "#Minecraft server properties\n#Sat Aug 17 12:00:00 UTC 2026\nenable-rcon=true\nmotd=runner wins\n\
             ! a bang comment\nmax-players=20\nmy-plugin-key = kept as is\nrcon.password=pw\nlevel-seed=\n\
             difficulty=hard\n"
        );
        // Merging again changes nothing.
        assert_eq!(merge_properties(&merged, &spec, &runner), merged);
    }

    #[test]
    fn spec_wins_over_the_file() {
        let merged = merge_properties("motd=old\r\nother=1", &map(&[("motd", "new")]), &BTreeMap::new());
        assert_eq!(merged, "motd=new\r\nother=1\n");
        assert_eq!(merge_properties("", &map(&[("a", "1")]), &BTreeMap::new()), "a=1\n");
    }

    #[test]
    fn java_escapes_and_separators_are_understood() {
        let text = "a:1\nb 2\nc\\:d=x\\=y\n  e = spaced\nlong = one \\\n    two\nuni=caf\\u00e9\nf\\ g=\\#h\n";
        let parsed = parse_properties(text);
        assert_eq!(parsed.get("a").map(String::as_str), Some("1"));
        assert_eq!(parsed.get("b").map(String::as_str), Some("2"));
        assert_eq!(parsed.get("c:d").map(String::as_str), Some("x=y"));
        assert_eq!(parsed.get("e").map(String::as_str), Some("spaced"));
        assert_eq!(parsed.get("long").map(String::as_str), Some("one two"));
        assert_eq!(parsed.get("uni").map(String::as_str), Some("café"));
        assert_eq!(parsed.get("f g").map(String::as_str), Some("#h"));
        // A continued entry is replaced as a whole.
        let merged = merge_properties(text, &map(&[("long", "short")]), &BTreeMap::new());
        assert!(merged.contains("\nlong=short\nuni=") && !merged.contains("two"), "{merged}");
    }

    #[test]
    fn written_values_read_back_the_same() {
        let tricky = map(&[("motd", " §aHi: a=b #1 \\ ✓"), ("key with space", "v")]);
        let merged = merge_properties("", &tricky, &BTreeMap::new());
        assert!(merged.is_ascii(), "{merged}");
        assert_eq!(parse_properties(&merged), tricky);
    }

    #[test]
    fn write_properties_creates_and_reports_the_file() -> anyhow::Result<()> {
        let tmp = crate::server::test_dir("properties")?;
        let dir = tmp.path();
        let written = write_properties(dir, &map(&[("motd", "hi")]), &map(&[("enable-rcon", "true")]))?;
        assert_eq!(written, map(&[("enable-rcon", "true"), ("motd", "hi")]));
        assert_eq!(std::fs::read_to_string(dir.join("server.properties"))?, "enable-rcon=true\nmotd=hi\n");
        Ok(())
    }
}
