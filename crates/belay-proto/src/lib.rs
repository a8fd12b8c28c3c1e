//! Generated Rust code for the `belay.v1` gRPC contracts in `proto/belay/v1`.
//!
//! This crate owns the prost messages, the tonic clients and server traits, and
//! the encoded file descriptor set (for server reflection). It holds no logic:
//! conversions to domain types, validation and error mapping belong to the
//! capability crates that serve or call these services.

/// Package `belay.v1`: shared messages (`common.proto`) and one module item
/// per service (`migration_service_client`, `migration_service_server`, ...).
#[allow(
    clippy::large_enum_variant,
    reason = "generated oneofs: boxing would change the prost API for every caller"
)]
pub mod v1 {
    tonic::include_proto!("belay.v1");
}

/// Encoded `google.protobuf.FileDescriptorSet` of every `belay.v1` file and its
/// imports, for `tonic-reflection` and tools such as grpcurl.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/belay_descriptor.bin"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_set_names_the_migration_service() {
        // The build script writes this file itself; prove it is the full set.
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let migration = set
            .file
            .iter()
            .find(|f| f.name() == "belay/v1/migration.proto")
            .expect("migration.proto is in the set");
        assert!(
            migration
                .service
                .iter()
                .any(|s| s.name() == "MigrationService")
        );
        assert!(
            set.file
                .iter()
                .any(|f| f.name() == "google/protobuf/timestamp.proto"),
            "imports are included"
        );
    }
}
