//! The `ferrox` binary: `ferrox agent` runs the node daemon; the other subcommands inspect the
//! node's datapath.

use clap::Parser as _;
use ferrox::cli::{Cli, Command, CtCommand, IpamCommand, LogFormat, SvcCommand};
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
        Command::Ipam(IpamCommand::Show(a)) => ferrox::ipam_cli::show(&a.node_config, a.output),
        Command::Ipam(IpamCommand::Check(a)) => {
            match ferrox::ipam_cli::run_check(&a.node_config, &layout, a.output) {
                // Problems found: printed, and a failure status for scripts.
                Ok(false) => return std::process::ExitCode::FAILURE,
                r => r.map(drop),
            }
        }
        Command::Ipam(IpamCommand::Release { what, args }) => {
            ferrox::ipam_cli::release(&args.node_config, &what)
        }
        Command::Trace(t) => trace(&layout, &t),
        Command::Ct(CtCommand::List { filter, output }) => {
            ferrox::ct_cli::list(&layout, &filter, output)
        }
        Command::Ct(CtCommand::Flush { filter }) => ferrox::ct_cli::flush(&layout, &filter),
        Command::Bgp(cmd) => ferrox::bgp::cli(cmd),
        Command::Routes(a) => ferrox::routes_cli::print(&layout, a.output),
        Command::Endpoints(a) => ferrox::ct_cli::endpoints(&layout, &a.node_config, a.output),
        Command::Status(a) => ferrox::status::print(&layout, &a.node_config, a.output),
        Command::Monitor { filter, output } => ferrox::monitor::run(&layout, &filter, output),
        Command::Completion { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "ferrox", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrox: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn trace(layout: &PinLayout, t: &ferrox::cli::TraceArgs) -> anyhow::Result<()> {
    use ferrox::trace;
    let (src, sport) = trace::parse_src(&t.src)?;
    let (dst, dport, l4) = trace::parse_dst(&t.dst)?;
    let view = trace::Pinned::open(layout)?;
    let origin = view.origin_of(src);
    trace::print(
        &trace::explain(&view, origin, src, sport, dst, dport, l4),
        t.output,
    )
}
