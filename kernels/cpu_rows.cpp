// Row-wise ops on CPU, one pass per row (built into the extension of kernels/cpu_gemm.py;
// kernels.rms_norm, add_rms_norm and apply_rope call them where moeray's C++ CPU kernels run),
// with kernels.reference's arithmetic:
// - RMSNorm and the residual add before it: the sum rounded to x's dtype, the norm in fp32 (the
//   mean of squares summed over 16 lanes, then 1 / sqrt(mean + eps)), the normed row rounded to
//   x's dtype, then times the weight, rounded again;
// - rope (rotate-half): x * cos + rotate_half(x) * sin, each product and the sum rounded to x's
//   dtype as torch rounds them, so the result equals the reference bit for bit.
// Rows are independent and each is one thread's: results do not depend on the thread count.

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "cpu_simd.h"

namespace moeray_cpu {
namespace {

template <typename D>
void norm_rows(const typename D::scalar* x, const typename D::scalar* residual,
               typename D::scalar* summed, const typename D::scalar* weight,
               typename D::scalar* out, int64_t T, int64_t Dm, float eps) {
  using S = typename D::scalar;
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const S* xr = x + t * Dm;
      S* sr = summed + t * Dm;
      const S* row = xr;  // what is normed: x, or x + residual as stored
      if (residual != nullptr) {
        for (int64_t c = 0; c < Dm; c += BLOCK) {
          const int64_t m = std::min<int64_t>(BLOCK, Dm - c);
          store(sr + c, load(xr + c, m) + load(residual + t * Dm + c, m), m);
        }
        row = sr;
      }
      vec squares = vzero();
      for (int64_t c = 0; c < Dm; c += BLOCK) {
        const vec v = load(row + c, std::min<int64_t>(BLOCK, Dm - c));
        squares = fmadd(v, v, squares);
      }
      const float scale = 1.0f / std::sqrt(hsum(squares) / Dm + eps);
      S* o = out + t * Dm;
      for (int64_t c = 0; c < Dm; c += BLOCK) {
        const int64_t m = std::min<int64_t>(BLOCK, Dm - c);
        store(o + c, load(row + c, m) * vset(scale), m);
        store(o + c, load(weight + c, m) * load(o + c, m), m);
      }
    }
  });
}

// v rounded to D's dtype and back (what a torch op in that dtype stores)
template <typename D>
inline vec rounded(vec v) {
  if constexpr (std::is_same_v<D, Bf16>) {
    return round_bf16(v);
  } else {
    return v;
  }
}

template <typename D>
void rope_rows(const typename D::scalar* x, int64_t T, int64_t heads, int64_t Dh, int64_t s0,
               int64_t s1, const typename D::scalar* cos, const typename D::scalar* sin,
               typename D::scalar* out) {
  const int64_t half = Dh / 2;
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const typename D::scalar* c = cos + t * Dh;
      const typename D::scalar* s = sin + t * Dh;
      for (int64_t h = 0; h < heads; ++h) {
        const typename D::scalar* xr = x + t * s0 + h * s1;
        typename D::scalar* o = out + (t * heads + h) * Dh;
        for (int64_t i = 0; i < half; i += BLOCK) {
          const int64_t m = std::min<int64_t>(BLOCK, half - i);
          const vec x1 = load(xr + i, m), x2 = load(xr + half + i, m);
          const vec neg = vzero() - x2;
          // first half: x1 * cos - x2 * sin; second half: x2 * cos + x1 * sin
          const vec lo = rounded<D>(x1 * load(c + i, m)) + rounded<D>(neg * load(s + i, m));
          const vec hi =
              rounded<D>(x2 * load(c + half + i, m)) + rounded<D>(x1 * load(s + half + i, m));
          store(o + i, lo, m);
          store(o + half + i, hi, m);
        }
      }
    }
  });
}

std::vector<torch::Tensor> run(const torch::Tensor& x_in, const torch::Tensor* residual_in,
                               const torch::Tensor& weight_in, double eps) {
  TORCH_CHECK(x_in.dim() >= 1 && weight_in.dim() == 1 && x_in.size(-1) == weight_in.size(0),
              "x must be [..., D] and weight [D]");
  TORCH_CHECK(x_in.scalar_type() == weight_in.scalar_type() &&
                  (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "x and weight must both be float32 or both bfloat16");
  const torch::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t Dm = x.size(-1), T = Dm ? x.numel() / Dm : 0;
  torch::Tensor residual, summed;
  if (residual_in != nullptr) {
    TORCH_CHECK(residual_in->sizes() == x.sizes() && residual_in->scalar_type() == x.scalar_type(),
                "residual must match x");
    residual = residual_in->contiguous();
    summed = torch::empty_like(x);
  }
  torch::Tensor out = torch::empty_like(x);
  if (x.scalar_type() == at::kBFloat16) {
    using S = c10::BFloat16;
    norm_rows<Bf16>(x.data_ptr<S>(), residual_in ? residual.data_ptr<S>() : nullptr,
                    residual_in ? summed.data_ptr<S>() : nullptr, weight.data_ptr<S>(),
                    out.data_ptr<S>(), T, Dm, static_cast<float>(eps));
  } else {
    norm_rows<Fp32>(x.data_ptr<float>(), residual_in ? residual.data_ptr<float>() : nullptr,
                    residual_in ? summed.data_ptr<float>() : nullptr, weight.data_ptr<float>(),
                    out.data_ptr<float>(), T, Dm, static_cast<float>(eps));
  }
  if (residual_in == nullptr) return {out};
  return {out, summed};
}

}  // namespace

torch::Tensor apply_rope(const torch::Tensor& x_in, const torch::Tensor& cos_in,
                         const torch::Tensor& sin_in) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(2) % 2 == 0, "x must be [T, heads, Dh], Dh even");
  const int64_t T = x_in.size(0), heads = x_in.size(1), Dh = x_in.size(2);
  TORCH_CHECK(cos_in.numel() == T * Dh && sin_in.numel() == T * Dh && cos_in.size(-1) == Dh &&
                  sin_in.size(-1) == Dh,
              "cos and sin must hold [T, Dh] = [", T, ", ", Dh, "]");
  TORCH_CHECK((x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16) &&
                  cos_in.scalar_type() == x_in.scalar_type() &&
                  sin_in.scalar_type() == x_in.scalar_type(),
              "x, cos and sin must all be float32 or all bfloat16");
  const torch::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const torch::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
  torch::Tensor out = torch::empty({T, heads, Dh}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    using S = c10::BFloat16;
    rope_rows<Bf16>(x.data_ptr<S>(), T, heads, Dh, x.stride(0), x.stride(1), cos.data_ptr<S>(),
                    sin.data_ptr<S>(), out.data_ptr<S>());
  } else {
    rope_rows<Fp32>(x.data_ptr<float>(), T, heads, Dh, x.stride(0), x.stride(1),
                    cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return run(x, nullptr, weight, eps)[0];
}

std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& residual,
                                        const torch::Tensor& weight, double eps) {
  return run(x, &residual, weight, eps);
}

}  // namespace moeray_cpu
