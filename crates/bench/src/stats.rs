//! Percentiles and the result tables.

use std::time::Duration;

/// Latency samples in microseconds.
#[derive(Debug, Default)]
pub struct Samples(Vec<u64>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn append(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The q-quantile in milliseconds (0 when empty).
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i] as f64 / 1000.0
    }
}

/// A scenario's table: a title, column names and rows of cells.
#[derive(Debug)]
pub struct Table {
    pub name: &'static str,
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    pub notes: Vec<String>,
}

impl Table {
    pub fn print(&self) {
        println!("== {} ==", self.name);
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| self.rows.iter().map(|r| r[i].len()).chain([self.columns[i].len()]).max().unwrap_or(0))
            .collect();
        let line = |cells: Vec<&str>| {
            cells.iter().enumerate().map(|(i, c)| format!("{c:>w$}", w = widths[i])).collect::<Vec<_>>().join("  ")
        };
        println!("{}", line(self.columns.clone()));
        for r in &self.rows {
            println!("{}", line(r.iter().map(String::as_str).collect()));
        }
        for n in &self.notes {
            println!("{n}");
        }
        println!();
    }

    pub fn json(&self) -> String {
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                let fields: Vec<String> = self
                    .columns
                    .iter()
                    .zip(r)
                    .map(|(c, v)| {
                        let value = if v.parse::<f64>().is_ok() { v.clone() } else { format!("\"{v}\"") };
                        format!("\"{c}\":{value}")
                    })
                    .collect();
                format!("{{{}}}", fields.join(","))
            })
            .collect();
        format!("\"{}\":[{}]", self.name, rows.join(","))
    }
}
