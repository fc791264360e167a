// host_shim.h: run the UNMODIFIED kernels/*.cu sources on the CPU, compiled by g++.
//
// CUDA's execution model, just enough of it for the UMQ kernels:
//   - __global__/__device__/__host__/__forceinline__/__restrict__ become plain C++;
//   - __shared__ becomes `static`: blocks run one after another, and all the threads of
//     the running block see the same storage, as on the GPU;
//   - every CUDA thread of a block is a fiber (ucontext) with its own stack and its own
//     threadIdx; blockIdx/blockDim/gridDim belong to the running launch;
//   - __syncthreads() is a real barrier: the fiber parks and the scheduler runs every
//     other fiber of the block up to the same barrier (or to its end) before any fiber
//     continues. A block whose threads disagree on the number of barriers is reported
//     as an error (on a GPU it hangs or corrupts), never silently accepted.
// Fibers switch in user space, so a 64 x 256 x 128 tiled matmul runs in a fraction of a
// second; one OS thread per CUDA thread would be several times slower.
#pragma once

#include <ucontext.h>

#include <cstddef>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct dim3 {
    unsigned int x, y, z;
    dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned int x, y, z;
};

namespace umq_shim {

enum FiberState { kRunnable, kAtBarrier, kDone };

// Kernels' locals are small (a few hundred bytes); 64 KiB leaves ample headroom.
constexpr std::size_t kStackBytes = 64 * 1024;

struct Fiber {
    ucontext_t context;
    uint3 thread_idx;
    FiberState state;
    std::unique_ptr<char[]> stack;
};

struct Launch {
    dim3 grid, block;
    uint3 block_idx;
    std::vector<Fiber> fibers;
    std::size_t current = 0;
    ucontext_t scheduler;
    std::function<void()> body;
};

inline Launch*& active() {
    static Launch* launch = nullptr;
    return launch;
}

inline void fiber_entry() {
    Launch* launch = active();
    launch->body();
    launch->fibers[launch->current].state = kDone;
    // Returning resumes uc_link, the scheduler.
}

inline void barrier() {
    Launch* launch = active();
    Fiber& fiber = launch->fibers[launch->current];
    fiber.state = kAtBarrier;
    swapcontext(&fiber.context, &launch->scheduler);
}

enum LaunchStatus { kOk = 0, kBarrierDivergence = 2, kBadConfig = 3 };

// Run `body` (the kernel call) for every thread of every block of the grid.
inline int launch(dim3 grid, dim3 block, std::function<void()> body) {
    const std::size_t threads = (std::size_t)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) return kBadConfig;
    Launch state;
    state.grid = grid;
    state.block = block;
    state.body = std::move(body);
    state.fibers.resize(threads);
    for (Fiber& fiber : state.fibers) fiber.stack.reset(new char[kStackBytes]);
    Launch* previous = active();
    active() = &state;
    int status = kOk;
    for (unsigned int bz = 0; bz < grid.z && status == kOk; ++bz)
        for (unsigned int by = 0; by < grid.y && status == kOk; ++by)
            for (unsigned int bx = 0; bx < grid.x && status == kOk; ++bx) {
                state.block_idx = uint3{bx, by, bz};
                for (std::size_t t = 0; t < threads; ++t) {
                    Fiber& fiber = state.fibers[t];
                    fiber.thread_idx = uint3{(unsigned int)(t % block.x),
                                             (unsigned int)((t / block.x) % block.y),
                                             (unsigned int)(t / ((std::size_t)block.x * block.y))};
                    fiber.state = kRunnable;
                    getcontext(&fiber.context);
                    fiber.context.uc_stack.ss_sp = fiber.stack.get();
                    fiber.context.uc_stack.ss_size = kStackBytes;
                    fiber.context.uc_link = &state.scheduler;
                    makecontext(&fiber.context, fiber_entry, 0);
                }
                // One pass runs every live fiber to its next barrier or to its end.
                for (;;) {
                    for (std::size_t t = 0; t < threads; ++t) {
                        if (state.fibers[t].state == kDone) continue;
                        state.fibers[t].state = kRunnable;
                        state.current = t;
                        swapcontext(&state.scheduler, &state.fibers[t].context);
                    }
                    std::size_t done = 0;
                    for (const Fiber& fiber : state.fibers) done += fiber.state == kDone;
                    if (done == threads) break;
                    if (done != 0) {  // some threads left while others wait at a barrier
                        status = kBarrierDivergence;
                        break;
                    }
                }
            }
    active() = previous;
    return status;
}

}  // namespace umq_shim

#define threadIdx (::umq_shim::active()->fibers[::umq_shim::active()->current].thread_idx)
#define blockIdx (::umq_shim::active()->block_idx)
#define blockDim (::umq_shim::active()->block)
#define gridDim (::umq_shim::active()->grid)

inline void __syncthreads() { ::umq_shim::barrier(); }
