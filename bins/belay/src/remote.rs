//! Remote mode: the same commands against a controller, plus the fleet commands.

use crate::cli::{
    Cli, Command, DeploymentsCommand, MigrateChecks, OnFailureArg, Output, RollbackCommand,
};
use crate::settings::{FileDeploy, Settings};
use crate::{Failure, exit};
use belay_migrate::{ApiError, ErrorKind};
use belay_proto::v1 as pb;
use belay_rpc::Connection;
use belay_rpc::convert::api_error_from;
use pb::controller_service_client::ControllerServiceClient;
use pb::history_service_client::HistoryServiceClient;
use serde_json::json;

/// The largest reply the CLI takes from a controller: a deployment to thousands of
/// targets, with its events, runs past gRPC's default 4 MiB.
const REPLY_LIMIT: usize = 256 << 20;

type Intercepted = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    belay_auth::MaybeTokenAttach,
>;

/// The controller's `ControllerService`, taking replies up to [`REPLY_LIMIT`].
fn controller_client(conn: &Connection) -> ControllerServiceClient<Intercepted> {
    ControllerServiceClient::new(conn.intercepted()).max_decoding_message_size(REPLY_LIMIT)
}

/// The controller's `HistoryService`, taking replies up to [`REPLY_LIMIT`].
fn history_client(conn: &Connection) -> HistoryServiceClient<Intercepted> {
    HistoryServiceClient::new(conn.intercepted()).max_decoding_message_size(REPLY_LIMIT)
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| belay_rpc::convert::from_timestamp(t).ok())
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn err(conn: &Connection) -> impl Fn(tonic::Status) -> Failure + '_ {
    move |s| Failure::from(api_error_from(&s, &conn.peer))
}

/// A deployment as JSON: per target its state, the step its pipeline reached, how it
/// ended (failed step, reason, evidence) and, where the controller sent them (`show`),
/// its events.
fn deployment_json(d: &pb::Deployment) -> serde_json::Value {
    let targets: Vec<serde_json::Value> = d
        .targets
        .iter()
        .map(|t| {
            let outcome = t
                .outcome
                .as_ref()
                .map(belay_rpc::convert::struct_to_json)
                .unwrap_or_default();
            let mut v = json!({
                "target": t.target, "state": t.state, "message": t.message, "updated_at": ts(&t.updated_at),
                "step": (!t.step.is_empty()).then_some(&t.step),
                "failed_step": outcome.get("failed_step"),
                "reason": outcome.get("reason"),
                "evidence": outcome.get("evidence"),
                "outcome": outcome,
            });
            if !d.events.is_empty() {
                v["events"] = json!(d
                    .events
                    .iter()
                    .filter(|e| e.target.as_deref() == Some(t.target.as_str()))
                    .map(event_json)
                    .collect::<Vec<_>>());
            }
            v
        })
        .collect();
    json!({
        "id": d.id,
        "state": d.state,
        "to_version": d.to_version,
        "environment": d.environment,
        "created_at": ts(&d.created_at),
        "finished_at": d.finished_at.as_ref().map(|_| ts(&d.finished_at)),
        "skip_promotion_reason": d.skip_promotion_reason,
        "requested_by": d.requested_by,
        "release": d.release,
        "targets": targets,
    })
}

fn event_json(e: &pb::DeploymentEvent) -> serde_json::Value {
    let payload = e
        .payload
        .as_ref()
        .map(belay_rpc::convert::struct_to_json)
        .unwrap_or_default();
    json!({
        "seq": e.seq, "at": ts(&e.at), "target": e.target, "kind": e.kind, "message": e.message,
        "step": payload.get("step"), "payload": payload,
    })
}

fn print_deployment(d: &pb::Deployment) {
    println!("deployment {}: {}", d.id, d.state);
    if let Some(v) = &d.to_version {
        println!("  to version {v}");
    }
    if let Some(r) = &d.release {
        println!("  release {r}");
    }
    if let Some(r) = &d.skip_promotion_reason {
        println!("  promotion gate skipped: {r}");
    }
    for t in &d.targets {
        let step = if t.step.is_empty() { "-" } else { &t.step };
        println!(
            "  {:<24} {:<10} {:<11} {}",
            t.target, t.state, step, t.message
        );
    }
    // Rollbacks requested by alerts (the controller's Alertmanager webhook), and what
    // became of each request.
    for e in d
        .events
        .iter()
        .filter(|e| e.kind.starts_with("rollback_request"))
    {
        println!(
            "  {}: {}",
            e.target.as_deref().unwrap_or("(deployment)"),
            e.message
        );
    }
}

/// The deployer's part of every target's policy, from the flags and belay.toml's
/// `[deploy]`; refused (exit 64) before anything is sent where it cannot be followed.
fn deployer_policy(
    checks: &DeployFlags<'_>,
    file: &FileDeploy,
) -> Result<belay_deploy::DeployerPolicy, Failure> {
    let usage = |message: String| Failure {
        code: exit::USAGE,
        message,
    };
    if file.before.is_some() || file.after.is_some() {
        return Err(usage(
            "belay.toml sets [deploy.before] or [deploy.after], which run only with local \
             `migrate` (the agents run remote deployments and have no deployment hooks yet); \
             use a belay.toml without them for remote mode; nothing was run"
                .into(),
        ));
    }
    let watch = checks
        .watch
        .map(|w| belay_core::parse_duration(w).map_err(|e| usage(format!("--watch: {e}"))))
        .transpose()?;
    // 0 (the default) is no soak; a soak needs a canary wave to soak.
    let soak = match checks.canary_soak.or(file.canary_soak.as_ref()) {
        Some(s) => {
            belay_core::parse_duration(s).map_err(|e| usage(format!("--canary-soak: {e}")))?
        }
        None => std::time::Duration::ZERO,
    };
    let soak = (!soak.is_zero()).then_some(soak);
    if soak.is_some() && checks.canary == 0 {
        return Err(usage(
            "--canary-soak (or [deploy] canary_soak in belay.toml) needs a canary wave to soak: \
             pass --canary N (N ≥ 1), or drop the soak"
                .into(),
        ));
    }
    let on_failure = match checks.on_failure.or(file.on_failure) {
        // Each target's agent rolls its own back, per its `[targets.rollback]` policy.
        Some(OnFailureArg::Rollback) => belay_deploy::OnFailure::Rollback,
        Some(OnFailureArg::Stop) | None => belay_deploy::OnFailure::Stop,
    };
    Ok(belay_deploy::DeployerPolicy {
        skip_preflight: checks.no_preflight,
        overrides: checks.override_check.to_vec(),
        reason: (!checks.override_check.is_empty())
            .then(|| checks.reason.cloned())
            .flatten(),
        watch,
        soak,
        lock_trip_budget: file.lock_trip_budget,
        on_failure,
        // `deploy` sends none: each target's agent.toml alone sets its thresholds.
        thresholds: Default::default(),
    })
}

/// Remote `migrate`'s deployer policy: the flags, belay.toml's `[deploy]` and the
/// `[preflight]` keys it sets (each tightens the target's own threshold, never loosens
/// it). What the target is validated and watched with is its agent.toml's: belay.toml's
/// `[[probes]]`, `[[checks]]`, `[[smoke]]` and `[postflight]` cannot be followed on the
/// agent (no URL or query crosses the wire) and are refused (exit 64) before anything
/// runs, naming where they go instead.
pub fn migrate_policy(
    cli: &Cli,
    settings: &Settings,
    checks: &MigrateChecks,
) -> Result<belay_deploy::DeployerPolicy, Failure> {
    let usage = |e: anyhow::Error| Failure {
        code: exit::USAGE,
        message: format!("{e:#}"),
    };
    let file = crate::settings::load_file(cli).map_err(usage)?;
    let caller_side: Vec<(&str, &str)> = [
        (!file.probes.is_empty(), "[[probes]]", "[[targets.probes]]"),
        (!file.checks.is_empty(), "[[checks]]", "[[targets.checks]]"),
        (!file.smoke.is_empty(), "[[smoke]]", "[[targets.smoke]]"),
        (
            file.postflight.is_some(),
            "[postflight]",
            "[targets.postflight]",
        ),
    ]
    .into_iter()
    .filter(|(set, ..)| *set)
    .map(|(_, here, there)| (here, there))
    .collect();
    if !caller_side.is_empty() {
        let here: Vec<&str> = caller_side.iter().map(|(h, _)| *h).collect();
        let there: Vec<&str> = caller_side.iter().map(|(_, t)| *t).collect();
        return Err(Failure {
            code: exit::USAGE,
            message: format!(
                "belay.toml sets {}, which remote `migrate` cannot use: the target's agent runs \
                 the deployment and validates and watches the target with its own agent.toml. \
                 Move them to {} under the target's [[targets]] entry in the agent's \
                 agent.toml, or use a belay.toml without them for remote mode; nothing was run",
                here.join(", "),
                there.join(", ")
            ),
        });
    }
    let flags = DeployFlags {
        override_check: &checks.override_check,
        reason: checks.reason.as_ref(),
        no_preflight: checks.no_preflight,
        watch: checks.watch.as_ref(),
        // One target: no canary wave, so no soak.
        canary: 0,
        canary_soak: None,
        on_failure: checks.on_failure,
    };
    let deploy = FileDeploy {
        canary_soak: None,
        ..settings.deploy.clone()
    };
    let mut policy = deployer_policy(&flags, &deploy)?;
    policy.thresholds = crate::settings::preflight_keys(cli).map_err(usage)?;
    Ok(policy)
}

/// `deploy`'s pipeline flags, borrowed from the command.
struct DeployFlags<'a> {
    override_check: &'a [String],
    reason: Option<&'a String>,
    no_preflight: bool,
    watch: Option<&'a String>,
    canary: u32,
    canary_soak: Option<&'a String>,
    on_failure: Option<OnFailureArg>,
}

/// Follows a deployment's event stream, then prints its final state; exit 1 unless it
/// succeeded.
async fn follow(
    conn: &Connection,
    stream: tonic::Streaming<pb::DeploymentEvent>,
    out: Output,
) -> Result<u8, Failure> {
    follow_until(conn, stream, out, "succeeded").await
}

/// [`follow`], exit 1 unless the deployment ended `success`.
async fn follow_until(
    conn: &Connection,
    mut stream: tonic::Streaming<pb::DeploymentEvent>,
    out: Output,
    success: &str,
) -> Result<u8, Failure> {
    let mut id = String::new();
    let mut events = Vec::new();
    let mut streamed = Vec::new();
    while let Some(e) = stream.message().await.map_err(err(conn))? {
        id.clone_from(&e.deployment_id);
        if out == Output::Text && !e.message.is_empty() {
            match &e.target {
                Some(t) => println!("[{}] {t}: {}", e.seq, e.message),
                None => println!("[{}] {}", e.seq, e.message),
            }
        }
        events.push(event_json(&e));
        streamed.push(e);
    }
    // The events came over the stream: asking for them again would send them twice, in
    // one message too large for a deployment to a thousand targets.
    let mut d = history_client(conn)
        .get_deployment(pb::GetDeploymentRequest {
            id,
            without_events: true,
        })
        .await
        .map_err(err(conn))?
        .into_inner();
    // What the rendering reads of them (each target's events, the alerts' rollback
    // requests), as a `deployments show` would have them.
    d.events = streamed;
    match out {
        Output::Text => print_deployment(&d),
        Output::Json => {
            let mut doc = deployment_json(&d);
            doc["events"] = json!(events);
            println!("{doc}");
        }
    }
    Ok(if d.state == success { 0 } else { exit::FAILED })
}

/// `rollback plan|execute ID` through a controller without `--target`: every target of
/// fleet deployment ID still deployed, each planned and run by its agent, last wave
/// first (`ControllerService.PlanDeploymentRollback`, `RollbackDeployment`). `None` for
/// the other rollback commands, which act on one target.
pub async fn rollback_deployment(
    conn: &Connection,
    command: &RollbackCommand,
    out: Output,
) -> Option<Result<u8, Failure>> {
    let (to, data_corrupted, reason, yes) = match command {
        RollbackCommand::Plan { to, data_corrupted } => (to, *data_corrupted, None, None),
        RollbackCommand::Execute {
            to,
            data_corrupted,
            reason,
            yes,
        } => (to, *data_corrupted, reason.clone(), Some(*yes)),
        _ => return None,
    };
    let Some(id) = to.to.as_deref().filter(|_| to.release.is_none()) else {
        return Some(Err(Failure {
            code: exit::USAGE,
            message: "through a controller without --target, rollback plan|execute take a fleet deployment id (the whole deployment); a release or a version needs --target NAME".into(),
        }));
    };
    Some(rollback_whole(conn, id, data_corrupted, reason, yes, out).await)
}

async fn rollback_whole(
    conn: &Connection,
    id: &str,
    data_corrupted: bool,
    reason: Option<String>,
    execute: Option<bool>,
    out: Output,
) -> Result<u8, Failure> {
    let trigger = crate::rollback_cmd::operator_trigger(reason, data_corrupted);
    let req = pb::DeploymentRollbackRequest {
        deployment_id: id.to_string(),
        trigger: Some(belay_rpc::rollback::trigger(&trigger)),
    };
    let mut client = controller_client(conn);
    let plan = client
        .plan_deployment_rollback(req.clone())
        .await
        .map_err(err(conn))?
        .into_inner();
    let plans = plan
        .plans
        .iter()
        .map(belay_rpc::rollback::plan_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure {
            code: exit::SOFTWARE,
            message: format!("the controller sent a plan this belay cannot read: {e}"),
        })?;
    let escalates = plans
        .iter()
        .any(|p| p.strategy == belay_rollback::Strategy::Escalate);
    let Some(yes) = execute else {
        if out == Output::Json {
            println!(
                "{}",
                json!({
                    "action": "rollback_plan",
                    "deployment": plan.deployment_id,
                    "plans": plans,
                    "left_out": plan.left_out,
                })
            );
        } else {
            print_whole_plan(&plan.deployment_id, &plans, &plan.left_out);
        }
        return Ok(if escalates { exit::REFUSED } else { 0 });
    };
    if out == Output::Text {
        print_whole_plan(&plan.deployment_id, &plans, &plan.left_out);
    }
    if !yes {
        crate::rollback_cmd::confirm_question(&format!(
            "roll back {} target(s) of fleet deployment {}?",
            plans.len(),
            plan.deployment_id
        ))?;
    }
    // The controller checks again, and each agent plans again just before acting.
    let stream = client
        .rollback_deployment(req)
        .await
        .map_err(err(conn))?
        .into_inner();
    follow_until(conn, stream, out, "rolled_back").await
}

fn print_whole_plan(id: &str, plans: &[belay_rollback::RollbackPlan], left_out: &[String]) {
    println!(
        "rollback of fleet deployment {id}: {} target(s), last wave first",
        plans.len()
    );
    for p in plans {
        println!();
        crate::rollback_cmd::print_plan(p);
    }
    if !left_out.is_empty() {
        println!();
        println!("left out:");
        for l in left_out {
            println!("  {l}");
        }
    }
}

/// The fleet commands; `None` when `command` is a per-target command.
pub async fn fleet_command(
    conn: &Connection,
    command: &Command,
    out: Output,
    file_deploy: &FileDeploy,
) -> Option<Result<u8, Failure>> {
    Some(match command {
        Command::Deploy {
            targets,
            to,
            canary,
            batch,
            parallel,
            environment,
            skip_promotion,
            reason,
            override_check,
            no_preflight,
            watch,
            canary_soak,
            on_failure,
            rollback_scope,
        } => {
            let flags = DeployFlags {
                override_check,
                reason: reason.as_ref(),
                no_preflight: *no_preflight,
                watch: watch.as_ref(),
                canary: *canary,
                canary_soak: canary_soak.as_ref(),
                on_failure: *on_failure,
            };
            let policy = match deployer_policy(&flags, file_deploy) {
                Ok(p) => p,
                Err(f) => return Some(Err(f)),
            };
            let scope = match rollback_scope.or(file_deploy.rollback_scope) {
                Some(crate::cli::RollbackScopeArg::Deployment) => {
                    if policy.on_failure != belay_deploy::OnFailure::Rollback {
                        return Some(Err(Failure {
                            code: exit::USAGE,
                            message: "--rollback-scope deployment (or [deploy] rollback_scope in belay.toml) rolls back the rest of the deployment after a failed target's own rollback: it needs --on-failure rollback; nothing was run".into(),
                        }));
                    }
                    pb::RollbackScope::Deployment
                }
                Some(crate::cli::RollbackScopeArg::Wave) => pb::RollbackScope::Wave,
                None => pb::RollbackScope::Unspecified,
            };
            if *no_preflight {
                eprintln!("warning: --no-preflight: deploying without the preflight checklist");
            }
            let req = pb::DeployRequest {
                policy: Some(belay_rpc::deploy::deployer_policy(&policy)),
                targets: targets.clone(),
                to_version: to.clone(),
                canary: *canary,
                batch: batch.clone(),
                parallel: *parallel,
                environment: environment.clone(),
                skip_promotion_reason: if *skip_promotion {
                    reason.clone()
                } else {
                    None
                },
                requested_by: crate::history_cmd::os_user(),
                rollback_scope: scope.into(),
            };
            match controller_client(conn).deploy(req).await {
                Ok(stream) => follow(conn, stream.into_inner(), out).await,
                Err(s) => Err(err(conn)(s)),
            }
        }
        Command::Deployments { command } => {
            let mut client = history_client(conn);
            match command
                .as_ref()
                .unwrap_or(&DeploymentsCommand::List { limit: 20 })
            {
                DeploymentsCommand::List { limit } => {
                    match client
                        .list_deployments(pb::ListDeploymentsRequest { limit: *limit })
                        .await
                    {
                        Ok(r) => {
                            let ds = r.into_inner().deployments;
                            match out {
                                Output::Json => println!(
                                    "{}",
                                    json!(ds.iter().map(deployment_json).collect::<Vec<_>>())
                                ),
                                Output::Text if ds.is_empty() => println!("no deployments yet"),
                                Output::Text => {
                                    for d in &ds {
                                        let ok = d
                                            .targets
                                            .iter()
                                            .filter(|t| t.state == "succeeded")
                                            .count();
                                        println!(
                                            "{}  {:<11} {}  {}/{} targets  to {}",
                                            d.id,
                                            d.state,
                                            ts(&d.created_at),
                                            ok,
                                            d.targets.len(),
                                            d.to_version.as_deref().unwrap_or("latest")
                                        );
                                    }
                                }
                            }
                            Ok(0)
                        }
                        Err(s) => Err(err(conn)(s)),
                    }
                }
                DeploymentsCommand::Show { id, .. } => {
                    match client
                        .get_deployment(pb::GetDeploymentRequest {
                            id: id.clone(),
                            without_events: false,
                        })
                        .await
                    {
                        Ok(d) => {
                            let d = d.into_inner();
                            match out {
                                Output::Json => println!("{}", deployment_json(&d)),
                                Output::Text => print_deployment(&d),
                            }
                            Ok(0)
                        }
                        Err(s) => Err(err(conn)(s)),
                    }
                }
                DeploymentsCommand::Watch { id } => {
                    match client
                        .watch_deployment(pb::WatchDeploymentRequest {
                            id: id.clone(),
                            after_seq: 0,
                        })
                        .await
                    {
                        Ok(stream) => follow(conn, stream.into_inner(), out).await,
                        Err(s) => Err(err(conn)(s)),
                    }
                }
            }
        }
        Command::Agents => match controller_client(conn)
            .list_agents(pb::ListAgentsRequest {})
            .await
        {
            Ok(r) => {
                let agents = r.into_inner().agents;
                // Each target's environment, as its agent.toml gives it.
                let environments: std::collections::BTreeMap<String, String> =
                    match controller_client(conn)
                        .list_targets(pb::ListTargetsRequest {})
                        .await
                    {
                        Ok(t) => t
                            .into_inner()
                            .targets
                            .into_iter()
                            .filter(|t| !t.environment.is_empty())
                            .map(|t| (t.name, t.environment))
                            .collect(),
                        Err(s) => return Some(Err(err(conn)(s))),
                    };
                let env_of = |t: &str| environments.get(t).map(String::as_str);
                match out {
                    Output::Json => println!(
                        "{}",
                        json!(agents.iter().map(|a| json!({
                            "name": a.name, "address": a.address, "version": a.version, "state": a.state,
                            "last_heartbeat": ts(&a.last_heartbeat), "targets": a.targets,
                            "target_environments": a.targets.iter().map(|t| (t.clone(), json!(env_of(t)))).collect::<serde_json::Map<_, _>>(),
                        })).collect::<Vec<_>>())
                    ),
                    Output::Text if agents.is_empty() => println!("no agents registered"),
                    Output::Text => {
                        for a in &agents {
                            let targets: Vec<String> = a
                                .targets
                                .iter()
                                .map(|t| match env_of(t) {
                                    Some(e) => format!("{t} ({e})"),
                                    None => format!("{t} (no environment)"),
                                })
                                .collect();
                            println!(
                                "{:<20} {:<22} {:<11} last heartbeat {}  targets: {}",
                                a.name,
                                a.address,
                                a.state,
                                ts(&a.last_heartbeat),
                                targets.join(", ")
                            );
                        }
                    }
                }
                Ok(0)
            }
            Err(s) => Err(err(conn)(s)),
        },
        _ => return None,
    })
}

/// The error for fleet commands run without `--controller` (`deployments` reads the
/// database's own log in local mode).
pub fn needs_controller(command: &Command) -> Option<Failure> {
    matches!(command, Command::Deploy { .. } | Command::Agents).then(|| Failure {
        code: exit::USAGE,
        message:
            "this command talks to a controller: pass --controller ADDR (or set BELAY_CONTROLLER)"
                .into(),
    })
}

pub fn remote_target(target: Option<&str>) -> Result<&str, Failure> {
    target.ok_or_else(|| {
        Failure::from(ApiError::new(
            ErrorKind::UnknownTarget,
            "remote mode acts on one target: pass --target NAME (see `belay agents`)",
        ))
    })
}
