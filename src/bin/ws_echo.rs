//! `ws-echo`: a plain WebSocket echo server on tokio-tungstenite, the baseline the perf
//! scripts compare torpor against (directly, and behind nginx).
//!
//! It accepts any path, echoes text and binary messages unchanged, answers pings (tungstenite
//! queues the pong itself) and sets TCP_NODELAY. Per connection it reads every message that is
//! already available, queues the echoes with `feed`, and flushes once per batch. It runs on a
//! tokio current-thread runtime unless `--threads N` (N > 1) asks for a multi-thread one.
//!
//! Read buffer: tungstenite zero-fills the unused part of its read buffer before every read,
//! so its default 128 KiB buffer costs a 128 KiB `memset` per read (57 % of the server's CPU in
//! a 20-byte echo loop). `--read-buffer` defaults to 16 KiB, the size tungstenite's own docs
//! suggest for many connections, which takes a 16 KiB message in two reads.
//!
//! It must never implement any part of the WebSocket protocol itself, nor log per message:
//! the point is an honest measurement of the mainstream stack, not of our own code.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(
    name = "ws-echo",
    about = "WebSocket echo server (tokio-tungstenite), a baseline for benchmarks"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Runtime threads: 1 is a tokio current-thread runtime, more is a multi-thread one.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Listen backlog (many connections may arrive at once in the idle benchmarks).
    #[arg(long, default_value_t = 65_535)]
    backlog: u32,
    /// tungstenite's read buffer per connection, in bytes (zero-filled before each read).
    #[arg(long, default_value_t = 16 * 1024)]
    read_buffer: usize,
}

/// Raises the soft open-file limit to the hard one, so tens of thousands of idle connections
/// fit. Failure leaves the limit as it was.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Echoes one connection until the peer closes it or an error ends it.
async fn serve(stream: TcpStream, read_buffer: usize) {
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    loop {
        // Wait for one message, then take every further message already readable.
        let mut next = ws.next().await;
        loop {
            match next {
                Some(Ok(msg @ (Message::Binary(_) | Message::Text(_)))) => {
                    if ws.feed(msg).await.is_err() {
                        return;
                    }
                }
                // Pings are answered by tungstenite on the next write or flush; pongs and
                // frames need nothing; a close is answered by tungstenite and the stream ends.
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    let _ = ws.flush().await;
                    return;
                }
            }
            match ws.next().now_or_never() {
                Some(more) => next = more,
                None => break,
            }
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
}

async fn run(args: Args) -> io::Result<()> {
    let socket = if args.listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(args.listen)?;
    let listener = socket.listen(args.backlog)?;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream, args.read_buffer));
            }
            Err(e) => {
                // Out of descriptors or a transient error: back off briefly, keep serving.
                eprintln!("ws-echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

fn main() {
    let args = Args::parse();
    raise_nofile();
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ws-echo: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("ws-echo: {e}");
        std::process::exit(1);
    }
}
