//! Metrics: the room for the node's counters and gauges, and the closed label values they use.
//!
//! Owns nothing yet but the labels: per-connection outcomes already reach the edge as closed
//! enums ([`crate::proxy::Outcome`]), so a counter keyed by them has bounded cardinality. The
//! registry root (prometheus-client), each subsystem's `Metrics::register` and the `/metrics`
//! endpoint come with the observability work; `app` will create the one registry and hand
//! sub-registries down. No metric is global or static.
