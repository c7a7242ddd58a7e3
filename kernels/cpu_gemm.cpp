// moeray's CPU GEMM for linear layers: out [T, N] = x [T, K] @ w[N, K]^T, bf16 or fp32, on
// AVX-512 (bf16 products with AVX512_BF16's vdpbf16ps) or AVX2 (cpu_simd.h). Built by
// kernels/cpu_gemm.py; read that module's docstring for when it is used and what it was measured
// against.
//
// Weight layout, made once by `pack`: w [N, K] -> [ceil(N/16), K/P, 16, P], P = 2 for bf16
// (vdpbf16ps multiplies pairs along K), 1 for fp32, columns past N zero. One 16-column block is
// then one contiguous stream, and one vec load holds what one multiply-add needs for 16 outputs.
//
// Two loops over it, both parallel over groups of column blocks (dynamic_for: torch's intra-op
// threads, each taking the next group as it finishes one), each output summed by one thread in a
// fixed order, so results do not depend on the thread count or on which thread took it:
// - one row (decode at batch 1, bound by how fast the weight streams from memory): one block at a
//   time, K split over A accumulators so the multiply-adds do not wait on each other;
// - more rows: register tiles of 6 rows x TILE_BLOCKS blocks (cpu_simd.h), the weights loaded
//   once per tile row.
// Where the CPU has AMX-BF16, every bf16 call with K a multiple of 32 runs on AMX tiles instead
// (cpu_amx.h), which read the same packed layout.
// The sums are fp32; bf16 outputs are rounded to nearest even once, at the end. AVX-512's bf16
// instructions treat denormal inputs as zero and flush denormal results (|x| < 1.2e-38), where
// torch's own conversion keeps them: no weight, activation or output of a model lives there.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_amx.h"
#include "cpu_simd.h"

namespace moeray_cpu {

// Columns of block b that are real (N need not be a multiple of 16: pack() pads with zeros).
inline int64_t cols(int64_t b, int64_t N) { return std::min<int64_t>(BLOCK, N - b * BLOCK); }

// One row: out[b*16 .. b*16+16) for blocks [b0, b1), K split over A accumulators.
template <typename D, int A>
void row_blocks(const typename D::scalar* x, const typename D::scalar* w, typename D::scalar* out,
                int64_t K, int64_t N, int64_t b0, int64_t b1) {
  constexpr int64_t P = D::P;
  const int64_t steps = K / P;  // multiply-adds per block
  for (int64_t b = b0; b < b1; ++b) {
    const typename D::scalar* wb = w + b * BLOCK * K;
    vec acc[A];
    for (int a = 0; a < A; ++a) acc[a] = vzero();
    int64_t s = 0;
    for (; s + A <= steps; s += A)
      for (int a = 0; a < A; ++a)
        acc[a] = D::step(acc[a], wb + (s + a) * BLOCK * P, x + (s + a) * P);
    for (; s < steps; ++s) acc[0] = D::step(acc[0], wb + s * BLOCK * P, x + s * P);
    for (int a = 1; a < A; ++a) acc[0] = acc[0] + acc[a];
    store(out + b * BLOCK, acc[0], cols(b, N));
  }
}

// RT rows x NB blocks starting at block b: out[t, (b+j)*16 ..] for t < RT, j < NB.
template <typename D, int NB, int RT>
void tile(const typename D::scalar* x, const typename D::scalar* w, int64_t K, int64_t N, int64_t b,
          typename D::scalar* out) {
  constexpr int64_t P = D::P;
  vec acc[RT][NB];
  for (int t = 0; t < RT; ++t)
    for (int j = 0; j < NB; ++j) acc[t][j] = vzero();
  const typename D::scalar* wb = w + b * BLOCK * K;
  for (int64_t s = 0; s < K / P; ++s) {
    for (int t = 0; t < RT; ++t)
      for (int j = 0; j < NB; ++j)
        acc[t][j] = D::step(acc[t][j], wb + j * BLOCK * K + s * BLOCK * P, x + t * K + s * P);
  }
  for (int t = 0; t < RT; ++t)
    for (int j = 0; j < NB; ++j) store(out + t * N + (b + j) * BLOCK, acc[t][j], cols(b + j, N));
}

// All T rows for NB blocks starting at block b: tiles of 6 rows, then 4, 2, 1 for the rest.
template <typename D, int NB>
void rows(const typename D::scalar* x, int64_t T, int64_t K, const typename D::scalar* w, int64_t N,
          int64_t b, typename D::scalar* out) {
  constexpr int RT = 6;
  int64_t t = 0;
  for (; t + RT <= T; t += RT) tile<D, NB, RT>(x + t * K, w, K, N, b, out + t * N);
  if (T - t >= 4) {
    tile<D, NB, 4>(x + t * K, w, K, N, b, out + t * N);
    t += 4;
  }
  if (T - t >= 2) {
    tile<D, NB, 2>(x + t * K, w, K, N, b, out + t * N);
    t += 2;
  }
  if (T - t == 1) tile<D, NB, 1>(x + t * K, w, K, N, b, out + t * N);
}

constexpr int64_t NB = 4;  // column blocks per work item: 64 outputs

// Column blocks [g*NB, g*NB + NB) (fewer in the last group) of out [T, N] = x [T, K] @ w^T, w
// packed into ceil(N/16) blocks: the unit of work the threads take in turn (dynamic_for).
template <typename D>
void group(const typename D::scalar* x, int64_t T, int64_t K, const typename D::scalar* w,
           int64_t N, int64_t g, typename D::scalar* out) {
  const int64_t blocks = (N + BLOCK - 1) / BLOCK, b = g * NB;
#ifdef MOERAY_HAS_AMX
  if constexpr (std::is_same_v<D, Bf16>) {
    if (K % AMX_K == 0 && amx_ready()) {  // tiles, cpu_amx.h
      amx_blocks(x, T, K, w, N, b, std::min(b + NB, blocks), out);
      return;
    }
  }
#endif
  if (T == 1) {
    // decode at batch 1: ~64 KB of bf16 weight per item at K 512, streamed block by block
    row_blocks<D, 4>(x, w, out, K, N, b, std::min(b + NB, blocks));
  } else if (b + NB <= blocks) {
    for (int64_t j = 0; j < NB; j += TILE_BLOCKS) rows<D, TILE_BLOCKS>(x, T, K, w, N, b + j, out);
  } else {
    for (int64_t bb = b; bb < blocks; ++bb) rows<D, 1>(x, T, K, w, N, bb, out);
  }
}

inline int64_t groups(int64_t N) { return ((N + BLOCK - 1) / BLOCK + NB - 1) / NB; }

// out [T, N] (row-major) = x [T, K] @ w^T, w packed into ceil(N/16) blocks.
template <typename D>
void gemm(const typename D::scalar* x, int64_t T, int64_t K, const typename D::scalar* w, int64_t N,
          typename D::scalar* out) {
  dynamic_for(groups(N), T * K * N, [&](int64_t g) { group<D>(x, T, K, w, N, g, out); });
}

bool amx() {
#ifdef MOERAY_HAS_AMX
  return amx_ready();
#else
  return false;
#endif
}

int64_t pairs(const torch::Tensor& w) { return w.scalar_type() == at::kBFloat16 ? 2 : 1; }

// w [N, K] -> [ceil(N/16), K/P, 16, P], the columns past N zero.
torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "w must be [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat,
              "w must be bfloat16 or float32");
  const int64_t N = w.size(0), K = w.size(1), P = pairs(w);
  TORCH_CHECK(K % P == 0, "a bfloat16 weight needs an even number of columns, got ", K);
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  torch::Tensor padded = w;
  if (blocks * BLOCK != N) {
    padded = torch::zeros({blocks * BLOCK, K}, w.options());
    padded.narrow(0, 0, N).copy_(w);
  }
  return padded.reshape({blocks, BLOCK, K / P, P}).permute({0, 2, 1, 3}).contiguous();
}

// x [T, K] @ w^T -> [T, N], w [N, K] packed by pack().
torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& packed, int64_t N) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == BLOCK && packed.is_contiguous(),
              "the weight must come from pack()");
  const int64_t P = packed.size(3), K = packed.size(1) * P;
  TORCH_CHECK(N > (packed.size(0) - 1) * BLOCK && N <= packed.size(0) * BLOCK,
              "N does not match the packed weight");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == packed.scalar_type() && x_in.size(1) == K,
              "x must be [T, ", K, "] of the weight's dtype");
  const torch::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0);
  torch::Tensor out = torch::empty({T, N}, x.options());
  if (T == 0) return out;
  if (x.scalar_type() == at::kBFloat16) {
    gemm<Bf16>(x.data_ptr<c10::BFloat16>(), T, K, packed.data_ptr<c10::BFloat16>(), N,
               out.data_ptr<c10::BFloat16>());
  } else {
    gemm<Fp32>(x.data_ptr<float>(), T, K, packed.data_ptr<float>(), N, out.data_ptr<float>());
  }
  return out;
}

// --- fused_moe: the packed path's routed experts in one call per layer ----------------------

// act [n, F] = silu(gate) * up of h [n, 2F] (gate columns, then up), in fp32, rounded once.
template <typename D>
void silu_and_mul(const typename D::scalar* h, int64_t n, int64_t F, typename D::scalar* act) {
  for (int64_t r = 0; r < n; ++r) {
    const typename D::scalar* gate = h + r * 2 * F;
    for (int64_t c = 0; c < F; c += BLOCK) {
      const int64_t m = std::min<int64_t>(BLOCK, F - c);
      const vec g = load(gate + c, m);
      const vec silu = g / (vset(1.0f) + exp_ps(vzero() - g));
      store(act + r * F + c, silu * load(gate + F + c, m), m);
    }
  }
}

// out[t] += w * y for each row of y [n, D]: the product rounded to fp32, then the sum (built
// with -ffp-contract=off, so never one fused multiply-add: a shard returns w * y rounded and
// the engine adds, and in-process must give the same bits).
template <typename D>
void combine(const typename D::scalar* y, int64_t n, int64_t D_, const int64_t* tokens,
             const float* weights, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    float* o = out + tokens[r] * D_;
    const vec w = vset(weights[r]);
    for (int64_t c = 0; c < D_; c += BLOCK) {
      const int64_t m = std::min<int64_t>(BLOCK, D_ - c);
      store(o + c, load(o + c, m) + load(y + r * D_ + c, m) * w, m);
    }
  }
}

// The layer in three parallel passes, each over every expert that has tokens (so a thread that
// finishes one expert's columns goes on to the next expert's): h = x @ w1^T, act = silu(gate) *
// up, y = act @ w2^T; then the weighted rows added into out, expert by expert.
template <typename D>
void moe(const typename D::scalar* hidden, int64_t Dm, int64_t F, const typename D::scalar* w1,
         int64_t w1_stride, const typename D::scalar* w2, int64_t w2_stride,
         const std::vector<std::vector<int64_t>>& slots, int64_t K, const float* topk_weights,
         float* out) {
  using S = typename D::scalar;
  std::vector<int64_t> experts, first;  // the experts with tokens, each one's first gathered row
  int64_t n = 0;
  for (size_t e = 0; e < slots.size(); ++e) {
    if (slots[e].empty()) continue;
    experts.push_back(static_cast<int64_t>(e));
    first.push_back(n);
    n += static_cast<int64_t>(slots[e].size());
  }
  first.push_back(n);
  const int64_t used = static_cast<int64_t>(experts.size());
  // scratch left uninitialised (every element is written before it is read)
  const std::unique_ptr<S[]> x(new S[n * Dm]), h(new S[n * 2 * F]), act(new S[n * F]),
      y(new S[n * Dm]);
  std::vector<int64_t> tokens(n);
  std::vector<float> weights(n);
  for (int64_t i = 0; i < used; ++i) {
    const std::vector<int64_t>& s = slots[experts[i]];
    for (size_t r = 0; r < s.size(); ++r) {
      const int64_t row = first[i] + static_cast<int64_t>(r);
      tokens[row] = s[r] / K;
      weights[row] = topk_weights[s[r]];
      std::memcpy(x.get() + row * Dm, hidden + tokens[row] * Dm, Dm * sizeof(S));
    }
  }
  const int64_t g1 = groups(2 * F), g2 = groups(Dm);
  dynamic_for(used * g1, n * Dm * 2 * F, [&](int64_t item) {  // [rows, 2F]
    const int64_t i = item / g1, e = experts[i], r = first[i];
    group<D>(x.get() + r * Dm, first[i + 1] - r, Dm, w1 + e * w1_stride, 2 * F, item % g1,
             h.get() + r * 2 * F);
  });
  dynamic_for(n, n * F * 8,  // e^x and a division a column
              [&](int64_t r) { silu_and_mul<D>(h.get() + r * 2 * F, 1, F, act.get() + r * F); });
  dynamic_for(used * g2, n * F * Dm, [&](int64_t item) {  // [rows, D]
    const int64_t i = item / g2, e = experts[i], r = first[i];
    group<D>(act.get() + r * F, first[i + 1] - r, F, w2 + e * w2_stride, Dm, item % g2,
             y.get() + r * Dm);
  });
  combine<D>(y.get(), n, Dm, tokens.data(), weights.data(), out);
}

// kernels.reference.fused_moe on packed experts: hidden [T, D] (the weights' dtype), w1
// [E, ...] = E experts' [2F, D] weights stacked after pack(), w2 [E, ...] their [D, F] ones,
// topk_weights [T, K] f32, topk_ids [T, K] (ids outside [0, E) skipped) -> [T, D] f32.
// Experts in ascending id order, each on its tokens in ascending order (the rows a shard's GEMM
// sees too), the SwiGLU in fp32, every expert's weighted rows added into the fp32 sum in turn.
torch::Tensor fused_moe(const torch::Tensor& hidden_in, const torch::Tensor& w1,
                        const torch::Tensor& w2, const torch::Tensor& topk_weights_in,
                        const torch::Tensor& topk_ids_in, int64_t F) {
  TORCH_CHECK(w1.dim() == 5 && w2.dim() == 5 && w1.size(0) == w2.size(0) && w1.is_contiguous() &&
                  w2.is_contiguous() && w1.size(3) == BLOCK && w2.size(3) == BLOCK,
              "w1 and w2 must be [E] packed weights stacked");
  const int64_t E = w1.size(0), P = w1.size(4), Dm = w1.size(2) * P;
  TORCH_CHECK(w1.size(1) == (2 * F + BLOCK - 1) / BLOCK && w2.size(1) == (Dm + BLOCK - 1) / BLOCK &&
                  w2.size(2) * P == F && w2.scalar_type() == w1.scalar_type(),
              "w1 must pack [E, 2F, D] and w2 [E, D, F] of one dtype");
  TORCH_CHECK(hidden_in.dim() == 2 && hidden_in.size(1) == Dm &&
                  hidden_in.scalar_type() == w1.scalar_type(),
              "hidden must be [T, ", Dm, "] of the weights' dtype");
  const int64_t T = hidden_in.size(0);
  TORCH_CHECK(topk_ids_in.dim() == 2 && topk_ids_in.size(0) == T &&
                  topk_weights_in.sizes() == topk_ids_in.sizes(),
              "topk_weights and topk_ids must be [T, K]");
  const torch::Tensor hidden = hidden_in.contiguous();
  const torch::Tensor ids = topk_ids_in.to(at::kLong).contiguous();
  const torch::Tensor weights = topk_weights_in.to(at::kFloat).contiguous();
  const int64_t K = ids.size(1);
  std::vector<std::vector<int64_t>> slots(E);  // per expert its (token, choice) slots, ascending
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * K; ++i)
    if (id[i] >= 0 && id[i] < E) slots[id[i]].push_back(i);
  torch::Tensor out = torch::zeros({T, Dm}, hidden.options().dtype(at::kFloat));
  if (hidden.scalar_type() == at::kBFloat16) {
    moe<Bf16>(hidden.data_ptr<c10::BFloat16>(), Dm, F, w1.data_ptr<c10::BFloat16>(), w1.stride(0),
              w2.data_ptr<c10::BFloat16>(), w2.stride(0), slots, K, weights.data_ptr<float>(),
              out.data_ptr<float>());
  } else {
    moe<Fp32>(hidden.data_ptr<float>(), Dm, F, w1.data_ptr<float>(), w1.stride(0),
              w2.data_ptr<float>(), w2.stride(0), slots, K, weights.data_ptr<float>(),
              out.data_ptr<float>());
  }
  return out;
}

}  // namespace moeray_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace moeray_cpu;
  // Everything but pack touches no Python object: those let go of the GIL, so the engine
  // process's other threads (its event loop sending the deltas) run while they compute.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("amx", &amx, "whether bf16 GEMMs run on AMX tiles here");
  m.def("pack", &pack, "w [N, K] -> the blocked layout linear() reads");
  m.def("linear", &linear, "x [T, K] @ w^T with w [N, K] packed -> [T, N]", nogil);
  m.def("fused_moe", &fused_moe, "the routed experts of one MoE layer on stacked packed weights",
        nogil);
  m.def("decode_attention", &decode_attention, "one query per sequence over its paged K/V cache",
        nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension", nogil);
  m.def("add_rms_norm", &add_rms_norm, "(rms_norm(x + residual), x + residual)", nogil);
  m.def("apply_rope", &apply_rope, "x * cos + rotate_half(x) * sin", nogil);
}
