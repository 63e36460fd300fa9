#pragma once
// Hot float32 loops of the CPU kernels, compiled twice (AVX+FMA and baseline SSE2) and picked at
// load time by the CPU's features, so one wheel is fast on current CPUs and still runs on old ones.
#include <cmath>
#include <cstdint>

namespace maskattn {
namespace cpu {

// sum_d a[d] * b[d], with independent partial sums (a plain loop is one serial add chain that the
// compiler may not reorder, and runs at a fraction of the memory bandwidth).
float dot_f32(const float* a, const float* b, int64_t n);

// out[j] = sum_d a[d] * rows[j][d] for nrows <= 4 rows at once: a is loaded once for all of them and
// the rows' independent sums keep the FMA units busy.
void dot_rows_f32(const float* a, const float* const* rows, int nrows, int64_t n, float* out);

// acc[d] += sum_{j < nrows} w[j] * rows[j][d], nrows <= 8: acc is loaded and stored once per
// group of rows instead of once per row.
void axpy_rows_f32(float* acc, const float* const* rows, const float* w, int nrows, int64_t n);

// e^(v - m) for v <= m (a softmax numerator) with the rounding error of v - m recovered exactly
// (Knuth's TwoSum: additions only, so FMA contraction cannot disturb it) and applied to the
// result: a logit 20 below the max would otherwise carry up to 1e-6 of relative error (float32)
// into its weight before the exp is even taken. e^-inf is exactly 0; subnormal results are kept.
template <typename T>
inline T exp_diff(T v, T m) {
  const T d = v - m;
  const T e = std::exp(d);
  if (e == T(0)) return e;
  const T vv = d + m;
  const T lo = (v - vv) - (m + (d - vv));
  return e + e * lo;
}

// Softmax numerators of a row: v[i] = e^(v[i] - mx) in place (v <= mx; -inf gives 0), returning
// their sum. The exp is a vectorised polynomial that, like exp_diff, takes the rounding error of
// v - mx into account (within ~2 ulp of e^(v - mx) at any distance from the max); the sum runs over
// blocks of cpu::kSumBlock, the blocks added pairwise. The fast variant writes 0 where the result
// would be subnormal (a value more than 87 below mx) and sets *tiny; the caller then refills v and
// calls exp_sum_careful_f32, which keeps those subnormals (docs/numerics.md). A NaN in v (or a
// NaN / +inf mx) gives a NaN sum.
float exp_sum_f32(float* v, int64_t n, float mx, bool* tiny);
float exp_sum_careful_f32(float* v, int64_t n, float mx);

// masked_channel_attention_pool's softmax runs per channel (one per bag and feature), so these
// vectors span channels, not rows.
//
// One block of a bag's rows: for each channel d < n, over rows j < nrows (nrows >= 1),
// m[d] = max_j l[j][d] (NaN wins), s[d] = sum_j e^(l[j][d] - m[d]) (exp as in exp_sum_f32) and
// a[d] = sum_j e * f[j][d], where a row whose e is 0 is selected away, not multiplied (0 * NaN). A
// channel whose max is -inf gets s = a = 0. careful = false writes 0 for a subnormal e and returns
// true; the caller then redoes the block with careful = true, which keeps them.
bool channel_softmax_block_f32(const float* const* l, const float* const* f, int nrows, int64_t n, float* m,
                               float* s, float* a, bool careful);

// Merges two such states, each m, s, a of n channels at x, x + stride, x + 2 * stride, into out
// (which may be x or y): both rescaled to the larger max (a state whose scale is 0 contributes
// nothing, even inf / NaN in a).
void channel_state_merge_f32(const float* x, const float* y, float* out, int64_t n, int64_t stride);

// w[d] = e^(l[d] - m[d]) * inv[d], d < n: one row's weights from its bag's final channel max and
// 1 / sum. Returns true when careful is false and some e was subnormal (written as 0).
bool channel_weights_row_f32(const float* l, const float* m, const float* inv, int64_t n, float* w,
                             bool careful);

// gated_attention_scores' row of H hidden units, act 0 = tanh, 1 = relu, 2 = gelu (erf), with
// x = v + bv and y = u + bu (a null bias adds nothing): p[j] = act(x[j]) * sigmoid(y[j]), and, given
// c[j] = dL/dp[j], gv = c * sigmoid(y) * act'(x) and gu = c * act(x) * sigmoid'(y). Each output is
// skipped when null; c is read only for gv or gu.
void gate_row_f32(const float* v, const float* u, const float* bv, const float* bu, const float* c, int64_t n,
                  int act, float* gv, float* gu, float* p);

// Generic versions for the other dtypes: eight independent partial sums, which compilers turn
// into vector code without being allowed to reassociate.
template <typename acc_t, typename scalar_t>
inline acc_t dot_any(const acc_t* a, const scalar_t* p, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int j = 0; j < 8; ++j) s[j] += a[d + j] * static_cast<acc_t>(p[d + j]);
  }
  for (; d < n; ++d) s[0] += a[d] * static_cast<acc_t>(p[d]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

inline float dot_any(const float* a, const float* p, int64_t n) {
  return dot_f32(a, p, n);
}

template <typename acc_t, typename scalar_t>
inline void dot_rows_any(const acc_t* a, const scalar_t* const* rows, int nrows, int64_t n, acc_t* out) {
  for (int j = 0; j < nrows; ++j) out[j] = dot_any(a, rows[j], n);
}

inline void dot_rows_any(const float* a, const float* const* rows, int nrows, int64_t n, float* out) {
  dot_rows_f32(a, rows, nrows, n, out);
}

template <typename acc_t, typename scalar_t>
inline void axpy_rows_any(acc_t* acc, const scalar_t* const* rows, const acc_t* w, int nrows, int64_t n) {
  for (int j = 0; j < nrows; ++j) {
    const acc_t wj = w[j];
    const scalar_t* r = rows[j];
    for (int64_t d = 0; d < n; ++d) acc[d] += wj * static_cast<acc_t>(r[d]);
  }
}

inline void axpy_rows_any(float* acc, const float* const* rows, const float* w, int nrows, int64_t n) {
  axpy_rows_f32(acc, rows, w, nrows, n);
}

}  // namespace cpu
}  // namespace maskattn
