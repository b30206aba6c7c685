//! `culvert ca`: the cluster CA. Signs workload certificates over Istio's CA API
//! (`IstioCertificateService`) for node daemons, only for identities that have a pod on the
//! asking node; keeps its key in one Secret and publishes the trust bundle in a ConfigMap.
//!
//! Rooms: [`auth`] (who asks, for what), [`csr`] (what a request may hold), [`authority`] (the
//! key material, rotation and signing), [`store`] (the Secret and ConfigMap), [`server`] (the
//! gRPC service over TLS).

pub mod auth;
pub mod authority;
pub mod csr;
pub mod server;
pub mod store;
