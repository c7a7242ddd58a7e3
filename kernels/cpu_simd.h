// What moeray's C++ CPU kernels share (kernels/cpu_gemm.cpp, cpu_attention.cpp, cpu_rows.cpp): fp32
// and bf16 lanes of one 512-bit register, e^x on them, and the functions the module exports.
// AVX-512 (F, BW, VL, DQ, BF16).
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

constexpr int64_t BLOCK = 16;  // output columns per block (one zmm of fp32 sums)

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

struct Bf16 {
  using scalar = c10::BFloat16;
  static constexpr int64_t P = 2;  // K elements per lane and multiply-add
  static __m512 step(__m512 acc, const scalar* w, const scalar* x) {
    // w: 16 lanes x 2 bf16; x: one bf16 pair broadcast to every lane
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w);
    int32_t pair;
    std::memcpy(&pair, x, sizeof(pair));
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
    return _mm512_dpbf16_ps(acc, wv, xv);
  }
  // n <= 16 values -> fp32 lanes (the rest zero)
  static __m512 load(const scalar* p, int64_t n) {
    const __m256i v = n == BLOCK
                          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                          : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
  static void store(scalar* out, __m512 acc, int64_t n) {
    const __m256i v = (__m256i)_mm512_cvtneps_pbh(acc);
    if (n == BLOCK) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
    } else {
      _mm256_mask_storeu_epi16(out, static_cast<__mmask16>((1u << n) - 1), v);
    }
  }
};

struct Fp32 {
  using scalar = float;
  static constexpr int64_t P = 1;
  static __m512 step(__m512 acc, const scalar* w, const scalar* x) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_set1_ps(*x), acc);
  }
  static __m512 load(const scalar* p, int64_t n) {
    return n == BLOCK ? _mm512_loadu_ps(p)
                      : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
  }
  static void store(scalar* out, __m512 acc, int64_t n) {
    if (n == BLOCK) {
      _mm512_storeu_ps(out, acc);
    } else {
      _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1), acc);
    }
  }
};

// e^x for fp32 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-7 polynomial,
// times 2^n), within 2 ulp of the exact value on [-88.4, 88.4], where x is clamped.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f)),
                    _mm512_set1_ps(88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
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
