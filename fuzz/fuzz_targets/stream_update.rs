//! A gRPC stream message: any bytes that decode as a StatusUpdate are checked or refused with a reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(u) = socialcard_proto::postal::v1::StatusUpdate::decode(data) {
        if let Err(r) = socialcard_postal::grpc::update_from_pb(&u, time::OffsetDateTime::UNIX_EPOCH) {
            socialcard_fuzz::check_rejection("update_from_pb", &r, &[]);
        }
    }
});
