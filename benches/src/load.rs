//! Our load generators: request/response on one connection, and new connections per second.
//! Clients run on threads whose sockets are created inside the client pod.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use culvert_lab::Pod;

/// Round-trip times in nanoseconds.
#[derive(Debug, Default)]
pub(crate) struct Latencies(Vec<u64>);

impl Latencies {
    /// The `q`-quantile (0.0 to 1.0), in microseconds.
    pub(crate) fn quantile_us(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i] as f64 / 1000.0
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// Sends `size`-byte messages on one persistent connection and waits for each echo, for
/// `duration`.
pub(crate) fn request_response(
    pod: &Pod,
    to: SocketAddr,
    size: usize,
    duration: Duration,
) -> anyhow::Result<Latencies> {
    let mut stream = pod.connect(to).context("connecting")?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut times = Vec::with_capacity(1 << 20);
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let start = Instant::now();
        stream.write_all(&msg)?;
        stream.read_exact(&mut back)?;
        times.push(start.elapsed().as_nanos() as u64);
    }
    ensure!(back == msg, "echo returned different bytes");
    Ok(Latencies(times))
}

/// `workers` threads each open a connection, send 1 byte, read 1 byte and close, in a loop, for
/// `duration`. Returns every connection's time; failures abort.
pub(crate) fn connections(
    pod: &Pod,
    to: SocketAddr,
    workers: usize,
    duration: Duration,
) -> anyhow::Result<Latencies> {
    let end = Instant::now() + duration;
    let results: Vec<anyhow::Result<Vec<u64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(move || {
                    let mut times = Vec::with_capacity(1 << 16);
                    let mut byte = [0u8; 1];
                    while Instant::now() < end {
                        let start = Instant::now();
                        let mut stream = pod.connect(to).context("connecting")?;
                        stream.set_nodelay(true)?;
                        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                        stream.write_all(b"x")?;
                        stream.read_exact(&mut byte)?;
                        drop(stream);
                        times.push(start.elapsed().as_nanos() as u64);
                    }
                    Ok(times)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect()
    });
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    Ok(Latencies(all))
}

/// Echo server for request/response: one thread per connection, echoing whatever arrives.
pub(crate) fn serve_echo(listener: TcpListener) {
    culvert_lab::serve(listener, |mut stream| {
        let _ = stream.set_nodelay(true);
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// Server for the connection-rate test: a pool of threads that each accept and answer one byte
/// inline, so the server's cost per connection is no thread spawn.
pub(crate) fn serve_one_byte(listener: TcpListener, threads: usize) -> anyhow::Result<()> {
    for _ in 0..threads {
        let listener = listener.try_clone()?;
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_nodelay(true);
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).is_ok() {
                    let _ = stream.write_all(&byte);
                    // Wait for the client's close, so the client closes first (as clients do).
                    let _ = stream.read(&mut byte);
                }
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_the_nearest_rank_in_microseconds() {
        let mut lat = Latencies((1..=1000).rev().map(|us| us * 1000).collect());
        assert_eq!(lat.quantile_us(0.5), 501.0);
        assert_eq!(lat.quantile_us(0.99), 990.0);
        assert_eq!(lat.quantile_us(0.0), 1.0);
        assert_eq!(lat.quantile_us(1.0), 1000.0);
        assert!(Latencies::default().quantile_us(0.5).is_nan());
    }
}
