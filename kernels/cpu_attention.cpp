// moeray's paged decode attention on CPU: each sequence's one new query over its cached keys and
// values, read in place through its block table (torch's path gathers the whole context into a
// padded copy first, then runs SDPA over it: three passes over K/V instead of one). Built into
// the extension of kernels/cpu_gemm.py; workers/attention.py calls it through
// kernels.decode_attention.
//
// One work item per (sequence, kv head), spread over torch's intra-op threads: the R = H / G
// query heads of that kv head share one pass over its keys (scores [R, L] in fp32), then a
// softmax in fp32 (max subtracted, e^x of cpu_simd.h), then one pass over its values. Every
// output is computed by one thread in a fixed order, so it does not depend on the thread count
// or on the other sequences of the batch.

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace moeray_cpu {
namespace {

template <typename D>
void attend(const typename D::scalar* q, int64_t q_head_stride, int64_t R, int64_t Dh,
            const typename D::scalar* k, const typename D::scalar* v, int64_t slot_stride,
            const int64_t* table, int64_t S, int64_t L, float scale, typename D::scalar* out,
            std::vector<float>& qf, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t chunks = (Dh + BLOCK - 1) / BLOCK, W = chunks * BLOCK;  // Dh padded to 16s
  qf.assign(R * W, 0.0f);
  scores.resize(R * L);
  acc.assign(R * W, 0.0f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t m = std::min<int64_t>(BLOCK, Dh - c * BLOCK);
      _mm512_storeu_ps(&qf[r * W + c * BLOCK], D::load(q + r * q_head_stride + c * BLOCK, m));
    }
  // scores[r, l] = (q_r . k_l) * scale
  for (int64_t l = 0; l < L; ++l) {
    const typename D::scalar* kl = k + (table[l / S] * S + l % S) * slot_stride;
    for (int64_t r = 0; r < R; ++r) {
      __m512 dot = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t m = std::min<int64_t>(BLOCK, Dh - c * BLOCK);
        dot = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[r * W + c * BLOCK]), D::load(kl + c * BLOCK, m),
                              dot);
      }
      scores[r * L + l] = _mm512_reduce_add_ps(dot) * scale;
    }
  }
  // softmax over l, in place: e^(s - max) and its sum
  std::vector<float> total(R);
  for (int64_t r = 0; r < R; ++r) {
    float* s = &scores[r * L];
    const float top = *std::max_element(s, s + L);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t l = 0; l < L; l += BLOCK) {
      const int64_t m = std::min<int64_t>(BLOCK, L - l);
      const __m512 e = exp_ps(_mm512_sub_ps(Fp32::load(s + l, m), _mm512_set1_ps(top)));
      Fp32::store(s + l, e, m);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(static_cast<__mmask16>((1u << m) - 1), e));
    }
    total[r] = _mm512_reduce_add_ps(sum);
  }
  // acc[r] = sum_l p[r, l] v_l, then out[r] = acc[r] / total[r]
  for (int64_t l = 0; l < L; ++l) {
    const typename D::scalar* vl = v + (table[l / S] * S + l % S) * slot_stride;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t m = std::min<int64_t>(BLOCK, Dh - c * BLOCK);
      const __m512 vv = D::load(vl + c * BLOCK, m);
      for (int64_t r = 0; r < R; ++r) {
        float* a = &acc[r * W + c * BLOCK];
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[r * L + l]), vv,
                                            _mm512_loadu_ps(a)));
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / total[r]);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t m = std::min<int64_t>(BLOCK, Dh - c * BLOCK);
      D::store(out + r * Dh + c * BLOCK, _mm512_mul_ps(_mm512_loadu_ps(&acc[r * W + c * BLOCK]), inv),
               m);
    }
  }
}

template <typename D>
void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& tables, const torch::Tensor& lens, float scale, torch::Tensor& out) {
  using Sc = typename D::scalar;
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2);
  const int64_t S = k_cache.size(1), G = k_cache.size(2), R = H / G, M = tables.size(1);
  const Sc* qp = q.data_ptr<Sc>();
  const Sc* kp = k_cache.data_ptr<Sc>();
  const Sc* vp = v_cache.data_ptr<Sc>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  Sc* op = out.data_ptr<Sc>();
  at::parallel_for(0, B * G, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf, scores, acc;  // per thread, reused across its items
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / G, g = i % G;
      attend<D>(qp + b * q.stride(0) + g * R * q.stride(1), q.stride(1), R, Dh, kp + g * Dh,
                vp + g * Dh, G * Dh, tp + b * M, S, lp[b], scale, op + (b * H + g * R) * Dh, qf,
                scores, acc);
    }
  });
}

}  // namespace

// q [B, H, Dh] (the last dimension contiguous), k_cache/v_cache [N, S, G, Dh] contiguous,
// block_tables [B, M] int64, context_lens [B] int64 (each in [1, M * S]) -> [B, H, Dh].
torch::Tensor decode_attention(const torch::Tensor& q_in, const torch::Tensor& k_cache,
                               const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                               const torch::Tensor& context_lens, double scale) {
  TORCH_CHECK(q_in.dim() == 3, "q must be [B, H, Dh]");
  const torch::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(3) == Dh,
              "k_cache and v_cache must be contiguous [N, S, G, ", Dh, "]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "q, k_cache and v_cache must all be float32 or all bfloat16");
  const int64_t G = k_cache.size(2);
  TORCH_CHECK(H % G == 0, "the query heads (", H, ") must be a multiple of the kv heads (", G, ")");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B &&
                  block_tables.scalar_type() == at::kLong && context_lens.dim() == 1 &&
                  context_lens.size(0) == B && context_lens.scalar_type() == at::kLong,
              "block_tables must be [B, M] and context_lens [B], int64");
  const torch::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const int64_t most = block_tables.size(1) * k_cache.size(1);
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= most, "context_lens[", b, "] = ", lp[b],
                " is outside [1, ", most, "]");
  const int64_t N = k_cache.size(0);
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < (lp[b] + k_cache.size(1) - 1) / k_cache.size(1); ++j)
      TORCH_CHECK(tp[b * tables.size(1) + j] >= 0 && tp[b * tables.size(1) + j] < N,
                  "block_tables[", b, ", ", j, "] is not a block of the cache");
  torch::Tensor out = torch::empty({B, H, Dh}, q.options());
  if (q.scalar_type() == at::kBFloat16) {
    decode<Bf16>(q, k_cache, v_cache, tables, lens, static_cast<float>(scale), out);
  } else {
    decode<Fp32>(q, k_cache, v_cache, tables, lens, static_cast<float>(scale), out);
  }
  return out;
}

}  // namespace moeray_cpu
