#include "common/cpu_vec.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "common/cascade_sum.h"

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
typedef int32_t v8si __attribute__((vector_size(32)));

// Unaligned loads and stores of a whole vector of floats, any width.
template <typename V>
inline V load_vec(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
inline void store_vec(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
inline v8sf load8(const float* p) {
  return load_vec<v8sf>(p);
}
inline void store8(float* p, v8sf v) {
  store_vec(p, v);
}
inline v8sf splat(float a) {
  return v8sf{a, a, a, a, a, a, a, a};
}
inline float hsum(const v8sf& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// e^(x + xlo) for x <= 0 (the row max is subtracted first) and |xlo| <= ulp(x) / 2: Cephes' expf
// polynomial after rounding x*log2(e) with the 1.5*2^23 trick, so every step is plain float/int
// arithmetic. xlo, the rounding error of the subtraction that gave x, joins the reduced argument;
// without it a score 20 below the max carries up to 1e-6 of relative error into its weight before
// the exp is even taken. At -inf the result is exactly 0; NaN stays NaN.
//
// Results below float32's normal range (x < -87) are kept as subnormals, as expf gives them
// (docs/numerics.md); only below -104, under half the smallest subnormal, is the result 0. That
// costs a third more time per element (the power of two applied in two steps, 2^(n+64) * 2^-64,
// the second rounding once into the subnormal range), and such lanes are rare - a score 87 below
// its row's max - so the fast variant (CAREFUL = false) gives 0 there and raises `tiny`; the row
// is then redone with CAREFUL = true. Lanes that give 0 are moved into the normal range before
// the arithmetic and selected away after it: a subnormal intermediate costs a ~100-cycle microcode
// assist on x86, and masked (-inf) lanes are common.
// Cephes' expf: e^(x + xlo) = y * 2^n, x rounded to n = round(x / ln 2) and reduced by n ln 2 in two
// parts; returns y (in [sqrt(1/2), sqrt(2)]) and sets n. Any vector width of floats.
template <typename V>
__attribute__((always_inline)) inline V cephes_exp_poly(V x, V xlo, V& n) {
  const V t = x * 1.44269504088896341f + 12582912.0f;
  n = t - 12582912.0f;
  V r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  r = r + xlo;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r) * r + r + 1.0f;
}

// 2^n for integral n in [-126, 127]: the float (n + 127) * 2^23 (exact) converted to int32 is the
// bit pattern of 2^n. One float FMA and one conversion, which AVX (without AVX2) has at full
// width, where shifting the integer exponent would take four half-width integer ops.
__attribute__((always_inline)) inline v8sf pow2(v8sf n) {
  return reinterpret_cast<v8sf>(__builtin_convertvector(n * splat(8388608.0f) + splat(1065353216.0f), v8si));
}

template <bool CAREFUL>
__attribute__((always_inline)) inline v8sf exp_nonpos(v8sf x, v8sf xlo, v8si& tiny) {
  const v8si under = x < splat(-87.0f);
  const v8si sub = under & (x >= splat(-104.0f));
  const v8si zero = CAREFUL ? under & ~sub : under;
  tiny |= sub;
  if constexpr (CAREFUL) {
    x = zero ? splat(0.0f) : x;
  } else {
    x = x > splat(-87.0f) ? x : splat(-87.0f);  // a max, cheaper than a blend; NaN goes on in xlo
  }
  // xlo is NaN in lanes at -inf (-inf - -inf): selected away below, NaN costs no assist
  v8sf n;
  const v8sf y = cephes_exp_poly(x, xlo, n);
  if constexpr (CAREFUL) {
    const v8sf down = sub ? splat(5.42101086242752217e-20f) : splat(1.0f);  // 2^-64
    return zero ? splat(0.0f) : (y * pow2(sub ? n + splat(64.0f) : n)) * down;
  } else {
    return zero ? splat(0.0f) : y * pow2(n);
  }
}

// e^(v - m) with the subtraction's rounding error recovered exactly (Knuth's TwoSum; additions
// only, so FMA contraction cannot disturb it).
template <bool CAREFUL>
__attribute__((always_inline)) inline v8sf exp_diff(v8sf v, v8sf m, v8si& tiny) {
  const v8sf d = v - m;
  const v8sf vv = d + m;
  const v8sf lo = (v - vv) - (m + (d - vv));
  return exp_nonpos<CAREFUL>(d, lo, tiny);
}

// v[i] = e^(v[i] - mx) in place; returns the sum. Eight lanes summed over blocks of kSumBlock
// elements, the blocks added pairwise (common/cascade_sum.h): a single running vector over a row
// of 10^6 scores would lose ~1e-5 of the denominator. The tail goes through one padded vector.
// Sets *tiny when CAREFUL is false and some e^(v - mx) was subnormal (and written as 0): the
// caller then reloads the row and calls the CAREFUL variant, which differs only in those lanes.
template <bool CAREFUL>
__attribute__((always_inline)) inline float row_exp_sum_t(float* __restrict__ v, int64_t n, float mx,
                                                          bool* tiny) {
  Cascade<v8sf> sum;
  const v8sf m = splat(mx);
  v8si sub = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  while (i + 8 <= n) {
    v8sf acc = splat(0.0f);
    const int64_t end = std::min(n, i + kSumBlock);
    for (; i + 8 <= end; i += 8) {
      const v8sf e = exp_diff<CAREFUL>(load8(v + i), m, sub);
      store8(v + i, e);
      acc += e;
    }
    sum.add(acc);
  }
  if (i < n) {
    v8sf x = splat(-std::numeric_limits<float>::infinity());
    for (int64_t k = 0; i + k < n; ++k) x[k] = v[i + k];
    const v8sf e = exp_diff<CAREFUL>(x, m, sub);
    for (int64_t k = 0; i + k < n; ++k) v[i + k] = e[k];
    sum.add(e);
  }
  bool any = false;
  for (int k = 0; k < 8; ++k) any = any || sub[k] != 0;
  *tiny = !CAREFUL && any;
  return hsum(sum.total());
}

}  // namespace

MASKATTN_CLONES
float exp_sum_f32(float* v, int64_t n, float mx, bool* tiny) {
  return row_exp_sum_t<false>(v, n, mx, tiny);
}

MASKATTN_CLONES
float exp_sum_careful_f32(float* v, int64_t n, float mx) {
  bool unused;
  return row_exp_sum_t<true>(v, n, mx, &unused);
}

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

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One group of eight channels (k < 8 of them in the tail, the rest padded with -inf logits) of
// channel_softmax_block_f32. The block's rows are read twice, for the max and for the sums; a block
// is short enough (masked_channel_attention_pool's kBlockRows) to still be in cache the second time.
template <bool CAREFUL, bool TAIL>
__attribute__((always_inline)) inline void channel_group(const float* const* l, const float* const* f,
                                                         int nrows, int64_t d, int k, float* m, float* s,
                                                         float* a, v8si& tiny) {
  auto ld = [&](const float* p, float pad) {
    if constexpr (!TAIL) {
      return load8(p + d);
    } else {
      v8sf x = splat(pad);
      for (int i = 0; i < k; ++i) x[i] = p[d + i];
      return x;
    }
  };
  v8sf mx = ld(l[0], kNegInf);
  for (int j = 1; j < nrows; ++j) {
    const v8sf v = ld(l[j], kNegInf);
    mx = ((v > mx) | (v != v)) ? v : mx;  // NaN wins: a NaN logit poisons its channel
  }
  v8sf ss = splat(0.0f), aa = splat(0.0f);
  for (int j = 0; j < nrows; ++j) {
    const v8sf e = exp_diff<CAREFUL>(ld(l[j], kNegInf), mx, tiny);
    ss += e;
    aa += (e != splat(0.0f)) ? e * ld(f[j], 0.0f) : splat(0.0f);
  }
  const v8si empty = mx == splat(kNegInf);  // no row, or only -inf: -inf - -inf is NaN above
  ss = empty ? splat(0.0f) : ss;
  aa = empty ? splat(0.0f) : aa;
  if constexpr (!TAIL) {
    store8(m + d, mx);
    store8(s + d, ss);
    store8(a + d, aa);
  } else {
    for (int i = 0; i < k; ++i) {
      m[d + i] = mx[i];
      s[d + i] = ss[i];
      a[d + i] = aa[i];
    }
  }
}

template <bool CAREFUL>
__attribute__((always_inline)) inline bool channel_block_t(const float* const* l, const float* const* f,
                                                           int nrows, int64_t n, float* m, float* s,
                                                           float* a) {
  v8si tiny = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) channel_group<CAREFUL, false>(l, f, nrows, d, 8, m, s, a, tiny);
  if (d < n) channel_group<CAREFUL, true>(l, f, nrows, d, static_cast<int>(n - d), m, s, a, tiny);
  bool any = false;
  for (int k = 0; k < 8; ++k) any = any || tiny[k] != 0;
  return !CAREFUL && any;
}

template <bool CAREFUL>
__attribute__((always_inline)) inline bool channel_weights_t(const float* l, const float* m, const float* inv,
                                                             int64_t n, float* w) {
  v8si tiny = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    store8(w + d, exp_diff<CAREFUL>(load8(l + d), load8(m + d), tiny) * load8(inv + d));
  if (d < n) {
    v8sf x = splat(kNegInf), mm = splat(0.0f), iv = splat(0.0f);
    for (int64_t k = 0; d + k < n; ++k) {
      x[k] = l[d + k];
      mm[k] = m[d + k];
      iv[k] = inv[d + k];
    }
    const v8sf r = exp_diff<CAREFUL>(x, mm, tiny) * iv;
    for (int64_t k = 0; d + k < n; ++k) w[d + k] = r[k];
  }
  bool any = false;
  for (int k = 0; k < 8; ++k) any = any || tiny[k] != 0;
  return !CAREFUL && any;
}

}  // namespace

MASKATTN_CLONES
bool channel_softmax_block_f32(const float* const* l, const float* const* f, int nrows, int64_t n, float* m,
                               float* s, float* a, bool careful) {
  return careful ? channel_block_t<true>(l, f, nrows, n, m, s, a)
                 : channel_block_t<false>(l, f, nrows, n, m, s, a);
}

MASKATTN_CLONES
void channel_state_merge_f32(const float* x, const float* y, float* out, int64_t n, int64_t stride) {
  const float *m1 = x, *s1 = x + stride, *a1 = x + 2 * stride;
  const float *m2 = y, *s2 = y + stride, *a2 = y + 2 * stride;
  float *mo = out, *so = out + stride, *ao = out + 2 * stride;
  v8si unused = {0, 0, 0, 0, 0, 0, 0, 0};
  const v8sf zero = splat(0.0f), ninf = splat(kNegInf);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    const v8sf p = load8(m1 + d), q = load8(m2 + d);
    const v8sf mx = ((q > p) | (q != q)) ? q : p;
    // a state at -inf holds nothing (and -inf - -inf would be NaN): its scale is 0
    const v8sf c1 = p == ninf ? zero : exp_diff<true>(p, mx, unused);
    const v8sf c2 = q == ninf ? zero : exp_diff<true>(q, mx, unused);
    const v8si u1 = c1 != zero, u2 = c2 != zero;
    const v8sf ss = (u1 ? load8(s1 + d) * c1 : zero) + (u2 ? load8(s2 + d) * c2 : zero);
    const v8sf aa = (u1 ? load8(a1 + d) * c1 : zero) + (u2 ? load8(a2 + d) * c2 : zero);
    store8(mo + d, mx);
    store8(so + d, ss);
    store8(ao + d, aa);
  }
  for (; d < n; ++d) {
    const float p = m1[d], q = m2[d];
    const float mx = (q > p || q != q) ? q : p;
    const float c1 = p == kNegInf ? 0.0f : exp_diff(p, mx);
    const float c2 = q == kNegInf ? 0.0f : exp_diff(q, mx);
    const float ss = (c1 != 0.0f ? s1[d] * c1 : 0.0f) + (c2 != 0.0f ? s2[d] * c2 : 0.0f);
    const float aa = (c1 != 0.0f ? a1[d] * c1 : 0.0f) + (c2 != 0.0f ? a2[d] * c2 : 0.0f);
    mo[d] = mx;
    so[d] = ss;
    ao[d] = aa;
  }
}

MASKATTN_CLONES
bool channel_weights_row_f32(const float* l, const float* m, const float* inv, int64_t n, float* w,
                             bool careful) {
  return careful ? channel_weights_t<true>(l, m, inv, n, w) : channel_weights_t<false>(l, m, inv, n, w);
}

namespace {

// The gate's loops are arithmetic-bound (two exponentials and two divisions per element, against
// two loads and up to three stores), so they are written for sixteen lanes and get an AVX-512
// clone as well: one zmm register there, two ymm with AVX2, four xmm at baseline.
typedef float v16sf __attribute__((vector_size(64)));
typedef int32_t v16si __attribute__((vector_size(64)));

inline v16sf load16(const float* p) {
  return load_vec<v16sf>(p);
}
inline void store16(float* p, v16sf v) {
  store_vec(p, v);
}
inline v16sf splat16(float a) {
  return v16sf{} + a;  // a scalar operand is broadcast to every lane
}

// e^x for any x, for the gate's activations only: x is clamped to [-87, 89] (NaN kept), so
// e^x never underflows (a logistic or tanh of a large argument rounds to its limit either way)
// and above ~88.4 it is +inf, which 1 / (1 + inf) and 2 / (inf + 1) turn into exact zeros. The
// polynomial is exp_nonpos's (cephes_exp_poly).
__attribute__((always_inline)) inline v16sf exp_any(v16sf x) {
  x = x < splat16(-87.0f) ? splat16(-87.0f) : x;  // comparisons with NaN are false: NaN goes on
  x = x > splat16(89.0f) ? splat16(89.0f) : x;
  v16sf n;
  const v16sf y = cephes_exp_poly(x, v16sf{}, n);
  // 2^n as in pow2; n = 128 gives the bit pattern of +inf
  return y * reinterpret_cast<v16sf>(
                 __builtin_convertvector(n * splat16(8388608.0f) + splat16(1065353216.0f), v16si));
}

__attribute__((always_inline)) inline v16sf sigmoid16(v16sf u) {
  return splat16(1.0f) / (splat16(1.0f) + exp_any(-u));
}

// Cephes' tanhf: an odd polynomial below |x| = 0.625, where 1 - 2 / (e^2|x| + 1) would cancel,
// and that form (sign restored) above.
__attribute__((always_inline)) inline v16sf tanh16(v16sf x) {
  const v16si bits = reinterpret_cast<v16si>(x);
  const v16si sign = bits & static_cast<int32_t>(0x80000000u);
  const v16sf ax = reinterpret_cast<v16sf>(bits & ~sign);
  const v16sf z = x * x;
  v16sf q = splat16(-5.70498872745e-3f);
  q = q * z + splat16(2.06390887954e-2f);
  q = q * z + splat16(-5.37397155531e-2f);
  q = q * z + splat16(1.33314422036e-1f);
  q = q * z + splat16(-3.33332819422e-1f);
  const v16sf small = q * z * x + x;
  const v16sf big = splat16(1.0f) - splat16(2.0f) / (exp_any(ax + ax) + splat16(1.0f));
  const v16sf signed_big = reinterpret_cast<v16sf>(reinterpret_cast<v16si>(big) | sign);
  return ax < splat16(0.625f) ? small : signed_big;
}

// gelu(x) = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2, with erf from Abramowitz and Stegun
// 7.1.26 (|error| <= 1.5e-7), the approximation torch's vectorised float32 erf uses, so the
// result is as accurate as torch's own float32 gelu. e^(-x^2 / 2) serves both erf and
// Phi'(x) = e^(-x^2 / 2) / sqrt(2 pi).
__attribute__((always_inline)) inline void gelu16(v16sf x, v16sf& a, v16sf& da) {
  const v16sf z = x * splat16(0.70710678118654752f);
  const v16si sign = reinterpret_cast<v16si>(z) & static_cast<int32_t>(0x80000000u);
  const v16sf az = reinterpret_cast<v16sf>(reinterpret_cast<v16si>(z) & ~sign);
  const v16sf e = exp_any(-(z * z));
  const v16sf t = splat16(1.0f) / (splat16(1.0f) + splat16(0.3275911f) * az);
  v16sf q = splat16(1.061405429f);
  q = q * t + splat16(-1.453152027f);
  q = q * t + splat16(1.421413741f);
  q = q * t + splat16(-0.284496736f);
  q = q * t + splat16(0.254829592f);
  const v16sf erf_abs = splat16(1.0f) - q * t * e;
  const v16sf erf = reinterpret_cast<v16sf>(reinterpret_cast<v16si>(erf_abs) | sign);
  const v16sf c = splat16(0.5f) + splat16(0.5f) * erf;
  a = x * c;
  da = c + x * e * splat16(0.39894228040143268f);
}

// Sixteen lanes of the gate: a = act(v), da = act'(v), s = sigmoid(u).
__attribute__((always_inline)) inline void gate16(v16sf v, v16sf u, int act, v16sf& a, v16sf& da, v16sf& s) {
  s = sigmoid16(u);
  if (act == 0) {
    a = tanh16(v);
    da = splat16(1.0f) - a * a;
  } else if (act == 1) {
    a = v < splat16(0.0f) ? splat16(0.0f) : v;  // NaN stays NaN, as torch.relu
    da = v > splat16(0.0f) ? splat16(1.0f) : splat16(0.0f);
  } else {
    gelu16(v, a, da);
  }
}

// d/dv of the gate given cs = c * sigmoid(u): cs * act'(v), except that relu's is a select, as
// torch's threshold_backward: 0 where v <= 0 (even for an infinite cs), cs elsewhere (NaN v too).
__attribute__((always_inline)) inline v16sf relu_grad(int act, v16sf v, v16sf cs, v16sf da) {
  return act == 1 ? (v <= splat16(0.0f) ? splat16(0.0f) : cs) : cs * da;
}

// Sixteen values of v + b from index j on (FULL), or the n - j left (the other lanes 0); a null b
// adds -0, and x + -0 is x for every x, -0 included: no bias changes no bit.
template <bool FULL>
__attribute__((always_inline)) inline v16sf load_plus(const float* v, const float* b, int64_t j, int64_t n) {
  if constexpr (FULL) {
    return load16(v + j) + (b ? load16(b + j) : splat16(-0.0f));
  } else {
    v16sf x = splat16(0.0f);
    for (int64_t k = 0; j + k < n; ++k) x[k] = v[j + k] + (b ? b[j + k] : -0.0f);
    return x;
  }
}

// Stores the lanes of r at p + j: all sixteen (FULL), or those before n.
template <bool FULL>
__attribute__((always_inline)) inline void store_upto(float* p, v16sf r, int64_t j, int64_t n) {
  if constexpr (FULL) {
    store16(p + j, r);
  } else {
    for (int64_t k = 0; j + k < n; ++k) p[j + k] = r[k];
  }
}

// gate_row_f32 on the sixteen lanes from j on (FULL), or on the row's tail. The tail is a separate
// instance so that the main loop keeps its vectors in registers.
template <bool FULL>
__attribute__((always_inline)) inline void gate_step(const float* v, const float* u, const float* bv,
                                                     const float* bu, const float* c, int64_t j, int64_t n,
                                                     int act, float* gv, float* gu, float* p) {
  v16sf a, da, s;
  const v16sf x = load_plus<FULL>(v, bv, j, n);
  gate16(x, load_plus<FULL>(u, bu, j, n), act, a, da, s);
  if (p) store_upto<FULL>(p, a * s, j, n);
  if (gv || gu) {
    const v16sf cs = load_plus<FULL>(c, nullptr, j, n) * s;
    if (gv) store_upto<FULL>(gv, relu_grad(act, x, cs, da), j, n);
    if (gu) store_upto<FULL>(gu, cs * a * (splat16(1.0f) - s), j, n);
  }
}

}  // namespace

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MASKATTN_CLONES_512 __attribute__((target_clones("avx512f", "fma", "default")))
#else
#define MASKATTN_CLONES_512
#endif

MASKATTN_CLONES_512
void gate_row_f32(const float* v, const float* u, const float* bv, const float* bu, const float* c, int64_t n,
                  int act, float* gv, float* gu, float* p) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) gate_step<true>(v, u, bv, bu, c, j, n, act, gv, gu, p);
  if (j < n) gate_step<false>(v, u, bv, bu, c, j, n, act, gv, gu, p);
}

}  // namespace cpu
}  // namespace maskattn
