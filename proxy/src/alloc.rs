//! The global allocator: mimalloc, with its arenas committed on demand.
//!
//! mimalloc spends about a fifth less CPU per proxied HTTP/2 request than glibc's malloc
//! (perf/HISTORY.md, "Allocator and workload pool"). Its default on Linux commits each arena eagerly, which
//! costs some 8 MiB of resident memory per process and would break the sidecar's 12 MiB
//! idle budget. The option must be set before mimalloc reserves its first arena, which
//! happens at the first Rust allocation, before `main`; so it is set from an ELF
//! constructor with a priority, which runs before Rust's runtime starts (std's own
//! `.init_array.00099` entry only records argv). Built with gcc, mimalloc's constructor runs
//! after ours; built with clang it runs first, which is harmless: it reads the options but
//! reserves no arena. The option is set outright rather than as a default, which holds in
//! either order (mimalloc's first read marks an option as settled, and a default set after
//! that is ignored); `MIMALLOC_ARENA_EAGER_COMMIT` therefore has no effect on the sidecar.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc.h's `mi_option_e` (show_errors, show_stats,
/// verbose, deprecated_eager_commit, arena_eager_commit): libmimalloc-sys names no constant
/// for it.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

extern "C" fn configure() {
    // SAFETY: mi_option_set writes one entry of mimalloc's static option table; it does not
    // allocate and needs no initialised heap.
    unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) };
}

/// Returns the calling thread's free memory to the system. Parsing a policy directory
/// allocates far more than the parsed set keeps, and mimalloc otherwise keeps those pages
/// resident for reuse: after loading the perf harness's 1,200 policies this returns 0.5 MiB.
pub fn release_free_memory() {
    // SAFETY: mi_collect only walks and frees the calling thread's own heap.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[used]
#[link_section = ".init_array.00200"]
static CONFIGURE: extern "C" fn() = configure;

#[cfg(test)]
mod tests {
    #[test]
    fn arenas_are_committed_on_demand() {
        // The test binary links this module too, so the constructor ran before the test
        // harness allocated anything. mimalloc's default here is 2.
        // SAFETY: reads mimalloc's option table.
        let value = unsafe { libmimalloc_sys::mi_option_get(super::ARENA_EAGER_COMMIT) };
        assert_eq!(value, 0);
    }
}
