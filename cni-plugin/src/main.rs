//! `culvert-cni`: the CNI plugin that hands pods to the node daemon.
//!
//! Not implemented yet: the CNI issue builds it on `culvert-cni-proto`. Until then it answers
//! VERSION and fails every other command with a CNI error, so a runtime never mistakes it for
//! a working plugin.

use std::io::Write;

fn main() -> std::process::ExitCode {
    let command = std::env::args().nth(1).unwrap_or_default();
    let reply = if command == "VERSION" {
        serde_json::json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
    } else {
        serde_json::json!({"cniVersion": "1.0.0", "code": 100, "msg": "culvert-cni is not implemented yet"})
    };
    let _ = writeln!(std::io::stdout(), "{reply}");
    if command == "VERSION" {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
