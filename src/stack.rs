//! Giving back the stack pages a parked connection thread no longer uses.
//!
//! A thread's stack costs every page it has ever touched. The handshake, parsing and logging
//! reach a few pages deep; then an idle connection's thread parks for minutes with only its top
//! frames live, and Linux keeps the deeper pages resident until told otherwise. `madvise` with
//! `MADV_DONTNEED` on the range below the current frame gives them back (a page touched again
//! comes back zeroed, which is all a stack below its pointer may hold). With thousands of idle
//! connections this is a third of their memory.
//!
//! This module only ever touches memory below the caller's frame, and only this thread's stack.
//! It needs Linux (`pthread_getattr_np` to find the stack, and `MADV_DONTNEED`'s zero-fill
//! semantics); elsewhere [`release_unused`] does nothing and idle connections simply keep the
//! pages they touched.

/// Room left below this module's frame for the calls it still makes (`madvise` itself). A
/// heuristic, not a guarantee: the libc wrapper of a syscall needs far less than this.
#[cfg(target_os = "linux")]
const MARGIN_BYTES: usize = 512;

/// On systems other than Linux: nothing to do (see the module's documentation).
#[cfg(not(target_os = "linux"))]
pub fn release_unused() {}

/// Returns this thread's stack pages below the caller to the kernel. Cheap enough for a
/// keepalive tick: no syscall but the `madvise`.
#[cfg(target_os = "linux")]
#[inline(never)] // the marker below must be in this function's own, small frame
pub fn release_unused() {
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let Some(low) = stack_low() else {
        return;
    };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let start = low.next_multiple_of(page);
    let end = here.saturating_sub(MARGIN_BYTES) / page * page;
    if end > start {
        // SAFETY: [start, end) lies in this thread's stack (between its lowest usable address,
        // from pthread, and this frame's marker), below every live frame: ours is above `end`,
        // and only the MARGIN_BYTES heuristic stands between `end` and the frames madvise's
        // wrapper pushes. Pages given back read as zeros, which a stack below its pointer may
        // hold; no live data is discarded.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

/// The lowest usable address of this thread's stack (above its guard page).
#[cfg(target_os = "linux")]
fn stack_low() -> Option<usize> {
    // SAFETY: `attr` is initialised by pthread_getattr_np before use and destroyed after.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut addr = std::ptr::null_mut();
        let mut size = 0;
        let found = libc::pthread_attr_getstack(&attr, &mut addr, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attr);
        found.then_some(addr as usize)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Resident kB of the mapping that holds `addr`, from /proc/self/smaps.
    fn resident_kb(addr: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(kb) = line.strip_prefix("Rss:") {
                return kb
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse()
                    .expect("kB");
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[inline(never)]
    fn touch_deep(depth: usize) -> u8 {
        let mut page = [0u8; 4096];
        page[depth % 4096] = depth as u8;
        let below = if depth > 0 { touch_deep(depth - 1) } else { 0 };
        std::hint::black_box(&mut page)[0].wrapping_add(below)
    }

    #[test]
    fn pages_below_the_caller_go_back_and_the_caller_lives_on() {
        let kb = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(|| {
                let marker = 7u8;
                let here = std::hint::black_box(&marker) as *const u8 as usize;
                touch_deep(32); // 128 KiB deep
                let before = resident_kb(here);
                release_unused();
                let after = resident_kb(here);
                assert_eq!(
                    std::hint::black_box(marker),
                    7,
                    "the caller's frame is intact"
                );
                (before, after)
            })
            .expect("spawn")
            .join()
            .expect("the thread survives");
        assert!(kb.0 >= 128, "touched: {kb:?}");
        assert!(kb.1 <= 32, "given back: {kb:?}");
    }
}
