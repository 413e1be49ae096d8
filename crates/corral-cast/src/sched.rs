//! Short scheduler slices for the sender's threads.
//!
//! The sender paces: it wakes about once a millisecond, sends what its token bucket allows and
//! sleeps again. On a host whose receivers (or anything else) keep the CPUs busy, a woken
//! sender waits for the running task's slice to end (EEVDF's default slice is 0.7–3 ms), and a
//! wait longer than the bucket loses rate: traced with `perf sched` at N = 8 receivers on 2
//! cores, the sender and the tokio thread that fires its timer waited up to 4 ms behind
//! receivers running 3.5–4.4 ms slices, while the machine was idle 25 % of the pass.
//!
//! Linux 6.12+ lets a `SCHED_OTHER` task ask for a shorter slice (`sched_attr.sched_runtime`,
//! no privilege needed); a task with a shorter slice preempts on wake-up. This does not raise
//! the task's share of the CPU (its nice value is kept), only how soon it runs when woken.
//! Older kernels ignore the field; failures are logged and otherwise ignored.
//!
//! This module and `socket` are the only ones of the crate allowed to use `unsafe` (the
//! `sched_getattr`/`sched_setattr` system calls, which libc does not wrap).
#![allow(unsafe_code)]

use std::time::Duration;

use tracing::debug;

/// `struct sched_attr` of `sched_setattr(2)` (the size the kernel has accepted since 4.13).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

/// The slice the sender's threads ask for: the kernel's minimum custom slice.
pub(crate) const SENDER_SLICE: Duration = Duration::from_micros(100);

fn get(tid: i32) -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: `attr` is a valid, writable `struct sched_attr` of `size` bytes; the kernel
    // writes at most `size` bytes into it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            size,
            0u32,
        )
    };
    if r == 0 {
        Ok(attr)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set(tid: i32, attr: &SchedAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid `struct sched_attr` whose `size` field says how many bytes the
    // kernel may read; it is only read.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, attr as *const SchedAttr, 0u32) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Asks for `slice` as the scheduler slice of every thread of this process that runs under
/// `SCHED_OTHER` or `SCHED_BATCH`, keeping its policy and nice value; threads started later
/// inherit it from their parent thread. Returns how many threads took it.
pub(crate) fn request_short_slices(slice: Duration) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let ns = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    let mut done = 0;
    for task in tasks.flatten() {
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let r = get(tid).and_then(|mut attr| {
            if attr.sched_policy != SCHED_OTHER && attr.sched_policy != SCHED_BATCH {
                return Ok(false);
            }
            attr.size = std::mem::size_of::<SchedAttr>() as u32;
            attr.sched_flags = 0;
            attr.sched_runtime = ns;
            set(tid, &attr).map(|()| true)
        });
        match r {
            Ok(true) => done += 1,
            Ok(false) => {}
            Err(e) => debug!(tid, error = %e, "short scheduler slice not set"),
        }
    }
    debug!(
        threads = done,
        slice_us = slice.as_micros() as u64,
        "short scheduler slices requested"
    );
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's view of a thread's slice (`se.slice` in `/proc/<pid>/task/<tid>/sched`).
    fn slice_of(tid: i32) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/sched")).ok()?;
        s.lines()
            .find(|l| l.starts_with("se.slice"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse().ok())
    }

    fn kernel_has_custom_slices() -> bool {
        // Custom slices for fair tasks arrived in Linux 6.12.
        let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut it = rel.trim().split(['.', '-']);
        let major: u32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let minor: u32 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        (major, minor) >= (6, 12)
    }

    #[test]
    fn every_thread_gets_the_short_slice_and_keeps_its_nice_value() {
        // A thread of our own, so that the test does not depend on what else runs.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            tx.send(tid).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        let before = get(tid).expect("sched_getattr of our own thread");
        let n = request_short_slices(Duration::from_micros(250));
        assert!(n >= 2, "at least this thread and the spawned one: {n}");
        let after = get(tid).unwrap();
        assert_eq!(after.sched_policy, before.sched_policy);
        assert_eq!(after.sched_nice, before.sched_nice, "nice value kept");
        if kernel_has_custom_slices() {
            assert_eq!(
                slice_of(tid),
                Some(250_000),
                "the kernel shows the new slice"
            );
            assert_eq!(after.sched_runtime, 250_000);
        } else {
            eprintln!("kernel older than 6.12: custom slices are ignored; only the call is tested");
        }
        done_tx.send(()).unwrap();
        h.join().unwrap();
    }
}
