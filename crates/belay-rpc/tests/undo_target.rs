//! A malformed `UndoTarget` sent over a real gRPC socket is refused with
//! INVALID_ARGUMENT naming the field, and nothing is undone: before, every such message
//! undid the newest migration.

use belay_core::DatabaseUrl;
use belay_migrate::{ApplyOptions, LocalTargets, MigrationApi, Target, TargetSpec, events};
use belay_proto::v1 as pb;
use belay_rpc::MigrationGrpc;
use belay_testkit::Cluster;
use pb::migration_service_client::MigrationServiceClient;
use pb::undo_target::Target as T;
use std::sync::Arc;
use tokio_stream::StreamExt;

type R<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn tables(url: &str) -> R<String> {
    Ok(belay_testkit::psql(
        url,
        "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relname IN ('a', 'b') AND relkind = 'r'",
    )?
    .trim()
    .to_string())
}

#[tokio::test]
async fn a_malformed_undo_target_is_refused_naming_the_field_and_undoes_nothing() -> R<()> {
    let db = Cluster::shared().create_database().await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("V1__a.sql"), "CREATE TABLE a (x int);\n")?;
    std::fs::write(dir.path().join("U1__a.sql"), "DROP TABLE a;\n")?;
    std::fs::write(dir.path().join("V2__b.sql"), "CREATE TABLE b (x int);\n")?;
    std::fs::write(dir.path().join("U2__b.sql"), "DROP TABLE b;\n")?;
    let api = Arc::new(LocalTargets::new([TargetSpec {
        name: "db".into(),
        url: DatabaseUrl::parse(&db.url)?,
        dir: dir.path().to_path_buf(),
        exec: Default::default(),
    }]));
    api.apply(
        "db",
        &Target::default(),
        &ApplyOptions::default(),
        events::discard(),
    )
    .await?;
    assert_eq!(tables(&db.url)?, "a,b");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = MigrationGrpc::new(api).into_service();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = MigrationServiceClient::connect(format!("http://{addr}")).await?;
    let request = |undo: Option<pb::UndoTarget>| pb::UndoRequest {
        target: Some(pb::Target { name: "db".into() }),
        undo,
        deployment_id: String::new(),
    };
    let undo = |t: Option<T>| Some(pb::UndoTarget { target: t });

    for (req, field) in [
        (request(None), "undo"),
        (request(undo(None)), "undo.target"),
        (request(undo(Some(T::Steps(0)))), "undo.steps"),
        (request(undo(Some(T::All(false)))), "undo.all"),
        (
            request(undo(Some(T::ToVersion(String::new())))),
            "undo.to_version",
        ),
        (
            request(undo(Some(T::ToVersion("latest".into())))),
            "undo.to_version",
        ),
    ] {
        let shown = format!("{:?}", req.undo);
        // Refused either when the call is made or as the stream's first item; never a
        // run.
        let status = match client.undo(req).await {
            Err(status) => status,
            Ok(stream) => match stream.into_inner().next().await {
                Some(Err(status)) => status,
                other => panic!("{shown}: expected a refusal, got {other:?}"),
            },
        };
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{shown}: {status:?}"
        );
        assert!(
            status.message().contains(&format!("malformed {field} ")),
            "{shown}: {}",
            status.message()
        );
        assert_eq!(tables(&db.url)?, "a,b", "{shown} undid something");
    }

    // A well-formed target still works over the same socket: one step back drops b.
    let mut stream = client
        .undo(request(undo(Some(T::Steps(1)))))
        .await?
        .into_inner();
    while let Some(message) = stream.next().await {
        message?;
    }
    assert_eq!(tables(&db.url)?, "a");
    server.abort();
    Ok(())
}
