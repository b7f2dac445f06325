//! The `ferrox` binary: `ferrox agent` runs the node daemon; every other subcommand is a node
//! command of the CLI.

use clap::Parser as _;
use ferrox::{
    cli::{Cli, Command},
    logging,
};
use ferrox_datapath::PinLayout;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let layout = PinLayout::new(cli.bpffs_root.clone());
    let result = match cli.command {
        Command::Agent(args) => {
            logging::init(args.log_format);
            ferrox::heap::use_one_arena();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(ferrox::daemon::run(*args, layout)))
                .map(|()| std::process::ExitCode::SUCCESS)
        }
        command => {
            match &command {
                Command::InstallCni(a) => logging::init(a.log_format),
                Command::Uninstall(a) => logging::init(a.log_format),
                _ => {}
            }
            ferrox::cli::run(command, &layout)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("ferrox: {e:#}");
        std::process::ExitCode::FAILURE
    })
}
