//! The loss coordinator's request validation (a scratch SQLite file, the registry and the adapters out of
//! reach): the first byte picks the RPC, the rest is decoded as its protobuf request. Bad input is
//! refused with a reason and never with an internal error; no refusal repeats the caller's phone.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use socialcard_domain::{BankDirectory, CityPolicy};
use socialcard_fuzz::{block_on, check_status, dead_channel, now, scratch_dir, select};
use socialcard_loss_coordinator::{Coordinator, CoordinatorConfig};
use socialcard_proto::loss::v1 as pb;
use socialcard_server::{ApiError, ManualClock};
use tonic::Status;

fn coordinator() -> &'static Coordinator {
    static C: OnceLock<Coordinator> = OnceLock::new();
    C.get_or_init(|| {
        let path = scratch_dir("loss-coordinator").join("coordinator.db");
        block_on(async {
            let mut config = CoordinatorConfig::new(CityPolicy::shanghai(), BankDirectory::shanghai());
            config.call_timeout = std::time::Duration::from_millis(200);
            let adapters = vec![("icbc".to_string(), dead_channel())];
            Coordinator::open(&path, dead_channel(), adapters, Arc::new(ManualClock::new(now())), config).await
        })
        .unwrap_or_else(|e| panic!("coordinator: {e}"))
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

fn phone(a: Option<&socialcard_proto::registry::v1::Actor>) -> &str {
    a.map(|a| a.caller_phone.as_str()).unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let Some((which, bytes)) = select(data) else { return };
    let c = coordinator();
    block_on(async {
        match which % 4 {
            0 => {
                let Ok(req) = pb::ReportLossRequest::decode(bytes) else { return };
                let caller = phone(req.actor.as_ref()).to_string();
                answer("ReportLoss", c.report_loss(req).await, &[&caller]);
            }
            1 => {
                let Ok(req) = pb::UnlockRequest::decode(bytes) else { return };
                let caller = phone(req.actor.as_ref()).to_string();
                answer("Unlock", c.unlock(req).await, &[&caller]);
            }
            2 => {
                let Ok(req) = pb::GetCaseRequest::decode(bytes) else { return };
                answer("GetCase", c.get_case(req).await, &[]);
            }
            _ => {
                let Ok(req) = pb::ListCasesRequest::decode(bytes) else { return };
                answer("ListCases", c.list_cases(req).await, &[]);
            }
        }
    });
});
