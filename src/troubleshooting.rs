//! Where the book says what to do about an error: the one pointer form (`see
//! docs/troubleshooting.md#AREA-CATEGORY`) that one-line errors and condition messages end with.
//!
//! An entry's anchor is its area (the module an error comes from, as a reader knows it) and its
//! category. The page is compiled in, so a pointer is only ever given to an anchor that exists;
//! tests/docs.rs checks that every category of the code has one.

use std::error::Error;

/// The troubleshooting page, as a path in the repository (the book renders it as
/// `troubleshooting.html` with the same anchors).
pub const PAGE: &str = "docs/troubleshooting.md";

/// The page's text, to check an anchor before pointing at it.
const PAGE_TEXT: &str = include_str!("../docs/troubleshooting.md");

/// The pseudo-area of the entries for condition reasons that are no error category
/// (`SecretMissing`, ...): `reason-SecretMissing`.
pub const REASON: &str = "reason";

/// The troubleshooting area of a module (a Rust module path such as `atlas_runner::pack::source`):
/// its top module, but for the modules whose errors a reader knows by another name.
pub fn area(module: &str) -> &str {
    let inner = module.strip_prefix("atlas_runner::").unwrap_or(module);
    match inner {
        "runner::spec" => "spec",
        "supervisor" => "process",
        "supervisor::classify" => "exit",
        "http::client" => "control",
        "telemetry" => "logging",
        _ => inner.split("::").next().unwrap_or(inner),
    }
}

/// `docs/troubleshooting.md#AREA-KEY`, when the page has that entry.
pub fn entry(area: &str, key: &str) -> Option<String> {
    let id = format!("{area}-{key}");
    PAGE_TEXT.contains(&format!("<a id=\"{id}\"></a>")).then(|| format!("{PAGE}#{id}"))
}

/// `see docs/troubleshooting.md#AREA-KEY`, when the page has that entry.
pub fn pointer(area: &str, key: &str) -> Option<String> {
    entry(area, key).map(|e| format!("see {e}"))
}

/// `message` with `; see ...` appended for the entry `area`-`key` (unless it already points at the
/// page, or there is no such entry).
pub fn with_pointer(message: String, area: &str, key: &str) -> String {
    append(message, pointer(area, key))
}

/// `message` with `; see ...` appended for the first error of `error`'s chain that has an entry.
pub fn with_pointer_for(message: String, error: &(dyn Error + 'static)) -> String {
    append(message, pointer_for(error))
}

fn append(message: String, pointer: Option<String>) -> String {
    match pointer {
        Some(pointer) if !message.contains(PAGE) => format!("{message}; {pointer}"),
        _ => message,
    }
}

/// The pointer for the first error of `error`'s chain (outermost first) whose area and category
/// have an entry. An outer error that passes an inner one's category on (`PrepareError::Pack`)
/// has no entry under its own area, so the inner one's is found.
pub fn pointer_for(error: &(dyn Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(pointer) = categorised(current).and_then(|(area, category)| pointer(area, category)) {
            return Some(pointer);
        }
        next = current.source();
    }
    None
}

/// The module part of a type's path.
fn module_of<T: ?Sized>() -> &'static str {
    let name = std::any::type_name::<T>();
    name.rsplit_once("::").map_or(name, |(module, _)| module)
}

/// The area and category of an error of one of the library's categorised types.
fn categorised(error: &(dyn Error + 'static)) -> Option<(&'static str, &'static str)> {
    macro_rules! try_types {
        ($($t:ty),* $(,)?) => {
            $(
                if let Some(e) = error.downcast_ref::<$t>() {
                    return Some((area(module_of::<$t>()), e.category()));
                }
            )*
        };
    }
    try_types!(
        crate::runner::SpecError,
        crate::runner::PrepareError,
        crate::server::ServerError,
        crate::supervisor::SupervisorError,
        crate::rcon::RconError,
        crate::http::client::ClientError,
        crate::pack::provision::ProvisionError,
        crate::pack::source::SourceError,
        crate::pack::build::BuildError,
        crate::pack::extract::ExtractError,
        crate::pack::apply::ApplyError,
        crate::pack::store::StoreError,
        crate::pack::lock::LockError,
        crate::pack::journal::JournalError,
        crate::pack::path::PathError,
        crate::pack::manifest::ManifestError,
        crate::backup::BackupError,
        crate::backup::store::StoreError,
        crate::backup::snapshot::SnapshotError,
        crate::backup::archive::ArchiveError,
        crate::backup::upload::UploadError,
        crate::telemetry::TelemetryError,
        crate::operator::Error,
        crate::operator::StartError,
        crate::agent::AgentError,
    );
    // A backup failure carries its category as data; its area is the backups'.
    if let Some(e) = error.downcast_ref::<crate::runner::backup::BackupFailure>() {
        return Some(("backup", e.category));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_are_top_modules_but_for_the_named_ones() {
        assert_eq!(area("atlas_runner::pack::source"), "pack");
        assert_eq!(area("atlas_runner::rcon"), "rcon");
        assert_eq!(area("atlas_runner::runner::prepare"), "runner");
        assert_eq!(area("atlas_runner::runner::spec"), "spec");
        assert_eq!(area("atlas_runner::supervisor"), "process");
        assert_eq!(area("atlas_runner::supervisor::classify"), "exit");
        assert_eq!(area(module_of::<crate::pack::extract::ExtractError>()), "pack");
        assert_eq!(area(module_of::<crate::runner::SpecError>()), "spec");
    }

    #[test]
    fn a_pointer_is_given_only_to_an_entry_that_exists() {
        assert_eq!(pointer("backup", "credentials").as_deref(), Some("see docs/troubleshooting.md#backup-credentials"));
        assert_eq!(pointer("backup", "no_such_category"), None);
        assert_eq!(with_pointer("x".into(), "nowhere", "io"), "x");
        let once = with_pointer("bad".into(), "backup", "credentials");
        assert_eq!(once, "bad; see docs/troubleshooting.md#backup-credentials");
        assert_eq!(with_pointer(once.clone(), "backup", "store"), once, "a second pointer is not added");
    }

    #[test]
    fn the_chain_is_searched_for_the_first_error_with_an_entry() -> Result<(), String> {
        let path = std::path::Path::new("server.yaml");
        let spec = crate::runner::parse_spec(path, "eula: false\nserver: {type: vanilla}\n");
        let Err(error) = spec else { return Err("a spec without the EULA parsed".into()) };
        let category = error.category();
        assert_eq!(pointer_for(&error), pointer("spec", category), "{error}");
        assert!(pointer_for(&error).is_some(), "{category} has no entry");
        let plain = std::io::Error::other("no category");
        assert_eq!(pointer_for(&plain), None);
        Ok(())
    }
}
