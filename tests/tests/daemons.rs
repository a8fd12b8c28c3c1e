//! The daemons as a supervisor sees them: `belay-agent` and `belay-controller`
//! are spawned as real processes, announce their address, answer gRPC health
//! checks, stop cleanly on SIGTERM, and fail with documented exit codes.
//!
//! `cargo test` builds a package's binaries only for that package's own
//! integration tests, so these tests run `cargo build -p belay-agent -p
//! belay-controller` once per test process (a no-op when they are fresh) and
//! take the executables' paths from cargo's JSON messages, which also covers a
//! custom `CARGO_TARGET_DIR`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::task::JoinHandle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Generous bounds: a loaded CI machine may be slow, but a hang must fail.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

const EX_USAGE: i32 = 64;
const EX_UNAVAILABLE: i32 = 69;

#[derive(Debug, Clone, Copy)]
struct Daemon {
    bin: &'static str,
    /// The service besides "" whose health the daemon reports.
    service: &'static str,
}

const DAEMONS: [Daemon; 2] = [
    Daemon {
        bin: "belay-agent",
        service: "belay.v1.MigrationService",
    },
    Daemon {
        bin: "belay-controller",
        service: "belay.v1.ControllerService",
    },
];

#[tokio::test]
async fn daemons_serve_health_and_stop_cleanly_on_sigterm() -> Result<()> {
    for daemon in DAEMONS {
        serves_health_and_stops_on_sigterm(daemon)
            .await
            .with_context(|| daemon.bin)?;
    }
    Ok(())
}

async fn serves_health_and_stops_on_sigterm(daemon: Daemon) -> Result<()> {
    let mut running = Running::start(daemon, &["--listen", "127.0.0.1:0"]).await?;

    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", running.addr))
        .context("building the endpoint")?
        .connect_timeout(RPC_TIMEOUT);
    let channel = tokio::time::timeout(RPC_TIMEOUT, endpoint.connect())
        .await
        .context("connecting timed out")?
        .context("connecting to the health service")?;
    let mut client = HealthClient::new(channel);
    for service in ["", daemon.service] {
        let response = tokio::time::timeout(
            RPC_TIMEOUT,
            client.check(HealthCheckRequest {
                service: service.to_owned(),
            }),
        )
        .await
        .with_context(|| format!("health check of {service:?} timed out"))?
        .with_context(|| format!("health check of {service:?}"))?;
        assert_eq!(
            response.into_inner().status(),
            ServingStatus::Serving,
            "{}: health of {service:?}",
            daemon.bin
        );
    }
    // Watchers (load balancers, the controller) must hear NOT_SERVING before
    // the daemon goes away, so they stop routing to it.
    let mut watch = tokio::time::timeout(
        RPC_TIMEOUT,
        client.watch(HealthCheckRequest {
            service: daemon.service.to_owned(),
        }),
    )
    .await
    .context("health watch timed out")?
    .context("health watch")?
    .into_inner();
    let first = next_status(&mut watch).await?;
    assert_eq!(
        first,
        Some(ServingStatus::Serving),
        "{}: first watched status",
        daemon.bin
    );

    send_sigterm(&running.child)?;
    let after = next_status(&mut watch).await?;
    assert_eq!(
        after,
        Some(ServingStatus::NotServing),
        "{}: status after SIGTERM",
        daemon.bin
    );
    // An open stream is an in-flight call that graceful shutdown waits for;
    // ending it (and keeping the idle connection) must let the daemon exit.
    drop(watch);
    let (code, stderr) = running.wait_exit().await?;
    assert_eq!(
        code,
        Some(0),
        "{}: exit code after SIGTERM; stderr:\n{stderr}",
        daemon.bin
    );
    assert!(
        stderr.contains("stopped"),
        "{}: no `stopped` log line in:\n{stderr}",
        daemon.bin
    );
    Ok(())
}

/// `--health-listen` serves grpc.health.v1 in plaintext for the kubelet's `grpc:` probe,
/// reporting what the daemon reports, and nothing else: reflection (and so every belay
/// service) answers `Unimplemented` there.
#[tokio::test]
async fn daemons_serve_health_alone_on_the_health_listener() -> Result<()> {
    for daemon in DAEMONS {
        let health = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.to_string()
        };
        let mut running = Running::start(
            daemon,
            &["--listen", "127.0.0.1:0", "--health-listen", &health],
        )
        .await
        .with_context(|| daemon.bin)?;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{health}"))?
            .connect_timeout(RPC_TIMEOUT)
            .connect()
            .await
            .with_context(|| format!("{}: connecting to --health-listen", daemon.bin))?;
        let mut client = HealthClient::new(channel.clone());
        for service in ["", daemon.service] {
            let status = client
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .with_context(|| format!("{}: health of {service:?}", daemon.bin))?
                .into_inner()
                .status();
            assert_eq!(
                status,
                ServingStatus::Serving,
                "{}: {service:?}",
                daemon.bin
            );
        }
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let listed = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([req]))
            .await;
        let code = match listed {
            Err(status) => status.code(),
            Ok(mut stream) => match stream.get_mut().message().await {
                Err(status) => status.code(),
                Ok(_) => tonic::Code::Ok,
            },
        };
        assert_eq!(code, tonic::Code::Unimplemented, "{}", daemon.bin);
        send_sigterm(&running.child)?;
        let (exit, stderr) = running.wait_exit().await?;
        assert_eq!(exit, Some(0), "{}: {stderr}", daemon.bin);
    }
    Ok(())
}

#[tokio::test]
async fn daemons_reject_a_malformed_listen_address_with_exit_64() -> Result<()> {
    for daemon in DAEMONS {
        let (code, stderr) = run_to_exit(daemon, &["--listen", "not-an-addr"]).await?;
        assert_eq!(code, Some(EX_USAGE), "{}: stderr:\n{stderr}", daemon.bin);
        assert!(
            stderr.contains("not-an-addr"),
            "{}: stderr names the address:\n{stderr}",
            daemon.bin
        );
    }
    Ok(())
}

#[tokio::test]
async fn daemons_reject_unknown_flags_with_exit_64_and_help_with_exit_0() -> Result<()> {
    for daemon in DAEMONS {
        let (code, stderr) = run_to_exit(daemon, &["--no-such-flag"]).await?;
        assert_eq!(code, Some(EX_USAGE), "{}: stderr:\n{stderr}", daemon.bin);

        let output = Command::new(binary(daemon.bin)?)
            .arg("--help")
            .output()
            .await
            .context("running --help")?;
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}: --help exit code",
            daemon.bin
        );
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            help.contains("Exit codes:"),
            "{}: --help documents exit codes:\n{help}",
            daemon.bin
        );
    }
    Ok(())
}

#[tokio::test]
async fn daemons_exit_69_when_the_port_is_taken() -> Result<()> {
    // Held for the whole test so the port stays taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").context("binding a port to hold")?;
    let addr = taken
        .local_addr()
        .context("reading the held port")?
        .to_string();
    for daemon in DAEMONS {
        let (code, stderr) = run_to_exit(daemon, &["--listen", &addr]).await?;
        assert_eq!(
            code,
            Some(EX_UNAVAILABLE),
            "{}: stderr:\n{stderr}",
            daemon.bin
        );
        assert!(
            stderr.contains(&addr),
            "{}: stderr names {addr}:\n{stderr}",
            daemon.bin
        );
    }
    Ok(())
}

/// The next status on a health watch stream; `None` when the stream ended.
async fn next_status(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> Result<Option<ServingStatus>> {
    let message = tokio::time::timeout(RPC_TIMEOUT, watch.message())
        .await
        .context("no health status in time")?
        .context("reading the health watch stream")?;
    Ok(message.map(|m| m.status()))
}

/// A daemon that announced its address.
struct Running {
    bin: &'static str,
    child: Child,
    addr: SocketAddr,
    stderr: JoinHandle<String>,
}

impl Running {
    async fn start(daemon: Daemon, args: &[&str]) -> Result<Self> {
        let mut child = command(daemon, args)?
            .spawn()
            .with_context(|| format!("spawning {}", daemon.bin))?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let stderr = collect(child.stderr.take().context("stderr is piped")?);

        let mut lines = BufReader::new(stdout).lines();
        let first = match tokio::time::timeout(STARTUP_TIMEOUT, lines.next_line()).await {
            Ok(line) => line.context("reading stdout")?,
            Err(_) => None,
        };
        let Some(line) = first else {
            // Either it timed out or stdout closed: show why it did not start.
            let _ = child.start_kill();
            let stderr = stderr.await.unwrap_or_default();
            bail!(
                "{} did not print `listening on ADDR` in time; stderr:\n{stderr}",
                daemon.bin
            );
        };
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("{}: unexpected first stdout line {line:?}", daemon.bin))?;
        Ok(Self {
            bin: daemon.bin,
            child,
            addr,
            stderr,
        })
    }

    /// Exit code and full stderr, or an error if it does not exit in time.
    async fn wait_exit(&mut self) -> Result<(Option<i32>, String)> {
        let status = match tokio::time::timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.context("waiting for exit")?,
            Err(_) => {
                let _ = self.child.start_kill();
                bail!("{} did not exit within {EXIT_TIMEOUT:?}", self.bin);
            }
        };
        let stderr = (&mut self.stderr).await.context("collecting stderr")?;
        Ok((status.code(), stderr))
    }
}

async fn run_to_exit(daemon: Daemon, args: &[&str]) -> Result<(Option<i32>, String)> {
    let mut child = command(daemon, args)?
        .spawn()
        .with_context(|| format!("spawning {}", daemon.bin))?;
    let stderr = collect(child.stderr.take().context("stderr is piped")?);
    let status = match tokio::time::timeout(EXIT_TIMEOUT, child.wait()).await {
        Ok(status) => status.context("waiting for exit")?,
        Err(_) => {
            let _ = child.start_kill();
            bail!(
                "{} {args:?} did not exit within {EXIT_TIMEOUT:?}",
                daemon.bin
            );
        }
    };
    Ok((status.code(), stderr.await.context("collecting stderr")?))
}

fn command(daemon: Daemon, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(binary(daemon.bin)?);
    cmd.args(args)
        // Hermetic: the developer's environment must not change flags or logs.
        .env_remove("BELAY_AGENT_LISTEN")
        .env_remove("BELAY_CONTROLLER_LISTEN")
        // The controller's store goes to a scratch file, never the working directory.
        .env("BELAY_CONTROLLER_STORE", scratch_store())
        .env_remove("BELAY_LOG_FORMAT")
        .env("BELAY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Ok(cmd)
}

/// Reads stderr to the end in the background so the child never blocks on a
/// full pipe.
fn collect(mut stderr: ChildStderr) -> JoinHandle<String> {
    tokio::spawn(async move {
        let mut text = String::new();
        // Partial output is still useful for a failure message.
        let _ = stderr.read_to_string(&mut text).await;
        text
    })
}

/// Through the shell's `kill` builtin: no unsafe `libc::kill`, and no
/// dependency on a `kill` executable being installed.
fn send_sigterm(child: &Child) -> Result<()> {
    let pid = child.id().context("the child has already been reaped")?;
    let status = std::process::Command::new("sh")
        .args(["-c", "kill -TERM \"$1\"", "sh", &pid.to_string()])
        .status()
        .context("running sh -c kill")?;
    ensure!(status.success(), "kill -TERM {pid} failed: {status}");
    Ok(())
}

/// A fresh SQLite store path under cargo's per-target scratch directory.
fn scratch_store() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("daemons-{}-{n}.db", std::process::id()))
}

/// Path of a freshly built daemon executable.
fn binary(name: &str) -> Result<PathBuf> {
    belay_e2e::binary(name)
}
