// AMX tiles for the bf16 GEMM of kernels/cpu_gemm.cpp (and the decode attention's scores,
// kernels/cpu_attention.cpp), where the CPU has AMX-BF16 (Intel
// Sapphire Rapids and later). A tile multiply-add (tdpbf16ps: 16 x 32 by 32 x 16) does 16 times
// the work of one vdpbf16ps, and tile loads stream the weight faster than the AVX-512 loop does,
// so tiles win at every row count, one row included (half-empty tiles cost nothing where the
// weight's stream bounds the call): on a 2-core Sapphire Rapids VM (2026-12-02, 2 threads,
// weights cycled past the L3) an expert's w1 [2048, 512] at 1 / 16 / 128 rows took 59 / 66 /
// 197 us against the AVX-512 loop's 77 / ~140 / 1224 and oneDNN's (also AMX) 86 / 95 / 216.
//
// The packed bf16 layout [ceil(N/16), K/2, 16, 2] is already AMX's B-tile layout: 16 pairs
// along K (rows of 64 bytes) of one 16-column block are one B tile, read with a 64-byte stride.
// A tiles are 16 rows x 32 columns of x (the last rows of a call on tiles of fewer rows).
// Each output is still summed by one thread over K in one fixed order (32 columns per tile
// product), so results do not depend on the thread count or the row count; they differ from
// the AVX-512 loop's in the last bits (another summation order): a machine runs one or the other
// for every bf16 call with K a multiple of 32.
//
// Linux hands a process the tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM, as
// oneDNN does too); without it the first tile instruction raises SIGILL. amx_ready() asks once
// and says whether it got it; MOERAY_AMX=0 in the environment keeps the AVX-512 loop (values
// other than 0 and 1 are refused by kernels/cpu_gemm.py before the extension loads; for
// benchmarks that compare the two).
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define MOERAY_HAS_AMX 1

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "cpu_simd.h"

namespace moeray_cpu {

// K must be a multiple of one A tile's width.
constexpr int64_t AMX_K = 32;

// Whether this process may run tile instructions: the CPU has AMX-TILE and AMX-BF16, Linux gave
// the process the tile data state, and MOERAY_AMX is not "0". Decided once.
inline bool amx_ready() {
  static const bool ready = [] {
    const char* env = std::getenv("MOERAY_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ready;
}

// Tile registers: C 0-3 (row tile r, column block j -> 2r + j), A 4-5, B 6-7; rows of 64 bytes
// (palette 1), 16 of them, or `rows` in the C and A tiles (the last rows of a call: the tiles
// read and write only those).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  explicit TileConfig(int64_t x_rows = BLOCK) {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = static_cast<uint8_t>(t < 6 ? x_rows : BLOCK);
    }
  }
};

// c [MR*16, NR*16] f32 (row stride NR*16) = x [MR*16, K] (row stride K) @ blocks b, b+1 of w^T.
template <int MR, int NR>
void amx_tile(const c10::BFloat16* x, int64_t K, const c10::BFloat16* w, int64_t b, float* c) {
  _tile_zero(0);
  if constexpr (NR > 1) _tile_zero(1);
  if constexpr (MR > 1) _tile_zero(2);
  if constexpr (MR > 1 && NR > 1) _tile_zero(3);
  const c10::BFloat16* w0 = w + b * BLOCK * K;
  for (int64_t k = 0; k < K; k += AMX_K) {
    _tile_loadd(4, x + k, K * 2);
    _tile_loadd(6, w0 + k * BLOCK, 64);  // pairs k/2 .. k/2 + 15 of block b
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NR > 1) {
      _tile_loadd(7, w0 + BLOCK * K + k * BLOCK, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MR > 1) {
      _tile_loadd(5, x + BLOCK * K + k, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NR > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int64_t stride = NR * BLOCK * 4;
  _tile_stored(0, c, stride);
  if constexpr (NR > 1) _tile_stored(1, c + BLOCK, stride);
  if constexpr (MR > 1) _tile_stored(2, c + BLOCK * NR * BLOCK, stride);
  if constexpr (MR > 1 && NR > 1) _tile_stored(3, c + BLOCK * NR * BLOCK + BLOCK, stride);
}

// out rows [t, t + rows) and blocks [b, b + nr) from c [*, nr*16] f32, rounded to bf16.
inline void amx_store(const float* c, int64_t rows, int nr, int64_t N, int64_t t, int64_t b,
                      c10::BFloat16* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < nr; ++j) {
      const int64_t m = std::min<int64_t>(BLOCK, N - (b + j) * BLOCK);
      store(out + (t + r) * N + (b + j) * BLOCK, load(c + r * nr * BLOCK + j * BLOCK, m), m);
    }
}

template <int MR>
void amx_row_tile(const c10::BFloat16* x, int64_t rows, int64_t K, const c10::BFloat16* w,
                  int64_t N, int64_t b0, int64_t b1, int64_t t, c10::BFloat16* out) {
  alignas(64) float c[2 * BLOCK * 2 * BLOCK];
  int64_t b = b0;
  for (; b + 2 <= b1; b += 2) {
    amx_tile<MR, 2>(x, K, w, b, c);
    amx_store(c, rows, 2, N, t, b, out);
  }
  if (b < b1) {
    amx_tile<MR, 1>(x, K, w, b, c);
    amx_store(c, rows, 1, N, t, b, out);
  }
}

// out [T, N] columns of blocks [b0, b1) = x [T, K] @ w^T on tiles: row tiles of 32, then 16,
// then the last rows (T not a multiple of 16) on tiles configured to that many rows.
inline void amx_blocks(const c10::BFloat16* x, int64_t T, int64_t K, const c10::BFloat16* w,
                       int64_t N, int64_t b0, int64_t b1, c10::BFloat16* out) {
  static const TileConfig config;
  _tile_loadconfig(&config);
  int64_t t = 0;
  for (; t + 2 * BLOCK <= T; t += 2 * BLOCK)
    amx_row_tile<2>(x + t * K, 2 * BLOCK, K, w, N, b0, b1, t, out);
  for (; t + BLOCK <= T; t += BLOCK) amx_row_tile<1>(x + t * K, BLOCK, K, w, N, b0, b1, t, out);
  if (t < T) {
    const TileConfig last(T - t);
    _tile_loadconfig(&last);
    amx_row_tile<1>(x + t * K, T - t, K, w, N, b0, b1, t, out);
  }
  _tile_release();
}

}  // namespace moeray_cpu

#endif
