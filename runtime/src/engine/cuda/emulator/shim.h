// optc CUDA emulator: what the generated CUDA C needs from CUDA, in host C++17, so the host's
// C++ compiler can build the kernels into a shared library that runs them on the CPU.
//
// A launch runs the grid's blocks one after another. The OPTC_BLOCK threads of a block are
// fibers (ucontext) on the calling thread: each runs until its next __syncthreads() or its end,
// in thread order, so a barrier is a round over all fibers. A block whose threads disagree on
// the number of barriers they reach (a barrier in divergent code) is reported as an error.
// __shared__ arrays are static: blocks never overlap, and launches of one library are serialized.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <ucontext.h>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

struct optc_emu_dim3 {
    unsigned int x, y, z;
};
static optc_emu_dim3 threadIdx, blockIdx, gridDim, blockDim;

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) double2 {
    double x, y;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline double2 make_double2(double x, double y) { return double2{x, y}; }
static inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}
static inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, sizeof i);
    return i;
}
static inline double __longlong_as_double(long long i) {
    double d;
    std::memcpy(&d, &i, sizeof d);
    return d;
}
static inline long long __double_as_longlong(double d) {
    long long i;
    std::memcpy(&i, &d, sizeof i);
    return i;
}

namespace optc_emu {

constexpr unsigned int kThreads = 256;
constexpr std::size_t kStack = 64 * 1024;

struct Fiber {
    ucontext_t ctx;
    bool done;
    unsigned long barriers;
};

static ucontext_t scheduler;
static Fiber fibers[kThreads];
static char* stacks = nullptr;
static unsigned int current = 0;
static void (*entry)(void*) = nullptr;
static void* entry_arg = nullptr;

static std::mutex& lock() {
    static std::mutex m;
    return m;
}

static void trampoline() {
    entry(entry_arg);
    fibers[current].done = true;
}

static void barrier() {
    Fiber& f = fibers[current];
    f.barriers += 1;
    swapcontext(&f.ctx, &scheduler);
}

// Runs block blockIdx.x; 0 on success, 2 when its threads reached different numbers of barriers.
static int run_block(unsigned int threads) {
    for (unsigned int t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks + t * kStack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, trampoline, 0);
        f.done = false;
        f.barriers = 0;
    }
    for (;;) {
        unsigned int live = 0;
        for (unsigned int t = 0; t < threads; ++t) {
            if (!fibers[t].done) {
                current = t;
                threadIdx = optc_emu_dim3{t, 0, 0};
                swapcontext(&scheduler, &fibers[t].ctx);
                live += fibers[t].done ? 0 : 1;
            }
        }
        if (live == 0) {
            return 0;
        }
        if (live != threads) {
            return 2;
        }
    }
}

template <typename... A, std::size_t... I>
static void call(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<A*>(p[I])...);
}

// Launches kernel `f` over `grid` blocks of `threads` threads with cuLaunchKernel-style
// parameters (`p[i]` points at the value of parameter i). 0: done; 1: no memory for the fiber
// stacks; 2: a barrier in divergent code.
template <typename... A>
static int launch(unsigned int grid, unsigned int threads, void (*f)(A...), void** p) {
    if (threads == 0 || threads > kThreads) {
        return 3;
    }
    std::lock_guard<std::mutex> guard(lock());
    if (stacks == nullptr) {
        stacks = static_cast<char*>(std::malloc(kThreads * kStack));
        if (stacks == nullptr) {
            return 1;
        }
    }
    struct Bound {
        void (*f)(A...);
        void** p;
    } bound{f, p};
    entry = [](void* b) {
        Bound* x = static_cast<Bound*>(b);
        call(x->f, x->p, std::index_sequence_for<A...>{});
    };
    entry_arg = &bound;
    gridDim = optc_emu_dim3{grid, 1, 1};
    blockDim = optc_emu_dim3{threads, 1, 1};
    for (unsigned int b = 0; b < grid; ++b) {
        blockIdx = optc_emu_dim3{b, 0, 0};
        const int r = run_block(threads);
        if (r != 0) {
            return r;
        }
    }
    return 0;
}

}  // namespace optc_emu

static inline void __syncthreads() { optc_emu::barrier(); }

// One exported launcher per kernel: optc_emu_launch_<kernel>(grid, threads, params).
#define OPTC_EMU_EXPORT(k)                                                                   \
    extern "C" int optc_emu_launch_##k(unsigned int grid, unsigned int threads, void** p) { \
        return optc_emu::launch(grid, threads, &k, p);                                       \
    }
