// host_shim.cpp: a shared library that runs the kernels of kernels/*.cu on the CPU.
//
// Build: g++ -std=c++17 -O2 -ffp-contract=off -shared -fPIC host_shim.cpp -o libumq_shim.so
// (umqcli/backends/host_shim.py does this, once per test session). The one entry point
// mirrors cuLaunchKernel: a kernel name, grid and block sizes, and an array of pointers
// to the argument values. -ffp-contract=off keeps every float32 product and sum rounded
// on its own, as the decode contract (decode(q) * scale, one rounding) requires.
#include "host_shim.h"

#include <cstring>
#include <type_traits>
#include <utility>

#include "umq_decode.cu"
#include "umq_matmul.cu"
#include "umq_gemv.cu"
#include "shim_selftest.cu"

namespace {

template <typename... Args, std::size_t... I>
void call_with(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<Args>*>(args[I])...);
}

template <typename... Args>
int run(void (*kernel)(Args...), dim3 grid, dim3 block, void** args) {
    return umq_shim::launch(grid, block, [kernel, args] {
        call_with(kernel, args, std::index_sequence_for<Args...>{});
    });
}

struct KernelEntry {
    const char* name;
    int (*launch)(dim3, dim3, void**);
};

#define UMQ_SHIM_KERNEL(fn) \
    KernelEntry { #fn, [](dim3 g, dim3 b, void** a) { return run(fn, g, b, a); } }

const KernelEntry kKernels[] = {
    UMQ_SHIM_KERNEL(umq_decode_f32),
    UMQ_SHIM_KERNEL(umq_decode_f16),
    UMQ_SHIM_KERNEL(umq_decode_bf16),
    UMQ_SHIM_KERNEL(umq_matmul_f32),
    UMQ_SHIM_KERNEL(umq_gemv_f32),
    UMQ_SHIM_KERNEL(umq_gemv_f16),
    UMQ_SHIM_KERNEL(umq_gemv_bf16),
    UMQ_SHIM_KERNEL(umq_selftest_barrier),
    UMQ_SHIM_KERNEL(umq_selftest_divergent),
};

}  // namespace

// 0 ok, 1 unknown kernel, 2 barrier divergence, 3 bad launch configuration.
extern "C" int umq_shim_launch(const char* name, unsigned int gx, unsigned int gy, unsigned int gz,
                               unsigned int bx, unsigned int by, unsigned int bz, void** args) {
    for (const KernelEntry& entry : kKernels)
        if (std::strcmp(entry.name, name) == 0) return entry.launch(dim3(gx, gy, gz), dim3(bx, by, bz), args);
    return 1;
}
