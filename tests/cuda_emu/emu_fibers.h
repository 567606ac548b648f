// tests/cuda_emu/emu_fibers.h: the scheduler behind emu.h (included by it, after the built-ins).
//
// Every CUDA thread of a block is a fiber (ucontext) on ONE host thread; blocks run one after another.
// A fiber runs until it reaches a synchronisation point (__syncthreads, __syncwarp, a warp shuffle) or
// exits; the scheduler then releases a warp whose live lanes all wait at a warp operation, or the block
// when all its live threads wait at the same __syncthreads. Between two synchronisation points the threads
// run one after another: in even blocks (blockIdx.x + y + z) the last thread first, in odd blocks the first
// thread first, so a read missing its barrier sees the old value in one block or the other, whichever thread
// writes (a grid of one block checks one direction only). The run is deterministic.
// Reported as a launch error (never a crash): threads that can never meet (deadlock), threads at different
// __syncthreads (a barrier in divergent code), lanes of one warp at different warp operations, a shuffle
// with a partial mask or reading an exited lane, a write past the dynamic shared memory, a memory fault, an
// integer division by zero. Shared memory (dynamic and __shared__) starts NaN-filled (0xFF bytes) per block.
#pragma once

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <vector>

namespace emu {

constexpr unsigned kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;   // per fiber; mapped lazily, with a guard page below
constexpr size_t kSmemGuard = 256;           // bytes after the dynamic shared memory, checked per block
constexpr unsigned char kFill = 0xFF;        // fresh shared memory: NaN as float, -1 as int

enum class Wait : unsigned char { running, block_barrier, warp_op, exited };
enum class WarpOp : unsigned char { sync, shfl_idx, shfl_xor, shfl_up, shfl_down };
inline const char* op_name(WarpOp op) {
    static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_xor_sync", "__shfl_up_sync",
                                  "__shfl_down_sync"};
    return names[static_cast<int>(op)];
}

struct Fiber {
    ucontext_t ctx;
    Wait wait = Wait::running;
    WarpOp op = WarpOp::sync;
    unsigned mask = 0;
    int arg = 0;                       // source lane, xor mask or delta
    const char* file = nullptr;        // where the fiber waits at __syncthreads
    int line = 0;
    unsigned long long send = 0, recv = 0;
};

struct StaticShared {                  // one __shared__ variable: storage, refilled for every block
    const void* key;
    unsigned char* data;
    size_t bytes;
    unsigned long long block_serial;
};

struct Launch {
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;         // grows, reused by later launches
    ucontext_t scheduler;
    unsigned current = 0, n_threads = 0;
    bool in_fiber = false, failed = false;
    char message[1024] = {0};
    void (*body)(void**) = nullptr;
    void** args = nullptr;
    std::vector<unsigned char> dyn_smem;   // 256-aligned copy lives at dyn_base
    unsigned char* dyn_base = nullptr;
    size_t dyn_bytes = 0;
    std::vector<StaticShared> statics;
    unsigned long long block_serial = 0;
    sigjmp_buf fault_jump;
    struct sigaction old_segv, old_bus, old_fpe;   // the handlers to restore after a launch
};
inline Launch L;

// Record the first error; inside a fiber, leave it for good (the launch is abandoned).
inline void fail(const char* fmt, ...) {
    if (!L.failed) {
        L.failed = true;
        int n = snprintf(L.message, sizeof L.message, "block (%u,%u,%u) thread %u: ", blockIdx.x, blockIdx.y,
                         blockIdx.z, L.current);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(L.message + n, sizeof L.message - n, fmt, ap);
        va_end(ap);
    }
    if (L.in_fiber) swapcontext(&L.fibers[L.current].ctx, &L.scheduler);
}

// The calling fiber waits until the scheduler releases it.
inline void park(Wait w) {
    Fiber& f = L.fibers[L.current];
    f.wait = w;
    swapcontext(&f.ctx, &L.scheduler);
}

template <class T> inline T warp_op(WarpOp op, unsigned mask, T value, int arg) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled type of at most 8 bytes");
    Fiber& f = L.fibers[L.current];
    f.op = op;
    f.mask = mask;
    f.arg = arg;
    f.send = 0;
    memcpy(&f.send, &value, sizeof(T));
    park(Wait::warp_op);
    T out;
    memcpy(&out, &f.recv, sizeof(T));
    return out;
}

inline void* dynamic_smem() { return L.dyn_base; }

// The storage of one function-scope __shared__ variable (key: a static object unique to the declaration).
inline void* static_smem(const void* key, size_t bytes) {
    for (StaticShared& s : L.statics) {
        if (s.key == key) {
            if (s.block_serial != L.block_serial) {
                memset(s.data, kFill, s.bytes);
                s.block_serial = L.block_serial;
            }
            return s.data;
        }
    }
    unsigned char* data = static_cast<unsigned char*>(aligned_alloc(256, (bytes + 255) / 256 * 256));
    memset(data, kFill, bytes);
    L.statics.push_back({key, data, bytes, L.block_serial});
    return data;
}

inline void fiber_main() {
    L.body(L.args);
    L.fibers[L.current].wait = Wait::exited;   // uc_link returns to the scheduler
}

// Release the warp whose live lanes all wait at a warp operation: compute every lane's shuffle result.
inline bool release_warp(unsigned w) {
    const unsigned first = w * kWarp, end = min(first + kWarp, L.n_threads);
    int leader = -1;
    for (unsigned i = first; i < end; ++i) {
        const Fiber& f = L.fibers[i];
        if (f.wait == Wait::exited) continue;
        if (f.wait != Wait::warp_op) return false;
        if (leader < 0) leader = static_cast<int>(i);
    }
    if (leader < 0) return false;
    const Fiber& lead = L.fibers[leader];
    for (unsigned i = first; i < end; ++i) {
        Fiber& f = L.fibers[i];
        if (f.wait == Wait::exited) continue;
        L.current = i;
        if (f.op != lead.op) {
            fail("lanes of warp %u meet at different warp operations (%s in lane %u, %s in lane %u)", w,
                 op_name(lead.op), leader - first, op_name(f.op), i - first);
            return false;
        }
        if (f.mask != 0xffffffffu) {
            fail("%s with mask 0x%08x: only the full-warp mask is emulated", op_name(f.op), f.mask);
            return false;
        }
        const int lane = static_cast<int>(i - first);
        int src = lane;
        switch (f.op) {
            case WarpOp::sync: break;
            case WarpOp::shfl_idx: src = ((f.arg % 32) + 32) % 32; break;
            case WarpOp::shfl_xor: src = (lane ^ f.arg) & 31; break;
            case WarpOp::shfl_up: src = lane >= f.arg ? lane - f.arg : lane; break;
            case WarpOp::shfl_down: src = lane + f.arg < 32 ? lane + f.arg : lane; break;
        }
        const unsigned s = first + src;
        if (f.op != WarpOp::sync && (s >= end || L.fibers[s].wait == Wait::exited)) {
            fail("%s in lane %d reads lane %d, which %s (undefined on a GPU)", op_name(f.op), lane, src,
                 s >= end ? "does not exist" : "has exited");
            return false;
        }
        f.recv = L.fibers[s].send;
    }
    for (unsigned i = first; i < end; ++i) {
        if (L.fibers[i].wait == Wait::warp_op) L.fibers[i].wait = Wait::running;
    }
    return true;
}

inline void describe_deadlock() {
    unsigned at_block = 0, at_warp = 0, a = 0, b = 0;
    for (unsigned i = 0; i < L.n_threads; ++i) {
        if (L.fibers[i].wait == Wait::block_barrier && at_block++ == 0) a = i;
        if (L.fibers[i].wait == Wait::warp_op && at_warp++ == 0) b = i;
    }
    L.current = a;
    fail("deadlock: %u threads wait at __syncthreads (first: %u) while %u wait at a warp operation (first: "
         "%u, %s), so neither can complete (a barrier in divergent code?)", at_block, a, at_warp, b,
         op_name(L.fibers[b].op));
}

// All threads at __syncthreads wait at the same one (a barrier in divergent code is undefined on a GPU).
inline bool same_barrier() {
    const Fiber* first = nullptr;
    for (unsigned i = 0; i < L.n_threads; ++i) {
        const Fiber& f = L.fibers[i];
        if (f.wait != Wait::block_barrier) continue;
        if (first == nullptr) {
            first = &f;
        } else if (f.line != first->line || strcmp(f.file, first->file) != 0) {
            L.current = i;
            fail("threads wait at different __syncthreads (%s:%d in thread %u, %s:%d here): a barrier in "
                 "divergent code is undefined on a GPU", first->file, first->line,
                 static_cast<unsigned>(first - L.fibers.data()), f.file, f.line);
            return false;
        }
    }
    return true;
}

inline void set_thread_index(unsigned i) {
    threadIdx = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
}

// One block: fibers start at the kernel body; rounds run every runnable fiber (last thread first, or first
// thread first) to its next synchronisation point, then warps or the block are released. False on an error.
inline bool run_block(bool last_first) {
    for (unsigned i = 0; i < L.n_threads; ++i) {
        Fiber& f = L.fibers[i];
        f.wait = Wait::running;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = L.stacks[i] + 4096;   // the first page is the guard
        f.ctx.uc_stack.ss_size = kStackBytes - 4096;
        f.ctx.uc_link = &L.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    memset(L.dyn_base, kFill, L.dyn_bytes + kSmemGuard);
    for (;;) {
        for (unsigned j = 0; j < L.n_threads; ++j) {
            const unsigned i = last_first ? L.n_threads - 1 - j : j;
            if (L.fibers[i].wait != Wait::running) continue;
            L.current = i;
            set_thread_index(i);
            L.in_fiber = true;
            swapcontext(&L.scheduler, &L.fibers[i].ctx);
            L.in_fiber = false;
            if (L.failed) return false;
        }
        bool released = false, all_exited = true, all_at_barrier = true;
        for (unsigned w = 0; w * kWarp < L.n_threads; ++w) {
            released |= release_warp(w);
            if (L.failed) return false;
        }
        for (unsigned i = 0; i < L.n_threads; ++i) {
            all_exited &= L.fibers[i].wait == Wait::exited;
            all_at_barrier &= L.fibers[i].wait == Wait::exited || L.fibers[i].wait == Wait::block_barrier;
        }
        if (all_exited) break;
        if (!released && all_at_barrier) {
            if (!same_barrier()) return false;
            for (Fiber& f : L.fibers) {
                if (f.wait == Wait::block_barrier) f.wait = Wait::running;
            }
            released = true;
        }
        if (!released) {
            describe_deadlock();
            return false;
        }
    }
    for (size_t j = 0; j < kSmemGuard; ++j) {
        if (L.dyn_base[L.dyn_bytes + j] != kFill) {
            fail("wrote past the end of the %zu bytes of dynamic shared memory (byte %zu)", L.dyn_bytes,
                 L.dyn_bytes + j);
            return false;
        }
    }
    return true;
}

// A memory fault or an integer division by zero inside a fiber: abandon the launch with a message.
inline void on_fault(int sig, siginfo_t* info, void*) {
    if (!L.in_fiber) {   // not the kernel's fault: the previous handler (Python's faulthandler) reports it
        sigaction(sig, sig == SIGSEGV ? &L.old_segv : sig == SIGBUS ? &L.old_bus : &L.old_fpe, nullptr);
        return;
    }
    L.in_fiber = false;
    fail(sig == SIGFPE ? "arithmetic fault (integer division by zero?) at %p" :
                         "memory fault at address %p (an out-of-bounds access, or a fiber stack overflow)",
         info->si_addr);
    siglongjmp(L.fault_jump, 1);
}

// __syncthreads() at file:line.
inline void sync_block(const char* file, int line) {
    L.fibers[L.current].file = file;
    L.fibers[L.current].line = line;
    park(Wait::block_barrier);
}

}  // namespace emu

// Run body(args) on a grid of blocks. Returns 0, or 1 with the error message in `error`.
extern "C" int emu_launch(void (*body)(void**), void** args, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned by, unsigned bz, unsigned long long smem_bytes, char* error,
                          unsigned long long error_len) {
    using namespace emu;
    L.failed = false;
    L.message[0] = 0;
    L.body = body;
    L.args = args;
    gridDim = dim3{gx, gy, gz};
    blockDim = dim3{bx, by, bz};
    blockIdx = uint3{0, 0, 0};
    L.n_threads = bx * by * bz;
    L.fibers.assign(L.n_threads, Fiber());
    while (L.stacks.size() < L.n_threads) {
        void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) {
            snprintf(error, error_len, "emulator: cannot map a fiber stack");
            return 1;
        }
        mprotect(p, 4096, PROT_NONE);
        L.stacks.push_back(static_cast<char*>(p));
    }
    L.dyn_bytes = smem_bytes;
    L.dyn_smem.assign(smem_bytes + kSmemGuard + 256, kFill);
    const uintptr_t raw = reinterpret_cast<uintptr_t>(L.dyn_smem.data());
    L.dyn_base = L.dyn_smem.data() + ((256 - raw % 256) % 256);

    // Faults inside a fiber come back here (on an alternate stack: the fiber's own may be the problem).
    static std::vector<char> alt(1 << 16);
    stack_t alt_new{}, alt_old{};
    alt_new.ss_sp = alt.data();
    alt_new.ss_size = alt.size();
    sigaltstack(&alt_new, &alt_old);
    struct sigaction act{};
    act.sa_sigaction = on_fault;
    act.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&act.sa_mask);
    sigaction(SIGSEGV, &act, &L.old_segv);
    sigaction(SIGBUS, &act, &L.old_bus);
    sigaction(SIGFPE, &act, &L.old_fpe);
    if (sigsetjmp(L.fault_jump, 1) == 0) {
        for (unsigned z = 0; z < gz && !L.failed; ++z)
            for (unsigned y = 0; y < gy && !L.failed; ++y)
                for (unsigned x = 0; x < gx && !L.failed; ++x) {
                    blockIdx = uint3{x, y, z};
                    ++L.block_serial;
                    run_block((x + y + z) % 2 == 0);   // even blocks last thread first, odd ones first first
                }
    }
    L.in_fiber = false;
    sigaction(SIGSEGV, &L.old_segv, nullptr);
    sigaction(SIGBUS, &L.old_bus, nullptr);
    sigaction(SIGFPE, &L.old_fpe, nullptr);
    sigaltstack(&alt_old, nullptr);
    if (L.failed) snprintf(error, error_len, "%s", L.message);
    return L.failed ? 1 : 0;
}
