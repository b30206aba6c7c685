//! What crossed the wire: a tcpdump capture and a reader for its TCP payloads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// A running tcpdump.
pub struct Capture {
    /// tcpdump; taken by [`Capture::finish`], killed on drop otherwise (a failed test must not
    /// leave it holding the namespace).
    child: Option<Child>,
    file: PathBuf,
}

/// One TCP segment with payload, as captured.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

impl Capture {
    /// Captures all TCP on `interface` inside `netns` into `file`.
    pub fn start(netns: &str, interface: &str, file: &Path) -> anyhow::Result<Self> {
        Self::start_filtered(netns, interface, file, "tcp")
    }

    /// Captures what the pcap `filter` selects on `interface` inside `netns` into `file`.
    pub fn start_filtered(
        netns: &str,
        interface: &str,
        file: &Path,
        filter: &str,
    ) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(file);
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", netns, "tcpdump", "-i", interface, "-U", "-n", "-s", "0", "-w",
            ])
            .arg(file)
            .args(filter.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump (is it installed?)")?;
        // tcpdump creates the file once it is listening.
        for _ in 0..500 {
            if file.exists() {
                return Ok(Self {
                    child: Some(child),
                    file: file.to_owned(),
                });
            }
            if let Some(status) = child.try_wait()? {
                bail!("tcpdump exited with {status}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("tcpdump did not start capturing within 5s")
    }

    /// Stops the capture and returns every TCP segment that carried payload.
    ///
    /// Fails when the kernel dropped packets. tcpdump can also lag the traffic by a second or
    /// more; this waits until the file has stopped growing, and callers that need to know the
    /// capture is complete compare the bytes seen with the bytes they sent.
    pub fn finish(mut self) -> anyhow::Result<Vec<Segment>> {
        let size = |f: &Path| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        let (mut last, mut stable) = (size(&self.file), 0);
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(200));
            let now = size(&self.file);
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
            if stable == 6 {
                break;
            }
        }
        let child = self
            .child
            .take()
            .context("the capture was finished already")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        let output = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let count = |what: &str| {
            stderr
                .lines()
                .find(|l| l.ends_with(what))
                .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        };
        if count("packets dropped by kernel") != Some(0) {
            bail!("incomplete capture: {stderr}");
        }
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        parse_pcap(&bytes)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a capture says about the traffic between nodes.
#[derive(Debug, Default)]
pub struct Report {
    pub segments: usize,
    /// Segments to or from the HBONE port.
    pub hbone_segments: usize,
    pub hbone_bytes: usize,
    /// A TLS ServerHello that selected TLS 1.3 was seen on the HBONE port.
    pub tls13: bool,
    /// Segments on any other port (plaintext that bypassed the tunnel).
    pub other_segments: usize,
}

impl Report {
    pub fn of(segments: &[Segment], hbone_port: u16) -> Self {
        let mut report = Self {
            segments: segments.len(),
            ..Self::default()
        };
        for s in segments {
            if s.src_port == hbone_port || s.dst_port == hbone_port {
                report.hbone_segments += 1;
                report.hbone_bytes += s.payload.len();
                report.tls13 |= s.src_port == hbone_port && is_tls13_server_hello(&s.payload);
            } else {
                report.other_segments += 1;
            }
        }
        report
    }
}

/// Whether `needle` appears in any captured payload (segments are searched one by one, so a
/// needle split across segments is missed: keep needles shorter than an MSS and unique).
pub fn contains(segments: &[Segment], needle: &[u8]) -> bool {
    segments
        .iter()
        .any(|s| s.payload.windows(needle.len()).any(|w| w == needle))
}

/// A TLS handshake record holding a ServerHello whose supported_versions extension says 1.3.
fn is_tls13_server_hello(payload: &[u8]) -> bool {
    let starts =
        payload.len() >= 6 && payload[0] == 0x16 && payload[1] == 0x03 && payload[5] == 0x02;
    let supported_versions_13 = [0x00, 0x2b, 0x00, 0x02, 0x03, 0x04];
    starts && payload.windows(6).any(|w| w == supported_versions_13)
}

/// Reads a classic pcap file of Ethernet frames and returns the TCP segments with payload.
pub fn parse_pcap(bytes: &[u8]) -> anyhow::Result<Vec<Segment>> {
    let u32_at =
        |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    if bytes.len() < 24 {
        bail!("pcap file too short ({} bytes)", bytes.len());
    }
    let magic = u32_at(bytes, 0);
    if magic != 0xa1b2_c3d4 && magic != 0xa1b2_3c4d {
        bail!("not a little-endian pcap file (magic {magic:#x})");
    }
    if u32_at(bytes, 20) != 1 {
        bail!("capture link type {} is not Ethernet", u32_at(bytes, 20));
    }
    let mut segments = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32_at(bytes, at + 8) as usize;
        let frame = bytes
            .get(at + 16..at + 16 + len)
            .context("truncated pcap record")?;
        at += 16 + len;
        if let Some(segment) = tcp_segment(frame) {
            segments.push(segment);
        }
    }
    Ok(segments)
}

fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (proto, l4) = match ethertype {
        0x0800 => (*ip.get(9)?, ip.get(usize::from(ip.first()? & 0x0f) * 4..)?),
        0x86dd => (*ip.get(6)?, ip.get(40..)?),
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let offset = usize::from(l4.get(12)? >> 4) * 4;
    let payload = l4.get(offset..)?;
    if payload.is_empty() {
        return None;
    }
    Some(Segment {
        src_port: u16::from_be_bytes([l4[0], l4[1]]),
        dst_port: u16::from_be_bytes([l4[2], l4[3]]),
        payload: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcp_payload_from_an_ethernet_ipv4_frame() {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6];
        ip.resize(20, 0);
        let mut tcp = vec![0x3a, 0x98, 0x1f, 0x90]; // 15000 -> 8080
        tcp.resize(12, 0);
        tcp.extend_from_slice(&[0x50, 0x18]);
        tcp.resize(20, 0);
        frame.extend(ip);
        frame.extend(tcp);
        frame.extend_from_slice(b"hello");
        let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        pcap.resize(20, 0);
        pcap.extend_from_slice(&1u32.to_le_bytes());
        pcap.extend_from_slice(&[0; 8]);
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend(frame);

        let segments = parse_pcap(&pcap).unwrap();
        assert_eq!(segments.len(), 1);
        assert_eq!((segments[0].src_port, segments[0].dst_port), (15000, 8080));
        assert!(contains(&segments, b"hello"));
        assert!(!contains(&segments, b"world"));
        let report = Report::of(&segments, 15008);
        assert_eq!((report.hbone_segments, report.other_segments), (0, 1));
    }
}
