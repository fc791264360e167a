// Times the fused GEMV of umqcli/runtime/umq_cpu.cpp without Python: one thread, random
// FORMAT v1 weights (k hi per group, random codes), best of N calls, and what the same
// bytes cost in an ideal int8 dot-product loop (pmovsxbd + convert + FMA), read as the
// kernel reads them with no decode, and in a plain float32 read. A tool for working on
// the kernel, not part of the package.
//
//   g++ -O2 -std=c++17 -fopenmp -o /tmp/gemv_harness benchmarks/gemv_harness.cpp
//   /tmp/gemv_harness [R C k lo hi reps M]   (lo 0 e4m3, 1 e5m2, 2 int8; hi 0 f16, 1 bf16;
//   M activation rows for UMQ, the int8 loop always runs one)
#include "../umqcli/runtime/umq_cpu.cpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <class F>
double best_ms(F&& f, int reps) {
  f();
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_ms();
    f();
    const double t = now_ms() - t0;
    if (t < best) best = t;
  }
  return best;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// An int8 weight-only GEMV at memory speed's best: y[r] = s[r] * sum_c q[r, c] x[c].
void int8_gemv(const int8_t* q, const float* s, const float* x, float* y, int64_t R, int64_t C) {
  for (int64_t r = 0; r < R; ++r) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    const int8_t* row = q + r * C;
    for (int64_t c = 0; c < C; c += 32) {
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c)))),
                           _mm256_loadu_ps(x + c), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c + 8)))),
                           _mm256_loadu_ps(x + c + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c + 16)))),
                           _mm256_loadu_ps(x + c + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c + 24)))),
                           _mm256_loadu_ps(x + c + 24), a3);
    }
    __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    y[r] = s[r] * _mm_cvtss_f32(h);
  }
}

// UMQ's payload read as the kernel reads it (a 16-byte load per group at the group stride,
// one FMA with the activations), with no decode: the ceiling of any decode of these bytes.
float stream_groups(const uint8_t* d, int64_t R, int64_t G, int64_t gb, const float* x) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* row = d + r * G * gb;
    for (int64_t g = 0; g + 4 <= G; g += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(row + g * gb + 2048), _MM_HINT_T0);
      a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(row + g * gb)))), _mm256_loadu_ps(x + g * 8), a0);
      a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(row + (g + 1) * gb)))), _mm256_loadu_ps(x + g * 8 + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(row + (g + 2) * gb)))), _mm256_loadu_ps(x + g * 8 + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(row + (g + 3) * gb)))), _mm256_loadu_ps(x + g * 8 + 24), a3);
    }
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  return t[0] + t[7];
}

float read_f32(const float* a, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(a + i + 8));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(s0, s1));
  return t[0] + t[7];
}
#pragma GCC pop_options

}  // namespace

int main(int argc, char** argv) {
  const int64_t R = argc > 1 ? atoll(argv[1]) : 4096, C = argc > 2 ? atoll(argv[2]) : 4096;
  const int k = argc > 3 ? atoi(argv[3]) : 1, lo = argc > 4 ? atoi(argv[4]) : 2, hi = argc > 5 ? atoi(argv[5]) : 1;
  const int reps = argc > 6 ? atoi(argv[6]) : 30;
  const int64_t M = argc > 7 ? atoll(argv[7]) : 1;
  std::mt19937 gen(0);
  const int64_t G = C / 8, gb = 8 + k;
  std::vector<uint8_t> data(size_t(R * G * gb)), mask(size_t(R * G));
  std::vector<float> scale(size_t(R), 0.01f), x(static_cast<size_t>(M * C)), y(static_cast<size_t>(M * R));
  std::vector<float> xf(size_t(R * C), 1.0f);
  std::vector<int8_t> q(size_t(R * C));
  for (auto& m : mask) {
    unsigned v = 0;
    while (__builtin_popcount(v) < k) v |= 1u << (gen() % 8);
    m = uint8_t(v);
  }
  // Finite normal values, as a real weight has: lo codes of magnitude 1..63 (every format
  // reads them as normal numbers), hi values in [1, 2) (0x3F80.. bf16, 0x3C00.. f16).
  for (int64_t gi = 0; gi < R * G; ++gi) {
    uint8_t* grp = data.data() + gi * gb;
    for (int i = 0; i < 8; ++i) {
      const int off = T.offset[mask[size_t(gi)]][i];
      if ((mask[size_t(gi)] >> i) & 1) {
        const uint16_t h = uint16_t((hi == HI_BF16 ? 0x3F80 : 0x3C00) | (gen() & 0x7F));
        grp[off] = uint8_t(h & 0xFF);
        grp[off + 1] = uint8_t(h >> 8);
      } else {
        grp[off] = uint8_t((gen() & 0x80) | (0x08 + gen() % 0x30));
      }
    }
  }
  for (auto& v : x) v = float(gen() % 1000) / 1000.0f;
  for (auto& v : q) v = int8_t(gen());
  const double bytes = double(data.size() + mask.size() + 4 * scale.size());
  const UmqLayer L{data.data(), mask.data(), scale.data(), R, C, k, 8 * int32_t(G), lo, hi, nullptr, 0};
  const double t_umq = best_ms([&] { umq_linear(ISA_AVX2, &L, x.data(), 0, M, y.data(), 0, 1); }, reps);
  const double t_int8 = best_ms([&] { int8_gemv(q.data(), scale.data(), x.data(), y.data(), R, C); }, reps);
  volatile float sink = 0;
  // data has 16 bytes past the last group only when k >= 8; the stream stops 4 groups short
  // of a row's end, so it never reads past the buffer.
  const double t_stream = best_ms([&] { sink = stream_groups(data.data(), R, G - 4, gb, x.data()); }, reps);
  const double t_read = best_ms([&] { sink = read_f32(xf.data(), R * C); }, reps);
  const double groups = double(R * G);
  std::printf("M=%lld R=%lld C=%lld k=%d lo=%d hi=%d: UMQ %.3f ms (%.2f GB/s, %.2f ns/group) | int8 loop %.3f ms (%.2f GB/s, "
              "%.2f ns/group) | UMQ bytes, no decode %.2f ns/group | fp32 read %.2f GB/s\n",
              (long long)M, (long long)R, (long long)C, k, lo, hi, t_umq, bytes / t_umq / 1e6, t_umq * 1e6 / groups, t_int8,
              double(R * C) / t_int8 / 1e6, t_int8 * 1e6 / groups, t_stream * 1e6 / double(R * (G - 4)), 4.0 * double(R * C) / t_read / 1e6);
  return 0;
}
