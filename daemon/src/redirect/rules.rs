//! The in-pod redirection ruleset (`docs/redirection.md`): rendering and installing it.
//!
//! Rendering is pure and golden-tested. Installing runs `nft -f -` (one atomic transaction) or
//! `iptables-restore --noflush` (one atomic restore per family), plus the policy-routing entries
//! that return spoofed-source replies to the proxy, all inside the pod's namespace.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use super::netns::Netns;
use crate::config::Ports;

/// `SO_MARK` on every socket the proxy opens in a pod; such traffic is never captured.
pub const PROXY_MARK: u32 = 0x539;
/// Connmark that steers replies of spoofed-source inbound connections back to the proxy.
pub const REPLY_CONNMARK: u32 = 0x111;
pub const MARK_MASK: u32 = 0xfff;
/// Routing table holding the `local` route for marked replies.
pub const ROUTE_TABLE: u32 = 100;
/// Source address of kubelet probes after the host SNATs them: the proxy admits them to a
/// STRICT pod and logs them as probes.
pub const PROBE_ADDR: &str = "169.254.7.127";
/// [`PROBE_ADDR`] as an address.
pub const PROBE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 7, 127);

const NFT_TABLE: &str = "culvert";
const CHAIN_PRERT: &str = "CULVERT_PRERT";
const CHAIN_OUTPUT: &str = "CULVERT_OUTPUT";

/// How rules are installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    Iptables,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::Iptables => "iptables",
        }
    }
}

/// Why rules could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("entering the pod network namespace")]
    Netns(#[source] std::io::Error),
    #[error("running {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// What the rules depend on: the proxy's ports and the pod's own addresses.
#[derive(Debug, Clone)]
pub struct Spec {
    pub ports: Ports,
    pub pod_ips: Vec<IpAddr>,
}

/// Renders the nftables transaction. It deletes and recreates the table in one go, so applying
/// it twice leaves one copy and there is no moment with half a ruleset.
pub fn render_nft(spec: &Spec) -> String {
    let Ports {
        outbound,
        inbound_plaintext,
        hbone,
    } = spec.ports;
    let mut own = String::new();
    for (family, ips) in [("ip", v4(&spec.pod_ips)), ("ip6", v6(&spec.pod_ips))] {
        if !ips.is_empty() {
            let _ = writeln!(
                own,
                "\t\toifname \"lo\" {family} daddr {{ {} }} accept",
                ips.join(", ")
            );
        }
    }
    format!(
        "table inet {NFT_TABLE}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
\tchain prerouting_mangle {{
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tmeta mark & {MARK_MASK:#x} == {PROXY_MARK:#x} ct mark set ct mark & {keep:#x} | {REPLY_CONNMARK:#x}
\t}}
\tchain output_mangle {{
\t\ttype route hook output priority mangle; policy accept;
\t\tct mark & {MARK_MASK:#x} == {REPLY_CONNMARK:#x} meta mark set meta mark & {keep:#x} | {REPLY_CONNMARK:#x}
\t}}
\tchain prerouting_nat {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tmeta l4proto != tcp return
\t\tip daddr 127.0.0.1 return
\t\tip6 daddr ::1 return
\t\ttcp dport {hbone} return
\t\tmeta mark & {MARK_MASK:#x} == {PROXY_MARK:#x} return
\t\tmeta l4proto tcp redirect to :{inbound_plaintext}
\t}}
\tchain output_nat {{
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta l4proto != tcp return
\t\tip daddr {PROBE_ADDR} accept
\t\tct mark & {MARK_MASK:#x} == {REPLY_CONNMARK:#x} accept
{own}\t\tip daddr 127.0.0.1 return
\t\tip6 daddr ::1 return
\t\tmeta mark & {MARK_MASK:#x} == {PROXY_MARK:#x} return
\t\tmeta l4proto tcp redirect to :{outbound}
\t}}
}}
",
        keep = !MARK_MASK,
    )
}

/// Renders an `iptables-restore --noflush` input for one family. Declaring our chains flushes
/// them, so re-applying leaves one copy; `jumps` lists the `(table, builtin chain, our chain)`
/// hooks still missing, which are inserted in the same restore.
pub fn render_iptables(spec: &Spec, ipv6: bool, jumps: &[(&str, &str, &str)]) -> String {
    let Ports {
        outbound,
        inbound_plaintext,
        hbone,
    } = spec.ports;
    let (lo, probe) = if ipv6 {
        ("::1/128", None)
    } else {
        ("127.0.0.1/32", Some(PROBE_ADDR))
    };
    let mark = format!("{PROXY_MARK:#x}/{MARK_MASK:#x}");
    let connmark = format!("{REPLY_CONNMARK:#x}/{MARK_MASK:#x}");
    let own = if ipv6 {
        v6(&spec.pod_ips)
    } else {
        v4(&spec.pod_ips)
    };
    let mut out = String::new();
    let jumps_of = |out: &mut String, table: &str| {
        for (_, builtin, chain) in jumps.iter().filter(|(t, _, _)| *t == table) {
            let _ = writeln!(out, "-I {builtin} 1 -j {chain}");
        }
    };

    out.push_str("*mangle\n");
    let _ = writeln!(out, ":{CHAIN_PRERT} - [0:0]\n:{CHAIN_OUTPUT} - [0:0]");
    let _ = writeln!(
        out,
        "-A {CHAIN_PRERT} -m mark --mark {mark} -j CONNMARK --set-xmark {connmark}"
    );
    let _ = writeln!(
        out,
        "-A {CHAIN_OUTPUT} -m connmark --mark {connmark} -j CONNMARK --restore-mark --nfmask {MARK_MASK:#x} --ctmask {MARK_MASK:#x}"
    );
    jumps_of(&mut out, "mangle");
    out.push_str("COMMIT\n*nat\n");
    let _ = writeln!(out, ":{CHAIN_PRERT} - [0:0]\n:{CHAIN_OUTPUT} - [0:0]");
    let _ = writeln!(
        out,
        "-A {CHAIN_PRERT} ! -d {lo} -p tcp ! --dport {hbone} -m mark ! --mark {mark} -j REDIRECT --to-ports {inbound_plaintext}"
    );
    if let Some(probe) = probe {
        let _ = writeln!(out, "-A {CHAIN_OUTPUT} -d {probe}/32 -p tcp -j ACCEPT");
    }
    let _ = writeln!(
        out,
        "-A {CHAIN_OUTPUT} -p tcp -m connmark --mark {connmark} -j ACCEPT"
    );
    for ip in own {
        let _ = writeln!(out, "-A {CHAIN_OUTPUT} -o lo -d {ip} -p tcp -j ACCEPT");
    }
    let _ = writeln!(
        out,
        "-A {CHAIN_OUTPUT} ! -d {lo} -p tcp -m mark ! --mark {mark} -j REDIRECT --to-ports {outbound}"
    );
    jumps_of(&mut out, "nat");
    out.push_str("COMMIT\n");
    out
}

/// The hooks from built-in chains into ours.
const JUMPS: [(&str, &str, &str); 4] = [
    ("mangle", "PREROUTING", CHAIN_PRERT),
    ("mangle", "OUTPUT", CHAIN_OUTPUT),
    ("nat", "PREROUTING", CHAIN_PRERT),
    ("nat", "OUTPUT", CHAIN_OUTPUT),
];

/// The host table or chain holding the probe SNAT.
const HOST_TABLE: &str = "culvert_host";
const CHAIN_HOST: &str = "CULVERT_HOST";

/// Renders the host's probe rule for nftables: TCP the node itself originates (a kubelet
/// probe) to a wired pod's IPv4 address leaves with [`PROBE_ADDR`] as its source, which the
/// pod's rules let through unredirected, so a STRICT pod still passes its health checks.
/// Traffic from anywhere else (other pods, other nodes) is untouched: its source is not local.
pub fn render_host_nft(pod_ips: &[IpAddr]) -> String {
    let ips = v4(pod_ips);
    let elements = if ips.is_empty() {
        String::new()
    } else {
        format!("\t\telements = {{ {} }}\n", ips.join(", "))
    };
    format!(
        "table ip {HOST_TABLE}
delete table ip {HOST_TABLE}
table ip {HOST_TABLE} {{
\tset probed {{
\t\ttype ipv4_addr
{elements}\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip daddr @probed meta l4proto tcp fib saddr type local snat to {PROBE_ADDR}
\t}}
}}
"
    )
}

/// [`render_host_nft`] for `iptables-restore --noflush`; `jump` when POSTROUTING lacks the jump.
pub fn render_host_iptables(pod_ips: &[IpAddr], jump: bool) -> String {
    let mut rules = format!("*nat\n:{CHAIN_HOST} - [0:0]\n");
    for ip in v4(pod_ips) {
        let _ = writeln!(
            rules,
            "-A {CHAIN_HOST} -d {ip}/32 -p tcp -m addrtype --src-type LOCAL -j SNAT --to-source {PROBE_ADDR}"
        );
    }
    if jump {
        let _ = writeln!(rules, "-I POSTROUTING 1 -j {CHAIN_HOST}");
    }
    rules.push_str("COMMIT\n");
    rules
}

/// Installs the host's probe rule for `pod_ips` in the calling thread's namespace (the
/// daemon's own, the node's), replacing the previous one atomically. Blocking.
pub fn apply_host(backend: Backend, pod_ips: &[IpAddr]) -> Result<(), Error> {
    match backend {
        Backend::Nftables => run("nft", &["-f", "-"], Some(&render_host_nft(pod_ips))),
        Backend::Iptables => {
            let check = ["-w", "-t", "nat", "-C", "POSTROUTING", "-j", CHAIN_HOST];
            let jump = run("iptables", &check, None).is_err();
            run(
                "iptables-restore",
                &["-w", "--noflush"],
                Some(&render_host_iptables(pod_ips, jump)),
            )
        }
    }
}

/// Installs (or re-installs) the ruleset in the pod. Blocking: call from a blocking thread.
pub fn apply(netns: &Netns, backend: Backend, spec: &Spec) -> Result<(), Error> {
    netns
        .run(|| {
            let has_v6 = spec.pod_ips.iter().any(IpAddr::is_ipv6);
            // Routes first: they are inert until marked packets exist, and the marks appear only
            // once the redirect rules below are live.
            install_routes(false)?;
            if has_v6 {
                install_routes(true)?;
            }
            match backend {
                Backend::Nftables => run("nft", &["-f", "-"], Some(&render_nft(spec))),
                Backend::Iptables => {
                    for ipv6 in [false, true] {
                        let tool = if ipv6 { "ip6tables" } else { "iptables" };
                        let missing: Vec<_> = JUMPS
                            .iter()
                            .filter(|(table, builtin, chain)| {
                                run(tool, &["-w", "-t", table, "-C", builtin, "-j", chain], None)
                                    .is_err()
                            })
                            .copied()
                            .collect();
                        let restore = format!("{tool}-restore");
                        run(
                            &restore,
                            &["-w", "--noflush"],
                            Some(&render_iptables(spec, ipv6, &missing)),
                        )?;
                    }
                    Ok(())
                }
            }
        })
        .map_err(Error::Netns)?
}

/// Removes everything [`apply`] installed; succeeds when there is nothing to remove.
pub fn remove(netns: &Netns, backend: Backend) -> Result<(), Error> {
    netns
        .run(|| {
            match backend {
                Backend::Nftables => {
                    // Absent table: nothing to do, so the error is not interesting.
                    let _ = run("nft", &["delete", "table", "inet", NFT_TABLE], None);
                }
                Backend::Iptables => {
                    for tool in ["iptables", "ip6tables"] {
                        for (table, builtin, chain) in JUMPS {
                            while run(tool, &["-w", "-t", table, "-D", builtin, "-j", chain], None)
                                .is_ok()
                            {}
                        }
                        for (table, _, chain) in JUMPS {
                            let _ = run(tool, &["-w", "-t", table, "-F", chain], None);
                            let _ = run(tool, &["-w", "-t", table, "-X", chain], None);
                        }
                    }
                }
            }
            for family in ["-4", "-6"] {
                remove_rule(family);
                let _ = run(
                    "ip",
                    &[family, "route", "flush", "table", &ROUTE_TABLE.to_string()],
                    None,
                );
            }
        })
        .map_err(Error::Netns)
}

/// Reports whether our ruleset is present in the pod (for status and tests).
pub fn present(netns: &Netns, backend: Backend) -> Result<bool, Error> {
    netns
        .run(|| match backend {
            Backend::Nftables => run("nft", &["list", "table", "inet", NFT_TABLE], None).is_ok(),
            Backend::Iptables => {
                run("iptables", &["-w", "-t", "nat", "-S", CHAIN_OUTPUT], None).is_ok()
            }
        })
        .map_err(Error::Netns)
}

fn install_routes(ipv6: bool) -> Result<(), Error> {
    let (family, default) = if ipv6 {
        ("-6", "::/0")
    } else {
        ("-4", "0.0.0.0/0")
    };
    // `ip rule add` does not deduplicate, and re-wiring a live pod (a restarted or surging
    // daemon) must never leave it without the rule: replies to transparent upstream sockets
    // would be routed out of the pod and answered with a reset. So add it only when missing,
    // then trim extra copies.
    let table = ROUTE_TABLE.to_string();
    let fwmark = format!("{REPLY_CONNMARK:#x}/{MARK_MASK:#x}");
    let rule = |verb| {
        let args = [family, "rule", verb, "fwmark", &fwmark, "lookup", &table];
        output("ip", &args, None)
    };
    let copies = rule("list")?.lines().count();
    if copies == 0 {
        rule("add")?;
    }
    for _ in 1..copies {
        rule("del")?;
    }
    run(
        "ip",
        &[
            family, "route", "replace", "local", default, "dev", "lo", "table", &table,
        ],
        None,
    )
}

fn remove_rule(family: &str) {
    let table = ROUTE_TABLE.to_string();
    let fwmark = format!("{REPLY_CONNMARK:#x}/{MARK_MASK:#x}");
    while run(
        "ip",
        &[family, "rule", "del", "fwmark", &fwmark, "lookup", &table],
        None,
    )
    .is_ok()
    {}
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), Error> {
    output(program, args, stdin).map(drop)
}

/// Runs `program` and returns its standard output.
fn output(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let command = format!("{program} {}", args.join(" "));
    let spawn = |source| Error::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn)?;
    }
    let output = child.wait_with_output().map_err(spawn)?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    Err(Error::Failed {
        command,
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

fn v4(ips: &[IpAddr]) -> Vec<String> {
    ips.iter()
        .filter(|ip| ip.is_ipv4())
        .map(IpAddr::to_string)
        .collect()
}

fn v6(ips: &[IpAddr]) -> Vec<String> {
    ips.iter()
        .filter(|ip| ip.is_ipv6())
        .map(IpAddr::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            ports: Ports {
                outbound: 15001,
                inbound_plaintext: 15006,
                hbone: 15008,
            },
            pod_ips: vec!["10.244.1.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        }
    }

    #[test]
    fn nftables_ruleset_matches_golden() {
        assert_eq!(render_nft(&spec()), include_str!("testdata/pod.nft"));
    }

    #[test]
    fn iptables_ruleset_matches_golden() {
        let v4 = render_iptables(&spec(), false, &JUMPS);
        assert_eq!(v4, include_str!("testdata/pod-v4.iptables"));
        let v6_without_jumps = render_iptables(&spec(), true, &[]);
        assert_eq!(v6_without_jumps, include_str!("testdata/pod-v6.iptables"));
    }

    #[test]
    fn the_probe_address_is_one_address() {
        assert_eq!(PROBE_IP.to_string(), PROBE_ADDR);
    }

    #[test]
    fn the_host_probe_rule_covers_the_wired_pods_ipv4_addresses() {
        let ips: Vec<IpAddr> = ["10.244.1.2", "fd00::2", "10.244.1.3"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        let nft = render_host_nft(&ips);
        assert!(
            nft.contains("elements = { 10.244.1.2, 10.244.1.3 }"),
            "{nft}"
        );
        assert!(nft.contains(
            "ip daddr @probed meta l4proto tcp fib saddr type local snat to 169.254.7.127"
        ));
        assert!(nft.starts_with("table ip culvert_host\ndelete table ip culvert_host\n"));
        assert!(!render_host_nft(&[]).contains("elements"));
        let ipt = render_host_iptables(&ips, true);
        assert_eq!(
            ipt,
            "*nat\n:CULVERT_HOST - [0:0]\n\
             -A CULVERT_HOST -d 10.244.1.2/32 -p tcp -m addrtype --src-type LOCAL -j SNAT --to-source 169.254.7.127\n\
             -A CULVERT_HOST -d 10.244.1.3/32 -p tcp -m addrtype --src-type LOCAL -j SNAT --to-source 169.254.7.127\n\
             -I POSTROUTING 1 -j CULVERT_HOST\nCOMMIT\n"
        );
    }
}
