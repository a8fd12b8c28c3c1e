use crate::model::DeploymentState;
use uuid::Uuid;

/// Everything the store refuses or fails at. Messages name the store (its URL redacted)
/// and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "unsupported controller store {spec:?}: give a file path, sqlite://PATH, or a postgres://… / postgresql://… URL"
    )]
    UnsupportedSpec { spec: String },

    #[error(
        "cannot open the controller store {store}: {reason}; check that the path is right and that its directory is writable by this user"
    )]
    Open { store: String, reason: String },

    #[error(
        "cannot connect to the controller store {store}: {reason}; check that PostgreSQL is running and reachable, and the URL's host, port, user, password and database"
    )]
    Connect { store: String, reason: String },

    #[error(
        "controller store {store}: {doing} failed: {reason}; check that the store is reachable and healthy, then retry"
    )]
    Database {
        store: String,
        doing: &'static str,
        reason: String,
    },

    #[error(
        "controller store {store}: migrating its schema failed: {source}; fix the cause and restart the controller (it migrates on start)"
    )]
    Migrate {
        store: String,
        #[source]
        source: Box<belay_migrate::MigrateError>,
    },

    #[error(
        "controller store {store}: its schema migration {script} was changed after it was applied (recorded checksum {recorded}, this build's is {expected}); run the belay version that created the store, or restore the store from a backup"
    )]
    SchemaDrift {
        store: String,
        script: String,
        recorded: String,
        expected: String,
    },

    #[error(
        "controller store {store} has schema version {found}, newer than this belay knows (up to {known}); upgrade belay before pointing it at this store"
    )]
    SchemaTooNew {
        store: String,
        found: i64,
        known: i64,
    },

    #[error(
        "target {target:?} belongs to agent {agent:?}, which is alive; remove it from that agent's configuration (or stop that agent) before registering it elsewhere"
    )]
    TargetOwned { target: String, agent: String },

    #[error("no deployment {0} in the controller store; list deployments to find its id")]
    NoSuchDeployment(Uuid),

    #[error("deployment {id} has no target {target:?}; its targets are fixed when it is created")]
    NoSuchTarget { id: Uuid, target: String },

    #[error("deployment {0} already exists in the controller store; use a new id")]
    DeploymentExists(Uuid),

    #[error(
        "a deployment cannot move from {from} to {to}; the lifecycle is planned → preflight → backing_up → migrating → validating → watching → succeeded, or → failed → rolling_back → rolled_back | escalated"
    )]
    BadTransition {
        from: DeploymentState,
        to: DeploymentState,
    },

    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}
