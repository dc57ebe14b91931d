//! `BPF_PROG_TEST_RUN` of the classifiers on crafted packets, for tests and benchmarks.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::programs::SchedClassifier;

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
        let prog = self.program::<SchedClassifier>(name)?;
        let info = prog.info().map_err(|e| Error::bpf(format!("reading info of {name}"), e))?;
        Ok((u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX), info.run_count()))
    }

    /// Loads (if needed) classifier `name` and runs it `repeat` times on `packet`.
    pub fn test_run(&mut self, name: &str, packet: &[u8], repeat: u32) -> Result<TestRun> {
        let prog = self.program::<SchedClassifier>(name)?;
        let fd = prog.fd().map_err(|e| Error::bpf("program fd", e))?.as_fd().as_raw_fd();
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
