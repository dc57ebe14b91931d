//! `BPF_PROG_TEST_RUN` of the classifiers and the XDP fast path on crafted packets, for tests
//! and benchmarks.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::programs::{Program, SchedClassifier, Xdp};

use super::{Datapath, Error, Result};

/// Result of running a classifier on one packet.
#[derive(Clone, Debug)]
pub struct TestRun {
    /// The program's return value (TC action).
    pub retval: i32,
    /// Average run time per repetition, in ns, as the kernel measured it.
    pub duration_ns: u32,
    /// The packet after the program ran (encapsulated, decapsulated, or unchanged).
    pub data_out: Vec<u8>,
}

impl Datapath {
    /// Cumulative (run time in ns, run count) of program `name`, as the kernel accounts them
    /// while BPF statistics are enabled (`aya::sys::enable_stats`).
    pub fn run_stats(&mut self, name: &str) -> Result<(u64, u64)> {
        let info = self.loaded(name)?.info().map_err(|e| Error::bpf(format!("reading info of {name}"), e))?;
        Ok((u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX), info.run_count()))
    }

    /// Program `name` (a classifier or an XDP program), loaded into the kernel if it was not.
    fn loaded(&mut self, name: &str) -> Result<&Program> {
        if matches!(self.ebpf.program(name), Some(Program::Xdp(_))) {
            self.program::<Xdp>(name)?;
        } else {
            self.program::<SchedClassifier>(name)?;
        }
        self.ebpf.program(name).ok_or_else(|| Error::invalid(format!("eBPF object has no program {name}")))
    }

    /// Loads (if needed) classifier or XDP program `name` and runs it `repeat` times on
    /// `packet` (an XDP program as if it came in on the loopback device).
    pub fn test_run(&mut self, name: &str, packet: &[u8], repeat: u32) -> Result<TestRun> {
        self.run_with(name, packet, repeat, None)
    }

    /// [`Datapath::test_run`] of XDP program `name` on `packet` as if it came in on interface
    /// `ingress_ifindex` (its first receive queue): the fast path looks its next hop up from
    /// there.
    pub fn test_run_xdp(&mut self, name: &str, packet: &[u8], repeat: u32, ingress_ifindex: u32) -> Result<TestRun> {
        let len = u32::try_from(packet.len()).map_err(|_| Error::invalid("packet too large"))?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        self.run_with(name, packet, repeat, Some([0, len, 0, ingress_ifindex, 0, 0]))
    }

    fn run_with(&mut self, name: &str, packet: &[u8], repeat: u32, xdp_md: Option<[u32; 6]>) -> Result<TestRun> {
        let fd = self.loaded(name)?.fd().map_err(|e| Error::bpf("program fd", e))?.as_fd().as_raw_fd();
        let mut out = vec![0u8; packet.len() + 256];
        let mut attr = [0u64; 16];
        // union bpf_attr, test: prog_fd, retval, data_size_in, data_size_out, data_in, data_out,
        // repeat, duration.
        let fd = u32::try_from(fd).map_err(|_| Error::invalid("bad program fd"))?;
        let len_in = u32::try_from(packet.len()).map_err(|_| Error::invalid("packet too large"))?;
        let len_out = u32::try_from(out.len()).map_err(|_| Error::invalid("packet too large"))?;
        attr[0] = u64::from(fd);
        attr[1] = u64::from(len_in) | (u64::from(len_out) << 32);
        attr[2] = packet.as_ptr() as u64;
        attr[3] = out.as_mut_ptr() as u64;
        attr[4] = u64::from(repeat);
        // ctx_size_in, ctx_in.
        if let Some(md) = &xdp_md {
            attr[5] = size_of_val(md) as u64;
            attr[6] = md.as_ptr() as u64;
        }
        // SAFETY: attr is a valid bpf_attr for BPF_PROG_TEST_RUN; the buffers outlive the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, 10 /* BPF_PROG_TEST_RUN */, attr.as_mut_ptr(), std::mem::size_of_val(&attr))
        };
        if rc < 0 {
            return Err(Error::io(format!("BPF_PROG_TEST_RUN of {name}"), std::io::Error::last_os_error()));
        }
        // The kernel wrote retval, data_size_out and duration: the upper halves of words 0, 1, 4.
        let upper = |w: u64| u32::try_from(w >> 32).unwrap_or(u32::MAX);
        let retval = i32::from_ne_bytes(upper(attr[0]).to_ne_bytes());
        let size_out = usize::try_from(upper(attr[1])).unwrap_or(usize::MAX);
        let duration_ns = upper(attr[4]);
        out.truncate(size_out.min(out.len()));
        Ok(TestRun { retval, duration_ns, data_out: out })
    }
}
