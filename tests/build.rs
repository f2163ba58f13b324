//! Generates the tonic client and server for the `outrider.test.Echo` gRPC service of
//! `src/pb.rs`. The service is described in Rust with tonic-build's manual builder (the
//! messages are hand-written prost structs there), so no `protoc` is needed; the
//! equivalent `.proto` is `proto/echo.proto`, kept for reference.

fn main() {
    let method = |name: &str, route: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type("crate::pb::EchoRequest")
            .output_type("crate::pb::EchoReply")
            .codec_path("tonic_prost::ProstCodec")
    };
    let service = tonic_build::manual::Service::builder()
        .name("Echo")
        .package("outrider.test")
        .method(method("unary", "Unary").build())
        .method(method("count", "Count").server_streaming().build())
        .method(
            method("chat", "Chat")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
