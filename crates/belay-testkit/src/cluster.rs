//! Throwaway PostgreSQL clusters.

use std::fmt;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::os::{self, RunAs};
use crate::template::{self, PREFIX};
use crate::tools::{psql, run_checked};
use crate::{Error, bin_dir};

/// How long a starting server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Start attempts; a free port can be taken by someone else between probing and binding.
const START_ATTEMPTS: u32 = 4;

/// A PostgreSQL server of its own, listening on 127.0.0.1 on a free port, with trust
/// authentication for the `postgres` superuser and `fsync=off`.
///
/// [`Cluster::start`] gives a dedicated cluster, stopped and deleted on `Drop`;
/// [`Cluster::shared`] gives one cluster per test binary. Tests that need isolation within a
/// cluster take a fresh database with [`Cluster::create_database`].
pub struct Cluster {
    /// Everything of this cluster lives here: `data/`, the socket, `postgres.log`.
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    run_as: Option<RunAs>,
    port: u16,
    pid: u32,
    /// `None` while stopped. A mutex (not `&mut`) so the exit hook of the shared cluster,
    /// which only has `&'static Cluster`, can stop it.
    server: Mutex<Option<Server>>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("root", &self.root)
            .field("port", &self.port)
            .field("pid", &self.pid)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

/// A database created for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    /// The database name, `t_<pid>_<n>`.
    pub name: String,
    /// `postgres://postgres@127.0.0.1:<port>/<name>`.
    pub url: String,
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

impl Cluster {
    /// Starts a dedicated cluster. Dropping it stops the server (fast shutdown) and removes
    /// its directory.
    pub fn start() -> Result<Cluster, Error> {
        let bin = bin_dir()?;
        let run_as = template::run_as()?;
        template::sweep_stale();
        let template = template::data_dir(&bin, run_as)?;

        let tmp = std::env::temp_dir();
        let root = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-", std::process::id()))
            .tempdir_in(&tmp)
            .map_err(Error::io(format!(
                "could not create a directory in {}",
                tmp.display()
            )))?
            .keep();
        let mut cluster = Cluster {
            data: root.join("data"),
            log: root.join("postgres.log"),
            root,
            bin,
            run_as,
            port: 0,
            pid: 0,
            server: Mutex::new(None),
        };
        // From here on, an early return drops `cluster`, which removes the directory.
        template::hand_over(&cluster.root, run_as, 0o700)?;
        run_checked(
            Command::new("cp")
                .arg("-a")
                .arg(&template)
                .arg(&cluster.data),
            "cp -a (copying the template data directory)",
        )?;
        cluster.launch(None)?;
        Ok(cluster)
    }

    /// The cluster shared by every test of this test binary, started on first use. It is
    /// stopped and its directory removed when the process exits; if the process dies
    /// instead, the server gets SIGQUIT from the kernel.
    ///
    /// # Panics
    /// If the cluster cannot be started; the message says why and how to fix it.
    pub fn shared() -> &'static Cluster {
        SHARED.get_or_init(|| {
            let cluster = Cluster::start().unwrap_or_else(|err| {
                panic!(
                    "belay-testkit: could not start the shared PostgreSQL cluster: {}",
                    error_chain(&err)
                )
            });
            if let Err(err) = os::at_exit(stop_shared_at_exit) {
                eprintln!(
                    "belay-testkit: {err}; the shared cluster in {} will only stop when this process dies",
                    cluster.root.display()
                );
            }
            cluster
        })
    }

    /// The TCP port on 127.0.0.1. It may change across [`Cluster::restart`] if the old
    /// port was taken meanwhile.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket (`-k`), also the cluster's root.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log (stdout and stderr of `postgres`).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `postgres://postgres@127.0.0.1:{port}/{db}`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The postmaster's pid (of the last start, if the server is stopped).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the server process is still running.
    pub fn is_running(&self) -> bool {
        lock(&self.server)
            .as_ref()
            .is_some_and(|server| !server.exited())
    }

    /// Creates a fresh, uniquely named database (`t_<pid>_<n>`) from `template0`.
    pub async fn create_database(&self) -> Result<TestDb, Error> {
        let db = self.next_database();
        let admin = self.url("postgres");
        let sql_err = |what: &str| {
            let (what, url) = (what.to_owned(), admin.clone());
            move |source| Error::Sql { what, url, source }
        };
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .map_err(sql_err("connect"))?;
        let create = format!("CREATE DATABASE {} TEMPLATE template0", db.name);
        sqlx::raw_sql(sqlx::AssertSqlSafe(create.clone()))
            .execute(&mut conn)
            .await
            .map_err(sql_err(&create))?;
        // Closing politely only saves the server a log line; failure here is harmless.
        let _ = conn.close().await;
        Ok(db)
    }

    /// [`Cluster::create_database`] for code without an async runtime (uses `psql`).
    pub fn create_database_blocking(&self) -> Result<TestDb, Error> {
        let db = self.next_database();
        psql(
            &self.url("postgres"),
            &format!("CREATE DATABASE {} TEMPLATE template0", db.name),
        )?;
        Ok(db)
    }

    fn next_database(&self) -> TestDb {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        TestDb {
            url: self.url(&name),
            name,
        }
    }

    /// Stops the server with a fast shutdown (open sessions are terminated, data is kept).
    /// Does nothing if it is not running.
    pub fn stop(&mut self) -> Result<(), Error> {
        match self
            .server
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(server) => stop_server(server, Stop::Fast),
            None => Ok(()),
        }
    }

    /// Kills the postmaster and all its backends with SIGKILL, like a crash of the server
    /// host: sessions drop at once, and the next [`Cluster::restart`] runs crash recovery.
    pub fn kill(&mut self) -> Result<(), Error> {
        match self
            .server
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(server) => stop_server(server, Stop::Kill),
            None => Ok(()),
        }
    }

    /// Stops the server if it runs, then starts it again on the same data (and the same
    /// port, unless that has been taken meanwhile).
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop()?;
        self.launch(Some(self.port))
    }

    /// Starts the server, retrying on another port when a start fails.
    fn launch(&mut self, preferred: Option<u16>) -> Result<(), Error> {
        let mut last_err = None;
        for attempt in 0..START_ATTEMPTS {
            let port = match preferred {
                Some(port) if attempt < 2 => port,
                _ => free_port()?,
            };
            match self.spawn_ready(port) {
                Ok(server) => {
                    self.port = port;
                    self.pid = server.pid;
                    *self.server.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(server);
                    return Ok(());
                }
                Err(Launch::Fatal(err)) => return Err(err),
                Err(Launch::Retry(err)) => last_err = Some(err),
            }
            // Lets a lingering previous server (same data directory) finish exiting.
            thread::sleep(Duration::from_millis(100 * u64::from(attempt + 1)));
        }
        Err(last_err.unwrap_or_else(|| Error::Start {
            port: 0,
            reason: "no start attempt was made".to_owned(),
            log: self.log.clone(),
            log_tail: String::new(),
        }))
    }

    fn spawn_ready(&self, port: u16) -> Result<Server, Launch> {
        let log_start = fs::metadata(&self.log).map_or(0, |m| m.len());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| {
                Launch::Fatal(Error::io(format!("could not open {}", self.log.display()))(
                    e,
                ))
            })?;
        let log_err = log
            .try_clone()
            .map_err(|e| Launch::Fatal(Error::io("could not duplicate the log file handle")(e)))?;

        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(&self.root)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                // Shared clusters serve many tests with their own pools at once.
                "-c",
                "max_connections=200",
            ])
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        os::prepare_child(&mut cmd, self.run_as, true);
        let mut server = Server::spawn(cmd, port).map_err(Launch::Fatal)?;

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = server.exit_status() {
                return Err(Launch::Retry(self.start_error(
                    port,
                    format!("postgres exited ({status})"),
                    log_start,
                )));
            }
            if self.accepts_connections(server.pid, port) {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                let _ = os::signal_group(server.pid, os::SIGKILL);
                let _ = server.wait(Duration::from_secs(5));
                return Err(Launch::Fatal(self.start_error(
                    port,
                    format!("not ready after {READY_TIMEOUT:?}"),
                    log_start,
                )));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Readiness as `pg_ctl -w` sees it (status line of `postmaster.pid`, written by this
    /// very postmaster), confirmed by a TCP connect to our port.
    fn accepts_connections(&self, pid: u32, port: u16) -> bool {
        let Ok(pidfile) = fs::read_to_string(self.data.join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = pidfile.lines().map(str::trim).collect();
        let ours = lines.first() == Some(&pid.to_string().as_str());
        let ready = lines.get(7) == Some(&"ready");
        ours && ready
            && TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                Duration::from_secs(1),
            )
            .is_ok()
    }

    fn start_error(&self, port: u16, reason: String, log_start: u64) -> Error {
        Error::Start {
            port,
            reason,
            log: self.log.clone(),
            log_tail: log_tail(&self.log, log_start, 20),
        }
    }

    /// Stops the server and deletes the directory; used by `Drop` and the exit hook.
    fn teardown(&self) {
        let server = lock(&self.server).take();
        if let Some(Err(err)) = server.map(|server| stop_server(server, Stop::Fast)) {
            eprintln!("belay-testkit: {}", error_chain(&err));
        }
        match fs::remove_dir_all(&self.root) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => eprintln!(
                "belay-testkit: could not remove {}: {err}",
                self.root.display()
            ),
            _ => {}
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

extern "C" fn stop_shared_at_exit() {
    // Unwinding out of an `extern "C"` function aborts the process; swallow instead.
    let _ = std::panic::catch_unwind(|| {
        if let Some(cluster) = SHARED.get() {
            cluster.teardown();
        }
    });
}

enum Launch {
    /// The server exited during start-up (port taken, previous server still exiting):
    /// worth another attempt.
    Retry(Error),
    Fatal(Error),
}

#[derive(Clone, Copy)]
enum Stop {
    Fast,
    Kill,
}

/// A running postmaster and the thread that spawned it and waits for it.
struct Server {
    pid: u32,
    /// Receives the exit status once the postmaster has been reaped.
    exited: mpsc::Receiver<String>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Server {
    /// Spawns `cmd` from a dedicated thread that then waits for it: PR_SET_PDEATHSIG fires
    /// when the *thread* that forked the child exits, so that thread must outlive the
    /// server — and must not be a test thread, which ends with its test.
    fn spawn(mut cmd: Command, port: u16) -> Result<Server, Error> {
        let (started_tx, started_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("postgres-{port}"))
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(child) => child,
                    Err(err) => {
                        let _ = started_tx.send(Err(err));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(child.id()));
                let status = match child.wait() {
                    Ok(status) => status.to_string(),
                    Err(err) => format!("could not wait for postgres: {err}"),
                };
                let _ = exit_tx.send(status);
            })
            .map_err(Error::io("could not spawn the thread that owns postgres"))?;
        let started = started_rx.recv();
        let pid = match started {
            Ok(Ok(pid)) => pid,
            Ok(Err(source)) => {
                let _ = thread.join();
                return Err(Error::Io {
                    what: "could not start postgres".to_owned(),
                    source,
                });
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Io {
                    what: "could not start postgres".to_owned(),
                    source: std::io::Error::other("the spawning thread ended early"),
                });
            }
        };
        Ok(Server {
            pid,
            exited: exit_rx,
            thread: Some(thread),
        })
    }

    fn exited(&self) -> bool {
        !matches!(self.exited.try_recv(), Err(TryRecvError::Empty))
    }

    /// The exit status if the server has exited.
    fn exit_status(&mut self) -> Option<String> {
        match self.exited.try_recv() {
            Ok(status) => {
                self.join();
                Some(status)
            }
            Err(TryRecvError::Disconnected) => {
                self.join();
                Some("exited".to_owned())
            }
            Err(TryRecvError::Empty) => None,
        }
    }

    /// Waits up to `timeout` for the server to exit; `true` if it did.
    fn wait(&mut self, timeout: Duration) -> bool {
        match self.exited.recv_timeout(timeout) {
            Ok(_) | Err(RecvTimeoutError::Disconnected) => {
                self.join();
                true
            }
            Err(RecvTimeoutError::Timeout) => false,
        }
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stop_server(mut server: Server, how: Stop) -> Result<(), Error> {
    let pid = server.pid;
    let sent = match how {
        // SIGINT is PostgreSQL's fast shutdown: terminate sessions, checkpoint, exit.
        Stop::Fast => os::signal(pid, os::SIGINT),
        // The postmaster leads its own process group (see `os::prepare_child`), so this
        // reaches every backend too.
        Stop::Kill => os::signal_group(pid, os::SIGKILL),
    };
    if let Err(source) = sent {
        return Err(Error::Io {
            what: format!("could not signal postgres (pid {pid})"),
            source,
        });
    }
    let timeout = match how {
        Stop::Fast => STOP_TIMEOUT,
        Stop::Kill => Duration::from_secs(10),
    };
    if server.wait(timeout) {
        wait_group_gone(pid);
        return Ok(());
    }
    let _ = os::signal_group(pid, os::SIGKILL);
    let _ = server.wait(Duration::from_secs(5));
    wait_group_gone(pid);
    Err(Error::Stop { pid, timeout })
}

/// Backends of a killed postmaster die asynchronously; a restart must not find them still
/// attached to the old shared memory. Bounded, since zombies may linger if nothing reaps
/// orphans (they hold no shared memory, so that is harmless).
fn wait_group_gone(pgid: u32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while os::group_alive(pgid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
}

fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(Error::io("could not find a free port on 127.0.0.1"))?;
    let port = listener
        .local_addr()
        .map_err(Error::io("could not read the probed port"))?
        .port();
    Ok(port)
}

/// The last `lines` lines of `path` written after byte `from`.
fn log_tail(path: &Path, from: u64, lines: usize) -> String {
    let mut text = String::new();
    let read = fs::File::open(path).and_then(|mut file| {
        file.seek(SeekFrom::Start(from))?;
        file.read_to_string(&mut text)
    });
    if let Err(err) = read {
        return format!("(could not read {}: {err})", path.display());
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves the data consistent (an Option we take or set).
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
