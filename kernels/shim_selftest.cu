// shim_selftest.cu: kernels that only test the CPU host shim itself (never shipped to a
// GPU by the backend; they are plain CUDA and compile with NVRTC too).

// Each round, every thread writes its slot, waits, then reads the slot of the thread
// `shift` places away. Without a real barrier a thread would read a stale or unwritten
// slot; with one, out[t] = sum over rounds of the neighbour's value.
extern "C" __global__ void umq_selftest_barrier(int* out, int rounds) {
    __shared__ int slots[1024];
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int n = blockDim.x * blockDim.y * blockDim.z;
    int total = 0;
    for (int round = 1; round <= rounds; ++round) {
        slots[t] = t * round + (int)blockIdx.x;
        __syncthreads();
        total += slots[(t + round) % n];
        __syncthreads();  // nobody overwrites a slot before everyone has read it
    }
    out[blockIdx.x * n + t] = total;
}

// Thread 0 leaves before the barrier the others wait at: undefined on a GPU, an error in
// the shim.
extern "C" __global__ void umq_selftest_divergent(int* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
