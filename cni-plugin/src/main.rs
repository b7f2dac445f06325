//! `ferrox-cni`: invoked by a container runtime with `CNI_*` variables and the network
//! configuration on stdin; prints the result (or the error) as CNI JSON on stdout.

use std::io::Read as _;

use ferrox_cni::{
    plugin,
    spec::{CNI_VERSION, Invocation},
};

fn main() -> std::process::ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| CNI_VERSION.to_owned());
    let result = match read {
        Err(e) => Err(ferrox_cni::spec::CniError::new(
            ferrox_cni::spec::code::IO_FAILURE,
            "reading stdin",
        )
        .with_source(&e)),
        Ok(_) => Invocation::from_env(|k| std::env::var(k).ok())
            .and_then(|inv| plugin::run(&inv, &stdin)),
    };
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Ok(None) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.to_json(&version));
            eprintln!("ferrox-cni: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
