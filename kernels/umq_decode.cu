// umq_decode.cu: packed UMQ v1 tensor -> dense matrix, bit-exact with codec.dequantize.
//
// One thread per group of 8 (grid-stride loop, so any grid covers any size): read the
// mask byte, the group's 8 + k payload bytes and its block scale, decode in registers,
// write 8 outputs. Three entry points differ only in the output dtype; float16 and
// bfloat16 outputs are written as their 16-bit patterns (round to nearest even from
// the float32 value, exactly like torch's `.to(dtype)`).
//
// Arguments (all row-major, contiguous; validated by the launcher before a launch):
//   data  uint8   [rows, groups * (8 + k)]
//   mask  uint8   [rows, groups]
//   scale float32 [rows, cols / block]
//   out   float32 or uint16 bit patterns [rows, cols]
#include "umq_common.cuh"

template <typename Store>
__device__ __forceinline__ void umq_decode_impl(const unsigned char* __restrict__ data,
                                                const unsigned char* __restrict__ mask,
                                                const float* __restrict__ scale, int rows,
                                                int cols, int k, int block, int lo, int hi,
                                                Store store) {
    const long long groups_per_row = cols / UMQ_GROUP;
    const long long total = (long long)rows * groups_per_row;
    const long long group_bytes = UMQ_GROUP + k;
    const long long scales_per_row = cols / block;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x; index < total;
         index += stride) {
        const long long row = index / groups_per_row;
        const long long group = index - row * groups_per_row;
        const float group_scale = scale[row * scales_per_row + group * UMQ_GROUP / block];
        float values[UMQ_GROUP];
        umq_decode_group(data + row * groups_per_row * group_bytes + group * group_bytes,
                         mask[index], group_scale, lo, hi, values);
        const long long first = row * cols + group * UMQ_GROUP;
#pragma unroll
        for (int i = 0; i < UMQ_GROUP; ++i) store(first + i, values[i]);
    }
}

struct UmqStoreF32 {
    float* out;
    __device__ __host__ void operator()(long long i, float v) const { out[i] = v; }
};
struct UmqStoreF16 {
    unsigned short* out;
    __device__ __host__ void operator()(long long i, float v) const {
        out[i] = (unsigned short)umq_float_to_half(v);
    }
};
struct UmqStoreBF16 {
    unsigned short* out;
    __device__ __host__ void operator()(long long i, float v) const {
        out[i] = (unsigned short)umq_float_to_bf16(v);
    }
};

extern "C" __global__ void umq_decode_f32(const unsigned char* __restrict__ data,
                                          const unsigned char* __restrict__ mask,
                                          const float* __restrict__ scale, float* __restrict__ out,
                                          int rows, int cols, int k, int block, int lo, int hi) {
    umq_decode_impl(data, mask, scale, rows, cols, k, block, lo, hi, UmqStoreF32{out});
}

extern "C" __global__ void umq_decode_f16(const unsigned char* __restrict__ data,
                                          const unsigned char* __restrict__ mask,
                                          const float* __restrict__ scale,
                                          unsigned short* __restrict__ out, int rows, int cols,
                                          int k, int block, int lo, int hi) {
    umq_decode_impl(data, mask, scale, rows, cols, k, block, lo, hi, UmqStoreF16{out});
}

extern "C" __global__ void umq_decode_bf16(const unsigned char* __restrict__ data,
                                           const unsigned char* __restrict__ mask,
                                           const float* __restrict__ scale,
                                           unsigned short* __restrict__ out, int rows, int cols,
                                           int k, int block, int lo, int hi) {
    umq_decode_impl(data, mask, scale, rows, cols, k, block, lo, hi, UmqStoreBF16{out});
}
