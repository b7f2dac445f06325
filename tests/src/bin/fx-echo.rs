//! fx-echo: the process the tests run inside pods.
//!
//! - `fx-echo serve --name web-0 --tcp 8080 --udp 8080`: a TCP server that greets each
//!   connection with `fx-echo <name>` and then echoes bytes back, and a UDP server that answers
//!   each datagram with `<name> <datagram>`.
//! - `fx-echo call tcp|udp ADDR:PORT [--count N]`: N connections (or datagrams); prints one JSON
//!   line per call with the backend's name and the peer address the application saw.
//! - `fx-echo transfer ADDR:PORT --bytes N`: one TCP connection that sends N bytes and reads
//!   them back, verified; prints `{"bytes": N, "backend": ..., "ms": ...}` (status 1 on error).
//! - `fx-echo stream ADDR:PORT`: one TCP connection carrying a verified echo stream; prints
//!   `progress <bytes>` lines, and on SIGTERM a JSON summary; any error ends it with status 1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test tool: failures should be loud"
)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
    },
    Call {
        proto: Proto,
        target: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
        /// UDP only: connect() the socket instead of sendto() on an unconnected one.
        #[arg(long)]
        connected: bool,
        /// Call i binds source port `source_port + i`, so a later run can repeat the same flows
        /// (TCP connections end with a reset, leaving no TIME_WAIT behind to block the port).
        #[arg(long)]
        source_port: Option<u16>,
        /// UDP only: datagrams of this many bytes (the reply echoes them, as large): above the
        /// path's MTU they travel as IP fragments both ways.
        #[arg(long, default_value_t = 4)]
        size: usize,
    },
    /// New TCP connections to `target` (with `--udp`: a request from a new unconnected UDP
    /// socket each time, as a resolver without a long-lived socket does), one after the other,
    /// until SIGTERM; prints `progress <ok> <failed>` lines, then a JSON summary with every
    /// failure.
    Load {
        target: SocketAddr,
        #[arg(long, default_value_t = 5)]
        pause_ms: u64,
        #[arg(long)]
        udp: bool,
    },
    /// One connected UDP socket to `target`, asking every `interval_ms` until SIGTERM, as a
    /// resolver with a long-lived socket does: prints a JSON line per answer, per timeout, and
    /// per socket error (after which it opens a new socket); then a summary.
    UdpSession {
        target: SocketAddr,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        #[arg(long, default_value_t = 300)]
        timeout_ms: u64,
    },
    /// GET `path` from `target` over HTTP/1.1; prints the status and body.
    Transfer {
        target: SocketAddr,
        #[arg(long)]
        bytes: usize,
    },
    HttpGet {
        target: SocketAddr,
        #[arg(default_value = "/")]
        path: String,
    },
    /// `count` request/response exchanges, each on a new TCP connection (connect, greeting,
    /// one echo, close with a reset so no TIME_WAIT piles up), one after the other; prints a
    /// JSON object with each exchange's time in microseconds and the whole run's.
    Rr {
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Exchanges made first and not counted (caches, neighbour entries, the server's
        /// threads).
        #[arg(long, default_value_t = 0)]
        warmup: usize,
    },
    /// One call to each target (`tcp:ADDR:PORT` or `udp:ADDR:PORT`), all at once; prints one
    /// JSON line per target, `{"target", "ok", "backend"}` (a TCP call is good when the server
    /// greeted and echoed, a UDP one when an answer came back), in the order given.
    Probe {
        targets: Vec<String>,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// TCP only: connect from this local address (one of the namespace's own).
        #[arg(long)]
        from: Option<std::net::Ipv4Addr>,
    },
    Stream {
        target: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        chunk: usize,
        /// Pause between chunks, to keep the machine's two cores for the rest of the test.
        #[arg(long, default_value_t = 2)]
        pause_ms: u64,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { name, tcp, udp } => serve(&name, &tcp, &udp),
        Cmd::Call {
            proto,
            target,
            count,
            timeout_ms,
            connected,
            source_port,
            size,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let mut failed = false;
            for i in 0..count {
                let source = source_port.map(|base| {
                    let port = u16::try_from(usize::from(base) + i).expect("source port range");
                    SocketAddr::from(([0, 0, 0, 0], port))
                });
                let line = match (proto, source) {
                    (Proto::Tcp, None) => call_tcp(target, timeout),
                    (Proto::Tcp, Some(source)) => call_tcp_from(source, target, timeout),
                    (Proto::Udp, _) => call_udp(target, timeout, connected, source, size),
                };
                failed |= line.get("error").is_some();
                println!("{line}");
            }
            std::process::exit(i32::from(failed));
        }
        Cmd::Stream {
            target,
            chunk,
            pause_ms,
        } => stream(target, chunk, Duration::from_millis(pause_ms)),
        Cmd::Load {
            target,
            pause_ms,
            udp,
        } => load(target, Duration::from_millis(pause_ms), udp),
        Cmd::UdpSession {
            target,
            interval_ms,
            timeout_ms,
        } => udp_session(
            target,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
        ),
        Cmd::Transfer { target, bytes } => transfer(target, bytes),
        Cmd::Rr {
            target,
            count,
            warmup,
        } => rr(target, count, warmup),
        Cmd::Probe {
            targets,
            timeout_ms,
            from,
        } => probe(&targets, Duration::from_millis(timeout_ms), from),
        Cmd::HttpGet { target, path } => {
            let line = http_get(target, &path);
            let failed = line.get("error").is_some();
            println!("{line}");
            std::process::exit(i32::from(failed));
        }
    }
}

fn serve(name: &str, tcp: &[u16], udp: &[u16]) {
    let mut threads = Vec::new();
    for &port in tcp {
        let listener = TcpListener::bind(("0.0.0.0", port)).expect("binding the TCP port");
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || echo_tcp(conn, &name));
            }
        }));
    }
    for &port in udp {
        let sock = UdpSocket::bind(("0.0.0.0", port)).expect("binding the UDP port");
        let name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let mut reply = format!("{name} {from} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, from);
            }
        }));
    }
    println!("serving");
    for t in threads {
        let _ = t.join();
    }
}

fn echo_tcp(mut conn: TcpStream, name: &str) {
    // The greeting says who answered and which client address this server sees.
    let seen = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    if conn
        .write_all(format!("fx-echo {name} {seen}\n").as_bytes())
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 16384];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn error(target: SocketAddr, e: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({ "target": target.to_string(), "error": e.to_string() })
}

fn call_tcp(target: SocketAddr, timeout: Duration) -> serde_json::Value {
    let started = Instant::now();
    match TcpStream::connect_timeout(&target, timeout) {
        Ok(conn) => exchange_tcp(conn, target, timeout, started),
        Err(e) => error(target, e),
    }
}

/// [`call_tcp`] from a fixed source address; the connection ends with a reset (linger 0).
fn call_tcp_from(source: SocketAddr, target: SocketAddr, timeout: Duration) -> serde_json::Value {
    let started = Instant::now();
    let sock = match socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    ) {
        Ok(s) => s,
        Err(e) => return error(target, e),
    };
    let connected = sock
        .set_reuse_address(true)
        .and_then(|()| sock.set_linger(Some(Duration::ZERO)))
        .and_then(|()| sock.bind(&source.into()))
        .and_then(|()| sock.connect_timeout(&target.into(), timeout));
    match connected {
        Ok(()) => exchange_tcp(sock.into(), target, timeout, started),
        Err(e) => error(target, format!("from {source}: {e}")),
    }
}

/// Reads the greeting, checks one echo, and describes the call.
fn exchange_tcp(
    mut conn: TcpStream,
    target: SocketAddr,
    timeout: Duration,
    started: Instant,
) -> serde_json::Value {
    conn.set_read_timeout(Some(timeout)).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut greeting = String::new();
    if let Err(e) = reader.read_line(&mut greeting) {
        return error(target, e);
    }
    let mut words = greeting.split_whitespace();
    let (Some("fx-echo"), Some(backend), seen) = (words.next(), words.next(), words.next()) else {
        return error(target, format!("unexpected greeting {greeting:?}"));
    };
    let (backend, seen) = (backend.to_owned(), seen.unwrap_or_default().to_owned());
    if let Err(e) = conn.write_all(b"ping\n") {
        return error(target, e);
    }
    let mut echo = String::new();
    if let Err(e) = reader.read_line(&mut echo) {
        return error(target, e);
    }
    if echo != "ping\n" {
        return error(target, format!("bad echo {echo:?}"));
    }
    serde_json::json!({
        "target": target.to_string(),
        "backend": backend,
        "seen_by_backend": seen,
        "peer": conn.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
        "local": conn.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "micros": started.elapsed().as_micros() as u64,
    })
}

fn call_udp(
    target: SocketAddr,
    timeout: Duration,
    connected: bool,
    source: Option<SocketAddr>,
    size: usize,
) -> serde_json::Value {
    let sock = match UdpSocket::bind(source.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))) {
        Ok(s) => s,
        Err(e) => return error(target, format!("binding {source:?}: {e}")),
    };
    sock.set_read_timeout(Some(timeout)).unwrap();
    // "ping", padded to `size` bytes without spaces (the reply's third word is the datagram).
    let mut payload = b"ping".to_vec();
    payload.resize(size.max(4), b'.');
    let sent = if connected {
        sock.connect(target).and_then(|()| sock.send(&payload))
    } else {
        sock.send_to(&payload, target)
    };
    if let Err(e) = sent {
        return error(target, e);
    }
    let mut buf = vec![0u8; 65536];
    let (n, from) = match sock.recv_from(&mut buf) {
        Ok(r) => r,
        Err(e) => return error(target, e),
    };
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    let mut words = reply.splitn(3, ' ');
    let (Some(backend), Some(seen), Some(echoed)) = (words.next(), words.next(), words.next())
    else {
        return error(target, format!("bad reply {reply:?}"));
    };
    if echoed.as_bytes() != payload.as_slice() {
        return error(
            target,
            format!(
                "the echo of {} bytes came back as {}",
                payload.len(),
                echoed.len()
            ),
        );
    }
    serde_json::json!({ "target": target.to_string(), "backend": backend, "seen_by_backend": seen, "from": from.to_string(),
        "local": sock.local_addr().map(|a| a.to_string()).unwrap_or_default() })
}

fn udp_session(target: SocketAddr, interval: Duration, timeout: Duration) {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    let open = || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(timeout)).unwrap();
        sock.connect(target).unwrap();
        sock
    };
    let mut sock = open();
    let (mut answers, mut timeouts, mut reopened) = (0u64, 0u64, 0u64);
    let mut buf = [0u8; 2048];
    while !STOP.load(Ordering::SeqCst) {
        let result = sock.send(b"ping").and_then(|_| sock.recv(&mut buf));
        let line = match result {
            Ok(n) => {
                answers += 1;
                let reply = String::from_utf8_lossy(&buf[..n]).to_string();
                let backend = reply.split(' ').next().unwrap_or_default().to_owned();
                serde_json::json!({ "backend": backend })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                timeouts += 1;
                serde_json::json!({ "timeout": true })
            }
            Err(e) => {
                // The socket was closed under us (ECONNABORTED) or refused: a new one, as a
                // resolver does.
                reopened += 1;
                sock = open();
                serde_json::json!({ "socket_error": e.to_string() })
            }
        };
        println!("{line}");
        std::thread::sleep(interval);
    }
    println!(
        "{}",
        serde_json::json!({ "answers": answers, "timeouts": timeouts, "reopened": reopened })
    );
}

fn load(target: SocketAddr, pause: Duration, udp: bool) {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut errors = Vec::new();
    // Calls that took long (a lost SYN costs a second): when, how long, and their outcome.
    let mut slow = Vec::new();
    let start = Instant::now();
    let mut last_report = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        let r = if udp {
            call_udp(target, Duration::from_secs(2), false, None, 4)
        } else {
            call_tcp(target, Duration::from_secs(2))
        };
        let took = t0.elapsed();
        if took >= Duration::from_millis(500) && slow.len() < 20 {
            slow.push(serde_json::json!({
                "atMs": (t0 - start).as_millis() as u64,
                "ms": took.as_millis() as u64,
                "result": r,
            }));
        }
        match r.get("error") {
            None => ok += 1,
            Some(e) => {
                failed += 1;
                if errors.len() < 20 {
                    errors.push(e.clone());
                }
            }
        }
        if last_report.elapsed() >= Duration::from_millis(100) {
            println!("progress {ok} {failed}");
            std::io::stdout().flush().ok();
            last_report = Instant::now();
        }
        std::thread::sleep(pause);
    }
    println!(
        "{}",
        serde_json::json!({ "done": true, "ok": ok, "failed": failed, "errors": errors, "slow": slow })
    );
}

fn http_get(target: SocketAddr, path: &str) -> serde_json::Value {
    let mut conn = match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
        Ok(c) => c,
        Err(e) => return error(target, e),
    };
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    if let Err(e) = conn.write_all(req.as_bytes()) {
        return error(target, e);
    }
    let mut resp = String::new();
    if let Err(e) = conn.read_to_string(&mut resp) {
        return error(target, e);
    }
    let status: u16 = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    serde_json::json!({ "target": target.to_string(), "status": status, "body": body })
}

fn stream(target: SocketAddr, chunk: usize, pause: Duration) {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    let fail = |what: &str, e: &dyn std::fmt::Display, bytes: u64| -> ! {
        println!(
            "{}",
            serde_json::json!({ "error": format!("{what}: {e}"), "bytes": bytes })
        );
        std::process::exit(1);
    };
    let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(3))
        .unwrap_or_else(|e| fail("connect", &e, 0));
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut greeting = String::new();
    reader
        .read_line(&mut greeting)
        .unwrap_or_else(|e| fail("greeting", &e, 0));
    let backend = greeting
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({ "connected": backend, "peer": peer })
    );

    let mut bytes: u64 = 0;
    let mut seq: u64 = 0;
    let mut out = vec![0u8; chunk];
    let mut back = vec![0u8; chunk];
    let mut last_report = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
        conn.write_all(&out)
            .unwrap_or_else(|e| fail("write", &e, bytes));
        reader
            .read_exact(&mut back)
            .unwrap_or_else(|e| fail("read", &e, bytes));
        if back != out {
            fail("verify", &"echoed bytes differ from what was sent", bytes);
        }
        bytes += chunk as u64;
        seq += 1;
        if last_report.elapsed() >= Duration::from_millis(100) {
            println!("progress {bytes}");
            std::io::stdout().flush().ok();
            last_report = Instant::now();
        }
        std::thread::sleep(pause);
    }
    println!(
        "{}",
        serde_json::json!({ "done": true, "bytes": bytes, "backend": backend, "peer": peer })
    );
}

/// Sends `bytes` bytes over one connection while a second thread reads the echo back and checks
/// every byte.
fn transfer(target: SocketAddr, bytes: usize) {
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        println!("{}", serde_json::json!({ "error": format!("{what}: {e}") }));
        std::process::exit(1);
    };
    let started = Instant::now();
    let conn = TcpStream::connect_timeout(&target, Duration::from_secs(3))
        .unwrap_or_else(|e| fail("connect", &e));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut greeting = String::new();
    reader
        .read_line(&mut greeting)
        .unwrap_or_else(|e| fail("greeting", &e));
    let pattern = |i: usize| (i.wrapping_mul(7) % 251) as u8;
    let checker = std::thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = 0usize;
        while seen < bytes {
            let n = reader
                .read(&mut buf)
                .map_err(|e| format!("read at {seen}: {e}"))?;
            if n == 0 {
                return Err(format!("closed after {seen} bytes"));
            }
            for (k, b) in buf[..n].iter().enumerate() {
                if *b != pattern(seen + k) {
                    return Err(format!("byte {} differs", seen + k));
                }
            }
            seen += n;
        }
        Ok(())
    });
    let mut w = conn;
    let data: Vec<u8> = (0..bytes).map(pattern).collect();
    w.write_all(&data).unwrap_or_else(|e| fail("write", &e));
    match checker.join() {
        Ok(Ok(())) => println!(
            "{}",
            serde_json::json!({
                "bytes": bytes,
                "backend": greeting.split_whitespace().nth(1).unwrap_or_default(),
                "ms": started.elapsed().as_secs_f64() * 1e3,
            })
        ),
        Ok(Err(e)) => fail("echo", &e),
        Err(_) => fail("echo", &"reader panicked"),
    }
}

/// One exchange on a new connection: connect, read the greeting, echo one line, reset.
fn rr_once(target: SocketAddr) -> std::io::Result<()> {
    let timeout = Duration::from_secs(3);
    let mut conn = TcpStream::connect_timeout(&target, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_nodelay(true)?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    // The greeting line ends with a newline.
    while !buf[..got].contains(&b'\n') {
        let n = conn.read(&mut buf[got..])?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the greeting"));
        }
        got += n;
    }
    conn.write_all(b"ping\n")?;
    let mut echo = [0u8; 5];
    conn.read_exact(&mut echo)?;
    if &echo != b"ping\n" {
        return Err(std::io::Error::other("wrong echo"));
    }
    socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO))?;
    Ok(())
}

fn rr(target: SocketAddr, count: usize, warmup: usize) {
    for _ in 0..warmup {
        let _ = rr_once(target);
    }
    let started = Instant::now();
    let mut samples = Vec::with_capacity(count);
    let mut failures = Vec::new();
    for _ in 0..count {
        let t = Instant::now();
        match rr_once(target) {
            Ok(()) => samples.push(t.elapsed().as_secs_f64() * 1e6),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "target": target.to_string(),
            "samples_us": samples,
            "elapsed_s": elapsed,
            "failures": failures,
        })
    );
    std::process::exit(i32::from(!failures.is_empty()));
}

fn probe(targets: &[String], timeout: Duration, from: Option<std::net::Ipv4Addr>) {
    let calls: Vec<_> = targets
        .iter()
        .map(|t| {
            let t = t.clone();
            std::thread::spawn(move || {
                let (proto, addr) = t.split_once(':').expect("tcp:ADDR:PORT or udp:ADDR:PORT");
                let addr: SocketAddr = addr.parse().expect("ADDR:PORT");
                let backend = match proto {
                    "tcp" => {
                        let line = match from {
                            Some(ip) => call_tcp_from(SocketAddr::from((ip, 0)), addr, timeout),
                            None => call_tcp(addr, timeout),
                        };
                        line.get("error")
                            .is_none()
                            .then(|| line["backend"].as_str().unwrap_or_default().to_owned())
                    }
                    "udp" => probe_udp(addr, timeout),
                    other => panic!("protocol {other:?}"),
                };
                serde_json::json!({"target": t, "ok": backend.is_some(), "backend": backend})
            })
        })
        .collect();
    for c in calls {
        println!("{}", c.join().expect("a probe thread"));
    }
}

/// A datagram to `target` from a new unconnected socket (sent again every third of `timeout`),
/// and the name of the server that answered.
fn probe_udp(target: SocketAddr, timeout: Duration) -> Option<String> {
    let sock = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
    sock.set_read_timeout(Some(timeout / 3)).ok()?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        sock.send_to(b"probe", target).ok()?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            return text.split_whitespace().next().map(str::to_owned);
        }
    }
    None
}
