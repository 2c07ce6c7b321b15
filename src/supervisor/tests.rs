//! Unit tests of the supervisor: what the process does when a worker is lost; how it writes
//! durations.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use clap::Parser;
use slog::{Drain, Level, OwnedKVList, Record};

use super::*;

/// Keeps every log line's level and message.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<(Level, String)>>>);

impl Drain for Lines {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, record: &Record<'_>, _: &OwnedKVList) -> Result<(), slog::Never> {
        if let Ok(mut lines) = self.0.lock() {
            lines.push((record.level(), record.msg().to_string()));
        }
        Ok(())
    }
}

#[test]
fn a_worker_that_ends_unexpectedly_stops_the_process_with_exit_1() {
    let args = ["greenlight", "--host", "127.0.0.1", "--port", "0"];
    let config = Config::try_parse_from(args.into_iter().chain(["--workers", "2"])).unwrap();
    let lines = Lines::default();
    let log = Logger::root(lines.clone().fuse(), slog::o!());
    let supervisor = Supervisor::bind(&config, log).unwrap();
    let addr = supervisor.addr();
    let reports = supervisor.crew.report_outbox().unwrap();
    let (exit_tx, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || exit_tx.send(supervisor.run()));

    // Serving: a request is answered (so the workers are up), then worker 1 "dies".
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    client
        .write_all(b"GET /v1/healthcheck HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    client.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    reports.send(Report::Gone(1));

    let exit = exit.recv_timeout(Duration::from_secs(10));
    assert_eq!(
        exit,
        Ok(Exit::Forced),
        "the process must not go on without a worker"
    );
    let lines = lines.0.lock().unwrap();
    assert!(
        lines.iter().any(|(level, msg)| *level == Level::Critical
            && msg == "worker stopped unexpectedly, stopping the process"),
        "{lines:?}"
    );
}

#[test]
fn durations_read_as_people_write_them() {
    let rows = [
        (0, "0s"),
        (1000, "1s"),
        (250, "250ms"),
        (1500, "1.5s"),
        (61_050, "61.05s"),
    ];
    for (millis, text) in rows {
        assert_eq!(super::stopping::human(Duration::from_millis(millis)), text);
    }
}
