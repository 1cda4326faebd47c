//! The wire contracts of socialcard: gRPC services and event payloads generated from `proto/socialcard`.
//!
//! Generated code only; conversions to domain types live at each service's edge, never here.

#![allow(missing_debug_implementations, clippy::all)]

/// The encoded `FileDescriptorSet` of every contract, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/socialcard_descriptor.bin"));

pub mod registry {
    pub mod v1 {
        tonic::include_proto!("socialcard.registry.v1");
    }
}

pub mod events {
    pub mod v1 {
        tonic::include_proto!("socialcard.events.v1");
    }
}

pub mod bank {
    pub mod v1 {
        tonic::include_proto!("socialcard.bank.v1");
    }
}

pub mod postal {
    pub mod v1 {
        tonic::include_proto!("socialcard.postal.v1");
    }
}

pub mod loss {
    pub mod v1 {
        tonic::include_proto!("socialcard.loss.v1");
    }
}

pub mod ops {
    pub mod v1 {
        tonic::include_proto!("socialcard.ops.v1");
    }
}
