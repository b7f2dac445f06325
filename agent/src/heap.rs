//! The agent's use of the C allocator: how many heaps it keeps and when it hands freed memory
//! back to the kernel. An agent at rest holds the tables of its watches; what it allocates to
//! decode a relist or to compile policies is freed right after, and without these calls glibc's
//! allocator would keep those pages resident. (musl's allocator, in the image, unmaps freed
//! memory itself; both calls do nothing there.)

/// One heap for the whole process instead of glibc's default of up to eight per CPU. The agent's
/// threads allocate little concurrently (per-thread caches serve the small allocations), and
/// each extra heap keeps its own high-water mark resident: with one, the same 10,000 Services
/// hold 3-4 MiB less. Call before the async runtime starts its threads.
pub fn use_one_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns the heap's free pages to the kernel, after a piece of work that freed most of what
/// it allocated (a full sync of every Service, a policy compile over every Pod).
pub fn give_back_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
