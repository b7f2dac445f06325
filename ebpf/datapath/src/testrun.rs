//! Running the TC programs on a crafted packet with `BPF_PROG_TEST_RUN`: the datapath tests and
//! the per-packet benchmarks drive the real programs this way, without any interface.

use aya::programs::{TestRun as _, TestRunOptions};
use ferrox_abi::program_names as names;

use crate::{Datapath, DatapathError, Result};

/// Size of the UAPI `struct __sk_buff` and the offset of its `ifindex` field.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_IFINDEX: usize = 40;
/// Size of the UAPI `struct xdp_md` and the offsets of its `data_end` (the frame's length, as
/// the kernel checks) and `ingress_ifindex` fields.
const XDP_MD_SIZE: usize = 24;
const XDP_MD_DATA_END: usize = 4;
const XDP_MD_INGRESS_IFINDEX: usize = 12;

/// The TC programs that can be test-run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcProgram {
    FromPod,
    ToPod,
    UplinkIngress,
    UplinkEgress,
}

impl TcProgram {
    pub const ALL: [Self; 4] = [
        Self::FromPod,
        Self::ToPod,
        Self::UplinkIngress,
        Self::UplinkEgress,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::FromPod => names::TC_FROM_POD,
            Self::ToPod => names::TC_TO_POD,
            Self::UplinkIngress => names::TC_UPLINK_INGRESS,
            Self::UplinkEgress => names::TC_UPLINK_EGRESS,
        }
    }
}

/// What one test run returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The program's return value (a TC action, e.g. -1 = TC_ACT_UNSPEC, 2 = TC_ACT_SHOT).
    pub action: i32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Average run time per repetition, as the kernel measured it.
    pub duration_ns: u64,
}

impl Datapath {
    /// Runs `program` `repeat` times on `packet` (which starts at the Ethernet header).
    pub fn test_run_tc(
        &mut self,
        program: TcProgram,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutput> {
        self.test_run_tc_on(program, packet, None, repeat)
    }

    /// Like [`Datapath::test_run_tc`], with the packet arriving on interface `ifindex` of the
    /// calling thread's network namespace (what FIB lookups and redirects see).
    pub fn test_run_tc_on(
        &mut self,
        program: TcProgram,
        packet: &[u8],
        ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<TestRunOutput> {
        let name = program.name();
        let prog = self.programs.tc(name)?;
        let mut out = vec![0u8; packet.len() + 256];
        // `struct __sk_buff` input: all zero but `ifindex` (UAPI offset 40), which makes the
        // kernel give the skb that device.
        let mut skb = [0u8; SK_BUFF_SIZE];
        if let Some(i) = ifindex {
            skb[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4].copy_from_slice(&i.to_ne_bytes());
        }
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        if ifindex.is_some() {
            opts.ctx_in = Some(&skb);
        }
        opts.repeat = repeat.max(1);
        let result = prog
            .test_run(opts)
            .map_err(|e| DatapathError::program("test-running", name, e))?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            action: result.return_value as i32,
            packet: out,
            duration_ns: result.duration.as_nanos() as u64,
        })
    }

    /// Runs the uplink's XDP program `repeat` times on `packet`; the action is an XDP action
    /// (1 = XDP_DROP, 2 = XDP_PASS, 3 = XDP_TX).
    pub fn test_run_xdp(&mut self, packet: &[u8], repeat: u32) -> Result<TestRunOutput> {
        self.test_run_xdp_on(packet, None, repeat)
    }

    /// Like [`Datapath::test_run_xdp`], with the frame arriving on interface `ifindex` of the
    /// calling thread's network namespace (its receive queue 0: what FIB lookups and the
    /// program's "back out of the arrival interface" see).
    pub fn test_run_xdp_on(
        &mut self,
        packet: &[u8],
        ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<TestRunOutput> {
        let name = crate::programs::XDP_PROGRAM;
        let mut out = vec![0u8; packet.len() + 256];
        let mut md = [0u8; XDP_MD_SIZE];
        md[XDP_MD_DATA_END..XDP_MD_DATA_END + 4]
            .copy_from_slice(&(packet.len() as u32).to_ne_bytes());
        if let Some(i) = ifindex {
            md[XDP_MD_INGRESS_IFINDEX..XDP_MD_INGRESS_IFINDEX + 4]
                .copy_from_slice(&i.to_ne_bytes());
        }
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        if ifindex.is_some() {
            opts.ctx_in = Some(&md);
        }
        opts.repeat = repeat.max(1);
        let result = self
            .programs
            .xdp
            .test_run(opts)
            .map_err(|e| DatapathError::program("test-running", name, e))?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            action: result.return_value as i32,
            packet: out,
            duration_ns: result.duration.as_nanos() as u64,
        })
    }
}

/// The kernel's run-time accounting of BPF programs, on while this lives (`BPF_ENABLE_STATS`):
/// every run of every program then also reads the clock twice, so only a measurement that
/// wants each program's own time (without the test run's set-up around it) turns it on.
pub struct RunStats {
    _fd: std::os::fd::OwnedFd,
}

impl RunStats {
    pub fn enable() -> Result<Self> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(|fd| Self { _fd: fd })
            .map_err(|e| DatapathError::Syscall {
                cmd: "BPF_ENABLE_STATS",
                path: "run time".into(),
                source: e.io_error,
            })
    }
}

impl Datapath {
    /// A TC program's total run time (ns) and run count so far, as the kernel accounts them
    /// while [`RunStats`] are on.
    pub fn tc_run_stats(&mut self, program: TcProgram) -> Result<(u64, u64)> {
        let name = program.name();
        run_stats(name, self.programs.tc(name)?.info())
    }

    /// The same for the uplink's XDP program.
    pub fn xdp_run_stats(&mut self) -> Result<(u64, u64)> {
        run_stats(crate::programs::XDP_PROGRAM, self.programs.xdp.info())
    }
}

/// Total run time (ns) and run count from a program's info.
fn run_stats(
    name: &'static str,
    info: std::result::Result<aya::programs::ProgramInfo, aya::programs::ProgramError>,
) -> Result<(u64, u64)> {
    let info = info.map_err(|e| DatapathError::program("reading the info of", name, e))?;
    Ok((info.run_time().as_nanos() as u64, info.run_count()))
}
