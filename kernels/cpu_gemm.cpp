// moeray's CPU GEMM for linear layers: out [T, N] = x [T, K] @ w[N, K]^T, bf16 or fp32, on
// AVX-512 (bf16 products with AVX512_BF16's vdpbf16ps). Built by kernels/cpu_gemm.py; read that
// module's docstring for when it is used and what it was measured against.
//
// Weight layout, made once by `pack`: w [N, K] -> [ceil(N/16), K/P, 16, P], P = 2 for bf16
// (vdpbf16ps multiplies pairs along K), 1 for fp32, columns past N zero. One 16-column block is
// then one contiguous stream, and a 512-bit load holds what one multiply-add needs for 16 outputs.
//
// Two loops over it, both parallel over column blocks (at::parallel_for: torch's intra-op
// threads), each output summed by one thread in a fixed order, so results do not depend on the
// thread count:
// - one row (decode at batch 1, bound by how fast the weight streams from memory): one block at a
//   time, K split over A accumulators so the multiply-adds do not wait on each other;
// - more rows: a register tile of NB blocks x RT rows, the weights loaded once per tile row.
// The sums are fp32; bf16 outputs are rounded to nearest even once, at the end. The bf16
// instructions treat denormal inputs as zero and flush denormal results (|x| < 1.2e-38), where
// torch's own conversion keeps them: no weight, activation or output of a model lives there.

#include <algorithm>
#include <cstring>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/extension.h>

namespace {

constexpr int64_t BLOCK = 16;  // output columns per block (one zmm of fp32 sums)

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
  static void store(scalar* out, __m512 acc, int64_t n) {
    if (n == BLOCK) {
      _mm512_storeu_ps(out, acc);
    } else {
      _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1), acc);
    }
  }
};

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
    __m512 acc[A];
    for (int a = 0; a < A; ++a) acc[a] = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + A <= steps; s += A)
      for (int a = 0; a < A; ++a) acc[a] = D::step(acc[a], wb + (s + a) * BLOCK * P, x + (s + a) * P);
    for (; s < steps; ++s) acc[0] = D::step(acc[0], wb + s * BLOCK * P, x + s * P);
    for (int a = 1; a < A; ++a) acc[0] = _mm512_add_ps(acc[0], acc[a]);
    D::store(out + b * BLOCK, acc[0], cols(b, N));
  }
}

// RT rows x NB blocks starting at block b: out[t, (b+j)*16 ..] for t < RT, j < NB.
template <typename D, int NB, int RT>
void tile(const typename D::scalar* x, const typename D::scalar* w, int64_t K, int64_t N, int64_t b,
          typename D::scalar* out) {
  constexpr int64_t P = D::P;
  __m512 acc[RT][NB];
  for (int t = 0; t < RT; ++t)
    for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_setzero_ps();
  const typename D::scalar* wb = w + b * BLOCK * K;
  for (int64_t s = 0; s < K / P; ++s) {
    for (int t = 0; t < RT; ++t)
      for (int j = 0; j < NB; ++j)
        acc[t][j] = D::step(acc[t][j], wb + j * BLOCK * K + s * BLOCK * P, x + t * K + s * P);
  }
  for (int t = 0; t < RT; ++t)
    for (int j = 0; j < NB; ++j) D::store(out + t * N + (b + j) * BLOCK, acc[t][j], cols(b + j, N));
}

// All T rows for NB blocks starting at block b: tiles of RT rows, then 4, 2, 1 for the rest.
template <typename D, int NB>
void rows(const typename D::scalar* x, int64_t T, int64_t K, const typename D::scalar* w, int64_t N,
          int64_t b, typename D::scalar* out) {
  constexpr int RT = 6;  // 6 x 4 accumulators + 4 weights: 28 of the 32 zmm registers
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

// out [T, N] (row-major) = x [T, K] @ w^T, w packed into ceil(N/16) blocks.
template <typename D>
void gemm(const typename D::scalar* x, int64_t T, int64_t K, const typename D::scalar* w, int64_t N,
          typename D::scalar* out) {
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  if (T == 1) {
    // ~64 KB of bf16 weight per task at K 512: small enough to balance, large enough to stream
    at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
      row_blocks<D, 4>(x, w, out, K, N, b0, b1);
    });
    return;
  }
  constexpr int NB = 4;
  const int64_t groups = (blocks + NB - 1) / NB;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g * NB;
      if (b + NB <= blocks) {
        rows<D, NB>(x, T, K, w, N, b, out);
      } else {
        for (int64_t bb = b; bb < blocks; ++bb) rows<D, 1>(x, T, K, w, N, bb, out);
      }
    }
  });
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "w [N, K] -> the blocked layout linear() reads");
  m.def("linear", &linear, "x [T, K] @ w^T with w [N, K] packed -> [T, N]");
}
