//! Wire contracts generated from `proto/` at build time: gRPC services and the
//! integration events published on NATS. Generated code only; no logic.
//!
//! Each module mirrors one versioned protobuf package.

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]

/// `shop.user.v1`: the user service.
pub mod user {
    pub mod v1 {
        tonic::include_proto!("shop.user.v1");
    }
}

/// `shop.order.v1`: the order service.
pub mod order {
    pub mod v1 {
        tonic::include_proto!("shop.order.v1");
    }
}

/// `shop.notification.v1`: the notification service.
pub mod notification {
    pub mod v1 {
        tonic::include_proto!("shop.notification.v1");
    }
}

/// `shop.events.v1`: integration events on JetStream.
pub mod events {
    pub mod v1 {
        tonic::include_proto!("shop.events.v1");
    }
}

/// Encoded `FileDescriptorSet` of every package, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shop_descriptor.bin"));

/// A UTC time as a protobuf `Timestamp` (the one conversion every mapper uses).
#[must_use]
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}
