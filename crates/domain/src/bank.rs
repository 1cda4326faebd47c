//! The partner (service) banks: configuration, not code. Shanghai's eleven are the default directory;
//! a deployment loads its own list (issue 4 adds `deploy/banks/<code>.toml`).

use serde::{Deserialize, Serialize};

use crate::numbers::BankAccountNumber;
use crate::rejection::Rejection;

/// Each bank's code and the port its adapter listens on, from its file.
pub type AdapterPorts = Vec<(String, Option<u16>)>;

/// The default bank files, `deploy/banks/<code>.toml`.
pub const SHANGHAI_BANK_FILES: [&str; 11] = [
    include_str!("../../../deploy/banks/icbc.toml"),
    include_str!("../../../deploy/banks/abc.toml"),
    include_str!("../../../deploy/banks/boc.toml"),
    include_str!("../../../deploy/banks/ccb.toml"),
    include_str!("../../../deploy/banks/bocom.toml"),
    include_str!("../../../deploy/banks/spdb.toml"),
    include_str!("../../../deploy/banks/bosc.toml"),
    include_str!("../../../deploy/banks/srcb.toml"),
    include_str!("../../../deploy/banks/psbc.toml"),
    include_str!("../../../deploy/banks/cmb.toml"),
    include_str!("../../../deploy/banks/citic.toml"),
];

/// Per-bank rules the bureau must respect (R27, R30).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankPolicy {
    /// A temporary (phone) loss on the financial side lapses after this many days unless made written.
    pub temporary_loss_expiry_days: u32,
    /// Wrong bank-PIN entries allowed per day before the bank locks the PIN.
    pub pin_tries_per_day: u32,
    /// How long after an activation the bank core may still roll it back (compensation).
    #[serde(default = "default_cancel_window")]
    pub activation_cancel_window_minutes: u32,
    /// The bank core's sustained calls per second to its adapter; beyond it (and the burst) calls are
    /// refused with RESOURCE_EXHAUSTED, so one bank's flood never slows the others.
    #[serde(default = "default_requests_per_second")]
    pub requests_per_second: u32,
    /// How many calls may come at once above the sustained rate.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_cancel_window() -> u32 {
    30
}

fn default_requests_per_second() -> u32 {
    2_000
}

fn default_burst() -> u32 {
    4_000
}

/// Working hours for manual operations at the bank, local time, Monday to Friday.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingHours {
    pub open: u8,
    pub close: u8,
}

impl Default for WorkingHours {
    fn default() -> Self {
        Self { open: 9, close: 17 }
    }
}

/// The layout of the bank's daily reconciliation file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReconciliationLayout {
    #[default]
    #[serde(rename = "fixed-width")]
    FixedWidth,
    #[serde(rename = "csv")]
    Csv,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconciliation {
    pub layout: ReconciliationLayout,
}

/// One bank's configuration file (`deploy/banks/<code>.toml`): the bank, and the port of its adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankFile {
    #[serde(flatten)]
    pub bank: PartnerBank,
    pub port: Option<u16>,
}

impl BankFile {
    pub fn parse(text: &str) -> Result<Self, Rejection> {
        toml::from_str(text).map_err(|e| Rejection::invalid("banks", "BANK_CONFIG_INVALID", format!("bank file: {e}")))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerBank {
    /// Short stable code used on the wire and in configuration, e.g. `icbc`.
    pub code: String,
    pub name: String,
    /// UnionPay BIN prefixes of the social security card accounts this bank issues.
    pub bin_prefixes: Vec<String>,
    pub policy: BankPolicy,
    #[serde(default)]
    pub hours: WorkingHours,
    #[serde(default)]
    pub reconciliation: Reconciliation,
}

impl PartnerBank {
    pub fn owns_account(&self, account: &BankAccountNumber) -> bool {
        self.bin_prefixes.iter().any(|p| account.starts_with(p))
    }
}

/// The set of partner banks a city works with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankDirectory {
    banks: Vec<PartnerBank>,
}

impl BankDirectory {
    /// Builds a directory, refusing duplicate codes and BIN prefixes shared by two banks (an account
    /// number must identify exactly one bank).
    pub fn new(banks: Vec<PartnerBank>) -> Result<Self, Rejection> {
        for (i, a) in banks.iter().enumerate() {
            if a.code.is_empty() || a.bin_prefixes.is_empty() {
                return Err(Rejection::invalid(
                    "banks",
                    "BANK_CONFIG_INCOMPLETE",
                    format!("bank #{i} needs a code and at least one BIN prefix"),
                ));
            }
            for b in &banks[i + 1..] {
                if a.code == b.code {
                    return Err(Rejection::invalid(
                        "banks",
                        "BANK_CONFIG_DUPLICATE",
                        format!("bank code {} appears twice", a.code),
                    ));
                }
                let overlap = a
                    .bin_prefixes
                    .iter()
                    .any(|p| b.bin_prefixes.iter().any(|q| p.starts_with(q.as_str()) || q.starts_with(p.as_str())));
                if overlap {
                    return Err(Rejection::invalid(
                        "banks",
                        "BANK_CONFIG_BIN_OVERLAP",
                        format!("banks {} and {} share a BIN range", a.code, b.code),
                    ));
                }
            }
        }
        Ok(Self { banks })
    }

    /// Shanghai's eleven service banks (R4), from the configuration files in `deploy/banks/` (compiled in
    /// as the default; a deployment passes its own files to [`BankDirectory::from_files`]).
    pub fn shanghai() -> Self {
        // Checked by the tests below: every file parses and the eleven form a valid directory.
        Self::from_files(&SHANGHAI_BANK_FILES).map(|(d, _)| d).unwrap_or(Self { banks: Vec::new() })
    }

    /// Parses bank configuration files into a validated directory and each bank's adapter port.
    pub fn from_files(texts: &[&str]) -> Result<(Self, AdapterPorts), Rejection> {
        let files = texts.iter().map(|t| BankFile::parse(t)).collect::<Result<Vec<_>, _>>()?;
        let ports = files.iter().map(|f| (f.bank.code.clone(), f.port)).collect();
        Ok((Self::new(files.into_iter().map(|f| f.bank).collect())?, ports))
    }

    pub fn get(&self, code: &str) -> Option<&PartnerBank> {
        self.banks.iter().find(|b| b.code == code)
    }

    /// Looks a bank code up, or says it is not one of the partner banks.
    pub fn require(&self, field: &'static str, code: &str) -> Result<&PartnerBank, Rejection> {
        self.get(code)
            .ok_or_else(|| Rejection::invalid(field, "UNKNOWN_BANK", "the bank code is not one of the partner banks"))
    }

    pub fn contains(&self, code: &str) -> bool {
        self.get(code).is_some()
    }

    pub fn banks(&self) -> &[PartnerBank] {
        &self.banks
    }

    pub fn len(&self) -> usize {
        self.banks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.banks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bank_files_parse_into_eleven_distinct_banks() {
        let (d, ports) = BankDirectory::from_files(&SHANGHAI_BANK_FILES).unwrap();
        assert_eq!(d, BankDirectory::shanghai());
        assert_eq!(ports.len(), 11);
        assert!(ports.iter().all(|(_, p)| p.is_some()));
        assert_eq!(d.get("abc").unwrap().reconciliation.layout, ReconciliationLayout::Csv);
        assert_eq!(d.get("icbc").unwrap().hours, WorkingHours { open: 9, close: 17 });
        let bad = BankFile::parse("code = 1").unwrap_err();
        assert_eq!(bad.reason, "BANK_CONFIG_INVALID");
        assert_eq!(d.len(), 11);
        assert!(BankDirectory::new(d.banks().to_vec()).is_ok());
        assert_eq!(d.require("bank_code", "nope").unwrap_err().reason, "UNKNOWN_BANK");
    }

    #[test]
    fn overlapping_bins_are_refused() {
        let mut banks = BankDirectory::shanghai().banks().to_vec();
        banks[1].bin_prefixes.push("6212".into());
        assert_eq!(BankDirectory::new(banks).unwrap_err().reason, "BANK_CONFIG_BIN_OVERLAP");
    }
}
