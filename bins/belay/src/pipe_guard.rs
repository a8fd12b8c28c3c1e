//! Output that survives its reader going away. `belay status | head` closes the pipe after
//! a few lines; Rust ignores SIGPIPE, so the next `println!` fails with EPIPE and panics —
//! and SIGPIPE's default instead would kill a migration mid-run. So when stdout or stderr
//! is a pipe, belay writes into a pipe of its own, and a thread copies it to the real one;
//! once the reader is gone the thread discards what follows. Printing never fails, the work
//! runs to its end, and the exit code is the work's.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::thread::JoinHandle;

/// The relays installed; [`Guard::finish`] delivers what is left before the process exits.
#[derive(Debug)]
pub struct Guard {
    relays: Vec<(Stream, Relay)>,
}

/// A relay thread, and word of its end (a child belay started that is still running would
/// hold the pipe open: belay waits a bounded time for it, then exits anyway).
#[derive(Debug)]
struct Relay {
    _thread: JoinHandle<()>,
    done: std::sync::mpsc::Receiver<()>,
}

/// How long `finish` waits for a relay to pass on the last of the output.
const DRAIN_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Puts a relay in front of stdout and stderr where each is a pipe. Anything that cannot be
/// set up leaves that stream as it was: belay then prints as before.
pub fn install() -> Guard {
    let mut relays = Vec::new();
    for stream in [Stream::Stdout, Stream::Stderr] {
        if let Some(handle) = relay(stream) {
            relays.push((stream, handle));
        }
    }
    Guard { relays }
}

fn relay(stream: Stream) -> Option<Relay> {
    let real: OwnedFd = match stream {
        Stream::Stdout => rustix::io::dup(std::io::stdout().as_fd()).ok()?,
        Stream::Stderr => rustix::io::dup(std::io::stderr().as_fd()).ok()?,
    };
    let mut real = std::fs::File::from(real);
    if !real.metadata().ok()?.file_type().is_fifo() {
        return None;
    }
    let (read, write) = rustix::pipe::pipe().ok()?;
    let swapped = match stream {
        Stream::Stdout => rustix::stdio::dup2_stdout(&write),
        Stream::Stderr => rustix::stdio::dup2_stderr(&write),
    };
    swapped.ok()?;
    // fd 1 (or 2) now holds the pipe's write end; this copy of it must go, or the relay
    // would never see the end of the output.
    drop(write);
    let mut read = std::fs::File::from(read);
    let (tx, done) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("belay-output".into())
        .spawn(move || {
            let mut buf = [0u8; 8192];
            let mut reader_gone = false;
            loop {
                match read.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) if !reader_gone => {
                        // Any write error means nobody reads any more (EPIPE, or the
                        // terminal went away): keep draining, so belay never blocks.
                        reader_gone = real.write_all(&buf[..n]).is_err();
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        })
        .ok()?;
    Some(Relay {
        _thread: thread,
        done,
    })
}

impl Guard {
    /// Flushes what belay printed, closes its end of each relay and waits until the relay
    /// has passed everything on (or dropped it, when the reader is gone).
    pub fn finish(self) {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") else {
            return;
        };
        for (stream, relay) in self.relays {
            let closed = match stream {
                Stream::Stdout => rustix::stdio::dup2_stdout(&null),
                Stream::Stderr => rustix::stdio::dup2_stderr(&null),
            };
            if closed.is_ok() {
                let _ = relay.done.recv_timeout(DRAIN_BOUND);
            }
        }
    }
}
