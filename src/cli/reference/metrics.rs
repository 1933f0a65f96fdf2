//! The metrics page, from the metrics each component registers: its name, type, labels and help,
//! read back from the registered collectors themselves (see `atlas_runner::metrics`).

use std::fmt::Write;

use atlas_runner::metrics::{AgentMetrics, BackupMetrics, PackMetrics, RunnerMetrics};
use atlas_runner::operator::metrics::OperatorMetrics;
use prometheus::Registry;
use prometheus::core::Collector;
use prometheus::proto::MetricType;

use super::markdown::{code, generated, heading, text};

/// One component's metrics, as its own `register` creates them.
struct Component {
    title: &'static str,
    /// Where its metrics are exported.
    exported: &'static str,
    metrics: Box<dyn Collector>,
}

fn components() -> prometheus::Result<Vec<Component>> {
    Ok(vec![
        Component {
            title: "Server, JVM and RCON",
            exported: "On the runner's `/metrics` (`atlas-runner run`).",
            metrics: Box::new(RunnerMetrics::register(&Registry::new())?),
        },
        Component {
            title: "Packs",
            exported: "On the runner's `/metrics`, and written by `pack apply --metrics-textfile FILE`.",
            metrics: Box::new(PackMetrics::register(&Registry::new())?),
        },
        Component {
            title: "Backups",
            exported: "On the runner's `/metrics` (its scheduled and on-demand backups), and written by \
                       `backup create --metrics-textfile FILE`.",
            metrics: Box::new(BackupMetrics::register(&Registry::new())?),
        },
        Component {
            title: "The in-pod agent",
            exported: "On the agent's `/metrics` (`atlas-runner agent`), beside the runner's.",
            metrics: Box::new(AgentMetrics::register(&Registry::new())?),
        },
        Component {
            title: "Operator",
            exported: "On the operator's `/metrics` (`atlas-runner operator --metrics-addr`; the chart's \
                       `metrics.port`, 8080).",
            metrics: Box::new(OperatorMetrics::register(&Registry::new())?),
        },
    ])
}

fn type_name(kind: MetricType) -> &'static str {
    match kind {
        MetricType::COUNTER => "counter",
        MetricType::GAUGE => "gauge",
        MetricType::HISTOGRAM => "histogram",
        MetricType::SUMMARY => "summary",
        MetricType::UNTYPED => "untyped",
    }
}

pub(super) fn page() -> anyhow::Result<String> {
    let mut page = String::from("# Metrics\n\n");
    page.push_str(&generated("the metrics src/metrics.rs and src/operator/metrics.rs register"));
    page.push_str(
        "Every metric Atlas Runner exports, in the Prometheus text format on `/metrics` of the admin \
         address (`--metrics-addr`, default `127.0.0.1:9100`). A label whose values are listed has \
         those series from the start, so `rate()` and alerts see the first event; other labels get \
         a series when the first event happens. See the [observability guide](../guides/observability.md) \
         for what to watch.\n\n",
    );
    for component in components()? {
        let _ = writeln!(page, "## {}\n\n{}\n", component.title, component.exported);
        let families = component.metrics.collect();
        for desc in component.metrics.desc() {
            let family = families.iter().find(|f| f.name() == desc.fq_name);
            let kind = family.map_or("untyped", |f| type_name(f.get_field_type()));
            page.push_str(&heading(3, &code(&desc.fq_name), &desc.fq_name));
            let _ = writeln!(page, "- Type: {kind}");
            for label in &desc.variable_labels {
                let mut values: Vec<&str> = family
                    .into_iter()
                    .flat_map(|f| f.get_metric())
                    .flat_map(|m| m.get_label())
                    .filter(|l| l.name() == label)
                    .map(|l| l.value())
                    .collect();
                values.sort_unstable();
                values.dedup();
                if values.is_empty() {
                    let _ = writeln!(page, "- Label {}", code(label));
                } else {
                    let values: Vec<String> = values.into_iter().map(code).collect();
                    let _ = writeln!(page, "- Label {}: {}", code(label), values.join(", "));
                }
            }
            for pair in &desc.const_label_pairs {
                let _ = writeln!(page, "- Label {} (constant for the process)", code(pair.name()));
            }
            let _ = writeln!(page, "\n{}\n", text(&desc.help));
        }
    }
    Ok(page)
}
