//! Culvert's node daemon: per-node mTLS (HBONE) tunnels for Kubernetes pods.
//!
//! Code map, data path first: [`redirect`] captures a pod's traffic inside its network
//! namespace; [`proxy`] handles each connection, asking [`state`] where it goes and [`policy`]
//! whether it may; [`hbone`] carries it between nodes over [`tls`] with certificates from
//! [`identity`]. [`cni`] takes pod registrations and keeps the registry of wired pods.
//! [`config`] reads the node file and flags, [`discovery`] watches the Kubernetes API, [`app`]
//! wires it all together, [`admin`] serves the admin API and probes, [`metrics`] is the room
//! for counters, and [`telemetry`] sets up logs.

pub mod admin;
pub mod app;
pub mod cli;
pub mod cni;
pub mod config;
pub mod discovery;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod state;
pub mod telemetry;
pub mod tls;

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
