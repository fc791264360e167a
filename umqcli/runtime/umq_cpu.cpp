// Fused CPU decode-matmul and decode for UMQ FORMAT v1 (shared/FORMAT.md), loaded by
// umqcli/runtime/__init__.py through ctypes. Plain C ABI, raw pointers, no torch headers:
// it compiles in about a second with g++ and links the OpenMP runtime torch already
// loaded (same soname), so threads are shared with torch.
//
// Paths (chosen at run time by the caller, each forceable):
//   ISA_SCALAR: portable C++, per-element tables; the reference twin of the SIMD path.
//   ISA_AVX2:   AVX2 + FMA + F16C. One group of 8 weights is one 16-byte load; one
//               `vpshufb` with a per-mask-byte table (256 entries) puts each lo code in
//               the top byte of its 32-bit lane and each hi pattern in the low half of
//               its lane (int8 and fp8 lo and bfloat16 hi are then a shift or two away;
//               float16 hi takes a conversion after a second, 128-bit shuffle), so a
//               group decodes in ~6 instructions with no branch on the mask. The matmul
//               reads fp8 codes as float32 bit fields unless the thread flushes denormals.
//   An AVX-512 VBMI2 (`vpexpandb`) variant was built and measured slower on Zen 4
//   (docs/runtime.md), so there is none.
// Every decoded weight equals codec.dequantize's float32 value: lo = decode(q) * scale as
// one float32 product, hi exact. Only the summation order of the matmul differs.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define UMQ_X86 1
#endif

namespace {

enum Lo { LO_E4M3 = 0, LO_E5M2 = 1, LO_INT8 = 2 };
enum Hi { HI_F16 = 0, HI_BF16 = 1 };
enum Out { OUT_F32 = 0, OUT_F16 = 1, OUT_BF16 = 2 };
enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1 };

// ------------------------------------------------------------------ scalar conversions

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

float half_to_float(uint16_t h) {  // exact, subnormals and inf included
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));
  if (exp == 0) {
    float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t float_to_half(float f) {  // round to nearest even, as torch's .to(float16)
  uint32_t x = float_to_bits(f), sign = (x >> 16) & 0x8000;
  uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return uint16_t(sign | 0x7C00 | (a > 0x7F800000u ? 0x200 : 0));
  if (a >= 0x477FF000u) return uint16_t(sign | 0x7C00);  // rounds past 65504
  if (a < 0x38800000u) {  // result is subnormal (or zero): exact rounding via float add
    float v = bits_to_float(a) + 0.5f;  // 0.5 = 2^-1: ulp of v is 2^-24, the fp16 subnormal step
    return uint16_t(sign | (float_to_bits(v) - 0x3F000000u));
  }
  uint32_t odd = (a >> 13) & 1;
  a += 0xC8000FFFu + odd;  // rebias exponent (-112 << 23) and round
  return uint16_t(sign | (a >> 13));
}

uint16_t float_to_bf16(float f) {  // round to nearest even
  uint32_t x = float_to_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((x >> 16) | 0x40);
  return uint16_t((x + 0x7FFFu + ((x >> 16) & 1)) >> 16);
}

float lo_value(int lo, uint8_t q) {
  if (lo == LO_INT8) return float(int8_t(q));
  if (lo == LO_E5M2) return half_to_float(uint16_t(q) << 8);
  // e4m3fn: the fp16 pattern below is value * 2^-8 for normals and subnormals alike
  uint16_t h = uint16_t(((q & 0x7F) << 7) | ((q & 0x80) << 8));
  return half_to_float(h) * 256.0f;
}

float hi_value(int hi, uint16_t bits) {
  return hi == HI_BF16 ? bits_to_float(uint32_t(bits) << 16) : half_to_float(bits);
}

// ------------------------------------------------------------------ tables

struct Tables {
  uint8_t offset[256][8];       // byte offset of position i inside a group (FORMAT §3)
  float lo[3][256];             // lo byte -> decode(q)
  alignas(16) uint8_t lo8[256][16];   // int8 lo: code into byte i, 0 elsewhere
  alignas(16) uint8_t lo16[256][16];  // fp8 lo: code into the high byte of word i, 0 elsewhere
  alignas(16) uint8_t hi16[256][16];  // f16 hi: pattern into word i
  alignas(32) uint32_t hi_lanes[256][8];  // all-ones in the lanes of hi positions
  // int8 lo (+ bfloat16 hi) from one 256-bit shuffle of the group broadcast to both
  // lanes: lo code into the top byte of dword i (srai 24 -> the int8 value, 0 in hi lanes),
  // a hi pattern into its low half (slli 16 -> the bfloat16 as float32, 0 in lo lanes).
  alignas(32) uint8_t lo_hi32[256][32];
  uint8_t popcount[256];
};

Tables make_tables() {
  Tables t;
  std::memset(&t, 0, sizeof t);
  for (int m = 0; m < 256; ++m) {
    int before = 0;
    std::memset(t.lo8[m], 0x80, 16);
    std::memset(t.lo16[m], 0x80, 16);
    std::memset(t.hi16[m], 0x80, 16);
    std::memset(t.lo_hi32[m], 0x80, 32);
    for (int i = 0; i < 8; ++i) {
      uint8_t off = uint8_t(i + before);
      t.offset[m][i] = off;
      if ((m >> i) & 1) {
        t.hi16[m][2 * i] = off;
        t.hi16[m][2 * i + 1] = uint8_t(off + 1);
        t.hi_lanes[m][i] = 0xFFFFFFFFu;
        t.lo_hi32[m][4 * i] = off;
        t.lo_hi32[m][4 * i + 1] = uint8_t(off + 1);
        ++before;
      } else {
        t.lo_hi32[m][4 * i + 3] = off;
        t.lo8[m][i] = off;
        t.lo16[m][2 * i + 1] = off;
      }
    }
    t.popcount[m] = uint8_t(before);
  }
  for (int q = 0; q < 256; ++q)
    for (int lo = 0; lo < 3; ++lo) t.lo[lo][q] = lo_value(lo, uint8_t(q));
  return t;
}

const Tables T = make_tables();

// A problem: the stored tensors of one packed weight and what to do with them.
struct Packed {
  const uint8_t* data;   // [R, G*(8+k)]
  const uint8_t* mask;   // [R, G]
  const float* scale;    // [R, C/block]
  int64_t rows, cols;
  int k, block, lo, hi;
  int64_t groups() const { return cols / 8; }
  int64_t group_bytes() const { return 8 + k; }
  int64_t row_bytes() const { return groups() * group_bytes(); }
  int64_t blocks() const { return cols / block; }
};

// Where y[m, r] goes: float32 accumulator + bias[r] (float32/float16/bfloat16, or none),
// rounded once to the output dtype (float32, or float16/bfloat16 to nearest even, as torch's
// `.to()` of the float32 sum).
struct Epilogue {
  void* y;                  // [M, R] with row stride ldy elements of y_kind
  int y_kind;
  int64_t ldy;
  const void* bias;         // [R] or nullptr
  int bias_kind;
  inline float bias_at(int64_t r) const {
    if (bias == nullptr) return 0.0f;
    if (bias_kind == OUT_F32) return static_cast<const float*>(bias)[r];
    const uint16_t b = static_cast<const uint16_t*>(bias)[r];
    return bias_kind == OUT_F16 ? half_to_float(b) : bits_to_float(uint32_t(b) << 16);
  }
  inline void store(int64_t m, int64_t r, float acc) const {
    const float v = acc + bias_at(r);
    const int64_t i = m * ldy + r;
    if (y_kind == OUT_F32) static_cast<float*>(y)[i] = v;
    else static_cast<uint16_t*>(y)[i] = y_kind == OUT_F16 ? float_to_half(v) : float_to_bf16(v);
  }
  // The epilogue of activation rows [m0, ...).
  Epilogue rows_from(int64_t m0) const {
    Epilogue e = *this;
    e.y = static_cast<char*>(y) + m0 * ldy * (y_kind == OUT_F32 ? 4 : 2);
    return e;
  }
};

// ------------------------------------------------------------------ scalar path

// The 8 weights of one group into w[8]; positions a too-full mask would place beyond the
// group's gb bytes decode to 0 (no byte outside the group is read).
inline void group_scalar(const uint8_t* src, unsigned m, int gb, int lo, int hi, float s, float* w) {
  for (int i = 0; i < 8; ++i) {
    const int off = T.offset[m][i];
    if ((m >> i) & 1)
      w[i] = off + 1 < gb ? hi_value(hi, uint16_t(src[off] | (src[off + 1] << 8))) : 0.0f;
    else
      w[i] = off < gb ? T.lo[lo][src[off]] * s : 0.0f;
  }
}

void decode_row_scalar(const Packed& p, int64_t r, float* out) {
  const uint8_t* d = p.data + r * p.row_bytes();
  const uint8_t* mk = p.mask + r * p.groups();
  const float* sc = p.scale + r * p.blocks();
  const int gb = int(p.group_bytes());
  for (int64_t g = 0; g < p.groups(); ++g)
    group_scalar(d + g * gb, mk[g], gb, p.lo, p.hi, sc[(g * 8) / p.block], out + g * 8);
}

// y[m, r] for rows [r0, r1), m < M: decode one row into `buf` [C], then dot products.
void gemv_rows_scalar(const Packed& p, const float* x, int64_t M, int64_t ldx, const Epilogue& ep,
                      int64_t r0, int64_t r1, float* buf) {
  for (int64_t r = r0; r < r1; ++r) {
    decode_row_scalar(p, r, buf);
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      float acc = 0.0f;
      for (int64_t c = 0; c < p.cols; ++c) acc += buf[c] * xm[c];
      ep.store(m, r, acc);
    }
  }
}

// ------------------------------------------------------------------ AVX2 path

#ifdef UMQ_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

// Eight weights of one group as float32. `src` points at the group and has 16 readable
// bytes. `sv` is the block scale times the lo path's fold factor. EXACT: hi and lo lanes
// are blended (keeps the sign of zeros, for decode); otherwise lo*s + hi with hi = +0 in
// lo lanes and lo = 0 in hi lanes (one fma, equal values, used by the matmul).
// FP8_BITS (fp8 lo only): the code goes from the top byte of its lane straight into a
// float32's sign, exponent and mantissa fields, value * 2^-120 (e4m3) or 2^-112 (e5m2)
// (subnormal codes become float32 denormals; e5m2's inf and NaN codes, which FORMAT §7
// refuses, become finite), which spares the float16 conversion and, with bfloat16 hi, the
// second shuffle; `sv` then carries the power of two back. Only where denormals are not
// treated as zero (see denormals_are_zero).
template <int LO, int HI, bool HAS_HI, bool EXACT, bool FP8_BITS = false>
inline __m256 group_avx2(const uint8_t* src, unsigned m, __m256 sv) {
  // The group in both 128-bit lanes: vbroadcasti128 from memory costs no shuffle.
  const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m128i raw = _mm256_castsi256_si128(both);
  __m256 lo;
  __m256i placed;  // int8 lo: Tables::lo_hi32's shuffle (its low halves hold bfloat16 hi patterns)
  if (LO == LO_INT8 || FP8_BITS) {
    placed = _mm256_shuffle_epi8(both, _mm256_load_si256(reinterpret_cast<const __m256i*>(T.lo_hi32[m])));
    if (LO == LO_INT8) {
      lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(placed, 24));
    } else {  // e4m3 s eeee mmm from bits 31..24 to 31, 26..23, 22..20 (e5m2 s eeeee mm to
              // 31, 27..23, 22..21); the AND clears the smeared sign and hi lanes' low halves
      const __m256i fields = LO == LO_E4M3
          ? _mm256_and_si256(_mm256_srai_epi32(placed, 4), _mm256_set1_epi32(int32_t(0x87F00000u)))
          : _mm256_and_si256(_mm256_srai_epi32(placed, 3), _mm256_set1_epi32(int32_t(0x8FE00000u)));
      lo = _mm256_castsi256_ps(fields);
    }
  } else {
    __m128i h = _mm_shuffle_epi8(raw, _mm_load_si128(reinterpret_cast<const __m128i*>(T.lo16[m])));
    if (LO == LO_E4M3) h = _mm_and_si128(_mm_srai_epi16(h, 1), _mm_set1_epi16(int16_t(0xBF80)));
    lo = _mm256_cvtph_ps(h);
  }
  if (!HAS_HI) return _mm256_mul_ps(lo, sv);
  __m256 hv;
  if (HI == HI_BF16) {
    if (LO != LO_INT8 && !FP8_BITS)
      placed = _mm256_shuffle_epi8(both, _mm256_load_si256(reinterpret_cast<const __m256i*>(T.lo_hi32[m])));
    hv = _mm256_castsi256_ps(_mm256_slli_epi32(placed, 16));  // lo codes shift out: +0 in lo lanes
  } else {
    hv = _mm256_cvtph_ps(_mm_shuffle_epi8(raw, _mm_load_si128(reinterpret_cast<const __m128i*>(T.hi16[m]))));
  }
  if (EXACT) {
    const __m256 lanes = _mm256_load_ps(reinterpret_cast<const float*>(T.hi_lanes[m]));
    return _mm256_blendv_ps(_mm256_mul_ps(lo, sv), hv, lanes);
  }
  return _mm256_fmadd_ps(lo, sv, hv);
}

// How far ahead of the hot loop the payload bytes are prefetched: without it a row stream
// from memory ran at 1.1-1.5 ns per group, with it at 0.9 (4096 x 4096, one thread; 512
// bytes: 1.2, 1024: 1.0, 4096: 0.9-1.0). A prefetch never faults, so the end needs no check.
constexpr int64_t PREFETCH_BYTES = 2048;

// What the lo path's decoded code is multiplied by, besides the scale: e4m3 through float16
// is value * 2^-8, through float32 bits value * 2^-120 (e5m2: exact, and value * 2^-112).
constexpr float lo_fold(int lo, bool fp8_bits = false) {
  return lo == LO_INT8 ? 1.0f : lo == LO_E4M3 ? (fp8_bits ? 0x1p120f : 256.0f) : (fp8_bits ? 0x1p112f : 1.0f);
}

// The MXCSR's denormals-are-zero flag of the calling thread (torch.set_flush_denormal
// sets it): then a denormal input of the e4m3 bit route would read as 0.
inline bool denormals_are_zero() { return (_mm_getcsr() & 0x0040) != 0; }

// Groups [g0, g1) of one row, each with 16 readable bytes, or copied into `tail` first.
struct RowCursor {
  const uint8_t* d;
  int64_t gb, safe;  // groups < safe can be loaded in place
  alignas(16) uint8_t tail[16];
  inline const uint8_t* at(int64_t g) {
    if (g < safe) return d + g * gb;
    std::memset(tail, 0, 16);
    std::memcpy(tail, d + g * gb, size_t(gb));
    return tail;
  }
};

inline RowCursor cursor(const Packed& p, int64_t r) {
  RowCursor c;
  c.d = p.data + r * p.row_bytes();
  c.gb = p.group_bytes();
  const int64_t left = p.rows * p.row_bytes() - r * p.row_bytes();  // bytes to the buffer's end
  const int64_t safe = left >= 16 ? (left - 16) / c.gb + 1 : 0;
  c.safe = safe < p.groups() ? safe : p.groups();
  return c;
}

// y[m, r] = sum_c x[m, c] * W[r, c] for MB activation rows and weight rows [r0, r1),
// weights decoded in registers. fp8 lo takes the float32-bit route unless this thread
// treats denormals as zero (checked here: each OpenMP thread has its own MXCSR).
template <int LO, int HI, bool HAS_HI, int MB, bool FP8_BITS = (LO != LO_INT8)>
void gemv_rows_avx2(const Packed& p, const float* x, int64_t ldx, const Epilogue& ep, int64_t r0, int64_t r1) {
  if (FP8_BITS && denormals_are_zero()) return gemv_rows_avx2<LO, HI, HAS_HI, MB, false>(p, x, ldx, ep, r0, r1);
  const int64_t groups_per_block = p.block / 8;
  for (int64_t r = r0; r < r1; ++r) {
    RowCursor rc = cursor(p, r);
    const uint8_t* mk = p.mask + r * p.groups();
    const float* sc = p.scale + r * p.blocks();
    // U independent accumulator chains per activation row hide the FMA latency.
    constexpr int U = MB == 1 ? 4 : 2;
    __m256 acc[MB][U];
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
      #pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    for (int64_t b = 0; b < p.blocks(); ++b) {
      const float s = sc[b];
      const float folded = s * lo_fold(LO, FP8_BITS);
      const int64_t g0 = b * groups_per_block, g1 = g0 + groups_per_block;
      if (!std::isfinite(folded)) {  // fp8 scale too large to fold: exact scalar rule for this block
        alignas(32) float w[8];
        for (int64_t g = g0; g < g1; ++g) {
          group_scalar(rc.d + g * rc.gb, mk[g], int(rc.gb), LO, HI, s, w);
          const __m256 wv = _mm256_load_ps(w);
          #pragma GCC unroll 8
          for (int m = 0; m < MB; ++m)
            acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + g * 8), acc[m][0]);
        }
        continue;
      }
      const __m256 sv = _mm256_set1_ps(folded);
      const uint8_t* d = rc.d;
      const int64_t gb = rc.gb;
      const int64_t in_place = g1 < rc.safe ? g1 : (g0 > rc.safe ? g0 : rc.safe);
      int64_t g = g0;
      for (; g + U <= in_place; g += U) {  // the hot loop: no bounds logic
        _mm_prefetch(reinterpret_cast<const char*>(d + g * gb + PREFETCH_BYTES), _MM_HINT_T0);
        #pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const __m256 w = group_avx2<LO, HI, HAS_HI, false, FP8_BITS>(d + (g + u) * gb, mk[g + u], sv);
          #pragma GCC unroll 8
          for (int m = 0; m < MB; ++m)
            acc[m][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + (g + u) * 8), acc[m][u]);
        }
      }
      for (; g < g1; ++g) {  // an odd group, and the last groups of the buffer (copied)
        const __m256 w0 = group_avx2<LO, HI, HAS_HI, false, FP8_BITS>(rc.at(g), mk[g], sv);
        #pragma GCC unroll 8
        for (int m = 0; m < MB; ++m)
          acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * ldx + g * 8), acc[m][0]);
      }
    }
    #pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      __m256 v = acc[m][0];
      #pragma GCC unroll 8
      for (int u = 1; u < U; ++u) v = _mm256_add_ps(v, acc[m][u]);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      ep.store(m, r, _mm_cvtss_f32(h));
    }
  }
}

template <int LO, int HI, bool HAS_HI>
void decode_row_avx2(const Packed& p, int64_t r, float* out) {
  RowCursor rc = cursor(p, r);
  const uint8_t* mk = p.mask + r * p.groups();
  const float* sc = p.scale + r * p.blocks();
  const int64_t groups_per_block = p.block / 8;
  for (int64_t b = 0; b < p.blocks(); ++b) {
    const float folded = sc[b] * lo_fold(LO);
    const int64_t g0 = b * groups_per_block, g1 = g0 + groups_per_block;
    if (!std::isfinite(folded)) {  // as in gemv_rows_avx2
      for (int64_t g = g0; g < g1; ++g) group_scalar(rc.d + g * rc.gb, mk[g], int(rc.gb), LO, HI, sc[b], out + g * 8);
      continue;
    }
    const __m256 sv = _mm256_set1_ps(folded);
    for (int64_t g = g0; g < g1; ++g)
      _mm256_storeu_ps(out + g * 8, group_avx2<LO, HI, HAS_HI, true>(rc.at(g), mk[g], sv));
  }
}

using GemvFn = void (*)(const Packed&, const float*, int64_t, const Epilogue&, int64_t, int64_t);
using DecodeFn = void (*)(const Packed&, int64_t, float*);

template <int LO, int HI, bool HAS_HI>
GemvFn gemv_for_mb(int mb) {
  switch (mb) {
    case 1: return gemv_rows_avx2<LO, HI, HAS_HI, 1>;
    case 2: return gemv_rows_avx2<LO, HI, HAS_HI, 2>;
    case 3: return gemv_rows_avx2<LO, HI, HAS_HI, 3>;
    default: return gemv_rows_avx2<LO, HI, HAS_HI, 4>;
  }
}

template <int LO, int HI>
GemvFn gemv_for_hi(bool has_hi, int mb) {
  return has_hi ? gemv_for_mb<LO, HI, true>(mb) : gemv_for_mb<LO, HI, false>(mb);
}

template <int LO>
GemvFn gemv_for_lo(int hi, bool has_hi, int mb) {
  return hi == HI_BF16 ? gemv_for_hi<LO, HI_BF16>(has_hi, mb) : gemv_for_hi<LO, HI_F16>(has_hi, mb);
}

GemvFn gemv_avx2(const Packed& p, int mb) {
  const bool has_hi = p.k > 0;
  switch (p.lo) {
    case LO_INT8: return gemv_for_lo<LO_INT8>(p.hi, has_hi, mb);
    case LO_E5M2: return gemv_for_lo<LO_E5M2>(p.hi, has_hi, mb);
    default: return gemv_for_lo<LO_E4M3>(p.hi, has_hi, mb);
  }
}

template <int LO>
DecodeFn decode_for_lo(int hi, bool has_hi) {
  if (!has_hi) return decode_row_avx2<LO, HI_F16, false>;
  return hi == HI_BF16 ? decode_row_avx2<LO, HI_BF16, true> : decode_row_avx2<LO, HI_F16, true>;
}

DecodeFn decode_avx2(const Packed& p) {
  const bool has_hi = p.k > 0;
  switch (p.lo) {
    case LO_INT8: return decode_for_lo<LO_INT8>(p.hi, has_hi);
    case LO_E5M2: return decode_for_lo<LO_E5M2>(p.hi, has_hi);
    default: return decode_for_lo<LO_E4M3>(p.hi, has_hi);
  }
}

// float32 [n] -> float16 / bfloat16 [n], round to nearest even (as torch's .to()).
// bfloat16: float_to_bf16's rule on 8 lanes (the upper 16 bits, rounded to nearest even;
// a NaN keeps its sign and payload, made quiet).
inline __m256i bf16_bits_avx2(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}

void narrow_avx2(const float* in, uint16_t* out, int64_t n, int kind) {
  int64_t i = 0;
  if (kind == OUT_F16) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    for (; i + 16 <= n; i += 16) {  // packus interleaves the 128-bit lanes; permute4x64 restores the order
      const __m256i words = _mm256_packus_epi32(bf16_bits_avx2(_mm256_loadu_ps(in + i)),
                                                bf16_bits_avx2(_mm256_loadu_ps(in + i + 8)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permute4x64_epi64(words, 0xD8));
    }
  }
  for (; i < n; ++i) out[i] = kind == OUT_F16 ? float_to_half(in[i]) : float_to_bf16(in[i]);
}

// float16 [n] -> float32 from the start; *done: how many were converted.
void widen_f16_avx2(const uint16_t* in, float* out, int64_t n, int64_t* done) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  *done = i;
}

#pragma GCC pop_options
#endif  // UMQ_X86

bool valid_problem(const Packed& p) {
  return p.rows >= 0 && p.cols >= 0 && p.cols % 8 == 0 && p.k >= 0 && p.k <= 8 && p.block > 0 &&
         p.block % 8 == 0 && p.cols % p.block == 0 && p.lo >= 0 && p.lo <= 2 && (p.hi == 0 || p.hi == 1);
}

int umq_cpu_features_impl() {
  static const int f = [] {
    int v = 0;
#ifdef UMQ_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) v |= 1;
#endif
    return v;
  }();
  return f;
}

// Whether this build and CPU run `isa`.
bool isa_runs(int isa) { return isa == ISA_SCALAR || (isa == ISA_AVX2 && (umq_cpu_features_impl() & 1)); }

// Fewest weights (times activation rows / 4) that get more than one thread. The Python
// side sets it from runtime.PARALLEL_MIN_WORK when it loads the library; this default
// (the same value) serves C callers such as benchmarks/gemv_harness.cpp.
int64_t parallel_min_work = int64_t(1) << 18;

int threads_for(int64_t work, int wanted) {
  // A parallel region needs every thread on a core at once, and a fork/join costs a few
  // microseconds even then: a small layer runs on one thread.
  if (wanted < 1) wanted = 1;
  if (work < parallel_min_work) return 1;
  return wanted;
}

constexpr int GEMV_CHUNKS = 16;  // activation-row chunks of 4 one call serves (M <= 64)

int gemv(int isa, const Packed& p, const float* x, int64_t M, int64_t ldx, const Epilogue& ep, int nthreads) {
  const int64_t R = p.rows, C = p.cols;
  const int nt = threads_for(R * C * (M < 4 ? 1 : M / 4), nthreads);
  if (isa == ISA_SCALAR) {
#pragma omp parallel num_threads(nt)
    {
      float* buf = new float[size_t(C > 0 ? C : 1)];
      const int t = omp_get_thread_num(), n = omp_get_num_threads();
      const int64_t r0 = R * t / n, r1 = R * (t + 1) / n;
      gemv_rows_scalar(p, x, M, ldx, ep, r0, r1, buf);
      delete[] buf;
    }
    return 0;
  }
#ifdef UMQ_X86
  if (isa == ISA_AVX2 && (umq_cpu_features_impl() & 1)) {
    // Activation rows in chunks of up to 4: each chunk decodes every weight once, a unit
    // of weight rows at a time for all chunks, so the later chunks read the unit from
    // cache, not memory. (Column chunks that keep x in L1 measured slower: the
    // activations stream well from L2.)
    for (int64_t m_base = 0; m_base < M; m_base += 4 * GEMV_CHUNKS) {
      const int64_t m_here = M - m_base < 4 * GEMV_CHUNKS ? M - m_base : 4 * GEMV_CHUNKS;
      const float* xs = x + m_base * ldx;
      const Epilogue eps = ep.rows_from(m_base);
      GemvFn fns[GEMV_CHUNKS];
      const int chunks = int((m_here + 3) / 4);
      for (int c = 0; c < chunks; ++c) fns[c] = gemv_avx2(p, int(m_here - 4 * c < 4 ? m_here - 4 * c : 4));
      const int64_t rows_per_unit = 8;
      auto unit = [&](int64_t r0, int64_t r1) {
        for (int c = 0; c < chunks; ++c) fns[c](p, xs + 4 * c * ldx, ldx, eps.rows_from(4 * c), r0, r1);
      };
      if (nt == 1) {  // no parallel region: its fork costs more than a small layer
        for (int64_t r = 0; r < R; r += rows_per_unit) unit(r, r + rows_per_unit < R ? r + rows_per_unit : R);
        continue;
      }
#pragma omp parallel for num_threads(nt) schedule(static)
      for (int64_t r = 0; r < R; r += rows_per_unit) unit(r, r + rows_per_unit < R ? r + rows_per_unit : R);
    }
    return 0;
  }
#endif
  return -1;
}

// 16-bit activations [n] -> float32 (exact).
void widen(const uint16_t* in, float* out, int64_t n, int kind, int isa) {
  int64_t i = 0;
#ifdef UMQ_X86
  if (kind == OUT_F16 && isa == ISA_AVX2 && (umq_cpu_features_impl() & 1)) widen_f16_avx2(in, out, n, &i);
#endif
  for (; i < n; ++i) out[i] = kind == OUT_F16 ? half_to_float(in[i]) : bits_to_float(uint32_t(in[i]) << 16);
}

}  // namespace

extern "C" {

// Bit 0: the CPU runs the AVX2 path (AVX2, FMA, F16C).
int umq_cpu_features() { return umq_cpu_features_impl(); }

void umq_set_parallel_min_work(int64_t work) { parallel_min_work = work; }

// y [M, R] (row stride ldy) = x [M, C] (row stride ldx) · Ŵᵀ, float32. Returns 0, or -1
// for an invalid problem / an ISA this build or CPU lacks.
int umq_gemv(int isa, const float* x, int64_t M, int64_t ldx, const uint8_t* data, const uint8_t* mask,
             const float* scale, int64_t R, int64_t C, int k, int block, int lo, int hi, float* y, int64_t ldy,
             int nthreads) {
  const Packed p{data, mask, scale, R, C, k, block, lo, hi};
  if (!valid_problem(p)) return -1;
  return gemv(isa, p, x, M, ldx, Epilogue{y, OUT_F32, ldy, nullptr, OUT_F32}, nthreads);
}

// One packed linear layer, described once by the caller (umqcli.runtime.LinearLaunch keeps
// it for the layer's lifetime; the Python side checked every shape and dtype).
struct UmqLayer {
  const uint8_t* data;
  const uint8_t* mask;
  const float* scale;
  int64_t rows, cols;
  int32_t k, block, lo, hi;
  const void* bias;   // [R] or nullptr
  int32_t bias_kind;  // 0 float32, 1 float16, 2 bfloat16
};

// y [M, R] (contiguous, y_kind) = x [M, C] (contiguous, x_kind) · Ŵᵀ + bias, float32
// accumulation; kinds 0 float32, 1 float16, 2 bfloat16. 16-bit activations are widened
// exactly to float32 first. Returns 0, or -1 as umq_gemv.
int umq_linear(int isa, const UmqLayer* L, const void* x, int x_kind, int64_t M, void* y, int y_kind,
               int nthreads) {
  const Packed p{L->data, L->mask, L->scale, L->rows, L->cols, L->k, L->block, L->lo, L->hi};
  if (!valid_problem(p) || x_kind < 0 || x_kind > 2 || y_kind < 0 || y_kind > 2 || L->bias_kind < 0 ||
      L->bias_kind > 2)
    return -1;
  const Epilogue ep{y, y_kind, p.rows, L->bias, L->bias_kind};
  if (x_kind == OUT_F32) return gemv(isa, p, static_cast<const float*>(x), M, p.cols, ep, nthreads);
  static thread_local std::vector<float> wide;
  wide.resize(size_t(M * p.cols));
  widen(static_cast<const uint16_t*>(x), wide.data(), M * p.cols, x_kind, isa);
  return gemv(isa, p, wide.data(), M, p.cols, ep, nthreads);
}

// float32 [n] -> float16 (kind 1) / bfloat16 (kind 2) [n], round to nearest even: the
// conversion the decode ends with, exported so tests compare the paths on every bit class.
// Returns 0, or -1 for a kind or ISA this build or CPU lacks.
int umq_narrow(int isa, const float* in, uint16_t* out, int64_t n, int kind) {
  if ((kind != OUT_F16 && kind != OUT_BF16) || !isa_runs(isa)) return -1;
#ifdef UMQ_X86
  if (isa != ISA_SCALAR) {
    narrow_avx2(in, out, n, kind);
    return 0;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = kind == OUT_F16 ? float_to_half(in[i]) : float_to_bf16(in[i]);
  return 0;
}

// Decode rows [r0, r1) into out (row stride ldo elements): out_kind 0 float32, 1 float16,
// 2 bfloat16. Returns the number of mask bytes whose popcount differs from k (their
// groups decode to garbage but no byte outside the group is read), or -1 as umq_gemv.
int64_t umq_decode(int isa, const uint8_t* data, const uint8_t* mask, const float* scale, int64_t R, int64_t C,
                   int k, int block, int lo, int hi, int64_t r0, int64_t r1, int out_kind, void* out, int64_t ldo,
                   int nthreads) {
  const Packed p{data, mask, scale, R, C, k, block, lo, hi};
  if (!valid_problem(p) || r0 < 0 || r1 > R || r0 > r1 || out_kind < 0 || out_kind > 2) return -1;
#ifdef UMQ_X86
  const bool simd = isa == ISA_AVX2 && (umq_cpu_features_impl() & 1);
  if (isa == ISA_AVX2 && !simd) return -1;
  const DecodeFn fn = simd ? decode_avx2(p) : nullptr;
#else
  if (isa != ISA_SCALAR) return -1;
  const bool simd = false;
#endif
  int64_t bad = 0;
  const int nt = threads_for((r1 - r0) * C, nthreads);
#pragma omp parallel num_threads(nt) reduction(+ : bad)
  {
    float* buf = out_kind == OUT_F32 ? nullptr : new float[size_t(C > 0 ? C : 1)];
#pragma omp for schedule(static)
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* mk = mask + r * p.groups();
      for (int64_t g = 0; g < p.groups(); ++g) bad += T.popcount[mk[g]] != k;
      float* row = out_kind == OUT_F32 ? static_cast<float*>(out) + (r - r0) * ldo : buf;
#ifdef UMQ_X86
      if (simd) fn(p, r, row);
      else
#endif
        decode_row_scalar(p, r, row);
      if (out_kind != OUT_F32) {
        uint16_t* dst = static_cast<uint16_t*>(out) + (r - r0) * ldo;
#ifdef UMQ_X86
        if (simd) narrow_avx2(row, dst, C, out_kind);
        else
#endif
          for (int64_t c = 0; c < C; ++c) dst[c] = out_kind == OUT_F16 ? float_to_half(row[c]) : float_to_bf16(row[c]);
      }
    }
    delete[] buf;
  }
  return bad;
}

}  // extern "C"
