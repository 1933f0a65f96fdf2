//! The book in docs/: its reference pages are what the code generates today, it builds with mdBook,
//! every page is in its table of contents, and no link or anchor inside it is broken. Links that
//! leave the book are not followed: nothing here leaves the machine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `atlas-runner reference` into a fresh directory and returns what it wrote.
fn generate(chart: &Path) -> Result<(tempfile::TempDir, BTreeMap<String, String>)> {
    let out = tempfile::tempdir()?;
    let run = Command::new(env!("CARGO_BIN_EXE_atlas-runner"))
        .args(["reference", "--out"])
        .arg(out.path())
        .arg("--chart")
        .arg(chart)
        .env_remove("RUST_LOG")
        .output()?;
    ensure!(run.status.success(), "atlas-runner reference failed: {}", String::from_utf8_lossy(&run.stderr));
    let pages = read_pages(out.path())?;
    Ok((out, pages))
}

fn read_pages(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut pages = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            pages.insert(name, std::fs::read_to_string(&path)?);
        }
    }
    Ok(pages)
}

#[test]
fn reference_pages_are_current() -> Result<()> {
    let (_dir, generated) = generate(&repo().join("charts/atlas-runner"))?;
    let committed = read_pages(&repo().join("docs/reference"))?;
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&committed),
        names(&generated),
        "docs/reference/ holds other pages than the code generates: run `make reference` and commit the result"
    );
    for (name, text) in &generated {
        assert!(
            committed[name] == *text,
            "docs/reference/{name} is stale: the code it is made from changed; run `make reference` and commit the result"
        );
    }
    for page in ["minecraftserver.md", "cli.md", "metrics.md"] {
        ensure!(generated.contains_key(page), "no {page} was generated");
    }
    Ok(())
}

#[test]
fn the_helm_values_page_is_made_from_a_charts_schema_and_defaults() -> Result<()> {
    let (_dir, pages) = generate(&repo().join("tests/fixtures/chart"))?;
    let page = pages.get("helm-values.md").context("no helm-values.md for a chart with a schema")?;
    for text in [
        "# Helm values",
        "Values of a small test chart.",
        "<a id=\"image\"></a>\n### `image`\n\n- Type: object\n- Required\n",
        "<a id=\"image.repository\"></a>\n### `image.repository`\n\n- Type: string\n- Required\n- Default: `\"atlas-runner\"`\n- Must be at least 1 characters long\n\nThe image to run.",
        "<a id=\"image.pullPolicy\"></a>\n### `image.pullPolicy`\n\n- Type: string\n- Default: `\"IfNotPresent\"`\n- Must be one of `Always`, `IfNotPresent`, `Never`\n",
        // The schema's own default wins; values.yaml has none for it.
        "<a id=\"resyncSeconds\"></a>\n### `resyncSeconds`\n\n- Type: integer\n- Default: `300`\n- Must be at least 1\n",
        "How many &lt;replicas> run.",
        "<a id=\"imagePullSecrets[].name\"></a>\n### `imagePullSecrets[].name`\n\n- Type: string\n- Required\n",
        "<a id=\"resources\"></a>\n### `resources`\n\n- Type: map of string to string or number\n",
    ] {
        assert!(page.contains(text), "helm-values.md lacks {text:?}:\n{page}");
    }
    // No schema, no page (and no error): the chart without values.schema.json.
    let empty = tempfile::tempdir()?;
    let (_dir, pages) = generate(empty.path())?;
    assert!(!pages.contains_key("helm-values.md"));
    Ok(())
}

#[test]
fn every_metric_the_runner_exports_is_on_the_metrics_page() -> Result<()> {
    // The registry `atlas-runner run` serves: the runner's shared state plus the pack metrics.
    let (shared, _requests) = atlas_runner::runner::shared(prometheus::Registry::new())?;
    atlas_runner::metrics::PackMetrics::register(&shared.registry)?;
    let page = std::fs::read_to_string(repo().join("docs/reference/metrics.md"))?;
    let gathered = shared.registry.gather();
    ensure!(gathered.len() >= 10, "only {} metric families gathered", gathered.len());
    for family in gathered {
        let heading = format!("<a id=\"{0}\"></a>\n### `{0}`", family.name());
        assert!(page.contains(&heading), "docs/reference/metrics.md lacks {}", family.name());
    }
    Ok(())
}

/// The targets of `](...)` links in a Markdown text.
fn markdown_links(text: &str) -> Vec<&str> {
    text.split("](").skip(1).filter_map(|rest| rest.split(')').next()).collect()
}

/// Every Markdown file under `dir`, relative to it.
fn markdown_files(dir: &Path, under: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            markdown_files(&path, under, out)?;
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path.strip_prefix(under)?.to_path_buf());
        }
    }
    Ok(())
}

#[test]
fn every_page_is_in_the_table_of_contents() -> Result<()> {
    let docs = repo().join("docs");
    let summary = std::fs::read_to_string(docs.join("SUMMARY.md"))?;
    let listed: BTreeSet<PathBuf> = markdown_links(&summary).into_iter().map(PathBuf::from).collect();
    let mut files = Vec::new();
    markdown_files(&docs, &docs, &mut files)?;
    let orphans: Vec<_> =
        files.iter().filter(|f| f.as_path() != Path::new("SUMMARY.md") && !listed.contains(*f)).collect();
    assert!(orphans.is_empty(), "pages not in docs/SUMMARY.md (so not in the book): {orphans:?}");
    Ok(())
}

/// The values of every `NAME="..."` attribute in an HTML text.
fn attributes<'a>(html: &'a str, name: &str) -> Vec<&'a str> {
    let needle = format!(" {name}=\"");
    html.split(needle.as_str()).skip(1).filter_map(|rest| rest.split('"').next()).collect()
}

/// `path` with `.` and `..` resolved without touching the filesystem.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// A link inside the built book that does not lead to a file or to an anchor of it.
fn broken_links(book: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let mut stack = vec![book.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "html") {
                files.push(path);
            }
        }
    }
    ensure!(!files.is_empty(), "mdbook wrote no HTML into {}", book.display());
    let mut ids: HashMap<PathBuf, BTreeSet<String>> = HashMap::new();
    let mut broken = Vec::new();
    for file in &files {
        let html = std::fs::read_to_string(file)?;
        // 404.html is served from any depth and so resolves its links from the site's root.
        let base = if html.contains("<base href=\"/\"") {
            book.to_path_buf()
        } else {
            file.parent().unwrap_or(book).to_path_buf()
        };
        for link in attributes(&html, "href").into_iter().chain(attributes(&html, "src")) {
            let external = ["http:", "https:", "mailto:", "//", "javascript:", "data:"];
            if link.is_empty() || external.iter().any(|p| link.starts_with(p)) {
                continue;
            }
            let (path, fragment) = link.split_once('#').unwrap_or((link, ""));
            let path = path.split('?').next().unwrap_or_default();
            let mut target = match path.strip_prefix('/') {
                // Absolute paths are the site's: the book is served from its root.
                Some(rooted) => normalise(&book.join(rooted)),
                None if path.is_empty() => file.clone(),
                None => normalise(&base.join(path)),
            };
            if target.is_dir() {
                target = target.join("index.html");
            }
            let shown = file.strip_prefix(book).unwrap_or(file).display().to_string();
            if !target.starts_with(book) || !target.is_file() {
                broken.push(format!("{shown}: {link} (no such file)"));
                continue;
            }
            if fragment.is_empty() {
                continue;
            }
            if !ids.contains_key(&target) {
                let text = std::fs::read_to_string(&target)?;
                ids.insert(target.clone(), attributes(&text, "id").into_iter().map(str::to_owned).collect());
            }
            if !ids[&target].contains(fragment) {
                broken.push(format!("{shown}: {link} (no anchor #{fragment})"));
            }
        }
    }
    Ok(broken)
}

#[test]
fn the_book_builds_and_no_internal_link_is_broken() -> Result<()> {
    let mdbook = atlas_testbed::bin("mdbook")?;
    let out = tempfile::tempdir()?;
    let build = Command::new(&mdbook).arg("build").arg(repo().join("docs")).arg("-d").arg(out.path()).output()?;
    let log = String::from_utf8_lossy(&build.stderr);
    ensure!(build.status.success(), "mdbook build failed:\n{log}");
    let complaints: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    ensure!(complaints.is_empty(), "mdbook build complained:\n{}", complaints.join("\n"));
    let broken = broken_links(out.path())?;
    if !broken.is_empty() {
        bail!("{} broken links in the book:\n{}", broken.len(), broken.join("\n"));
    }
    Ok(())
}

#[test]
fn the_link_check_finds_a_missing_page_and_a_missing_anchor() -> Result<()> {
    let book = tempfile::tempdir()?;
    std::fs::create_dir(book.path().join("guide"))?;
    std::fs::write(book.path().join("index.html"), r#"<a href="guide/a.html#there">a</a> <a href="gone.html">b</a>"#)?;
    std::fs::write(
        book.path().join("guide/a.html"),
        r#"<h2 id="there">x</h2><a href="../index.html#nowhere">c</a><img src="../img.png"><a href="https://example.com/x">d</a>"#,
    )?;
    let mut broken = broken_links(book.path())?;
    broken.sort();
    assert_eq!(
        broken,
        [
            "guide/a.html: ../img.png (no such file)",
            "guide/a.html: ../index.html#nowhere (no anchor #nowhere)",
            "index.html: gone.html (no such file)",
        ]
    );
    Ok(())
}

/// The troubleshooting section a source file's error categories belong to: the area the library's
/// pointers use for the file's module (`src/pack/...` is `pack`, `src/rcon.rs` is `rcon`, but
/// `src/runner/spec.rs` is `spec`).
fn area(path: &str) -> String {
    let inner = path.strip_prefix("src/").unwrap_or(path).trim_end_matches(".rs");
    let inner = inner.strip_suffix("/mod").unwrap_or(inner);
    let module = format!("atlas_runner::{}", inner.replace('/', "::"));
    atlas_runner::troubleshooting::area(&module).to_owned()
}

/// The words in the body of each `fn category` of `source`: every string literal of lowercase
/// letters, `_` and `-`, which is what a category is.
fn category_words(source: &str) -> Vec<String> {
    let mut words = Vec::new();
    for (start, _) in source.match_indices("fn category(") {
        let Some(open) = source[start..].find('{').map(|i| start + i) else { continue };
        let mut depth = 0;
        let mut end = open;
        for (i, c) in source[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let body = &source[open..end];
        for literal in body.split('"').skip(1).step_by(2) {
            if !literal.is_empty() && literal.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '-') {
                words.push(literal.to_owned());
            }
        }
    }
    words
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[test]
fn every_error_category_has_a_troubleshooting_entry_and_every_entry_a_category() -> Result<()> {
    let mut files = Vec::new();
    rust_files(&repo().join("src"), &mut files)?;
    let mut expected = BTreeSet::new();
    let mut areas = BTreeSet::new();
    for file in files {
        let source = std::fs::read_to_string(&file)?;
        let words = category_words(&source);
        if words.is_empty() {
            continue;
        }
        let relative = file.strip_prefix(repo())?.to_string_lossy().replace('\\', "/");
        let area = area(&relative);
        areas.insert(area.clone());
        expected.extend(words.into_iter().map(|w| format!("{area}-{w}")));
    }
    ensure!(expected.len() > 80, "only {} categories found: is the parser still right?", expected.len());
    let page = std::fs::read_to_string(repo().join("docs/troubleshooting.md"))?;
    let entries: BTreeSet<String> = page
        .split("<a id=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|id| areas.iter().any(|a: &String| id.starts_with(&format!("{a}-"))))
        .map(str::to_owned)
        .collect();
    let missing: Vec<_> = expected.difference(&entries).collect();
    let stale: Vec<_> = entries.difference(&expected).collect();
    assert!(missing.is_empty(), "categories without an entry in docs/troubleshooting.md: {missing:?}");
    assert!(stale.is_empty(), "docs/troubleshooting.md has entries for categories the code no longer has: {stale:?}");
    // The pointer every one-line error and condition message ends with leads to that entry.
    for id in &expected {
        let (area, category) = id.split_once('-').context("an id without an area")?;
        let pointer = atlas_runner::troubleshooting::pointer(area, category);
        assert_eq!(pointer, Some(format!("see docs/troubleshooting.md#{id}")), "the pointer for {id}");
    }
    Ok(())
}

#[test]
fn the_condition_reasons_messages_point_at_have_entries() -> Result<()> {
    use atlas_runner::api::conditions::reasons;
    let page = std::fs::read_to_string(repo().join("docs/troubleshooting.md"))?;
    for reason in [
        reasons::PACK_SOURCE_UNREACHABLE,
        reasons::DOWNLOAD_API_UNREACHABLE,
        reasons::STORE_UNREACHABLE,
        reasons::SAVING_LEFT_OFF,
        reasons::SECRET_MISSING,
        reasons::SECRET_KEY_MISSING,
        reasons::POD_NOT_READY,
        reasons::OUTSIDE_WINDOW,
        reasons::PLAYERS_ONLINE,
    ] {
        let entry = atlas_runner::troubleshooting::entry(atlas_runner::troubleshooting::REASON, reason)
            .with_context(|| format!("no troubleshooting entry for the reason {reason}"))?;
        let (path, id) = entry.split_once('#').context("an entry without an anchor")?;
        assert_eq!(path, "docs/troubleshooting.md");
        assert!(page.contains(&format!("<a id=\"{id}\"></a>")), "{entry} is not an anchor of the page on disk");
    }
    Ok(())
}

#[test]
fn areas_are_modules_but_for_the_named_files() {
    assert_eq!(area("src/pack/source/mod.rs"), "pack");
    assert_eq!(area("src/rcon.rs"), "rcon");
    assert_eq!(area("src/runner/prepare.rs"), "runner");
    assert_eq!(area("src/runner/spec.rs"), "spec");
    assert_eq!(area("src/supervisor/classify.rs"), "exit");
    assert_eq!(area("src/supervisor/mod.rs"), "process");
    assert_eq!(area("src/http/client.rs"), "control");
    assert_eq!(area("src/telemetry.rs"), "logging");
}

#[test]
fn category_words_are_read_from_every_arm() {
    let source = r#"
        impl E {
            pub fn category(&self) -> &'static str {
                match self {
                    Self::A { .. } => "bad-spec",
                    Self::B(e) => e.category(),
                    Self::C => { if x { "io" } else { "local_io" } }
                }
            }
            fn other(&self) -> &str { "not_me" }
        }
    "#;
    assert_eq!(category_words(source), ["bad-spec", "io", "local_io"]);
}

#[test]
fn the_readmes_links_into_the_repository_lead_to_files_and_anchors() -> Result<()> {
    let readme = std::fs::read_to_string(repo().join("README.md"))?;
    let mut broken = Vec::new();
    for link in markdown_links(&readme) {
        if link.contains("://") {
            continue;
        }
        let (path, fragment) = link.split_once('#').unwrap_or((link, ""));
        let target = repo().join(path);
        if !target.exists() {
            broken.push(format!("{link} (no such file)"));
        } else if !fragment.is_empty() {
            let text = std::fs::read_to_string(&target)?;
            if !text.contains(&format!("<a id=\"{fragment}\"")) {
                broken.push(format!("{link} (no anchor)"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links in README.md: {broken:?}");
    ensure!(readme.lines().count() <= 170, "README.md has grown past a front door: move detail into the book");
    Ok(())
}
