//! Giving back, once the agent serves, the memory only start-up needed: the allocator's
//! freed heap (start-up parses the config, the eBPF object and the kernel's BTF, and
//! frees most of it; glibc keeps freed pages unless asked) and the pages of the agent's
//! own code that start-up faulted in (YAML and ELF parsing, argument handling, the
//! loader). The kernel maps code 64 KiB at a time around each page touched, so a large
//! binary ends start-up with far more of itself resident than it runs on; paged out,
//! what the data path uses faults back in on first use and the rest stays out. At rest
//! that takes the agent from about 16 to under 10 MiB (docs/performance.md). The cost
//! is paid once, by the first connections: page faults for the code they run.

use std::{io, path::Path};

/// Give the allocator's free pages back to the kernel: after start-up, and after a
/// whole-config change (a catalog of 10,000 services parses into far more than it keeps).
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory back to the kernel.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trim the heap and page out the agent's own code; returns the bytes of code paged out.
pub fn release_startup() -> io::Result<usize> {
    trim_heap();
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut paged = 0;
    for (start, end) in own_read_only_mappings(&maps, &exe) {
        // SAFETY: advice on a range the process maps (from /proc/self/maps), read-only
        // file pages: reclaiming them changes no content, they fault back in on use.
        if unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) } == 0 {
            paged += end - start;
        }
    }
    Ok(paged)
}

/// The (start, end) of every read-only mapping of `exe` (code and constants; writable
/// data is left alone: its pages are the agent's own).
fn own_read_only_mappings(maps: &str, exe: &Path) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3)?;
            if path != exe.to_str()? || perms.contains('w') {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_mappings_of_the_binary_are_chosen() {
        let maps = "\
55d0c0000000-55d0c0100000 r--p 00000000 08:01 42 /usr/bin/switchyard
55d0c0100000-55d0c0900000 r-xp 00100000 08:01 42 /usr/bin/switchyard
55d0c0900000-55d0c0a00000 rw-p 00900000 08:01 42 /usr/bin/switchyard
7f0000000000-7f0000100000 r-xp 00000000 08:01 7 /usr/lib/libc.so.6
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
";
        let got = own_read_only_mappings(maps, Path::new("/usr/bin/switchyard"));
        assert_eq!(got, [(0x55d0c0000000, 0x55d0c0100000), (0x55d0c0100000, 0x55d0c0900000)]);
    }
}
