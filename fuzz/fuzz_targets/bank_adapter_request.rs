//! A bank adapter's request validation (icbc's, on a scratch SQLite file, the registry out of reach): the
//! first byte picks the RPC, the rest is decoded as its protobuf request. Bad input is refused with a
//! reason and never with an internal error; no refusal repeats an account number it was sent.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use socialcard_bank_adapter::BankAdapter;
use socialcard_domain::BankDirectory;
use socialcard_fuzz::{block_on, check_status, dead_channel, scratch_dir, select};
use socialcard_proto::bank::v1 as bank;
use socialcard_server::ApiError;
use tonic::Status;

const DEADLINE: Option<Duration> = Some(Duration::from_millis(200));

fn adapter() -> &'static BankAdapter {
    static A: OnceLock<BankAdapter> = OnceLock::new();
    A.get_or_init(|| {
        let icbc = BankDirectory::shanghai().get("icbc").cloned().unwrap_or_else(|| panic!("icbc"));
        let path = scratch_dir("bank-adapter").join("icbc.db");
        block_on(async { BankAdapter::open(icbc, &path, dead_channel()).await })
            .unwrap_or_else(|e| panic!("adapter: {e}"))
    })
}

fn answer<T>(what: &str, r: Result<T, ApiError>, secrets: &[&str]) -> Option<T> {
    match r {
        Ok(t) => Some(t),
        Err(e) => {
            check_status(what, &Status::from(e), secrets);
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((which, bytes)) = select(data) else { return };
    let a = adapter();
    block_on(async {
        match which % 6 {
            0 => {
                let Ok(req) = bank::ActivateFinancialRequest::decode(bytes) else { return };
                answer("ActivateFinancial", a.activate_financial(req, DEADLINE).await, &[]);
            }
            1 => {
                let Ok(req) = bank::CancelActivationRequest::decode(bytes) else { return };
                answer("CancelActivation", a.cancel_activation(req, DEADLINE).await, &[]);
            }
            2 => {
                let Ok(req) = bank::ReportLossRequest::decode(bytes) else { return };
                answer("ReportLoss", a.report_loss(req, DEADLINE).await, &[]);
            }
            3 => {
                let Ok(req) = bank::UnlockFinancialRequest::decode(bytes) else { return };
                answer("UnlockFinancial", a.unlock_financial(req, DEADLINE).await, &[]);
            }
            4 => {
                let Ok(req) = bank::QueryCardRequest::decode(bytes) else { return };
                answer("QueryCard", a.query_card(req, DEADLINE).await, &[]);
            }
            _ => {
                let Ok(req) = bank::ConfirmAccountOpeningRequest::decode(bytes) else { return };
                let accounts: Vec<String> = req
                    .results
                    .iter()
                    .filter_map(|r| match &r.result {
                        Some(bank::account_opening_result::Result::AccountNumber(n)) => Some(n.clone()),
                        _ => None,
                    })
                    .collect();
                let secrets: Vec<&str> = accounts.iter().map(String::as_str).collect();
                if let Some(resp) =
                    answer("ConfirmAccountOpening", a.confirm_account_opening(req, DEADLINE).await, &secrets)
                {
                    for outcome in &resp.outcomes {
                        if !outcome.accepted {
                            assert!(!outcome.reason.is_empty(), "a refused card says why: {outcome:?}");
                        }
                    }
                }
            }
        }
    });
});
