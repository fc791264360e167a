// umq_gemv.cu: Y = X · Ŵᵀ for small M (1 <= M <= 16), straight from the packed bytes.
//
// At M = 1 the 64 x 64 tile kernel (umq_matmul.cu) spends 63/64 of its work on padding
// and launches only R / 64 blocks; a GEMV is bound by reading the packed bytes once, so
// this kernel is built around that read:
//   - one warp per W row, 8 rows per block of 256 threads (grid: ceil(R / 8) blocks);
//   - the warp walks its row 64 groups (two per lane) at a time. The chunk's payload,
//     64 * (8 + k) contiguous bytes, is staged in shared memory with 16-byte vector loads
//     (aligned to 16 bytes of the data tensor, whose base the launcher aligns; up to three
//     loads per lane issued back to back, so more bytes are in flight per barrier), then
//     each lane decodes its two groups from shared memory: the mask byte drives the layout
//     (the byte of position i sits at i + popcount(mask & ((1 << i) - 1)), FORMAT §3);
//   - X is read with 16-byte vector loads too (8 activations of one group: two float4 for
//     float32, one 16-byte vector for float16/bfloat16, converted exactly to float32), and
//     every lane accumulates M float32 partial sums;
//   - the 32 partial sums of a row are reduced through shared memory (no warp shuffles:
//     the same source runs on the CPU host shim, whose only primitive is __syncthreads).
// Double-buffered staging: chunk c goes to buffer c % 2, so one barrier per chunk orders
// both "staged before decoded" and "decoded before overwritten".
//
// Arguments (row-major, contiguous, 16-byte aligned bases; validated by the launcher):
//   x     float32 / float16 / bfloat16 bit patterns [M, C]
//   data  uint8 [R, (C / 8) * (8 + k)],  mask uint8 [R, C / 8],  scale float32 [R, C / block]
//   y     float32 [M, R]
// Launch: grid (ceil(R / 8)), block (256). 1 <= M <= 16; C % 8 == 0.
// sm_90 (ptxas): 62-72 registers, no spills, 33 KB static shared memory: 3 blocks per SM,
// about 15 KB of payload loads in flight per SM per step. (Capping registers at 64 for a
// 4th block makes the bf16 variant spill.)
#include "umq_common.cuh"

#define UMQ_GEMV_MAX_M 16
#define UMQ_GEMV_THREADS 256
#define UMQ_GEMV_WARP 32
#define UMQ_GEMV_ROWS (UMQ_GEMV_THREADS / UMQ_GEMV_WARP)  // one W row per warp
#define UMQ_GEMV_LANE_GROUPS 2                               // groups a lane decodes per chunk
#define UMQ_GEMV_CHUNK (UMQ_GEMV_WARP * UMQ_GEMV_LANE_GROUPS)  // groups per warp per step
// A chunk is 64 groups of at most 16 bytes, starting up to 15 bytes into its first vector.
#define UMQ_GEMV_STAGE_VECTORS ((UMQ_GEMV_CHUNK * 2 * UMQ_GROUP + 15) / 16 + 1)

struct alignas(16) UmqVec16 {
    unsigned int a, b, c, d;
};
struct alignas(16) UmqFloat4 {
    float a, b, c, d;
};

// 8 activations of row m, columns 8g..8g+7, as float32 (exact conversions).
struct UmqLoadF32 {
    __device__ __host__ static void load(const void* x, long long first, float out[UMQ_GROUP]) {
        const UmqFloat4* p = (const UmqFloat4*)((const float*)x + first);
        const UmqFloat4 lo = p[0];
        const UmqFloat4 hi = p[1];
        out[0] = lo.a; out[1] = lo.b; out[2] = lo.c; out[3] = lo.d;
        out[4] = hi.a; out[5] = hi.b; out[6] = hi.c; out[7] = hi.d;
    }
};
template <bool Bf16>
struct UmqLoad16 {
    __device__ __host__ static void load(const void* x, long long first, float out[UMQ_GROUP]) {
        const UmqVec16 v = *(const UmqVec16*)((const unsigned short*)x + first);
        const unsigned int words[4] = {v.a, v.b, v.c, v.d};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const unsigned int low = words[i] & 0xFFFFu;  // little-endian: element 2i first
            const unsigned int high = words[i] >> 16;
            out[2 * i] = Bf16 ? umq_bf16_to_float(low) : umq_half_to_float(low);
            out[2 * i + 1] = Bf16 ? umq_bf16_to_float(high) : umq_half_to_float(high);
        }
    }
};

template <typename Load>
__device__ __forceinline__ void umq_gemv_impl(const void* __restrict__ x,
                                              const unsigned char* __restrict__ data,
                                              const unsigned char* __restrict__ mask,
                                              const float* __restrict__ scale, float* __restrict__ y,
                                              int M, int R, int C, int k, int block, int lo, int hi) {
    __shared__ UmqVec16 stage[2][UMQ_GEMV_ROWS][UMQ_GEMV_STAGE_VECTORS];
    __shared__ float partial[UMQ_GEMV_MAX_M][UMQ_GEMV_THREADS];

    // The launcher guarantees these; a wrong launch writes nothing rather than guessing.
    if (blockDim.x != UMQ_GEMV_THREADS || M < 1 || M > UMQ_GEMV_MAX_M) return;
    const int tid = threadIdx.x;
    const int warp = tid / UMQ_GEMV_WARP;
    const int lane = tid % UMQ_GEMV_WARP;
    const long long row = (long long)blockIdx.x * UMQ_GEMV_ROWS + warp;
    const bool live = row < R;  // dead warps still reach every barrier
    const long long groups = C / UMQ_GROUP;
    const long long group_bytes = UMQ_GROUP + k;
    const long long row_bytes = groups * group_bytes;
    const long long total_bytes = (long long)R * row_bytes;
    const long long scales_per_row = C / block;
    const long long row_start = (live ? row : 0) * row_bytes;

    float acc[UMQ_GEMV_MAX_M];
#pragma unroll
    for (int m = 0; m < UMQ_GEMV_MAX_M; ++m) acc[m] = 0.0f;

    int buffer = 0;
    for (long long g0 = 0; g0 < groups; g0 += UMQ_GEMV_CHUNK, buffer ^= 1) {
        // 1. Stage the chunk's bytes [start, end) with aligned 16-byte loads; a vector that
        //    would run past the tensor's last byte is copied byte by byte.
        const long long count = groups - g0 < UMQ_GEMV_CHUNK ? groups - g0 : UMQ_GEMV_CHUNK;
        const long long start = row_start + g0 * group_bytes;
        const long long end = start + count * group_bytes;
        const long long aligned = start & ~15LL;
        const int head = (int)(start - aligned);
        const int vectors = (int)((end - aligned + 15) / 16);
        UmqVec16* slot = stage[buffer][warp];
        if (live) {
            for (int v = lane; v < vectors; v += UMQ_GEMV_WARP) {
                const long long at = aligned + 16LL * v;
                if (at + 16 <= total_bytes) {
                    slot[v] = *(const UmqVec16*)(data + at);
                } else {
                    unsigned char* bytes = (unsigned char*)&slot[v];
                    for (int b = 0; b < 16; ++b) bytes[b] = at + b < total_bytes ? data[at + b] : 0;
                }
            }
        }
        __syncthreads();
        // 2. Decode this lane's groups from shared memory and accumulate M dot products.
        for (int j = 0; j < UMQ_GEMV_LANE_GROUPS; ++j) {
            const int local = lane + j * UMQ_GEMV_WARP;
            if (!live || local >= count) break;
            const long long group = g0 + local;
            float w[UMQ_GROUP];
            const unsigned char* payload = (const unsigned char*)slot + head + local * group_bytes;
            umq_decode_group(payload, mask[row * groups + group],
                             scale[row * scales_per_row + group * UMQ_GROUP / block], lo, hi, w);
#pragma unroll
            for (int m = 0; m < UMQ_GEMV_MAX_M; ++m) {
                if (m < M) {
                    float xv[UMQ_GROUP];
                    Load::load(x, (long long)m * C + group * UMQ_GROUP, xv);
#pragma unroll
                    for (int i = 0; i < UMQ_GROUP; ++i) acc[m] += xv[i] * w[i];
                }
            }
        }
    }

    // 3. Reduce the 32 partial sums of each (row, m) through shared memory.
#pragma unroll
    for (int m = 0; m < UMQ_GEMV_MAX_M; ++m) partial[m][tid] = acc[m];
    __syncthreads();
    // Thread t sums (row of warp t / M, output m = t % M): up to 8 * 16 = 128 sums.
    if (tid < UMQ_GEMV_ROWS * M) {
        const int w = tid / M;
        const int m = tid % M;
        const long long out_row = (long long)blockIdx.x * UMQ_GEMV_ROWS + w;
        if (out_row < R) {
            float sum = 0.0f;
            for (int l = 0; l < UMQ_GEMV_WARP; ++l) sum += partial[m][w * UMQ_GEMV_WARP + l];
            y[(long long)m * R + out_row] = sum;
        }
    }
}

#define UMQ_GEMV_ENTRY(name, Load)                                                              \
    extern "C" __global__ void name(const void* __restrict__ x, const unsigned char* __restrict__ data, \
                                    const unsigned char* __restrict__ mask,                      \
                                    const float* __restrict__ scale, float* __restrict__ y, int M, \
                                    int R, int C, int k, int block, int lo, int hi) {            \
        umq_gemv_impl<Load>(x, data, mask, scale, y, M, R, C, k, block, lo, hi);                 \
    }

UMQ_GEMV_ENTRY(umq_gemv_f32, UmqLoadF32)
UMQ_GEMV_ENTRY(umq_gemv_f16, UmqLoad16<false>)
UMQ_GEMV_ENTRY(umq_gemv_bf16, UmqLoad16<true>)
