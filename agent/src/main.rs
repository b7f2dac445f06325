//! The `ferrox` binary: `ferrox agent` runs the node daemon; the other subcommands inspect the
//! node's datapath.

use clap::Parser as _;
use ferrox::cli::{Cli, Command, LogFormat, SvcCommand};
use ferrox_datapath::PinLayout;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let layout = PinLayout::new(cli.bpffs_root.clone());
    let result = match cli.command {
        Command::Agent(args) => {
            init_logging(args.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(ferrox::daemon::run(*args, layout)))
        }
        Command::InstallCni(args) => {
            init_logging(args.log_format);
            ferrox::install::run_install(&args)
        }
        Command::Uninstall(args) => {
            init_logging(args.log_format);
            ferrox::install::run_uninstall(&args, &layout)
        }
        Command::Svc(SvcCommand::List(o)) => ferrox::inspect::print_services(&layout, o.output),
        Command::Counters(o) => ferrox::inspect::print_counters(&layout, o.output),
        Command::Datapath(o) => ferrox::inspect::print_datapath(&layout, o.output),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrox: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
