// moeray's paged decode attention on CPU: each sequence's one new query over its cached keys and
// values, read in place through its block table (torch's path gathers the whole context into a
// padded copy first, then runs SDPA over it: three passes over K/V instead of one). Built into
// the extension of kernels/cpu_gemm.py; workers/attention.py calls it through
// kernels.decode_attention.
//
// One work item per (sequence, kv head), taken in turn by torch's intra-op threads (dynamic_for:
// contexts differ in length): the R = H / G query heads of that kv head share one pass over its
// keys (four heads at a time: each key loaded once, the four dot products summed in one shuffle
// tree; scores [R, L] in fp32), then a softmax in fp32 (max subtracted, e^x of cpu_simd.h), then
// the values weighed 64 columns at a time, the four heads' sums held in registers across the
// context (one pass over V for Dh <= 64). The K and V rows of positions AHEAD further on are
// prefetched: a context's rows lie in scattered cache blocks, where the hardware prefetchers lose
// the stream. Where the CPU has AMX (cpu_amx.h), a bf16 cache with blocks of a multiple of 16
// slots has its scores computed on tiles instead: a block's 16 keys one A tile, the group's query
// heads one B tile (bf16 64 sequences x 256 context 589 -> 465 us, 2-core Sapphire Rapids VM).
// Every output is computed by one thread in a fixed order, so it does not depend on the thread
// count, on which thread took it or on the other sequences of the batch.

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_amx.h"
#include "cpu_simd.h"

namespace moeray_cpu {
namespace {

// scores[r * L + l] = (q_r . k_l) * scale for NR query heads (qf: their fp32 rows, W apart),
// k_l read once
template <typename D, int NR>
inline void score_heads(const float* qf, int64_t W, int64_t Dh, const typename D::scalar* kl,
                        float scale, float* scores, int64_t L, int64_t l) {
  vec dot[NR];
  for (int r = 0; r < NR; ++r) dot[r] = vzero();
  for (int64_t c = 0; c < Dh; c += BLOCK) {
    const vec kv = load(kl + c, std::min<int64_t>(BLOCK, Dh - c));
    for (int r = 0; r < NR; ++r) dot[r] = fmadd(load(qf + r * W + c), kv, dot[r]);
  }
  if constexpr (NR == 4) {
    float sums[4];
    hsum4(dot[0], dot[1], dot[2], dot[3], sums);
    for (int r = 0; r < 4; ++r) scores[r * L + l] = sums[r] * scale;
  } else {
    for (int r = 0; r < NR; ++r) scores[r * L + l] = hsum(dot[r]) * scale;
  }
}

// Positions ahead whose K or V row is prefetched: rows are scattered over the cache's blocks, so
// the hardware prefetchers lose the stream at every block boundary.
constexpr int64_t AHEAD = 8;

// Asks for the cache lines of row [p, p + bytes) ahead of their use.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// out[r] = sum_l p[r, l] v_l / total[r] for NR query heads, CG 16-lane column chunks from column
// c0 at a time: one pass over the context per CG chunks, the NR x CG sums in registers
template <typename D, int NR, int CG>
inline void weigh_chunks(const float* p, int64_t L, const typename D::scalar* v,
                         const int64_t* offsets, int64_t Dh, int64_t c0, const float* total,
                         typename D::scalar* out) {
  int64_t m[CG];
  for (int j = 0; j < CG; ++j) m[j] = std::min<int64_t>(BLOCK, Dh - c0 - j * BLOCK);
  const int64_t row_bytes = Dh * static_cast<int64_t>(sizeof(typename D::scalar));
  vec acc[NR][CG];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < CG; ++j) acc[r][j] = vzero();
  for (int64_t l = 0; l < L; ++l) {
    if (c0 == 0 && l + AHEAD < L) prefetch_row(v + offsets[l + AHEAD], row_bytes);
    for (int j = 0; j < CG; ++j) {
      const vec vv = load(v + offsets[l] + c0 + j * BLOCK, m[j]);
      for (int r = 0; r < NR; ++r) acc[r][j] = fmadd(vset(p[r * L + l]), vv, acc[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < CG; ++j)
      store(out + r * Dh + c0 + j * BLOCK, acc[r][j] * vset(1.0f / total[r]), m[j]);
}

// weigh_chunks over all of Dh: four chunks (64 columns) per pass, then what is left
template <typename D, int NR>
inline void weigh_values(const float* p, int64_t L, const typename D::scalar* v,
                         const int64_t* offsets, int64_t Dh, const float* total,
                         typename D::scalar* out) {
  const int64_t chunks = (Dh + BLOCK - 1) / BLOCK;
  int64_t j = 0;
  for (; j + 4 <= chunks; j += 4)
    weigh_chunks<D, NR, 4>(p, L, v, offsets, Dh, j * BLOCK, total, out);
  for (; j < chunks; ++j) weigh_chunks<D, NR, 1>(p, L, v, offsets, Dh, j * BLOCK, total, out);
}

#ifdef MOERAY_HAS_AMX
// score_heads for all R <= 16 query heads of a bf16 cache on AMX tiles: the 16 keys of a
// cache block (S a multiple of 16) are one A tile per 32 columns (rows slot_stride apart), the R
// query rows one B tile (pairs along Dh, heads as columns, the rest zero), 16 x R scores per
// tile product. The products are exact in fp32 and summed in fp32, as score_heads does, in
// another order. Rows of the last block past L are read (the block holds S slots) and dropped.
inline void amx_scores(const c10::BFloat16* q, int64_t q_head_stride, int64_t R, int64_t Dh,
                       const c10::BFloat16* k, const int64_t* offsets, int64_t slot_stride,
                       int64_t L, float scale, float* scores) {
  static const TileConfig config;
  thread_local std::vector<c10::BFloat16> qt;  // [Dh / 32][16 pairs][16 heads][2]
  const int64_t steps = Dh / AMX_K;
  qt.assign(steps * BLOCK * BLOCK * 2, c10::BFloat16(0.0f));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < Dh; ++d)
      qt[(d / AMX_K) * BLOCK * BLOCK * 2 + (d % AMX_K / 2) * BLOCK * 2 + r * 2 + d % 2] =
          q[r * q_head_stride + d];
  alignas(64) float c[BLOCK * BLOCK];
  const int64_t row_bytes = Dh * static_cast<int64_t>(sizeof(c10::BFloat16));
  _tile_loadconfig(&config);
  for (int64_t l0 = 0; l0 < L; l0 += BLOCK) {
    const int64_t n = std::min<int64_t>(BLOCK, L - l0);
    if (l0 + BLOCK < L)  // the next 16 keys
      for (int64_t i = l0 + BLOCK; i < std::min(l0 + 2 * BLOCK, L); ++i)
        prefetch_row(k + offsets[i], row_bytes);
    _tile_zero(0);
    for (int64_t st = 0; st < steps; ++st) {
      _tile_loadd(4, k + offsets[l0] + st * AMX_K, slot_stride * 2);
      _tile_loadd(6, qt.data() + st * BLOCK * BLOCK * 2, 64);
      _tile_dpbf16ps(0, 4, 6);
    }
    _tile_stored(0, c, BLOCK * 4);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t l = 0; l < n; ++l) scores[r * L + l0 + l] = c[l * BLOCK + r] * scale;
  }
  _tile_release();
}
#endif

template <typename D>
void attend(const typename D::scalar* q, int64_t q_head_stride, int64_t R, int64_t Dh,
            const typename D::scalar* k, const typename D::scalar* v, int64_t slot_stride,
            const int64_t* table, int64_t S, int64_t L, float scale, typename D::scalar* out,
            std::vector<float>& qf, std::vector<float>& scores, std::vector<int64_t>& offsets) {
  scores.resize(R * L);
  offsets.resize(L);
  for (int64_t l0 = 0; l0 < L; l0 += S) {  // block by block: no division per position
    const int64_t base = table[l0 / S] * S * slot_stride;
    for (int64_t l = l0; l < std::min(l0 + S, L); ++l) offsets[l] = base + (l - l0) * slot_stride;
  }
  bool scored = false;
#ifdef MOERAY_HAS_AMX
  if constexpr (std::is_same_v<D, Bf16>) {
    if (S % BLOCK == 0 && Dh % AMX_K == 0 && R <= BLOCK && amx_ready()) {
      amx_scores(q, q_head_stride, R, Dh, k, offsets.data(), slot_stride, L, scale, scores.data());
      scored = true;
    }
  }
#endif
  if (!scored) {
    // scores, query heads four at a time
    const int64_t W = (Dh + BLOCK - 1) / BLOCK * BLOCK;  // Dh padded to 16s
    qf.assign(R * W, 0.0f);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < Dh; c += BLOCK)
        store(&qf[r * W + c], load(q + r * q_head_stride + c, std::min<int64_t>(BLOCK, Dh - c)));
    const int64_t row_bytes = Dh * static_cast<int64_t>(sizeof(typename D::scalar));
    for (int64_t l = 0; l < L; ++l) {
      if (l + AHEAD < L) prefetch_row(k + offsets[l + AHEAD], row_bytes);
      const typename D::scalar* kl = k + offsets[l];
      int64_t r = 0;
      for (; r + 4 <= R; r += 4)
        score_heads<D, 4>(&qf[r * W], W, Dh, kl, scale, &scores[r * L], L, l);
      for (; r < R; ++r) score_heads<D, 1>(&qf[r * W], W, Dh, kl, scale, &scores[r * L], L, l);
    }
  }
  // softmax over l, in place: e^(s - max) and its sum
  std::vector<float> total(R);
  for (int64_t r = 0; r < R; ++r) {
    float* s = &scores[r * L];
    const float top = max_of(s, L);
    vec sum = vzero();
    for (int64_t l = 0; l < L; l += BLOCK) {
      const int64_t m = std::min<int64_t>(BLOCK, L - l);
      const vec e = exp_ps(load(s + l, m) - vset(top));
      store(s + l, e, m);
      sum = sum + keep(e, m);
    }
    total[r] = hsum(sum);
  }
  int64_t r = 0;
  for (; r + 4 <= R; r += 4)
    weigh_values<D, 4>(&scores[r * L], L, v, offsets.data(), Dh, &total[r], out + r * Dh);
  for (; r < R; ++r)
    weigh_values<D, 1>(&scores[r * L], L, v, offsets.data(), Dh, &total[r], out + r * Dh);
}

template <typename D>
void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& tables, const torch::Tensor& lens, float scale,
            torch::Tensor& out) {
  using Sc = typename D::scalar;
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2);
  const int64_t S = k_cache.size(1), G = k_cache.size(2), R = H / G, M = tables.size(1);
  const Sc* qp = q.data_ptr<Sc>();
  const Sc* kp = k_cache.data_ptr<Sc>();
  const Sc* vp = v_cache.data_ptr<Sc>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  Sc* op = out.data_ptr<Sc>();
  int64_t positions = 0;
  for (int64_t b = 0; b < B; ++b) positions += lp[b];
  // contexts differ in length: threads take the items in turn
  dynamic_for(B * G, positions * H * Dh * 2, [&](int64_t i) {
    thread_local std::vector<float> qf, scores;  // per thread, reused across its items
    thread_local std::vector<int64_t> offsets;
    const int64_t b = i / G, g = i % G;
    attend<D>(qp + b * q.stride(0) + g * R * q.stride(1), q.stride(1), R, Dh, kp + g * Dh,
              vp + g * Dh, G * Dh, tp + b * M, S, lp[b], scale, op + (b * H + g * R) * Dh, qf,
              scores, offsets);
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
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.size(3) == Dh,
              "k_cache and v_cache must be contiguous [N, S, G, ", Dh, "]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                  q.scalar_type() == v_cache.scalar_type() &&
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
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= most, "context_lens[", b, "] = ", lp[b], " is outside [1, ",
                most, "]");
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
