//! The global allocator: mimalloc, called the way C's `malloc` is.
//!
//! The `mimalloc` crate sends every allocation through
//! `mi_malloc_aligned`, whose fast path serves only blocks up to 1 KiB
//! that happen to be aligned, and whose slow path over-allocates; the
//! gateway's proxy path (about twenty allocations a request, a few of
//! them larger than 1 KiB: boxed futures, write buffers) spent ~95
//! instructions per allocation there. Plain `mi_malloc` is what the C
//! world calls. Measured with callgrind on `bench/`'s proxy load
//! (ARCHITECTURE.md, "unsafe"): the reason this file may hold the
//! workspace's only `unsafe`.
//!
//! mimalloc aligns every block of 16 bytes or more to 16 (its
//! `MI_MAX_ALIGN_SIZE`) and smaller ones to 8, so an alignment of at most
//! 16 that is not larger than the size needs nothing more; any other goes
//! through the aligned calls.
#![allow(unsafe_code)]

use libmimalloc_sys as mi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// What `mi_malloc` guarantees for a block at least this large.
const MIN_ALIGN: usize = 16;

/// mimalloc as the global allocator.
pub struct Mimalloc;

fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it
// (`mi_free` takes blocks from either kind of call); alignments are
// honoured as the module's doc says.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: FFI calls with a size and a power-of-two alignment.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator; the new block keeps the
        // layout's alignment.
        unsafe {
            if plain(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

/// Opts the process out of transparent huge pages (Linux's
/// `PR_SET_THP_DISABLE`; elsewhere nothing), before the runtime starts.
///
/// mimalloc reserves a 1 GiB arena and marks it `MADV_HUGEPAGE`, so on a
/// kernel whose THP mode is `madvise` (Debian's default) its pages were
/// faulted in 2 MiB at a time and `khugepaged` collapsed the rest: 26.8
/// MiB resident with 1,000 idle clients before, 23.4 after, and
/// `perf sched` caught `khugepaged` holding a core for 4.8 ms while the
/// gateway's worker waited to run (a 4.8 ms stall in that core's
/// requests). Throughput did not change measurably (ARCHITECTURE.md).
/// The kernel flag overrides the arena's `madvise`; a failure (an old
/// kernel) changes nothing else and is not an error.
pub fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_have_the_alignment_asked_for() {
        let a = Mimalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [1, 7, 8, 15, 16, 24, 40, 100, 1000, 1025, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block freed once, by us.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xAB, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed {size} {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0));
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "grown {size} {align}");
                    assert!(std::slice::from_raw_parts(grown, size)
                        .iter()
                        .all(|b| *b == 0xAB));
                    a.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
