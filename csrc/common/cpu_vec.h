#pragma once
// Hot float32 loops of the CPU kernels, compiled twice (AVX+FMA and baseline SSE2) and picked at
// load time by the CPU's features, so one wheel is fast on current CPUs and still runs on old ones.
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
