//! Field pages from JSON schemas: the MinecraftServer CRD's `openAPIV3Schema` (the text `kubectl
//! explain` shows) and the Helm chart's `values.schema.json`. One walker serves both: every property,
//! nested ones under their dotted path, with its type, whether it is required, its default, its
//! constraints and CEL rules, and its description.

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, bail};
use kube::CustomResourceExt;
use serde_json::Value;

use super::markdown::{code, generated, heading, text};
use atlas_runner::api::MinecraftServer;

/// One property of a schema, under its full path.
struct Field<'a> {
    path: String,
    schema: &'a Value,
    required: bool,
}

/// Every property below `schema`, depth first in name order; array items' properties go under
/// `path[]`.
fn fields<'a>(schema: &'a Value, path: &str, out: &mut Vec<Field<'a>>) {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        let required: Vec<&str> =
            schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        let mut names: Vec<&String> = properties.keys().collect();
        names.sort();
        for name in names {
            let child = &properties[name.as_str()];
            let child_path = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
            out.push(Field { path: child_path.clone(), schema: child, required: required.contains(&name.as_str()) });
            fields(child, &child_path, out);
        }
    }
    if let Some(items) = schema.get("items") {
        fields(items, &format!("{path}[]"), out);
    }
}

/// The type as a reader says it: `string (date-time)`, `array of string`, `map of string to string`.
fn type_name(schema: &Value) -> String {
    if schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
        return "integer or string".to_owned();
    }
    let format = schema.get("format").and_then(Value::as_str);
    let base = match schema.get("type") {
        Some(Value::String(t)) if t == "array" => {
            return format!("array of {}", schema.get("items").map_or_else(|| "any".to_owned(), type_name));
        }
        Some(Value::String(t)) if t == "object" => match schema.get("additionalProperties") {
            Some(inner @ Value::Object(_)) => return format!("map of string to {}", type_name(inner)),
            _ => "object".to_owned(),
        },
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(types)) => types.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" or "),
        _ => "any".to_owned(),
    };
    match format {
        Some(format) => format!("{base} ({format})"),
        None => base,
    }
}

/// A JSON number as written by people: `19`, not `19.0`.
fn number(value: &Value) -> String {
    match value.as_f64() {
        Some(n) if n.fract() == 0.0 && n.abs() < 1e15 => format!("{}", n as i64),
        _ => value.to_string(),
    }
}

/// The constraints a value must meet, one phrase each.
fn constraints(schema: &Value) -> Vec<String> {
    let get = |key: &str| schema.get(key);
    let mut out = Vec::new();
    if let Some(values) = get("enum").and_then(Value::as_array) {
        let values: Vec<String> = values.iter().map(|v| code(v.as_str().map_or(&v.to_string(), |s| s))).collect();
        out.push(format!("be one of {}", values.join(", ")));
    }
    if let Some(pattern) = get("pattern").and_then(Value::as_str) {
        out.push(format!("match {}", code(pattern)));
    }
    match (get("minLength"), get("maxLength")) {
        (Some(min), Some(max)) => out.push(format!("be {} to {} characters long", number(min), number(max))),
        (Some(min), None) => out.push(format!("be at least {} characters long", number(min))),
        (None, Some(max)) => out.push(format!("be at most {} characters long", number(max))),
        (None, None) => {}
    }
    match (get("minimum"), get("maximum")) {
        (Some(min), Some(max)) => out.push(format!("be from {} to {}", number(min), number(max))),
        (Some(min), None) => out.push(format!("be at least {}", number(min))),
        (None, Some(max)) => out.push(format!("be at most {}", number(max))),
        (None, None) => {}
    }
    match (get("minItems"), get("maxItems")) {
        (Some(min), Some(max)) => out.push(format!("have {} to {} items", number(min), number(max))),
        (Some(min), None) => out.push(format!("have at least {} items", number(min))),
        (None, Some(max)) => out.push(format!("have at most {} items", number(max))),
        (None, None) => {}
    }
    if let Some(max) = get("maxProperties") {
        out.push(format!("have at most {} entries", number(max)));
    }
    if let Some(keys) = get("x-kubernetes-list-map-keys").and_then(Value::as_array) {
        let keys: Vec<String> = keys.iter().filter_map(Value::as_str).map(code).collect();
        out.push(format!("be a list keyed by {} (one entry per key)", keys.join(", ")));
    }
    out
}

/// The CEL rules on a field (`x-kubernetes-validations`): the rule and the message the API server
/// answers with when it does not hold.
fn rules(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for rule in schema.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
        let expression = rule.get("rule").and_then(Value::as_str).unwrap_or_default();
        let message = rule.get("message").and_then(Value::as_str);
        let mut line = format!("rule {}", code(expression));
        if let Some(message) = message {
            let _ = write!(line, ", else: {}", text(message));
        }
        out.push(line);
    }
    out
}

/// One field's section: a heading anchored at its path, then what it takes, then its description.
fn write_field(page: &mut String, field: &Field<'_>, default: Option<&Value>) {
    page.push_str(&heading(3, &code(&field.path), &field.path));
    let _ = writeln!(page, "- Type: {}", type_name(field.schema));
    if field.required {
        let _ = writeln!(page, "- Required");
    }
    if let Some(default) = default {
        let _ = writeln!(page, "- Default: {}", code(&default.to_string()));
    }
    for constraint in constraints(field.schema) {
        let _ = writeln!(page, "- Must {constraint}");
    }
    for rule in rules(field.schema) {
        let _ = writeln!(page, "- Validation: {rule}");
    }
    if field.schema.get("type").and_then(Value::as_str) == Some("array")
        && let Some(items) = field.schema.get("items")
    {
        for constraint in constraints(items) {
            let _ = writeln!(page, "- Each item must {constraint}");
        }
        for rule in rules(items) {
            let _ = writeln!(page, "- Validation of each item: {rule}");
        }
    }
    if let Some(description) = field.schema.get("description").and_then(Value::as_str) {
        let _ = writeln!(page, "\n{}", text(description.trim()));
    }
    page.push('\n');
}

/// The MinecraftServer page, from the CRD the code generates (the committed `crds/` file is that
/// same text, checked by tests/cli.rs).
pub(super) fn crd_page() -> anyhow::Result<String> {
    let crd = MinecraftServer::crd();
    let version = crd.spec.versions.first().context("the CRD has a version")?;
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .context("the CRD has an openAPIV3Schema")?;
    let schema = serde_json::to_value(schema)?;
    let names = &crd.spec.names;
    let short = names.short_names.clone().unwrap_or_default().iter().map(|s| code(s)).collect::<Vec<_>>().join(", ");

    let mut page = String::from("# MinecraftServer\n\n");
    page.push_str(&generated("the CRD src/api generates"));
    let _ = writeln!(
        page,
        "{} `apiVersion: {}/{}`, `kind: {}`, namespaced; plural {}, short name {short}.\n",
        schema.get("description").and_then(Value::as_str).map(text).unwrap_or_default(),
        crd.spec.group,
        version.name,
        names.kind,
        code(&names.plural),
    );
    page.push_str(
        "Every field of the resource, with the text `kubectl explain` shows for it. The standalone runner \
         (`atlas-runner run --spec FILE`) reads the same document and checks the same rules before it uses \
         it; fields marked *Operator only* mean nothing to it. A field's anchor is its path: \
         `minecraftserver.md#spec.backup.schedule`.\n\n",
    );
    let whole = rules(&schema);
    if !whole.is_empty() {
        page.push_str("Rules on the whole object:\n\n");
        for rule in whole {
            let _ = writeln!(page, "- {rule}");
        }
        page.push('\n');
    }
    for top in ["spec", "status"] {
        let Some(part) = schema.get("properties").and_then(|p| p.get(top)) else {
            bail!("the CRD's schema has no {top}");
        };
        let _ = writeln!(page, "## {top}\n");
        if let Some(description) = part.get("description").and_then(Value::as_str) {
            let _ = writeln!(page, "{}\n", text(description.trim()));
        }
        let part_rules = rules(part);
        for rule in &part_rules {
            let _ = writeln!(page, "- Validation: {rule}");
        }
        if !part_rules.is_empty() {
            page.push('\n');
        }
        let mut all = Vec::new();
        fields(part, top, &mut all);
        for field in &all {
            write_field(&mut page, field, field.schema.get("default"));
        }
    }
    Ok(page)
}

/// The value at a dotted path of the chart's `values.yaml`.
fn lookup<'a>(values: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(values, |node, key| node.get(key))
}

/// The Helm values page from the chart's `values.schema.json`, with each leaf's default from
/// `values.yaml` where the schema gives none; `None` when the chart has no schema.
pub(super) fn helm_page(chart: &Path) -> anyhow::Result<Option<String>> {
    let schema_path = chart.join("values.schema.json");
    let schema_text = match std::fs::read_to_string(&schema_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", schema_path.display())),
    };
    let schema: Value =
        serde_json::from_str(&schema_text).with_context(|| format!("parse {}", schema_path.display()))?;
    let values_path = chart.join("values.yaml");
    let values: Value = match std::fs::read_to_string(&values_path) {
        Ok(text) => serde_yaml::from_str(&text).with_context(|| format!("parse {}", values_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
        Err(e) => return Err(e).with_context(|| format!("read {}", values_path.display())),
    };

    let mut page = String::from("# Helm values\n\n");
    page.push_str(&generated("the chart's values.schema.json and values.yaml"));
    if let Some(title) = schema.get("title").and_then(Value::as_str) {
        let _ = writeln!(page, "{}.\n", text(title.trim_end_matches('.')));
    }
    page.push_str(
        "Every value the chart takes, as its `values.schema.json` checks it (`helm install` and \
         `helm upgrade` refuse values that break it), with the default from its `values.yaml`. Set \
         one with `--set PATH=VALUE` or in a file given with `-f`.\n\n",
    );
    let mut all = Vec::new();
    fields(&schema, "", &mut all);
    for field in &all {
        let leaf = field.schema.get("properties").is_none();
        let default = field.schema.get("default").or_else(|| {
            (leaf && !field.path.contains("[]"))
                .then(|| lookup(&values, &field.path))
                .flatten()
                .filter(|v| !v.is_null())
        });
        write_field(&mut page, field, default);
    }
    Ok(Some(page))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_are_listed_with_their_paths_types_and_constraints() {
        let schema = json!({
            "type": "object",
            "required": ["image"],
            "properties": {
                "image": {"type": "object", "properties": {
                    "tag": {"type": "string", "maxLength": 128},
                    "pullPolicy": {"type": "string", "enum": ["Always", "Never"]}
                }},
                "ports": {"type": "array", "items": {"type": "object", "properties": {"port": {"type": "integer", "minimum": 1, "maximum": 65535.0}}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "limits": {"type": "object", "additionalProperties": {"x-kubernetes-int-or-string": true}}
            }
        });
        let mut all = Vec::new();
        fields(&schema, "", &mut all);
        let paths: Vec<&str> = all.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["image", "image.pullPolicy", "image.tag", "labels", "limits", "ports", "ports[].port"]);
        assert!(all[0].required && !all[1].required);
        assert_eq!(type_name(all[3].schema), "map of string to string");
        assert_eq!(type_name(all[4].schema), "map of string to integer or string");
        assert_eq!(type_name(all[5].schema), "array of object");
        assert_eq!(constraints(all[1].schema), ["be one of `Always`, `Never`"]);
        assert_eq!(constraints(all[2].schema), ["be at most 128 characters long"]);
        assert_eq!(constraints(all[6].schema), ["be from 1 to 65535"]);
    }

    #[test]
    fn cel_rules_carry_their_messages() {
        let schema = json!({"x-kubernetes-validations": [{"rule": "self == true", "message": "must be <true>"}]});
        assert_eq!(rules(&schema), ["rule `self == true`, else: must be &lt;true>"]);
    }

    #[test]
    fn the_crd_page_documents_every_spec_field_with_its_rules() -> anyhow::Result<()> {
        let page = crd_page()?;
        for text in [
            "<a id=\"spec.eula\"></a>\n### `spec.eula`\n",
            "- Required",
            "spec.eula must be true",
            "<a id=\"spec.pack.source.url.sha256\"></a>\n### `spec.pack.source.url.sha256`\n",
            "- Must match `^[0-9a-f]{64}$`",
            "### `spec.backup.retention.keepLast`",
            "- Default: `10`",
            "### `status.conditions[].type`",
            "metadata.name must be at most 52 characters",
        ] {
            assert!(page.contains(text), "the CRD page lacks {text:?}");
        }
        Ok(())
    }
}
