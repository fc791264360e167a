// umq_common.cuh: bit-level decoders for UMQ FORMAT v1, shared by every kernel.
//
// Everything here is `__device__ __host__` and uses no CUDA header, no intrinsic type
// (no __half, no __nv_bfloat16) and no libc: the same text compiles with NVRTC for
// sm_70+ and with g++ through kernels/host_shim.h, so the CPU tests execute exactly the
// code the GPU runs. Values are built from their bit patterns, never via casts whose
// rounding or saturation differs between compilers.
#pragma once

#define UMQ_HD __device__ __host__ __forceinline__

// Lo encodings (the `lo` kernel argument): LO_KERNEL_CODES of umqcli/format.py, checked
// against these lines by tests/test_kernels_nvrtc.py.
#define UMQ_LO_FP8_E4M3 0
#define UMQ_LO_FP8_E5M2 1
#define UMQ_LO_INT8 2
// Hi encodings (the `hi` kernel argument).
#define UMQ_HI_FLOAT16 0
#define UMQ_HI_BFLOAT16 1

#define UMQ_GROUP 8

UMQ_HD float umq_bits_to_float(unsigned int bits) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(bits);
#else
    float value;
    __builtin_memcpy(&value, &bits, sizeof(value));
    return value;
#endif
}

UMQ_HD unsigned int umq_float_to_bits(float value) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(value);
#else
    unsigned int bits;
    __builtin_memcpy(&bits, &value, sizeof(bits));
    return bits;
#endif
}

UMQ_HD int umq_popcount(unsigned int x) {
#if defined(__CUDA_ARCH__)
    return __popc(x);
#else
    return __builtin_popcount(x);
#endif
}

// IEEE binary16 bits -> float32 (exact).
UMQ_HD float umq_half_to_float(unsigned int h) {
    const unsigned int sign = (h & 0x8000u) << 16;
    const unsigned int exponent = (h >> 10) & 0x1Fu;
    const unsigned int mantissa = h & 0x3FFu;
    if (exponent == 0) {
        // Subnormal (or zero): mantissa * 2^-24, exact in float32.
        const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return umq_bits_to_float(umq_float_to_bits(magnitude) | sign);
    }
    if (exponent == 0x1Fu) {  // inf / NaN keep their payload
        return umq_bits_to_float(sign | 0x7F800000u | (mantissa << 13));
    }
    return umq_bits_to_float(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}

// bfloat16 bits -> float32 (exact: bfloat16 is float32's top half).
UMQ_HD float umq_bf16_to_float(unsigned int b) { return umq_bits_to_float((b & 0xFFFFu) << 16); }

// OCP FP8 E4M3FN byte -> float32 (bias 7, no infinities, 0x7F/0xFF NaN).
UMQ_HD float umq_e4m3_to_float(unsigned int q) {
    const unsigned int sign = (q & 0x80u) << 24;
    const unsigned int exponent = (q >> 3) & 0xFu;
    const unsigned int mantissa = q & 0x7u;
    if (exponent == 0) {  // subnormal: mantissa * 2^-9
        const float magnitude = (float)mantissa * 0.001953125f;
        return umq_bits_to_float(umq_float_to_bits(magnitude) | sign);
    }
    if (exponent == 0xFu && mantissa == 0x7u) return umq_bits_to_float(sign | 0x7FC00000u);
    return umq_bits_to_float(sign | ((exponent + (127 - 7)) << 23) | (mantissa << 20));
}

// OCP FP8 E5M2 byte -> float32 (bias 15; the top byte of a binary16).
UMQ_HD float umq_e5m2_to_float(unsigned int q) { return umq_half_to_float((q & 0xFFu) << 8); }

// int8 two's complement byte -> float32.
UMQ_HD float umq_int8_to_float(unsigned int q) {
    const int value = (int)(q & 0xFFu) - ((q & 0x80u) ? 256 : 0);
    return (float)value;
}

UMQ_HD float umq_decode_lo(unsigned int q, int lo) {
    if (lo == UMQ_LO_FP8_E4M3) return umq_e4m3_to_float(q);
    if (lo == UMQ_LO_FP8_E5M2) return umq_e5m2_to_float(q);
    return umq_int8_to_float(q);
}

UMQ_HD float umq_decode_hi(unsigned int bits, int hi) {
    return hi == UMQ_HI_FLOAT16 ? umq_half_to_float(bits) : umq_bf16_to_float(bits);
}

// float32 -> binary16 bits, round to nearest even (torch / IEEE semantics: overflow to
// inf, gradual underflow, NaN stays NaN).
UMQ_HD unsigned int umq_float_to_half(float value) {
    const unsigned int bits = umq_float_to_bits(value);
    const unsigned int sign = (bits >> 16) & 0x8000u;
    const unsigned int magnitude = bits & 0x7FFFFFFFu;
    if (magnitude >= 0x7F800000u) return sign | 0x7C00u | (magnitude > 0x7F800000u ? 0x200u : 0u);
    if (magnitude >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf
    if (magnitude < 0x38800000u) {                         // below 2^-14: subnormal half
        if (magnitude < 0x33000000u) return sign;          // below 2^-25: rounds to 0
        const unsigned int exponent = magnitude >> 23;
        const unsigned int significand = (magnitude & 0x7FFFFFu) | 0x800000u;
        const unsigned int shift = 126u - exponent;        // 14..24
        unsigned int result = significand >> shift;
        const unsigned int rest = significand & ((1u << shift) - 1u);
        const unsigned int halfway = 1u << (shift - 1u);
        if (rest > halfway || (rest == halfway && (result & 1u))) result += 1u;
        return sign | result;
    }
    unsigned int result = ((magnitude >> 23) - 112u) << 10 | ((magnitude >> 13) & 0x3FFu);
    const unsigned int rest = magnitude & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (result & 1u))) result += 1u;
    return sign | result;
}

// float32 -> bfloat16 bits, round to nearest even (NaN -> canonical quiet NaN, as torch).
UMQ_HD unsigned int umq_float_to_bf16(float value) {
    const unsigned int bits = umq_float_to_bits(value);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
    return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

// Decode one group of 8 elements (FORMAT §3/§4) into float32.
//   payload: the group's first byte in umq_data (8 + k bytes)
//   mask:    the group's mask byte (bit i set <=> position i is hi)
//   scale:   the group's block scale
// A hi element is its 16-bit value; a lo element is decode(q) * scale (a float32
// product, rounded once). The byte of position i sits at i + popcount(mask & ((1<<i)-1)).
UMQ_HD void umq_decode_group(const unsigned char* payload, unsigned int mask, float scale,
                             int lo, int hi, float out[UMQ_GROUP]) {
    int offset = 0;
#pragma unroll
    for (int i = 0; i < UMQ_GROUP; ++i) {
        const unsigned int first = payload[offset];
        if (mask & (1u << i)) {
            const unsigned int bits = first | ((unsigned int)payload[offset + 1] << 8);
            out[i] = umq_decode_hi(bits, hi);
            offset += 2;
        } else {
            out[i] = umq_decode_lo(first, lo) * scale;
            offset += 1;
        }
    }
}
