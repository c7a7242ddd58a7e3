// What moeray's C++ CPU kernels share (kernels/cpu_gemm.cpp, cpu_attention.cpp, cpu_rows.cpp):
// `vec`, 16 fp32 lanes handled as one value, its arithmetic, loads and stores of fp32 and bf16,
// e^x, and the functions the module exports. The kernels are written once against these; the
// instruction set is the one the extension is compiled for (kernels/cpu_gemm.py builds the one
// this CPU has):
// - AVX-512 (F, BW, VL, DQ, BF16): a vec is one zmm register; bf16 products by vdpbf16ps, which
//   treats denormal inputs as zero and flushes denormal sums;
// - AVX2 with FMA: a vec is two ymm registers; bf16 pairs widened to fp32 (a shift, a mask)
//   before two multiply-adds, in vdpbf16ps's order (the odd element, then the even one), with
//   denormals kept; bf16 rounding is torch's (to nearest even, NaN to a quiet NaN).
// The two differ in the last bits of horizontal sums (their order) and of denormals. Within one
// build a result never depends on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace moeray_cpu {

constexpr int64_t BLOCK = 16;  // output columns per block: the lanes of one vec

// Multiply-adds (or the like) a thread must have to be worth a share: below it a parallel region
// costs what it saves ([1, 64] x [64, 256], 16k multiply-adds: 1.54 us on one thread, 1.57 on two;
// [10, 64] x [64, 256]: 4.0 vs 3.5 us; 2-core AMD EPYC VM, 2026-12-01), and a tiny model's decode
// step runs on the calling thread.
constexpr int64_t MIN_WORK_PER_THREAD = int64_t{1} << 16;

// f(i) for every i in [0, n) on torch's intra-op threads, each thread taking the next i as it
// finishes one. at::parallel_for hands each thread a fixed share, so on a node where other
// processes run (a router, a client, Ray's daemons) a thread the OS preempts holds the whole
// region up by its share while the others wait at the end; here they take what it has not begun.
// Which thread computes an item never changes what the item computes. work: the n items'
// multiply-adds together; one thread per MIN_WORK_PER_THREAD of it at most.
template <typename F>
void dynamic_for(int64_t n, int64_t work, const F& f) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(
      {at::get_num_threads(), n, std::max<int64_t>(1, work / MIN_WORK_PER_THREAD)});
  if (threads == 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) f(i);
  });
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)

// Column blocks of the GEMM's register tile of 6 rows (kernels/cpu_gemm.cpp): 6 x 4 accumulators
// + 4 weights, 28 of the 32 zmm registers.
constexpr int TILE_BLOCKS = 4;

struct vec {
  __m512 v;
};

inline __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

inline vec vzero() { return {_mm512_setzero_ps()}; }
inline vec vset(float x) { return {_mm512_set1_ps(x)}; }
inline vec operator+(vec a, vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline vec operator-(vec a, vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline vec operator*(vec a, vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline vec operator/(vec a, vec b) { return {_mm512_div_ps(a.v, b.v)}; }
inline vec fmadd(vec a, vec b, vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }    // a b + c
inline vec fnmadd(vec a, vec b, vec c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c - a b
inline vec vmin(vec a, vec b) { return {_mm512_min_ps(a.v, b.v)}; }
inline vec vmax(vec a, vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline vec keep(vec a, int64_t n) { return {_mm512_maskz_mov_ps(first(n), a.v)}; }  // lanes < n
inline float hsum(vec a) { return _mm512_reduce_add_ps(a.v); }

// (sum a, sum b, sum c, sum d) in one shuffle tree
inline void hsum4(vec a, vec b, vec c, vec d, float* out) {
  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [a.., b.., c.., d..]
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a.v, b.v), _mm512_unpackhi_ps(a.v, b.v));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c.v, d.v), _mm512_unpackhi_ps(c.v, d.v));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 lanes = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                     _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  const __m256 half =
      _mm256_add_ps(_mm512_castps512_ps256(lanes),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
}

// n <= 16 values -> lanes (the rest zero), and back
inline vec load(const float* p, int64_t n = BLOCK) {
  return {n == BLOCK ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first(n), p)};
}
inline void store(float* p, vec a, int64_t n = BLOCK) {
  if (n == BLOCK) {
    _mm512_storeu_ps(p, a.v);
  } else {
    _mm512_mask_storeu_ps(p, first(n), a.v);
  }
}
inline vec load(const c10::BFloat16* p, int64_t n = BLOCK) {
  const __m256i v = n == BLOCK ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                               : _mm256_maskz_loadu_epi16(first(n), p);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))};
}
inline void store(c10::BFloat16* p, vec a, int64_t n = BLOCK) {
  const __m256i v = (__m256i)_mm512_cvtneps_pbh(a.v);
  if (n == BLOCK) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    _mm256_mask_storeu_epi16(p, first(n), v);
  }
}

// a rounded to bf16 and back (what a torch op in bf16 stores)
inline vec round_bf16(vec a) {
  return {_mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(a.v)), 16))};
}

// acc + w x over one pair of K: w holds 16 lanes x 2 bf16, x one bf16 pair
inline vec dot_bf16(vec acc, const c10::BFloat16* w, const c10::BFloat16* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return {
      _mm512_dpbf16_ps(acc.v, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_set1_epi32(pair))};
}

inline vec round_to_int(vec a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline vec scale_by_pow2(vec a, vec n) { return {_mm512_scalef_ps(a.v, n.v)}; }  // a 2^n

#elif defined(__AVX2__) && defined(__FMA__)

// Column blocks of the GEMM's register tile of 6 rows (kernels/cpu_gemm.cpp): 6 x 1 accumulators
// of two ymm each + 2 weights + 1 broadcast, 15 of the 16 ymm registers (BLIS's Haswell kernel).
constexpr int TILE_BLOCKS = 1;

struct vec {
  __m256 lo, hi;  // lanes 0-7, 8-15
};

// lanes < n (n <= 16) as two masks of all-ones lanes
inline void first(int64_t n, __m256i& lo, __m256i& hi) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
  hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n) - 8), lanes);
}

inline vec vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline vec vset(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline vec operator+(vec a, vec b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
inline vec operator-(vec a, vec b) {
  return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)};
}
inline vec operator*(vec a, vec b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline vec operator/(vec a, vec b) {
  return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)};
}
inline vec fmadd(vec a, vec b, vec c) {  // a b + c
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline vec fnmadd(vec a, vec b, vec c) {  // c - a b
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline vec vmin(vec a, vec b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline vec vmax(vec a, vec b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline vec keep(vec a, int64_t n) {  // lanes < n, the rest zero
  __m256i lo, hi;
  first(n, lo, hi);
  return {_mm256_and_ps(a.lo, _mm256_castsi256_ps(lo)),
          _mm256_and_ps(a.hi, _mm256_castsi256_ps(hi))};
}

inline float hsum(vec a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// (sum a, sum b, sum c, sum d) in one shuffle tree
inline void hsum4(vec a, vec b, vec c, vec d, float* out) {
  const __m256 ab = _mm256_hadd_ps(_mm256_add_ps(a.lo, a.hi), _mm256_add_ps(b.lo, b.hi));
  const __m256 cd = _mm256_hadd_ps(_mm256_add_ps(c.lo, c.hi), _mm256_add_ps(d.lo, d.hi));
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit lane: [a, b, c, d] partial sums
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}

// n <= 16 values -> lanes (the rest zero), and back
inline vec load(const float* p, int64_t n = BLOCK) {
  if (n == BLOCK) return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
  __m256i lo, hi;
  first(n, lo, hi);
  return {_mm256_maskload_ps(p, lo), _mm256_maskload_ps(p + 8, hi)};
}
inline void store(float* p, vec a, int64_t n = BLOCK) {
  if (n == BLOCK) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
    return;
  }
  __m256i lo, hi;
  first(n, lo, hi);
  _mm256_maskstore_ps(p, lo, a.lo);
  _mm256_maskstore_ps(p + 8, hi, a.hi);
}

inline __m256 widen(__m128i bf16) {  // 8 bf16 -> fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16), 16));
}
inline vec load(const c10::BFloat16* p, int64_t n = BLOCK) {
  alignas(32) c10::BFloat16 part[BLOCK];
  if (n != BLOCK) {  // no 16-bit masked loads in AVX2
    std::memset(part, 0, sizeof(part));
    std::memcpy(part, p, n * sizeof(c10::BFloat16));
    p = part;
  }
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {widen(_mm256_castsi256_si128(v)), widen(_mm256_extracti128_si256(v, 1))};
}

// fp32 lanes -> their bf16 bits in the low half of each 32-bit lane, rounded as torch rounds
// (c10::round_to_nearest_even: to nearest, ties to even; NaN to 0x7fc0)
inline __m256i bf16_bits(__m256 a) {
  const __m256i bits = _mm256_castps_si256(a);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}
inline void store(c10::BFloat16* p, vec a, int64_t n = BLOCK) {
  // packus interleaves the two halves by 128-bit lane; the permute puts lanes 0-15 in order
  const __m256i v =
      _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits(a.lo), bf16_bits(a.hi)), 0xd8);
  if (n == BLOCK) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
    return;
  }
  alignas(32) c10::BFloat16 part[BLOCK];
  _mm256_store_si256(reinterpret_cast<__m256i*>(part), v);
  std::memcpy(p, part, n * sizeof(c10::BFloat16));
}

// a rounded to bf16 and back (what a torch op in bf16 stores)
inline vec round_bf16(vec a) {
  return {_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(a.lo), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(a.hi), 16))};
}

// acc + w x over one pair of K: w holds 16 lanes x 2 bf16, x one bf16 pair (each product is exact
// in fp32, so a multiply-add rounds as vdpbf16ps's add does)
inline vec dot_bf16(vec acc, const c10::BFloat16* w, const c10::BFloat16* x) {
  const __m256 even = _mm256_set1_ps(static_cast<float>(x[0]));
  const __m256 odd = _mm256_set1_ps(static_cast<float>(x[1]));
  const __m256 high = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16));
  acc.lo = _mm256_fmadd_ps(_mm256_and_ps(_mm256_castsi256_ps(lo), high), odd, acc.lo);
  acc.hi = _mm256_fmadd_ps(_mm256_and_ps(_mm256_castsi256_ps(hi), high), odd, acc.hi);
  acc.lo = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), even, acc.lo);
  acc.hi = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)), even, acc.hi);
  return acc;
}

inline vec round_to_int(vec a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
// a 2^n for integral n in [-126, 127] (exp_ps's range; 2^-127 becomes 0)
inline vec scale_by_pow2(vec a, vec n) {
  const auto pow2 = [](__m256 m) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(m), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_max_epi32(e, _mm256_setzero_si256()), 23));
  };
  return {_mm256_mul_ps(a.lo, pow2(n.lo)), _mm256_mul_ps(a.hi, pow2(n.hi))};
}

#else
#error "moeray's CPU kernels need AVX-512 (F, BW, VL, DQ, BF16) or AVX2 with FMA"
#endif

// The two element types of the kernels: scalar, and P, the K elements one multiply-add step of
// the GEMM takes (bf16 multiplies pairs along K).
struct Bf16 {
  using scalar = c10::BFloat16;
  static constexpr int64_t P = 2;
  // acc + w x: w 16 lanes x 2 bf16, x one bf16 pair broadcast to every lane
  static vec step(vec acc, const scalar* w, const scalar* x) { return dot_bf16(acc, w, x); }
};

struct Fp32 {
  using scalar = float;
  static constexpr int64_t P = 1;
  static vec step(vec acc, const scalar* w, const scalar* x) {
    return fmadd(load(w), vset(*x), acc);
  }
};

// max of s[0, n) (n >= 1), exactly std::max_element's for numbers: 16 lanes at a time, then
// the lanes and the tail (a scalar loop is one long chain of dependent max instructions: it was
// a quarter of the decode attention's time)
inline float max_of(const float* s, int64_t n) {
  float top = s[0];
  int64_t l = 0;
  if (n >= BLOCK) {
    vec m = load(s);
    for (l = BLOCK; l + BLOCK <= n; l += BLOCK) m = vmax(m, load(s + l));
    alignas(64) float lanes[BLOCK];
    store(lanes, m);
    top = *std::max_element(lanes, lanes + BLOCK);
  }
  for (; l < n; ++l) top = std::max(top, s[l]);
  return top;
}

// e^x for fp32 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-7 polynomial,
// times 2^n), within 2 ulp of the exact value on [-87.3, 88.4], where x is clamped (below it the
// result is denormal: AVX-512 keeps it, AVX2 flushes e^x under 2^-126 to zero).
inline vec exp_ps(vec x) {
  x = vmin(vmax(x, vset(-88.3762626647949f)), vset(88.3762626647949f));
  const vec n = round_to_int(x * vset(1.44269504088896341f));
  vec r = fnmadd(n, vset(0.693359375f), x);  // ln2 in two parts
  r = fnmadd(n, vset(-2.12194440e-4f), r);
  vec p = vset(1.9875691500e-4f);
  p = fmadd(p, r, vset(1.3981999507e-3f));
  p = fmadd(p, r, vset(8.3334519073e-3f));
  p = fmadd(p, r, vset(4.1665795894e-2f));
  p = fmadd(p, r, vset(1.6666665459e-1f));
  p = fmadd(p, r, vset(5.0000001201e-1f));
  p = fmadd(p, r * r, r + vset(1.0f));
  return scale_by_pow2(p, n);
}

// cpu_rows.cpp: kernels.reference.rms_norm, add_rms_norm and apply_rope, one pass per row
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos,
                         const torch::Tensor& sin);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& residual,
                                        const torch::Tensor& weight, double eps);

// cpu_attention.cpp: q [B, H, Dh] over each sequence's cached K/V -> [B, H, Dh]
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                               const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                               const torch::Tensor& context_lens, double scale);

}  // namespace moeray_cpu
