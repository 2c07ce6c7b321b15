//! Zero heap allocations per healthcheck request on a warm keep-alive connection, in every
//! worker, counted by a global allocator that counts every thread but the test's client (the
//! supervisor and the workers). A regression fails this test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::thread;

use clap::Parser;
use greenlight::{Config, Supervisor};

struct CountingAllocator;

static SERVER_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static IS_CLIENT_THREAD: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if !IS_CLIENT_THREAD.try_with(Cell::get).unwrap_or(true) {
        SERVER_ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
    }
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const GET: &[u8] = b"GET /v1/healthcheck HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n";
const HEAD: &[u8] = b"HEAD /v1/healthcheck HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Reads one response: the head, then Content-Length bytes unless `head_only`.
fn read_response(stream: &mut TcpStream, head_only: bool) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "connection closed");
        raw.push(byte[0]);
    }
    let head = String::from_utf8(raw.clone()).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    if !head_only {
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0; length];
        stream.read_exact(&mut body).unwrap();
        raw.extend_from_slice(&body);
    }
    raw
}

/// Workers in this test: connections are dealt round-robin, so one connection per worker
/// puts every worker on the hot path.
const WORKERS: usize = 3;

#[test]
fn warm_keep_alive_healthcheck_requests_allocate_nothing_in_any_worker() {
    IS_CLIENT_THREAD.with(|flag| flag.set(true));
    let workers = WORKERS.to_string();
    let args = ["greenlight", "--host", "127.0.0.1", "--port", "0"];
    let config = Config::try_parse_from(args.into_iter().chain(["--workers", &workers])).unwrap();
    let log = slog::Logger::root(slog::Discard, slog::o!());
    let server = Supervisor::bind(&config, log).unwrap();
    let addr = server.addr();
    let (started_tx, started) = channel();
    thread::spawn(move || {
        started_tx.send(()).unwrap();
        server.run();
    });
    started.recv().unwrap();

    let mut streams: Vec<TcpStream> = (0..WORKERS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // Warm up: the scratch buffers and the slabs reach their working size.
    for stream in &mut streams {
        for _ in 0..10 {
            stream.write_all(GET).unwrap();
            read_response(stream, false);
        }
        stream.write_all(&GET.repeat(16)).unwrap();
        for _ in 0..16 {
            read_response(stream, false);
        }
    }

    let before = SERVER_ALLOCATIONS.load(Ordering::SeqCst);
    for stream in &mut streams {
        for _ in 0..500 {
            stream.write_all(GET).unwrap();
            read_response(stream, false);
            stream.write_all(HEAD).unwrap();
            read_response(stream, true);
        }
        for _ in 0..50 {
            stream.write_all(&GET.repeat(16)).unwrap();
            for _ in 0..16 {
                read_response(stream, false);
            }
        }
    }
    let allocations = SERVER_ALLOCATIONS.load(Ordering::SeqCst) - before;
    assert_eq!(
        allocations, 0,
        "the server's threads allocated {allocations} times for 1,800 warm keep-alive requests \
         on each of {WORKERS} workers"
    );
}
