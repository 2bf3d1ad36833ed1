//! Generates the gRPC code from `proto/` with a pure-Rust compiler (no `protoc` needed), and a
//! routing table built from each RPC's `(gitfleet.v1.kind)` option. The build fails when an RPC
//! declares no kind or when its request does not carry a header in field 1.

use std::fmt::Write as _;
use std::path::PathBuf;

use protox::prost::Message as _;
use protox::prost_reflect::{DescriptorPool, Kind, Value};

const PROTO_FILES: &[&str] = &[
    "gitfleet/v1/options.proto",
    "gitfleet/v1/shared.proto",
    "gitfleet/v1/repository.proto",
    "gitfleet/v1/refs.proto",
    "gitfleet/v1/objects.proto",
    "gitfleet/v1/smarthttp.proto",
    "gitfleet/v1/ssh.proto",
    "gitfleet/v1/node.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds the migrations: a new one must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTO_FILES)?;
    let descriptors = compiler.file_descriptor_set();
    std::fs::write(
        out_dir.join("gitfleet_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    std::fs::write(
        out_dir.join("rpc_table.rs"),
        rpc_table(&compiler.descriptor_pool())?,
    )?;

    tonic_prost_build::configure()
        .bytes(".gitfleet.v1")
        .compile_fds(descriptors)?;
    Ok(())
}

/// Renders `RPC_TABLE`, one entry per RPC, for `src/proto.rs` to include.
fn rpc_table(pool: &DescriptorPool) -> Result<String, String> {
    let kind_option = pool
        .get_extension_by_name("gitfleet.v1.kind")
        .ok_or("proto: extension gitfleet.v1.kind is missing")?;
    let kind_enum = match kind_option.kind() {
        Kind::Enum(kind_enum) => kind_enum,
        other => return Err(format!("gitfleet.v1.kind must be an enum, not {other:?}")),
    };

    let mut table = String::from("pub const RPC_TABLE: &[RpcInfo] = &[\n");
    for service in pool.services() {
        if service.package_name() != "gitfleet.v1" {
            continue;
        }
        for method in service.methods() {
            let name = format!("/{}/{}", service.full_name(), method.name());
            let options = method.options();
            let kind = match options.get_extension(&kind_option).as_ref() {
                Value::EnumNumber(number) if *number != 0 => kind_enum
                    .get_value(*number)
                    .ok_or(format!("{name}: unknown kind {number}"))?,
                _ => return Err(format!("{name}: declares no (gitfleet.v1.kind) option")),
            };
            let kind = match kind.name() {
                "RPC_KIND_ACCESSOR" => "Accessor",
                "RPC_KIND_MUTATOR" => "Mutator",
                "RPC_KIND_CREATOR" => "Creator",
                "RPC_KIND_REMOVER" => "Remover",
                "RPC_KIND_CATALOG" => "Catalog",
                "RPC_KIND_INTERNAL" => "Internal",
                other => return Err(format!("{name}: kind {other} has no routing rule")),
            };
            let header = method
                .input()
                .get_field(1)
                .and_then(|field| match field.kind() {
                    Kind::Message(message) => Some(message.full_name().to_owned()),
                    _ => None,
                });
            let scope = match header.as_deref() {
                Some("gitfleet.v1.RepositoryHeader") => "Repository",
                Some("gitfleet.v1.StorageHeader") => "Storage",
                _ => {
                    return Err(format!(
                        "{name}: field 1 of {} must be a RepositoryHeader or StorageHeader",
                        method.input().full_name()
                    ));
                }
            };
            writeln!(
                table,
                "    RpcInfo {{ path: {name:?}, kind: RpcKind::{kind}, scope: HeaderScope::{scope}, \
                 client_streaming: {}, server_streaming: {} }},",
                method.is_client_streaming(),
                method.is_server_streaming()
            )
            .map_err(|error| error.to_string())?;
        }
    }
    table.push_str("];\n");
    Ok(table)
}
