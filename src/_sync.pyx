"""A counter one thread advances and another waits for by spinning, the GIL released
(``npapprox.parallel``'s hand-over between the calling thread and its workers).

Waking a thread blocked on a lock costs tens of microseconds (a futex wake, on a
virtual machine an interrupt to a halted virtual CPU), as long as a BN pass on one
core's share of a tensor. A thread that polls a counter in memory sees it change
within a fraction of a microsecond, at the price of its core while it polls: so a
waiter polls for a bounded time, then falls back to blocking (the caller's job).
"""

from libc.stdint cimport int64_t


cdef extern from *:
    """
    #include <stdint.h>
    #if defined(_WIN32)
    #include <windows.h>
    static double npa_now(void) {
        LARGE_INTEGER c, f;
        QueryPerformanceCounter(&c);
        QueryPerformanceFrequency(&f);
        return (double)c.QuadPart / (double)f.QuadPart;
    }
    #else
    #include <time.h>
    static double npa_now(void) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
    }
    #endif
    #if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
    #include <immintrin.h>
    #define NPA_PAUSE() _mm_pause()
    #elif defined(__aarch64__) && !defined(_MSC_VER)
    #define NPA_PAUSE() __asm__ __volatile__("yield")
    #else
    #define NPA_PAUSE() ((void)0)
    #endif
    #if defined(_MSC_VER)
    #define NPA_LOAD(p) InterlockedCompareExchange64((volatile LONG64 *)(p), 0, 0)
    #define NPA_STORE(p, v) InterlockedExchange64((volatile LONG64 *)(p), (v))
    #else
    #define NPA_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define NPA_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
    #endif

    /* Poll *p until it equals v (-> 1) or `seconds` have passed (-> 0); the clock
       is read every 64 polls. */
    static int npa_spin_until(int64_t *p, int64_t v, double seconds) {
        double end = npa_now() + seconds;
        int k;
        for (;;) {
            for (k = 0; k < 64; k++) {
                if (NPA_LOAD(p) == v) return 1;
                NPA_PAUSE();
            }
            if (npa_now() > end) return NPA_LOAD(p) == v;
        }
    }
    """
    int64_t NPA_LOAD(int64_t* p) nogil
    void NPA_STORE(int64_t* p, int64_t v) nogil
    int npa_spin_until(int64_t* p, int64_t v, double seconds) nogil


cdef class Counter:
    """An int64 in memory: ``set`` stores with release order, ``value`` and ``wait``
    load with acquire order, so what the setter wrote before ``set`` is visible to a
    thread once ``wait`` has seen the value."""
    cdef int64_t v

    @property
    def value(self):
        return NPA_LOAD(&self.v)

    def set(self, int64_t v):
        NPA_STORE(&self.v, v)

    def set_then_wait(self, int64_t v, Counter other, int64_t w, double seconds):
        """``set(v)`` with the GIL already released, then ``other.wait(w, seconds)``: a
        thread waiting for this counter never finds the GIL held by the setter."""
        cdef int seen
        with nogil:
            NPA_STORE(&self.v, v)
            seen = npa_spin_until(&other.v, w, seconds)
        return bool(seen)

    def wait(self, int64_t v, double seconds):
        """Poll, the GIL released, until the value is ``v`` (-> True) or ``seconds``
        have passed (-> False, at once when ``seconds <= 0`` and the value differs)."""
        cdef int seen
        if NPA_LOAD(&self.v) == v:
            return True
        if seconds <= 0:
            return False
        with nogil:
            seen = npa_spin_until(&self.v, v, seconds)
        return bool(seen)
