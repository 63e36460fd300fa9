#include "common/cpu_vec.h"

#include <cstring>

// The 32-byte vector helpers below are always inlined into both clones; the ABI note GCC emits
// for returning them from a non-AVX function concerns calls that never happen.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MASKATTN_CLONES __attribute__((target_clones("fma", "default")))
#else
#define MASKATTN_CLONES
#endif

namespace maskattn {
namespace cpu {
namespace {
// Eight floats; the compiler maps it to one AVX register or two SSE registers.
typedef float v8sf __attribute__((vector_size(32)));

inline v8sf load8(const float* p) {
  v8sf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8sf v) {
  std::memcpy(p, &v, sizeof(v));
}
}  // namespace

MASKATTN_CLONES
float dot_f32(const float* a, const float* b, int64_t n) {
  v8sf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 += load8(a + i) * load8(b + i);
    s1 += load8(a + i + 8) * load8(b + i + 8);
    s2 += load8(a + i + 16) * load8(b + i + 16);
    s3 += load8(a + i + 24) * load8(b + i + 24);
  }
  for (; i + 8 <= n; i += 8) s0 += load8(a + i) * load8(b + i);
  const v8sf s = (s0 + s1) + (s2 + s3);
  float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

MASKATTN_CLONES
void dot_rows_f32(const float* a, const float* const* rows, int nrows, int64_t n, float* out) {
  if (nrows != 4) {
    for (int j = 0; j < nrows; ++j) out[j] = dot_f32(a, rows[j], n);
    return;
  }
  const float* r0 = rows[0];
  const float* r1 = rows[1];
  const float* r2 = rows[2];
  const float* r3 = rows[3];
  v8sf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v8sf x = load8(a + i), y = load8(a + i + 8);
    s0 += x * load8(r0 + i);
    t0 += y * load8(r0 + i + 8);
    s1 += x * load8(r1 + i);
    t1 += y * load8(r1 + i + 8);
    s2 += x * load8(r2 + i);
    t2 += y * load8(r2 + i + 8);
    s3 += x * load8(r3 + i);
    t3 += y * load8(r3 + i + 8);
  }
  const v8sf u[4] = {s0 + t0, s1 + t1, s2 + t2, s3 + t3};
  for (int j = 0; j < 4; ++j) {
    const v8sf v = u[j];
    float r = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    for (int64_t k = i; k < n; ++k) r += a[k] * rows[j][k];
    out[j] = r;
  }
}

MASKATTN_CLONES
void axpy_rows_f32(float* acc, const float* const* rows, const float* w, int nrows, int64_t n) {
  int64_t i = 0;
  if (nrows == 8) {  // the steady state of the pooling loop: fully unrolled
    const float* r0 = rows[0];
    const float* r1 = rows[1];
    const float* r2 = rows[2];
    const float* r3 = rows[3];
    const float* r4 = rows[4];
    const float* r5 = rows[5];
    const float* r6 = rows[6];
    const float* r7 = rows[7];
    for (; i + 8 <= n; i += 8) {
      v8sf x = load8(acc + i);
      x += w[0] * load8(r0 + i) + w[1] * load8(r1 + i);
      x += w[2] * load8(r2 + i) + w[3] * load8(r3 + i);
      x += w[4] * load8(r4 + i) + w[5] * load8(r5 + i);
      x += w[6] * load8(r6 + i) + w[7] * load8(r7 + i);
      store8(acc + i, x);
    }
  } else {
    for (; i + 8 <= n; i += 8) {
      v8sf x = load8(acc + i);
      for (int j = 0; j < nrows; ++j) x += w[j] * load8(rows[j] + i);
      store8(acc + i, x);
    }
  }
  for (; i < n; ++i) {
    float x = acc[i];
    for (int j = 0; j < nrows; ++j) x += w[j] * rows[j][i];
    acc[i] = x;
  }
}

}  // namespace cpu
}  // namespace maskattn
