// umq_matmul.cu: fused Y = X · Ŵᵀ straight from the packed UMQ v1 bytes.
//
// Ŵ is never materialised in global memory. Each block computes one 64 x 64 tile of Y
// (64 rows of X by 64 rows of W) with 256 threads, stepping through the input columns
// 32 at a time (4 groups):
//   1. the X sub-tile [64, 32] is copied to shared memory (coalesced, zero-padded);
//   2. each thread decodes ONE group of the W sub-tile [64 rows, 4 groups]: its mask
//      byte, its 8 + k payload bytes and its block scale are read from global memory
//      exactly once per output tile, decoded in registers (hi: 16-bit value; lo:
//      decode(q) * scale in float32) and stored as float32 in shared memory. The seed's
//      X·(M⊙W)ᵀ + X·((1−M)⊙W)ᵀ is thereby one pass over one tile;
//   3. every thread accumulates a 4 x 4 micro-tile in float32 registers.
// Thread (tx, ty) owns rows ty + 16 i and columns tx + 16 j of the tile, so a warp's
// shared-memory reads are conflict-free (consecutive tx) or broadcasts (same ty).
//
// Arguments (row-major, contiguous; validated by the launcher before a launch):
//   x     float32 [M, C]
//   data  uint8   [R, (C / 8) * (8 + k)],  mask uint8 [R, C / 8],  scale float32 [R, C / block]
//   y     float32 [M, R]
// Launch: grid (ceil(R / 64), ceil(M / 64)), block (256). Any M, R >= 1; C % 8 == 0.
#include "umq_common.cuh"

#define UMQ_TILE_M 64
#define UMQ_TILE_N 64
#define UMQ_TILE_K 32
#define UMQ_THREADS 256
#define UMQ_MICRO 4  // outputs per thread along each tile axis: 64 / 16

extern "C" __global__ void umq_matmul_f32(const float* __restrict__ x,
                                          const unsigned char* __restrict__ data,
                                          const unsigned char* __restrict__ mask,
                                          const float* __restrict__ scale, float* __restrict__ y,
                                          int M, int R, int C, int k, int block, int lo, int hi) {
    // +1 column of padding: the column-major stores of step 1 hit 32 different banks.
    __shared__ float x_tile[UMQ_TILE_K][UMQ_TILE_M + 1];
    __shared__ float w_tile[UMQ_TILE_K][UMQ_TILE_N + 1];

    if (blockDim.x != UMQ_THREADS) return;  // the launcher always uses 256; never guess
    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const long long m0 = (long long)blockIdx.y * UMQ_TILE_M;
    const long long n0 = (long long)blockIdx.x * UMQ_TILE_N;
    const long long groups_per_row = C / UMQ_GROUP;
    const long long group_bytes = UMQ_GROUP + k;
    const long long scales_per_row = C / block;

    // The group this thread decodes in every step: row n0 + w_row, group w_group of the step.
    const int w_row = tid % UMQ_TILE_N;
    const int w_group = tid / UMQ_TILE_N;  // 0..3
    const long long n_decode = n0 + w_row;
    const long long n_safe = n_decode < R ? n_decode : 0;  // no pointer past the end
    const unsigned char* row_data = data + n_safe * groups_per_row * group_bytes;
    const unsigned char* row_mask = mask + n_safe * groups_per_row;
    const float* row_scale = scale + n_safe * scales_per_row;

    float acc[UMQ_MICRO][UMQ_MICRO];
#pragma unroll
    for (int i = 0; i < UMQ_MICRO; ++i)
#pragma unroll
        for (int j = 0; j < UMQ_MICRO; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < C; k0 += UMQ_TILE_K) {
        // 1. X sub-tile: 64 x 32 floats, 8 per thread, consecutive threads read consecutive columns.
#pragma unroll
        for (int step = 0; step < (UMQ_TILE_M * UMQ_TILE_K) / UMQ_THREADS; ++step) {
            const int index = step * UMQ_THREADS + tid;
            const int r = index / UMQ_TILE_K;
            const int c = index % UMQ_TILE_K;
            const long long m = m0 + r;
            const int col = k0 + c;
            x_tile[c][r] = (m < M && col < C) ? x[m * C + col] : 0.0f;
        }
        // 2. W sub-tile: one group per thread, decoded in registers.
        {
            const long long group = k0 / UMQ_GROUP + w_group;
            float values[UMQ_GROUP];
            if (n_decode < R && group < groups_per_row) {
                umq_decode_group(row_data + group * group_bytes, row_mask[group],
                                 row_scale[group * UMQ_GROUP / block], lo, hi, values);
            } else {
#pragma unroll
                for (int i = 0; i < UMQ_GROUP; ++i) values[i] = 0.0f;
            }
#pragma unroll
            for (int i = 0; i < UMQ_GROUP; ++i) w_tile[w_group * UMQ_GROUP + i][w_row] = values[i];
        }
        __syncthreads();
        // 3. float32 accumulation of the 4 x 4 micro-tile.
#pragma unroll 8
        for (int kk = 0; kk < UMQ_TILE_K; ++kk) {
            float a[UMQ_MICRO];
            float b[UMQ_MICRO];
#pragma unroll
            for (int i = 0; i < UMQ_MICRO; ++i) a[i] = x_tile[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < UMQ_MICRO; ++j) b[j] = w_tile[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < UMQ_MICRO; ++i)
#pragma unroll
                for (int j = 0; j < UMQ_MICRO; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();  // the next step overwrites the tiles
    }

#pragma unroll
    for (int i = 0; i < UMQ_MICRO; ++i) {
        const long long m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < UMQ_MICRO; ++j) {
            const long long n = n0 + tx + 16 * j;
            if (n < R) y[m * R + n] = acc[i][j];
        }
    }
}
