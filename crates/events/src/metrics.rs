//! The backbone's own figures, in the Prometheus text format: outbox backlog per source, consumer lag,
//! events applied and dead-lettered per consumer group. Shared by every relay and consumer of a process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Gauge,
    Counter,
}

type Labels = Vec<(&'static str, String)>;
/// name and labels -> kind, help text, value.
type Series = BTreeMap<(&'static str, Labels), (Kind, &'static str, i64)>;

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Series>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn with(&self, f: impl FnOnce(&mut Series)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn set(&self, name: &'static str, help: &'static str, labels: Labels, value: i64) {
        self.with(|m| {
            m.insert((name, labels), (Kind::Gauge, help, value));
        });
    }

    fn add(&self, name: &'static str, help: &'static str, labels: Labels, by: i64) {
        self.with(|m| {
            m.entry((name, labels)).or_insert((Kind::Counter, help, 0)).2 += by;
        });
    }

    pub fn outbox_backlog(&self, source: &str, rows: i64) {
        self.set("socialcard_outbox_backlog", "Outbox rows not yet published.", vec![("source", source.into())], rows);
    }

    pub fn consumer_lag(&self, group: &str, topic: &str, events: i64) {
        self.set(
            "socialcard_consumer_lag",
            "Events on the topic the consumer group has not processed yet.",
            vec![("group", group.into()), ("topic", topic.into())],
            events,
        );
    }

    pub fn applied(&self, group: &str, n: i64) {
        self.add(
            "socialcard_events_applied_total",
            "Events applied by the consumer group.",
            vec![("group", group.into())],
            n,
        );
    }

    pub fn duplicates(&self, group: &str, n: i64) {
        self.add(
            "socialcard_events_duplicate_total",
            "Events that changed nothing: redelivered (the inbox recognised them), or of a kind the consumer has no part in.",
            vec![("group", group.into())],
            n,
        );
    }

    pub fn dead_lettered(&self, group: &str, n: i64) {
        self.add(
            "socialcard_events_dead_lettered_total",
            "Events moved to the dead-letter topic.",
            vec![("group", group.into())],
            n,
        );
    }

    /// The current value of a series (for tests and dashboards).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<i64> {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .find(|((n, l), _)| {
                *n == name && l.len() == labels.len() && l.iter().zip(labels).all(|(a, b)| a.0 == b.0 && a.1 == b.1)
            })
            .map(|(_, v)| v.2)
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let mut last = "";
        for ((name, labels), (kind, help, value)) in m.iter() {
            if *name != last {
                out.push_str(&format!(
                    "# HELP {name} {help}\n# TYPE {name} {}\n",
                    match kind {
                        Kind::Gauge => "gauge",
                        Kind::Counter => "counter",
                    }
                ));
                last = name;
            }
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            out.push_str(&format!("{name}{{{}}} {value}\n", labels.join(",")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.outbox_backlog("registry", 3);
        m.consumer_lag("postal", "socialcard.card.v1", 7);
        m.applied("postal", 2);
        m.applied("postal", 5);
        let text = m.render();
        assert!(
            text.contains("# TYPE socialcard_outbox_backlog gauge\nsocialcard_outbox_backlog{source=\"registry\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("socialcard_consumer_lag{group=\"postal\",topic=\"socialcard.card.v1\"} 7"), "{text}");
        assert!(
            text.contains(
                "# TYPE socialcard_events_applied_total counter\nsocialcard_events_applied_total{group=\"postal\"} 7"
            ),
            "{text}"
        );
        assert_eq!(m.value("socialcard_events_applied_total", &[("group", "postal")]), Some(7));
    }
}
