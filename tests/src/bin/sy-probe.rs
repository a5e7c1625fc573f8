//! A small real client and server for the end-to-end tests, std only.
//!
//! `sy-probe serve --listen ADDR [--listen ADDR ...]`
//!   For each connection: send `HELLO <local address>\n` (so the client learns which
//!   endpoint it reached), then echo every byte until the client half-closes, then
//!   half-close back and close. Prints `listening` once every address is bound.
//!
//! `sy-probe client --connect ADDR [--bytes N]`
//!   Connect (an IPv6 address, v4-mapped included, uses an AF_INET6 socket), print
//!   `peer=<getpeername>` and `hello=<endpoint>`, then stream N pseudo-random bytes while
//!   reading the echo, half-close after the last byte, and check that exactly the same N
//!   bytes come back before EOF: `echo_bytes=N`. A failed connect prints
//!   `connect_errno=<errno>` and exits 2; any other failure exits 1.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let values =
        |flag: &str| -> Vec<String> { args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect() };
    let addr = |s: &String| s.parse::<SocketAddr>().unwrap_or_else(|e| panic!("bad address {s}: {e}"));
    match args.first().map(String::as_str) {
        Some("serve") => serve(values("--listen").iter().map(addr).collect()),
        Some("client") => {
            let target = values("--connect").first().map(addr).expect("--connect ADDR");
            let bytes = values("--bytes").first().map(|b| b.parse().expect("--bytes N")).unwrap_or(0);
            client(target, bytes)
        }
        _ => {
            eprintln!("usage: sy-probe serve --listen ADDR... | client --connect ADDR [--bytes N]");
            ExitCode::FAILURE
        }
    }
}

fn serve(addrs: Vec<SocketAddr>) -> ExitCode {
    let listeners: Vec<TcpListener> =
        addrs.iter().map(|a| TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}"))).collect();
    println!("listening");
    let _ = std::io::stdout().flush();
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            thread::spawn(move || {
                for conn in l.incoming().flatten() {
                    thread::spawn(move || echo(conn));
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

fn client(target: SocketAddr, bytes: u64) -> ExitCode {
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
    if reader.read_line(&mut hello).is_err() || !hello.starts_with("HELLO ") {
        println!("error=no greeting from the server (got {hello:?})");
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
