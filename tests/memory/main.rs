//! The node's view of the cluster stays lean: live heap bytes per pod, counted by dhat's
//! allocator (deterministic: bytes, not time), after a list, with a snapshot held, after churn,
//! after a relist, and after a list that brings the EndpointSlices before the pods.
//!
//! A test binary of its own, with one test, so that nothing else allocates while it counts.
//! `CULVERT_HEAP_PROFILE=FILE` writes a dhat heap profile of the steady state, the view after
//! the first list with a snapshot held (open it in dhat's viewer; its "at t-end" figures are
//! what the view holds), to see where the bytes go.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

use culvert::discovery::{Cluster, Settings};
use culvert::state::PeerAuthentication;
use culvert::test_util::cluster::{Shape, Step};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Live heap bytes per pod the view may hold: records, interned strings, the index and one
/// snapshot (which shares the index: a few bytes more), in a cluster of Deployments of 15 pods
/// with a Service each. 532 when set; a change that makes pods heavier has to say why here.
const BYTES_PER_POD: usize = 560;

fn live() -> usize {
    dhat::HeapStats::get().curr_bytes
}

/// The view after `what` holds at most 5 % more than after the first list.
fn within_fresh(what: &str, bytes: usize, fresh: usize) {
    eprintln!("after {what}: {bytes} bytes (fresh: {fresh})");
    assert!(
        bytes <= fresh + fresh / 20,
        "{what} grew the view from {fresh} to {bytes} bytes"
    );
}

#[test]
fn the_cluster_view_holds_a_pod_in_a_few_hundred_bytes_and_churn_does_not_grow_it() {
    let settings = Settings {
        trust_domain: "cluster.local".into(),
        peer_authentication: PeerAuthentication::Permissive,
        policy: culvert::policy::Settings::default(),
        file_policies: std::sync::Arc::default(),
    };
    let shape = Shape {
        nodes: 100,
        ..Shape::new(15_000)
    };
    // The API's JSON is made before counting starts: only decoding and keeping it counts.
    let list = shape.list_steps(0);
    let (first, second) = (shape.roll_out_steps(0, 1), shape.roll_out_steps(1, 2));
    let relist = shape.list_steps(2);
    let slices_first = shape.list_steps_slices_first(0);
    let apply = |steps: &[Step], cluster: &Cluster| steps.iter().for_each(|s| s.apply(cluster));

    let profile = std::env::var_os("CULVERT_HEAP_PROFILE");
    let profiling = profile.is_some();
    let profiler = match profile {
        Some(file) => dhat::Profiler::builder().file_name(file).build(),
        None => dhat::Profiler::builder().testing().build(),
    };
    let before = live();
    let cluster = Cluster::new("cluster.local");
    apply(&list, &cluster);
    let records = live() - before;
    let snapshot = cluster.snapshot(&settings);
    assert_eq!(snapshot.workloads().count(), shape.pods);
    assert_eq!(snapshot.services().count(), shape.services());
    let fresh = live() - before;
    let per_pod = fresh / shape.pods;
    eprintln!(
        "records and index: {} bytes per pod; with a snapshot: {per_pod}",
        records / shape.pods
    );
    assert!(
        per_pod < BYTES_PER_POD,
        "{per_pod} bytes per pod, over the {BYTES_PER_POD} allowed"
    );
    if profiling {
        // The profile ends here: what is live now is the steady state.
        drop(profiler);
        return;
    }
    drop(snapshot);

    // Every Deployment rolls out twice: all pods renamed, new template hashes.
    apply(&first, &cluster);
    apply(&second, &cluster);
    let snapshot = cluster.snapshot(&settings);
    assert_eq!(snapshot.workloads().count(), shape.pods);
    within_fresh("two rollouts of everything", live() - before, fresh);
    drop(snapshot);

    apply(&relist, &cluster);
    let snapshot = cluster.snapshot(&settings);
    within_fresh("a relist", live() - before, fresh);
    drop(snapshot);
    drop(cluster);
    assert!(live() - before < 64 * 1024, "dropping the view frees it");

    // Slices listed before pods: every endpoint's address is adopted until its pod arrives,
    // and that room is given back once the statuses are in.
    let before = live();
    let cluster = Cluster::new("cluster.local");
    apply(&slices_first, &cluster);
    let snapshot = cluster.snapshot(&settings);
    assert_eq!(snapshot.workloads().count(), shape.pods);
    within_fresh("a list of slices before pods", live() - before, fresh);
}
