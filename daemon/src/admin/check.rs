//! `GET /check`: what `culvert check` reports for this node, each finding with its fix.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::RootCertStore;

use serde::Serialize;

use crate::cni::{Registry, install};
use crate::identity::{self, Held, Id};
use crate::proxy::tally;

/// One finding.
#[derive(Debug, Serialize)]
pub(super) struct Check {
    /// `ready`, `cni`, `pods`, `certificates`, `ca` or `traffic`.
    check: &'static str,
    ok: bool,
    /// What was found.
    detail: String,
    /// What to do about it; only on a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<&'static str>,
    /// The `traffic` check's counts and plaintext sources.
    #[serde(skip_serializing_if = "Option::is_none")]
    inbound: Option<tally::Summary>,
}

impl Check {
    fn pass(check: &'static str, detail: String) -> Self {
        Self {
            check,
            ok: true,
            detail,
            fix: None,
            inbound: None,
        }
    }

    fn fail(check: &'static str, detail: String, fix: &'static str) -> Self {
        Self {
            check,
            ok: false,
            detail,
            fix: Some(fix),
            inbound: None,
        }
    }
}

/// A certificate with less than this share of its lifetime left has missed several renewals
/// (they start at half of it).
const NEAR_EXPIRY: u32 = 4;

/// Every check, in the order `culvert check` prints them.
pub(super) async fn run(
    ready: bool,
    registry: &Registry,
    cni_conf_dir: Option<&Path>,
) -> Vec<Check> {
    let mut checks = vec![if ready {
        Check::pass("ready", "the daemon serves".into())
    } else {
        Check::fail(
            "ready",
            "the daemon is not ready: still starting (discovery not synced) or draining".into(),
            "wait for it to start; if it does not, read its log",
        )
    }];
    checks.push(cni(cni_conf_dir));
    let audit = registry.audit().await;
    let bad: Vec<String> = audit
        .iter()
        .filter_map(|(pod, problem)| problem.as_ref().map(|p| format!("{pod}: {p}")))
        .collect();
    checks.push(if bad.is_empty() {
        Check::pass(
            "pods",
            match audit.len() {
                1 => "the enrolled pod is wired".into(),
                n => format!("{n} enrolled pods wired"),
            },
        )
    } else {
        Check::fail(
            "pods",
            bad.join("; "),
            "a pod still starting is wired once its sandbox exists; otherwise restart the pod, \
             or the daemon if its rules keep disappearing",
        )
    });
    checks.push(certificates(registry));
    checks.push(ca(registry.certificates()).await);
    checks.push(traffic(registry.proxy().arrivals()));
    checks
}

/// Whether every inbound connection to an enrolled pod came over mTLS lately: plaintext a
/// PERMISSIVE pod accepted fails it, naming where it came from; plaintext refused does not.
fn traffic(inbound: tally::Summary) -> Check {
    let minutes = inbound.minutes;
    let total = inbound.mtls + inbound.plaintext;
    let refused = match inbound.refused {
        0 => String::new(),
        n => format!("; {n} plaintext connections refused by policy"),
    };
    let mut check = if inbound.plaintext == 0 {
        let detail = match total {
            0 => format!("no inbound connections to enrolled pods in the last {minutes} minutes"),
            n => format!("{n} inbound connections in the last {minutes} minutes, all over mTLS"),
        };
        Check::pass("traffic", detail + &refused)
    } else {
        let mut sources: Vec<String> = inbound
            .plaintext_sources
            .iter()
            .map(|s| format!("{} to {} ({})", s.from, s.to, s.connections))
            .collect();
        if inbound.plaintext_unnamed > 0 {
            sources.push(format!("{} more", inbound.plaintext_unnamed));
        }
        let share = inbound.mtls as f64 * 100.0 / total as f64;
        Check::fail(
            "traffic",
            format!(
                "{} of {total} inbound connections in the last {minutes} minutes were plaintext \
                 ({share:.1} % over mTLS), from {}{refused}",
                inbound.plaintext,
                sources.join(", ")
            ),
            "enroll the sources (label their namespace, or run them on a node with Culvert); \
             once every client is enrolled, a STRICT PeerAuthentication refuses plaintext",
        )
    };
    check.inbound = Some(inbound);
    check
}

fn cni(conf_dir: Option<&Path>) -> Check {
    let Some(dir) = conf_dir else {
        return Check::pass(
            "cni",
            "not managed by this daemon (--install-cni is off)".into(),
        );
    };
    let fix = "check the daemon's --cni-conf-dir and that the primary CNI plugin wrote its \
               configuration there; the daemon puts culvert-cni back within a second";
    match install::primary(dir) {
        Ok(Some((path, config))) => {
            let chained = config
                .get("plugins")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .any(|p| {
                    p.get("type").and_then(serde_json::Value::as_str) == Some(install::PLUGIN)
                });
            if chained {
                Check::pass("cni", format!("culvert-cni is in {}", path.display()))
            } else {
                Check::fail(
                    "cni",
                    format!("culvert-cni is not in {}", path.display()),
                    fix,
                )
            }
        }
        Ok(None) => Check::fail(
            "cni",
            format!("no CNI configuration in {}", dir.display()),
            fix,
        ),
        Err(e) => Check::fail("cni", format!("{e:#}"), fix),
    }
}

fn certificates(registry: &Registry) -> Check {
    let cache = registry.certificates();
    let mut wanted: Vec<_> = registry
        .list()
        .into_iter()
        .filter_map(|p| registry.pod(&p.pod.namespace, &p.pod.name))
        .map(|p| p.identity.clone())
        .collect();
    wanted.sort();
    wanted.dedup();
    let bad = certificate_problems(&wanted, &cache.chains(), cache.roots(), SystemTime::now());
    if bad.is_empty() {
        Check::pass(
            "certificates",
            format!("{} identities hold valid certificates", wanted.len()),
        )
    } else {
        Check::fail(
            "certificates",
            bad.join("; "),
            "read the daemon's log for the CA's answer; check that the CA is reachable and \
             that the trust bundle the node follows is the CA's",
        )
    }
}

/// What is wrong with the certificates `held` for the identities `wanted`, at `now`: one
/// line per identity with no certificate, one the bundle `roots` does not accept, or one with
/// less than a quarter of its lifetime left.
fn certificate_problems(
    wanted: &[Id],
    held: &[Held],
    roots: Arc<RootCertStore>,
    now: SystemTime,
) -> Vec<String> {
    let mut bad = Vec::new();
    for id in wanted {
        let Some(held) = held.iter().find(|held| held.id == *id) else {
            bad.push(format!("{id}: no certificate"));
            continue;
        };
        if let Err(e) = crate::tls::chains_to(roots.clone(), &held.key.cert) {
            bad.push(format!(
                "{id}: not accepted by the current trust bundle: {e}"
            ));
            continue;
        }
        let lifetime = held
            .not_after
            .duration_since(held.not_before)
            .unwrap_or_default();
        let left = held.not_after.duration_since(now).unwrap_or_default();
        if left * NEAR_EXPIRY < lifetime {
            bad.push(format!(
                "{id}: expires in {} s; renewal is failing",
                left.as_secs()
            ));
        }
    }
    bad
}

/// Whether the certificate source answers now, and how its last request went.
async fn ca(cache: &identity::Cache) -> Check {
    let fix = "check the CA's address (the istio-ca settings) and that this node reaches it \
               (DNS, network policy); its certificate must chain to the mesh's trust bundle; a \
               refusal's reason is in the daemon's log and the CA's. Held certificates keep \
               serving until they expire";
    let ago = |at: SystemTime| {
        SystemTime::now()
            .duration_since(at)
            .unwrap_or_default()
            .as_secs()
    };
    let last = cache.last_request();
    let failed = last.as_ref().and_then(|l| {
        let error = l.error.as_ref()?;
        Some(format!(
            "the last request, for {} {} s ago, failed: {error}",
            l.id,
            ago(l.at)
        ))
    });
    match (cache.reach().await, failed) {
        (Err(e), None) => Check::fail("ca", format!("unreachable: {e}"), fix),
        (Err(e), Some(failed)) => Check::fail("ca", format!("unreachable: {e}; {failed}"), fix),
        (Ok(what), Some(failed)) => Check::fail("ca", format!("{what}, but {failed}"), fix),
        (Ok(what), None) => match last {
            Some(last) => Check::pass(
                "ca",
                format!("{what}; it signed {} {} s ago", last.id, ago(last.at)),
            ),
            None => Check::pass("ca", what),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Ca, TempDir};

    #[tokio::test]
    async fn certificates_fail_when_missing_from_another_ca_or_near_expiry() {
        let id = |sa: &str| Id::new("cluster.local", "shop", sa).unwrap();
        let (ours, theirs) = (
            Ca::new("check-ours").certs(),
            Ca::new("check-theirs").certs(),
        );
        for sa in ["cart", "pay"] {
            ours.ensure(&id(sa)).await.unwrap();
        }
        theirs.ensure(&id("stray")).await.unwrap();
        let mut held = ours.chains();
        held.extend(theirs.chains());
        let wanted = [id("cart"), id("pay"), id("stray"), id("ghost")];
        let now = SystemTime::now();
        let problems = certificate_problems(&wanted, &held, ours.roots(), now);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "spiffe://cluster.local/ns/shop/sa/stray: not accepted by the current trust bundle"
            ),
            "{problems:?}"
        );
        assert_eq!(
            problems[1],
            "spiffe://cluster.local/ns/shop/sa/ghost: no certificate"
        );

        // One-hour certificates: at 46 minutes a quarter of the lifetime is not left.
        let later = held[0].not_before + std::time::Duration::from_secs(46 * 60);
        let problems = certificate_problems(&wanted[..2], &held, ours.roots(), later);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems
                .iter()
                .all(|p| p.ends_with("s; renewal is failing")),
            "{problems:?}"
        );
        let earlier = held[0].not_before + std::time::Duration::from_secs(44 * 60);
        assert!(certificate_problems(&wanted[..2], &held, ours.roots(), earlier).is_empty());
    }

    #[tokio::test]
    async fn a_local_ca_is_always_reachable_and_reports_its_last_signature() {
        let cache = Ca::new("check-ca").certs();
        let before = ca(&cache).await;
        assert!(before.ok, "{before:?}");
        assert_eq!(
            before.detail,
            "certificates are signed in this daemon, with its own CA key"
        );
        cache
            .ensure(&Id::new("cluster.local", "shop", "cart").unwrap())
            .await
            .unwrap();
        let after = ca(&cache).await;
        assert!(after.ok, "{after:?}");
        assert!(
            after
                .detail
                .contains("; it signed spiffe://cluster.local/ns/shop/sa/cart 0 s ago"),
            "{after:?}"
        );
    }

    #[test]
    fn the_cni_check_fails_until_culvert_cni_is_in_the_primary_configuration() {
        assert!(
            cni(None).ok,
            "a daemon that does not manage the CNI chain has nothing to check"
        );
        let dir = TempDir::new("check-cni");
        let none = cni(Some(dir.path()));
        assert!(
            !none.ok && none.detail.starts_with("no CNI configuration"),
            "{none:?}"
        );
        let conflist = dir.path().join("10-bridge.conflist");
        let write = |plugins: &str| {
            std::fs::write(
                &conflist,
                format!(r#"{{"cniVersion": "1.0.0", "name": "pods", "plugins": [{plugins}]}}"#),
            )
            .unwrap();
        };
        write(r#"{"type": "bridge"}"#);
        let missing = cni(Some(dir.path()));
        assert!(
            !missing.ok && missing.detail.contains("is not in"),
            "{missing:?}"
        );
        assert!(missing.fix.is_some());
        write(r#"{"type": "bridge"}, {"type": "culvert-cni"}"#);
        let chained = cni(Some(dir.path()));
        assert!(chained.ok, "{chained:?}");
    }
}
