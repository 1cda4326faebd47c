//! The partner (service) banks: configuration, not code. Shanghai's eleven are the default directory;
//! a deployment loads its own list (issue 4 adds `deploy/banks/<code>.toml`).

use serde::{Deserialize, Serialize};

use crate::numbers::BankAccountNumber;
use crate::rejection::Rejection;

/// Per-bank rules the bureau must respect (R27, R30).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankPolicy {
    /// A temporary (phone) loss on the financial side lapses after this many days unless made written.
    pub temporary_loss_expiry_days: u32,
    /// Wrong bank-PIN entries allowed per day before the bank locks the PIN.
    pub pin_tries_per_day: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerBank {
    /// Short stable code used on the wire and in configuration, e.g. `icbc`.
    pub code: String,
    pub name: String,
    /// UnionPay BIN prefixes of the social security card accounts this bank issues.
    pub bin_prefixes: Vec<String>,
    pub policy: BankPolicy,
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

    /// Shanghai's eleven service banks (R4). The BIN prefixes are development values; production
    /// deployments configure each bank's real ranges.
    pub fn shanghai() -> Self {
        let bank = |code: &str, name: &str, bins: &[&str], expiry: u32| PartnerBank {
            code: code.into(),
            name: name.into(),
            bin_prefixes: bins.iter().map(|b| (*b).to_string()).collect(),
            policy: BankPolicy { temporary_loss_expiry_days: expiry, pin_tries_per_day: 3 },
        };
        Self {
            banks: vec![
                bank("icbc", "Industrial and Commercial Bank of China", &["621226"], 5),
                bank("abc", "Agricultural Bank of China", &["622848"], 5),
                bank("boc", "Bank of China", &["621661"], 5),
                bank("ccb", "China Construction Bank", &["621700"], 5),
                bank("bocom", "Bank of Communications", &["622262"], 5),
                bank("spdb", "Shanghai Pudong Development Bank", &["622521"], 5),
                bank("bosc", "Bank of Shanghai", &["622892"], 5),
                bank("srcb", "Shanghai Rural Commercial Bank", &["621068"], 5),
                bank("psbc", "Postal Savings Bank of China", &["621799"], 5),
                bank("cmb", "China Merchants Bank", &["621483"], 5),
                bank("citic", "China CITIC Bank", &["621771"], 5),
            ],
        }
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
    fn shanghai_has_eleven_distinct_banks() {
        let d = BankDirectory::shanghai();
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
