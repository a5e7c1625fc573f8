//! A small real client and server for the end-to-end tests, std only.
//!
//! `sy-probe serve --listen ADDR [--listen ADDR ...] [--delay-ms D]`
//!   For each connection: send `HELLO <local address>\n` (so the client learns which
//!   endpoint it reached; after D ms with --delay-ms, a server that answers slowly), then
//!   echo every byte until the client half-closes, then half-close back and close. Prints
//!   `listening` once every address is bound.
//!
//! `sy-probe client --connect ADDR [--bytes N] [--chunk-delay-ms D]`
//!   Connect (an IPv6 address, v4-mapped included, uses an AF_INET6 socket), print
//!   `peer=<getpeername>` and `hello=<endpoint>`, then stream N pseudo-random bytes while
//!   reading the echo (pausing D ms between 64 KiB chunks, for a connection that stays
//!   open and moves bytes for a while), half-close after the last byte, and check that exactly the same N
//!   bytes come back before EOF: `echo_bytes=N`. A failed connect prints
//!   `connect_errno=<errno>` and exits 2; no greeting prints `greeting=reset` (RST),
//!   `greeting=closed` (EOF), `greeting=timeout` or `greeting=garbled`, and exits 1, as
//!   does any other failure.
//!
//! `sy-probe hold --connect ADDR --conns N --hold-ms T`
//!   Open N connections and keep them idle for T ms (for memory-per-connection
//!   measurements). Prints `held=N` once all are open.
//!
//! `sy-probe load --connect ADDR --conns N --concurrency C [--duration-ms D] [--hold-ms H]`
//!   Continuous load: C workers open connections one after another until N are done or
//!   D ms have passed (both bounds always apply). Each connection reads the greeting,
//!   echoes 64 bytes, holds H ms and echoes again (so a cut is seen), and closes. One line per connection:
//!   `conn <start_ms> <end_ms> ok <endpoint>` or `conn <start_ms> <end_ms> fail - <error>`
//!   (milliseconds since the Unix epoch), then `ok=N failed=M`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let values =
        |flag: &str| -> Vec<String> { args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect() };
    let addr = |s: &String| s.parse::<SocketAddr>().unwrap_or_else(|e| panic!("bad address {s}: {e}"));
    let number = |flag: &str, default: u64| values(flag).first().map(|v| v.parse().expect(flag)).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("serve") => serve(values("--listen").iter().map(addr).collect(), number("--delay-ms", 0)),
        Some("hold") => hold(
            values("--connect").first().map(addr).expect("--connect ADDR"),
            number("--conns", 1000),
            Duration::from_millis(number("--hold-ms", 10_000)),
        ),
        Some("load") => load(
            values("--connect").first().map(addr).expect("--connect ADDR"),
            number("--conns", 100),
            number("--concurrency", 1),
            Duration::from_millis(number("--duration-ms", 60_000)),
            Duration::from_millis(number("--hold-ms", 0)),
        ),
        Some("client") => {
            let target = values("--connect").first().map(addr).expect("--connect ADDR");
            let bytes = values("--bytes").first().map(|b| b.parse().expect("--bytes N")).unwrap_or(0);
            client(target, bytes, Duration::from_millis(number("--chunk-delay-ms", 0)))
        }
        _ => {
            eprintln!(
                "usage: sy-probe serve --listen ADDR... | client --connect ADDR [--bytes N] | load --connect ADDR ..."
            );
            ExitCode::FAILURE
        }
    }
}

fn serve(addrs: Vec<SocketAddr>, delay_ms: u64) -> ExitCode {
    let listeners: Vec<TcpListener> =
        addrs.iter().map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}"))).collect();
    println!("listening");
    let _ = std::io::stdout().flush();
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            thread::spawn(move || {
                for conn in l.incoming().flatten() {
                    thread::spawn(move || {
                        thread::sleep(Duration::from_millis(delay_ms));
                        echo(conn)
                    });
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn echo(mut conn: TcpStream) {
    let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
    if conn.write_all(format!("HELLO {local}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    // The client half-closed and has every byte back: half-close our side too.
    let _ = conn.shutdown(Shutdown::Write);
}

/// Deterministic byte stream (xorshift64), so the reader can check without a copy.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

fn client(target: SocketAddr, bytes: u64, chunk_delay: Duration) -> ExitCode {
    let conn = match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => {
            println!("connect_errno={}", e.raw_os_error().unwrap_or(-1));
            println!("connect_error={e}");
            return ExitCode::from(2);
        }
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    println!("peer={}", conn.peer_addr().map(|a| a.to_string()).unwrap_or_else(|e| format!("error:{e}")));
    let mut reader = BufReader::new(conn.try_clone().expect("clone socket"));
    let mut hello = String::new();
    // `greeting=` tells a reset (RST: the proxy gave up on the connection) from a clean
    // close (FIN) and from a timeout: tests assert which one they expect.
    let greeting = match reader.read_line(&mut hello) {
        Ok(_) if hello.starts_with("HELLO ") => None,
        Ok(0) => Some("closed"),
        Ok(_) => Some("garbled"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some("reset"),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Some("timeout"),
        Err(_) => Some("error"),
    };
    if let Some(greeting) = greeting {
        println!("greeting={greeting}");
        println!("error=no greeting from the server ({greeting}; got {hello:?})");
        return ExitCode::FAILURE;
    }
    println!("hello={}", hello.trim_start_matches("HELLO ").trim());

    let mut writer = conn;
    let sender = thread::spawn(move || -> std::io::Result<()> {
        let mut pattern = Pattern(0x5eed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            writer.write_all(&buf[..n])?;
            left -= n as u64;
            thread::sleep(chunk_delay);
        }
        // Half-close: the server sees EOF only if the proxy forwards it.
        writer.shutdown(Shutdown::Write)
    });

    let mut expected = Pattern(0x5eed);
    let (mut got, mut buf, mut want) = (0u64, vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                println!("error=read after {got} bytes: {e}");
                return ExitCode::FAILURE;
            }
        };
        expected.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            println!("error=echoed bytes differ from sent bytes near offset {got}");
            return ExitCode::FAILURE;
        }
        got += n as u64;
    }
    if let Err(e) = sender.join().expect("sender thread") {
        println!("error=send: {e}");
        return ExitCode::FAILURE;
    }
    println!("echo_bytes={got}");
    if got == bytes { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn epoch_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// One load connection: the endpoint that answered, or why it failed.
fn one_conn(target: SocketAddr, hold: Duration) -> Result<String, String> {
    let conn = TcpStream::connect_timeout(&target, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    // Short enough that a connection stuck on a black-holed endpoint ends within the test.
    conn.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let mut hello = String::new();
    match reader.read_line(&mut hello) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(format!("greeting: reset: {e}")),
        Err(e) => return Err(format!("greeting: {e}")),
        Ok(0) => return Err("greeting: closed before the greeting".into()),
        Ok(_) => {}
    }
    let endpoint =
        hello.strip_prefix("HELLO ").ok_or_else(|| format!("no greeting (got {hello:?})"))?.trim().to_owned();
    let mut writer = conn;
    let payload = [0x5au8; 64];
    writer.write_all(&payload).map_err(|e| format!("send: {e}"))?;
    let mut back = [0u8; 64];
    reader.read_exact(&mut back).map_err(|e| format!("echo: {e}"))?;
    if back != payload {
        return Err("echo differs".into());
    }
    if !hold.is_zero() {
        // Held connections talk again at the end, so a connection cut meanwhile fails.
        thread::sleep(hold);
        writer.write_all(&payload).map_err(|e| format!("send after hold: {e}"))?;
        reader.read_exact(&mut back).map_err(|e| format!("echo after hold: {e}"))?;
    }
    Ok(endpoint)
}

fn load(target: SocketAddr, conns: u64, concurrency: u64, duration: Duration, hold: Duration) -> ExitCode {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (next, ok, failed) = (Arc::clone(&next), Arc::clone(&ok), Arc::clone(&failed));
            thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < conns && started.elapsed() < duration {
                    let start = epoch_ms();
                    let line = match one_conn(target, hold) {
                        Ok(endpoint) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            format!("conn {start} {} ok {endpoint}", epoch_ms())
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            format!("conn {start} {} fail - {e}", epoch_ms())
                        }
                    };
                    println!("{line}");
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    println!("ok={} failed={}", ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    ExitCode::SUCCESS
}

fn hold(target: SocketAddr, conns: u64, hold: Duration) -> ExitCode {
    // Each connection is a file descriptor: lift the soft limit to the hard one.
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let mut open = Vec::with_capacity(conns as usize);
    for i in 0..conns {
        match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            Ok(c) => open.push(c),
            Err(e) => {
                println!("error=connection {i}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("held={}", open.len());
    let _ = std::io::stdout().flush();
    thread::sleep(hold);
    ExitCode::SUCCESS
}
