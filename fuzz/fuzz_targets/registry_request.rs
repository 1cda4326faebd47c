//! The registry's request validation, end to end through its gRPC handlers (in-memory SQLite, a fixed
//! clock): the first byte picks the RPC, the rest is decoded as its protobuf request. Bad input is
//! refused with a reason and without echoing the citizen ID, phone or name it carried, never with an
//! internal error; a person or application is accepted only with an ID the domain accepts.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use socialcard_domain::CitizenId;
use socialcard_fuzz::{TODAY, block_on, check_status, now, select};
use socialcard_proto::registry::v1 as pb;
use socialcard_proto::registry::v1::registry_service_server::RegistryService;
use socialcard_registry::grpc::RegistryGrpc;
use socialcard_registry::{RegistryConfig, build};
use socialcard_server::clock::ManualClock;
use tonic::{Request, Status};

/// Registered before the first input, so applications can get past PERSON_NOT_FOUND.
const PERSON: &str = "11010519491231002X";

fn registry() -> &'static RegistryGrpc {
    static R: OnceLock<RegistryGrpc> = OnceLock::new();
    R.get_or_init(|| {
        block_on(async {
            let built =
                build("sqlite::memory:", Arc::new(ManualClock::new(now())), RegistryConfig::shanghai(vec![7; 32]))
                    .await
                    .unwrap_or_else(|e| panic!("registry: {e}"));
            let g = RegistryGrpc::new(built.registry);
            g.register_person(Request::new(pb::RegisterPersonRequest {
                idempotency_key: "fuzz-seed-person".into(),
                citizen_id: PERSON.into(),
                name: "Wang Fang".into(),
                phone: "13800000000".into(),
            }))
            .await
            .unwrap_or_else(|e| panic!("seed person: {e:?}"));
            g
        })
    })
}

fn answer<T>(what: &str, r: Result<tonic::Response<T>, Status>, secrets: &[&str]) -> Option<T> {
    match r {
        Ok(resp) => Some(resp.into_inner()),
        Err(s) => {
            check_status(what, &s, secrets);
            None
        }
    }
}

fn actor_secrets(a: Option<&pb::Actor>) -> Vec<&str> {
    a.map(|a| vec![a.caller_phone.as_str()]).unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let Some((which, bytes)) = select(data) else { return };
    let g = registry();
    block_on(async {
        match which % 9 {
            0 => {
                let Ok(req) = pb::RegisterPersonRequest::decode(bytes) else { return };
                let secrets = [req.citizen_id.as_str(), req.phone.as_str(), req.name.as_str()];
                let r = g.register_person(Request::new(req.clone())).await;
                if let Some(resp) = answer("RegisterPerson", r, &secrets) {
                    let id = CitizenId::parse(&req.citizen_id, TODAY)
                        .unwrap_or_else(|e| panic!("RegisterPerson accepted {:?}: {e}", req.citizen_id));
                    let person = resp.person.unwrap_or_else(|| panic!("RegisterPerson without a person"));
                    assert_eq!(person.citizen_id_masked, id.masked());
                    assert!(!person.name.is_empty() && person.name == req.name.trim());
                }
            }
            1 => {
                let Ok(req) = pb::GetPersonRequest::decode(bytes) else { return };
                let r = g.get_person(Request::new(req.clone())).await;
                if answer("GetPerson", r, &[req.citizen_id.as_str()]).is_some() {
                    assert!(CitizenId::parse(&req.citizen_id, TODAY).is_ok(), "GetPerson found {:?}", req.citizen_id);
                }
            }
            2 => {
                let Ok(req) = pb::SubmitApplicationRequest::decode(bytes) else { return };
                let mut secrets = actor_secrets(req.actor.as_ref());
                secrets.push(req.citizen_id.as_str());
                let r = g.submit_application(Request::new(req.clone())).await;
                if answer("SubmitApplication", r, &secrets).is_some() {
                    assert!(CitizenId::parse(&req.citizen_id, TODAY).is_ok(), "applied with {:?}", req.citizen_id);
                }
            }
            3 => {
                let Ok(req) = pb::LockSocialFunctionRequest::decode(bytes) else { return };
                let secrets = actor_secrets(req.actor.as_ref());
                let r = g.lock_social_function(Request::new(req.clone())).await;
                answer("LockSocialFunction", r, &secrets);
            }
            4 => {
                let Ok(req) = pb::ChangeSocialPinRequest::decode(bytes) else { return };
                let mut secrets = actor_secrets(req.actor.as_ref());
                secrets.extend([req.old_pin.as_str(), req.new_pin.as_str()]);
                let r = g.change_social_pin(Request::new(req.clone())).await;
                answer("ChangeSocialPin", r, &secrets);
            }
            5 => {
                let Ok(req) = pb::ReviewApplicationRequest::decode(bytes) else { return };
                let secrets = actor_secrets(req.actor.as_ref());
                let r = g.review_application(Request::new(req.clone())).await;
                answer("ReviewApplication", r, &secrets);
            }
            6 => {
                let Ok(req) = pb::CancelCardRequest::decode(bytes) else { return };
                let secrets = actor_secrets(req.actor.as_ref());
                let r = g.cancel_card(Request::new(req.clone())).await;
                answer("CancelCard", r, &secrets);
            }
            7 => {
                let Ok(req) = pb::RecordProductionResultRequest::decode(bytes) else { return };
                let r = g.record_production_result(Request::new(req)).await;
                answer("RecordProductionResult", r, &[]);
            }
            _ => {
                let Ok(req) = pb::GetCardRequest::decode(bytes) else { return };
                let r = g.get_card(Request::new(req)).await;
                answer("GetCard", r, &[]);
            }
        }
    });
});
