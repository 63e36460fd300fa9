// CPU kernels of masked_softmax and its backward.
//
// Each row is read once from memory into a small per-thread float buffer (masked positions become
// -inf there), reduced and exponentiated in that L1-resident buffer, and written once: one read and
// one write per element, against masked_fill + softmax's two of each plus a temporary. The exp and
// its pairwise sum (common/cpu_vec) are a branch-free polynomial over vectors; x86-64 builds carry
// an AVX+FMA clone of the hot loops, picked at load time, because the package is built for
// baseline x86-64 (SSE2).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cascade_sum.h"
#include "common/cpu_vec.h"
#include "common/stable.h"
#include "masked_softmax.h"

// The 8-float vector type below changes the calling convention between the clones; every
// function taking one is always inlined, so no such call exists.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__INTEL_COMPILER)
// "fma" implies AVX (256-bit float ops); every AVX2 CPU has it too, and CI machines with AVX + FMA
// but no AVX2 still get the fast clone. ("arch=haswell" would be matched by CPU model, not feature.)
#define MASKATTN_HOT __attribute__((target_clones("fma", "default")))
#else
#define MASKATTN_HOT
#endif

namespace maskattn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Eight floats as one GCC/Clang vector: the default build lowers it to two SSE registers, the
// AVX+FMA clone to one ymm register. Written explicitly because the autovectoriser will not
// reassociate float reductions without -ffast-math.
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline f8 splat(float a) {
  return f8{a, a, a, a, a, a, a, a};
}
__attribute__((always_inline)) inline f8 load8(const float* p) {
  f8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline void store8(float* p, f8 v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

__attribute__((always_inline)) inline float hsum(const f8& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

MASKATTN_HOT float row_max(const float* __restrict__ v, int64_t n) {
  f8 acc = splat(kNegInf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const f8 x = load8(v + i);
    acc = acc > x ? acc : x;  // NaN never wins; it poisons the sum instead
  }
  float m = kNegInf;
  for (int k = 0; k < 8; ++k) m = acc[k] > m ? acc[k] : m;
  for (; i < n; ++i) m = m > v[i] ? m : v[i];
  return m;
}

typedef uint8_t u8x8 __attribute__((vector_size(8)));

// float32 rows with unit-stride scores and mask: v = mask ? scale * x : -inf, returning max(v).
MASKATTN_HOT float load_row_f32(const float* __restrict__ x, const uint8_t* __restrict__ mk, float scale,
                                float* __restrict__ v, int64_t n) {
  f8 acc = splat(kNegInf);
  const f8 sc = splat(scale), ninf = splat(kNegInf);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    u8x8 mb;
    __builtin_memcpy(&mb, mk + i, 8);
    const i8 valid = __builtin_convertvector(mb, i8) != 0;
    const f8 e = valid ? load8(x + i) * sc : ninf;
    store8(v + i, e);
    acc = acc > e ? acc : e;
  }
  float m = kNegInf;
  for (int k = 0; k < 8; ++k) m = acc[k] > m ? acc[k] : m;
  for (; i < n; ++i) {
    v[i] = mk[i] ? x[i] * scale : kNegInf;
    m = m > v[i] ? m : v[i];
  }
  return m;
}

MASKATTN_HOT void store_row_f32(const float* __restrict__ v, float inv, float* __restrict__ y, int64_t n) {
  const f8 s = splat(inv);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(y + i, load8(v + i) * s);
  for (; i < n; ++i) y[i] = v[i] * inv;
}

// <a, b> with the blocked pairwise summation of cpu::exp_sum_f32.
MASKATTN_HOT float row_dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  cpu::Cascade<f8> sum;
  int64_t i = 0;
  while (i + 8 <= n) {
    f8 acc = splat(0.0f);
    const int64_t end = std::min(n, i + cpu::kSumBlock);
    for (; i + 8 <= end; i += 8) acc += load8(a + i) * load8(b + i);
    sum.add(acc);
  }
  float s = hsum(sum.total());
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// float64 keeps the library exp: it is the reference dtype, not the fast one.
double row_max(const double* v, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = m > v[i] ? m : v[i];
  return m;
}

float row_exp_sum(float* v, int64_t n, float mx, bool* tiny) {
  return cpu::exp_sum_f32(v, n, mx, tiny);
}
float row_exp_sum_careful(float* v, int64_t n, float mx) {
  return cpu::exp_sum_careful_f32(v, n, mx);
}

// std::exp keeps subnormal results, so *tiny never asks for a second pass.
double row_exp_sum(double* v, int64_t n, double mx, bool* tiny) {
  cpu::BlockedSum<double> s;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = cpu::exp_diff(v[i], mx);
    s.add(v[i]);
  }
  *tiny = false;
  return s.total();
}
double row_exp_sum_careful(double* v, int64_t n, double mx) {
  bool unused;
  return row_exp_sum(v, n, mx, &unused);
}

double row_dot(const double* a, const double* b, int64_t n) {
  cpu::BlockedSum<double> s;
  for (int64_t i = 0; i < n; ++i) s.add(a[i] * b[i]);
  return s.total();
}

// Rare paths for non-finite scores, kept out of the hot loops: a row is "poisoned" when a valid
// score is NaN or +inf (its exp-sum is NaN). torch.softmax makes the whole row NaN then; we do the
// same for the valid positions and keep padding exactly 0 (0 * NaN would otherwise leak into it).
template <typename T>
bool has_nan(const T* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (v[i] != v[i]) return true;
  return false;
}

template <typename scalar_t>
void poisoned_row(const uint8_t* mr, int64_t ms, scalar_t* yr, int64_t ys, int64_t N) {
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  for (int64_t i = 0; i < N; ++i) yr[i * ys] = mr[i * ms] ? nan : scalar_t(0);
}

// Rows of work per task: enough elements that scheduling costs nothing next to them.
int64_t row_grain(int64_t N) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N));
}

template <typename scalar_t>
void softmax_forward(const SoftmaxArgs& a, const st::View& out_moved, scalar_t* y, double scale_d) {
  using acc_t = st::acc_t<scalar_t>;
  const st::View vs[3] = {a.x, a.y, out_moved};
  const RowLayout L = make_row_layout(vs, 3);
  const scalar_t* x = a.xt.const_data_ptr<scalar_t>();
  const uint8_t* m = reinterpret_cast<const uint8_t*>(a.yt.const_data_ptr<bool>());
  const int64_t N = a.N, xs = L.inner[0], ms = L.inner[1], ys = L.inner[2];
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  torch::stable::parallel_for(0, a.rows, row_grain(N), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(N);
    acc_t* v = buf.data();
    for (int64_t r = r0; r < r1; ++r) {
      int64_t off[3];
      row_offsets(L, r, off, 3);
      const scalar_t* xr = x + off[0];
      const uint8_t* mr = m + off[1];
      scalar_t* yr = y + off[2];
      // v = the scaled row with -inf at masked positions; returns its max.
      auto load = [&]() -> acc_t {
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (xs == 1 && ms == 1) return load_row_f32(xr, mr, scale, v, N);  // key mask, dim = -1
        }
        if (xs == 1 && ms == 1) {
          for (int64_t i = 0; i < N; ++i) v[i] = mr[i] ? scale * static_cast<acc_t>(xr[i]) : ninf;
        } else if (xs == 1 && ms == 0) {
          // Mask broadcast along the row (a query mask): the whole row is in or out.
          if (mr[0]) {
            for (int64_t i = 0; i < N; ++i) v[i] = scale * static_cast<acc_t>(xr[i]);
          } else {
            std::fill(v, v + N, ninf);
          }
        } else {
          for (int64_t i = 0; i < N; ++i) v[i] = mr[i * ms] ? scale * static_cast<acc_t>(xr[i * xs]) : ninf;
        }
        return row_max(v, N);
      };
      const acc_t mx = load();
      if (mx == ninf && !has_nan(v, N)) {
        // No valid position (or only -inf scores): zeros, never NaN.
        for (int64_t i = 0; i < N; ++i) yr[i * ys] = scalar_t(0);
        continue;
      }
      bool tiny = false;
      acc_t sum = row_exp_sum(v, N, mx, &tiny);
      if (tiny) {  // some weight is subnormal: the (slower) exact pass over a fresh copy of the row
        load();
        sum = row_exp_sum_careful(v, N, mx);
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (ys == 1 && sum == sum) {
          store_row_f32(v, 1.0f / sum, yr, N);
          continue;
        }
      }
      if (sum != sum) {
        poisoned_row(mr, ms, yr, ys, N);
        continue;
      }
      const acc_t inv = acc_t(1) / sum;
      if (ys == 1) {
        for (int64_t i = 0; i < N; ++i) yr[i] = static_cast<scalar_t>(v[i] * inv);
      } else {
        for (int64_t i = 0; i < N; ++i) yr[i * ys] = static_cast<scalar_t>(v[i] * inv);
      }
    }
  });
}

// grad_in = scale * y * (g - <g, y>), and exactly 0 wherever y is 0 (masked positions, fully
// masked rows) whatever the incoming gradient holds there.
template <typename scalar_t>
void softmax_backward(const SoftmaxArgs& a, const st::View& out_moved, scalar_t* o, double scale_d) {
  using acc_t = st::acc_t<scalar_t>;
  const st::View vs[3] = {a.x, a.y, out_moved};
  const RowLayout L = make_row_layout(vs, 3);
  const scalar_t* g = a.xt.const_data_ptr<scalar_t>();
  const scalar_t* y = a.yt.const_data_ptr<scalar_t>();
  const int64_t N = a.N, gs = L.inner[0], ys = L.inner[1], os = L.inner[2];
  const acc_t scale = static_cast<acc_t>(scale_d);
  torch::stable::parallel_for(0, a.rows, row_grain(N), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(2 * N);
    acc_t* bg = buf.data();
    acc_t* by = buf.data() + N;
    for (int64_t r = r0; r < r1; ++r) {
      int64_t off[3];
      row_offsets(L, r, off, 3);
      const scalar_t* gr = g + off[0];
      const scalar_t* yr = y + off[1];
      scalar_t* orow = o + off[2];
      if (gs == 1 && ys == 1) {
        for (int64_t i = 0; i < N; ++i) {
          by[i] = static_cast<acc_t>(yr[i]);
          bg[i] = by[i] != acc_t(0) ? static_cast<acc_t>(gr[i]) : acc_t(0);
        }
      } else {
        for (int64_t i = 0; i < N; ++i) {
          by[i] = static_cast<acc_t>(yr[i * ys]);
          bg[i] = by[i] != acc_t(0) ? static_cast<acc_t>(gr[i * gs]) : acc_t(0);
        }
      }
      const acc_t d = row_dot(bg, by, N);
      if (os == 1) {
        // selected, not multiplied: in a NaN (poisoned) row d is NaN and 0 * NaN would reach padding
        for (int64_t i = 0; i < N; ++i)
          orow[i] = static_cast<scalar_t>(by[i] != acc_t(0) ? scale * by[i] * (bg[i] - d) : acc_t(0));
      } else {
        for (int64_t i = 0; i < N; ++i)
          orow[i * os] = static_cast<scalar_t>(by[i] != acc_t(0) ? scale * by[i] * (bg[i] - d) : acc_t(0));
      }
    }
  });
}

// Output is contiguous in the input's shape (what the fake kernel promises); the kernels write it
// through the dim-moved view, so no transpose copy is needed for dim != -1.
st::Tensor masked_softmax_cpu(const st::Tensor& scores, const st::Tensor& mask, int64_t dim, double scale) {
  const SoftmaxArgs a = check_masked_softmax(scores, mask, dim, scale);
  const st::View sv = st::View::of(scores);
  st::Tensor out = st::empty(sv.size, sv.ndim, scores.scalar_type(), scores.device());
  if (out.numel() == 0) return out;
  const st::View om = st::View::of(out).move_last(static_cast<int>(a.dim));
  void* o = out.mutable_data_ptr();
  THO_DISPATCH_V2(scores.scalar_type(), "masked_softmax_cpu",
                  AT_WRAP([&] { softmax_forward<scalar_t>(a, om, static_cast<scalar_t*>(o), scale); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return out;
}

st::Tensor masked_softmax_backward_cpu(const st::Tensor& grad_output, const st::Tensor& output, int64_t dim,
                                       double scale) {
  const SoftmaxArgs a = check_masked_softmax_backward(grad_output, output, dim, scale);
  const st::View ov = st::View::of(output);
  st::Tensor out = st::empty(ov.size, ov.ndim, output.scalar_type(), output.device());
  if (out.numel() == 0) return out;
  const st::View om = st::View::of(out).move_last(static_cast<int>(a.dim));
  void* o = out.mutable_data_ptr();
  THO_DISPATCH_V2(output.scalar_type(), "masked_softmax_backward_cpu",
                  AT_WRAP([&] { softmax_backward<scalar_t>(a, om, static_cast<scalar_t*>(o), scale); }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return out;
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CPU, m) {
  m.impl("masked_softmax", TORCH_BOX(&maskattn::masked_softmax_cpu));
  m.impl("_masked_softmax_backward", TORCH_BOX(&maskattn::masked_softmax_backward_cpu));
}
