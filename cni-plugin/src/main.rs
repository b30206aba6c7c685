//! `culvert-cni` entry point: environment and stdin in, result or error JSON on stdout.

use std::io::{Read, Write};
use std::process::ExitCode;

use culvert_cni::{Inputs, answer_version, run};

// stdout is the CNI protocol channel: the result or the error, nothing else.
#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    let env = |name| std::env::var(name).ok();
    let mut inputs = Inputs {
        command: env("CNI_COMMAND"),
        container_id: env("CNI_CONTAINERID"),
        netns: env("CNI_NETNS"),
        ifname: env("CNI_IFNAME"),
        args: env("CNI_ARGS"),
        stdin: Vec::new(),
    };
    if let Err(e) = std::io::stdin().read_to_end(&mut inputs.stdin) {
        inputs.stdin.clear();
        eprintln_log(&format!("reading stdin: {e}"));
    }
    let (output, status) = match run(&inputs) {
        Ok(Some(result)) => (Some(result), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err(e) => {
            eprintln_log(&format!("{} ({}): {}", e.msg, e.code, e.details));
            (
                Some(e.to_json(&answer_version(&inputs.stdin))),
                ExitCode::FAILURE,
            )
        }
    };
    if let Some(output) = output {
        println!("{output}");
    }
    let _ = std::io::stdout().flush();
    status
}

/// Logs go to stderr: the runtime keeps them, and they never mix with the result.
#[allow(clippy::print_stderr)]
fn eprintln_log(line: &str) {
    eprintln!("culvert-cni: {line}");
}
