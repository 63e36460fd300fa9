// CUDA kernels of masked_softmax and its backward.
//
// Rows of up to 1024 elements: one warp per row, the row held in registers, so each element is
// read once and written once (NVIDIA Megatron-LM's scaled_masked_softmax does the same, but only
// for half types, rows up to a fixed length and a [B,1,N,N] mask). Longer rows: one block per
// row, the row staged in shared memory while it fits (one read, one write), and an online
// max/sum pass plus a second read beyond that. The mask is read through its own strides - stride
// 0 on the dims it is broadcast over - so a [B,1,1,N] key mask is never materialised.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/stable_cuda.h"
#include "masked_softmax.h"

namespace maskattn {
namespace {

using cuda::block_reduce;
using cuda::exp_diff;
using cuda::load_pack;
using cuda::Pack;
using cuda::store_pack;
using cuda::warp_max;
using cuda::warp_sum;

constexpr int kWarpRowsPerBlock = 4;  // warp kernels: blockDim = (32, 4)
constexpr int kMaxWarpRow = 1024;     // 32 lanes x 32 elements in registers
constexpr int64_t kMaxGrid = int64_t(1) << 30;

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// VEC elements of one row starting at col; VEC > 1 only when the host checked alignment.
template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_row(const scalar_t* p) {
  if constexpr (VEC > 1) {
    return load_pack<scalar_t, VEC>(p);
  } else {
    Pack<scalar_t, VEC> r;
    r.v[0] = p[0];
    return r;
  }
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_row(scalar_t* p, const Pack<scalar_t, VEC>& x) {
  if constexpr (VEC > 1) {
    store_pack<scalar_t, VEC>(p, x);
  } else {
    p[0] = x.v[0];
  }
}

// The mask bits of VEC consecutive elements: one VEC-byte load when the mask row is unit-stride and
// aligned (the usual [B,1,1,N] key mask), one byte when it is broadcast along the row (a query
// mask), else VEC byte loads through its stride.
template <int VEC>
__device__ __forceinline__ void load_mask(const bool* mr, int64_t col, int64_t ms, bool (&ok)[VEC]) {
  if constexpr (VEC > 1) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(mr + col * ms);
    if (ms == 1 && (reinterpret_cast<uintptr_t>(p) & (VEC - 1)) == 0) {
      const auto m = load_pack<uint8_t, VEC>(p);
#pragma unroll
      for (int k = 0; k < VEC; ++k) ok[k] = m.v[k] != 0;
      return;
    }
    if (ms == 0) {
      const bool b = *p != 0;
#pragma unroll
      for (int k = 0; k < VEC; ++k) ok[k] = b;
      return;
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) ok[k] = mr[(col + k) * ms];
}

// ---------------------------------------------------------------- forward, warp per row
template <typename scalar_t, typename acc_t, int ELEMS, int VEC>
__global__ void __launch_bounds__(32 * kWarpRowsPerBlock)
    softmax_fwd_warp(const scalar_t* __restrict__ x, const bool* __restrict__ mask, scalar_t* __restrict__ y,
                     RowLayout L, int64_t rows, int N, acc_t scale) {
  constexpr int ITERS = ELEMS / VEC;
  const int lane = threadIdx.x;
  const int64_t ms = L.inner[1];
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += step) {
    int64_t off[2];
    row_offsets(L, row, off, 2);
    const scalar_t* xr = x + off[0];
    const bool* mr = mask + off[1];
    scalar_t* yr = y + row * N;
    acc_t v[ELEMS];
    acc_t mx = neg_inf<acc_t>();
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * 32 + lane) * VEC;
      if (col < N) {
        const auto p = load_row<scalar_t, VEC>(xr + col);
        bool ok[VEC];
        load_mask<VEC>(mr, col, ms, ok);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          v[it * VEC + k] = ok[k] ? scale * static_cast<acc_t>(p.v[k]) : neg_inf<acc_t>();
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[it * VEC + k] = neg_inf<acc_t>();
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t t = v[it * VEC + k];
        mx = (t > mx || t != t) ? t : mx;  // NaN wins: an all-NaN row is NaN, not empty
      }
    }
    mx = warp_max(mx);
    Pack<scalar_t, VEC> o;
    if (mx == neg_inf<acc_t>()) {
      // No valid position (or only -inf scores): zeros, never NaN. mx is warp-uniform.
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = scalar_t(0);
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int col = (it * 32 + lane) * VEC;
        if (col < N) store_row<scalar_t, VEC>(yr + col, o);
      }
      continue;
    }
    acc_t sum = 0;
#pragma unroll
    for (int i = 0; i < ELEMS; ++i) {
      v[i] = exp_diff(v[i], mx);  // e^-inf = 0 at masked positions
      sum += v[i];
    }
    const acc_t inv = acc_t(1) / warp_sum(sum);
    // A NaN or +inf valid score makes inv NaN (warp-uniform): the valid positions are NaN, as
    // torch.softmax gives, and padding stays exactly 0 (0 * NaN would leak into it).
    const bool poisoned = inv != inv;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * 32 + lane) * VEC;
      if (col < N) {
        if (poisoned) {
          bool ok[VEC];
          load_mask<VEC>(mr, col, ms, ok);
#pragma unroll
          for (int k = 0; k < VEC; ++k) o.v[k] = ok[k] ? static_cast<scalar_t>(inv) : scalar_t(0);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(v[it * VEC + k] * inv);
        }
        store_row<scalar_t, VEC>(yr + col, o);
      }
    }
  }
}

// ---------------------------------------------------------------- forward, block per row
// SMEM: the scaled, masked row is staged in shared memory (one read of x). Otherwise each thread
// keeps an online (max, sum) and x is read a second time to write y.
template <typename scalar_t, typename acc_t, int VEC, bool SMEM>
__global__ void softmax_fwd_block(const scalar_t* __restrict__ x, const bool* __restrict__ mask,
                                  scalar_t* __restrict__ y, RowLayout L, int64_t rows, int64_t N,
                                  acc_t scale) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* buf = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ acc_t scratch[32];
  const int64_t ms = L.inner[1];
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC,
                stride = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t off[2];
    row_offsets(L, row, off, 2);
    const scalar_t* xr = x + off[0];
    const bool* mr = mask + off[1];
    scalar_t* yr = y + row * N;
    // Without SMEM each thread keeps an online sum over N / blockDim.x elements (10^3 for a row
    // of 10^6): s takes kFold iterations, then goes into s_out, both relative to the running max.
    acc_t mx = neg_inf<acc_t>(), s = 0, s_out = 0;
    int fold = 0;
    for (int64_t col = first; col < N; col += stride) {
      const auto p = load_row<scalar_t, VEC>(xr + col);
      bool ok[VEC];
      load_mask<VEC>(mr, col, ms, ok);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t v = ok[k] ? scale * static_cast<acc_t>(p.v[k]) : neg_inf<acc_t>();
        if constexpr (SMEM) {
          buf[col + k] = v;
          mx = (v > mx || v != v) ? v : mx;  // NaN wins: an all-NaN row is NaN, not empty
        } else if (v != neg_inf<acc_t>()) {
          if (v > mx || v != v) {  // a NaN makes s and mx NaN: the row is poisoned
            const acc_t c = exp_diff(mx, v);
            s = s * c + acc_t(1);
            s_out *= c;
            mx = v;
          } else {
            s += exp_diff(v, mx);
          }
        }
      }
      if constexpr (!SMEM) {
        if (++fold == cuda::kFold) {
          fold = 0;
          s_out += s;
          s = 0;
        }
      }
    }
    if constexpr (!SMEM) s += s_out;
    const acc_t M = block_reduce<acc_t, true>(mx, scratch);
    Pack<scalar_t, VEC> o;
    if (M == neg_inf<acc_t>()) {  // block-uniform
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = scalar_t(0);
      for (int64_t col = first; col < N; col += stride) store_row<scalar_t, VEC>(yr + col, o);
      continue;
    }
    if constexpr (SMEM) {
      // Every thread revisits only the entries it wrote: no barrier needed around buf.
      for (int64_t col = first; col < N; col += stride) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t e = exp_diff(buf[col + k], M);
          buf[col + k] = e;
          s += e;
        }
      }
    } else {
      s = mx == neg_inf<acc_t>() ? acc_t(0) : s * exp_diff(mx, M);
    }
    const acc_t inv = acc_t(1) / block_reduce<acc_t, false>(s, scratch);
    const bool poisoned = inv != inv;  // block-uniform; see softmax_fwd_warp
    for (int64_t col = first; col < N; col += stride) {
      if (poisoned) {
        bool ok[VEC];
        load_mask<VEC>(mr, col, ms, ok);
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = ok[k] ? static_cast<scalar_t>(inv) : scalar_t(0);
      } else if constexpr (SMEM) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(buf[col + k] * inv);
      } else {
        const auto p = load_row<scalar_t, VEC>(xr + col);
        bool ok[VEC];
        load_mask<VEC>(mr, col, ms, ok);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t e = ok[k] ? exp_diff(scale * static_cast<acc_t>(p.v[k]), M) : acc_t(0);
          o.v[k] = static_cast<scalar_t>(e * inv);
        }
      }
      store_row<scalar_t, VEC>(yr + col, o);
    }
  }
}

// ---------------------------------------------------------------- backward
// grad_in = scale * y * (g - <g, y>), exactly 0 wherever y is 0 whatever g holds there.
template <typename scalar_t, typename acc_t, int ELEMS, int VEC>
__global__ void __launch_bounds__(32 * kWarpRowsPerBlock)
    softmax_bwd_warp(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                     scalar_t* __restrict__ out, RowLayout L, int64_t rows, int N, acc_t scale) {
  constexpr int ITERS = ELEMS / VEC;
  const int lane = threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += step) {
    int64_t off[2];
    row_offsets(L, row, off, 2);
    const scalar_t* gr = g + off[0];
    const scalar_t* yr = y + off[1];
    scalar_t* orow = out + row * N;
    acc_t gv[ELEMS], yv[ELEMS];
    acc_t dot = 0;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * 32 + lane) * VEC;
      if (col < N) {
        const auto pg = load_row<scalar_t, VEC>(gr + col);
        const auto py = load_row<scalar_t, VEC>(yr + col);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          yv[it * VEC + k] = static_cast<acc_t>(py.v[k]);
          gv[it * VEC + k] = yv[it * VEC + k] != acc_t(0) ? static_cast<acc_t>(pg.v[k]) : acc_t(0);
          dot += gv[it * VEC + k] * yv[it * VEC + k];
        }
      }
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int col = (it * 32 + lane) * VEC;
      if (col < N) {
        Pack<scalar_t, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          // selected, not multiplied: in a NaN (poisoned) row dot is NaN and 0 * NaN would reach padding
          o.v[k] = yv[it * VEC + k] != acc_t(0)
                       ? static_cast<scalar_t>(scale * yv[it * VEC + k] * (gv[it * VEC + k] - dot))
                       : scalar_t(0);
        }
        store_row<scalar_t, VEC>(orow + col, o);
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void softmax_bwd_block(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                  scalar_t* __restrict__ out, RowLayout L, int64_t rows, int64_t N,
                                  acc_t scale) {
  __shared__ acc_t scratch[32];
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC,
                stride = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t off[2];
    row_offsets(L, row, off, 2);
    const scalar_t* gr = g + off[0];
    const scalar_t* yr = y + off[1];
    scalar_t* orow = out + row * N;
    acc_t dot = 0, dot_out = 0;
    int fold = 0;
    for (int64_t col = first; col < N; col += stride) {
      const auto pg = load_row<scalar_t, VEC>(gr + col);
      const auto py = load_row<scalar_t, VEC>(yr + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t yk = static_cast<acc_t>(py.v[k]);
        if (yk != acc_t(0)) dot += static_cast<acc_t>(pg.v[k]) * yk;
      }
      if (++fold == cuda::kFold) {  // a thread's share of a long row: see softmax_fwd_block
        fold = 0;
        dot_out += dot;
        dot = 0;
      }
    }
    dot = block_reduce<acc_t, false>(dot + dot_out, scratch);
    for (int64_t col = first; col < N; col += stride) {
      const auto pg = load_row<scalar_t, VEC>(gr + col);
      const auto py = load_row<scalar_t, VEC>(yr + col);
      Pack<scalar_t, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t yk = static_cast<acc_t>(py.v[k]);
        o.v[k] = yk != acc_t(0) ? static_cast<scalar_t>(scale * yk * (static_cast<acc_t>(pg.v[k]) - dot))
                                : scalar_t(0);
      }
      store_row<scalar_t, VEC>(orow + col, o);
    }
  }
}

// ---------------------------------------------------------------- host side
// Packs of 16 bytes when every row start of every tensor is 16-byte aligned and N is a whole
// number of packs; float64 rows stay scalar (they are the reference dtype, not the fast one).
template <typename scalar_t>
constexpr int max_vec() {
  return std::is_same_v<scalar_t, double> ? 1 : static_cast<int>(16 / sizeof(scalar_t));
}

bool rows_aligned(const void* data, const RowLayout& L, int ti, int64_t N, int vec, size_t elem) {
  if (vec == 1) return true;
  if (N % vec != 0 || reinterpret_cast<uintptr_t>(data) % (vec * elem) != 0) return false;
  for (int d = 0; d < L.ndim; ++d) {
    if (L.stride[ti][d] % vec != 0) return false;
  }
  return true;
}

int warp_elems(int64_t N) {
  int e = 1;
  while (e * 32 < N) e *= 2;
  return e;
}

template <typename scalar_t, int VEC, typename Launch>
void dispatch_elems(int elems, Launch&& launch) {
  // ELEMS is a power of two and at least VEC.
  switch (std::max(elems, VEC)) {
    case 1:
      if constexpr (VEC <= 1) launch(std::integral_constant<int, 1>{});
      break;
    case 2:
      if constexpr (VEC <= 2) launch(std::integral_constant<int, 2>{});
      break;
    case 4:
      if constexpr (VEC <= 4) launch(std::integral_constant<int, 4>{});
      break;
    case 8:
      if constexpr (VEC <= 8) launch(std::integral_constant<int, 8>{});
      break;
    case 16:
      launch(std::integral_constant<int, 16>{});
      break;
    default:
      launch(std::integral_constant<int, 32>{});
      break;
  }
}

int block_threads(int64_t N) {
  return N <= 4096 ? 256 : (N <= 16384 ? 512 : 1024);
}

// Launches one kernel over `rows` rows of N: a warp per row with ELEMS values per lane in
// registers up to kMaxWarpRow, else a block per row; packs of VMAX elements when `vec`.
// warp(V, E, grid, block) and block_rows(V, grid, threads) launch the kernel for those choices.
template <typename scalar_t, typename WarpLaunch, typename BlockLaunch>
void launch_rows(int64_t rows, int64_t N, bool vec, WarpLaunch&& warp, BlockLaunch&& block_rows) {
  auto with_vec = [&](auto&& f) {
    if (vec)
      f(std::integral_constant<int, max_vec<scalar_t>()>{});
    else
      f(std::integral_constant<int, 1>{});
  };
  if (N <= kMaxWarpRow) {
    const dim3 block(32, kWarpRowsPerBlock);
    const auto grid = static_cast<unsigned>(std::min(cuda::ceil_div(rows, kWarpRowsPerBlock), kMaxGrid));
    with_vec([&](auto vec_c) {
      dispatch_elems<scalar_t, decltype(vec_c)::value>(warp_elems(N), [&](auto e_c) {
        warp(vec_c, e_c, grid, block);
        MASKATTN_CUDA_LAUNCH_CHECK();
      });
    });
    return;
  }
  const auto grid = static_cast<unsigned>(std::min(rows, kMaxGrid));
  with_vec([&](auto vec_c) {
    block_rows(vec_c, grid, block_threads(N));
    MASKATTN_CUDA_LAUNCH_CHECK();
  });
}

// A tensor's data seen through a view of it.
struct Rows {
  const void* data;
  st::View view;
};

// x: [..., N] with unit inner stride; mask: bool, any strides; y: contiguous [rows, N].
template <typename scalar_t>
void launch_forward(const Rows& x, const Rows& mask, scalar_t* yp, int64_t rows, int64_t N, double scale_d,
                    cudaStream_t stream) {
  using acc_t = st::acc_t<scalar_t>;
  const st::View vs[2] = {x.view, mask.view};
  const RowLayout L = make_row_layout(vs, 2);
  const bool vec = rows_aligned(x.data, L, 0, N, max_vec<scalar_t>(), sizeof(scalar_t));
  const scalar_t* xp = static_cast<const scalar_t*>(x.data);
  const bool* mp = static_cast<const bool*>(mask.data);
  const acc_t scale = static_cast<acc_t>(scale_d);
  const size_t smem = static_cast<size_t>(N) * sizeof(acc_t);
  // 48 KB is the launch limit without opt-in for static (the reduction scratch) plus dynamic memory.
  const bool use_smem = smem + 32 * sizeof(acc_t) <= 48 * 1024;
  launch_rows<scalar_t>(
      rows, N, vec,
      [&](auto vec_c, auto e_c, unsigned grid, dim3 block) {
        constexpr int V = decltype(vec_c)::value, E = decltype(e_c)::value;
        softmax_fwd_warp<scalar_t, acc_t, E, V>
            <<<grid, block, 0, stream>>>(xp, mp, yp, L, rows, static_cast<int>(N), scale);
      },
      [&](auto vec_c, unsigned grid, int threads) {
        constexpr int V = decltype(vec_c)::value;
        if (use_smem) {
          softmax_fwd_block<scalar_t, acc_t, V, true>
              <<<grid, threads, smem, stream>>>(xp, mp, yp, L, rows, N, scale);
        } else {
          softmax_fwd_block<scalar_t, acc_t, V, false>
              <<<grid, threads, 0, stream>>>(xp, mp, yp, L, rows, N, scale);
        }
      });
}

template <typename scalar_t>
void launch_backward(const Rows& g, const Rows& y, scalar_t* op, int64_t rows, int64_t N, double scale_d,
                     cudaStream_t stream) {
  using acc_t = st::acc_t<scalar_t>;
  const st::View vs[2] = {g.view, y.view};
  const RowLayout L = make_row_layout(vs, 2);
  constexpr int VMAX = max_vec<scalar_t>();
  const bool vec = rows_aligned(g.data, L, 0, N, VMAX, sizeof(scalar_t)) &&
                   rows_aligned(y.data, L, 1, N, VMAX, sizeof(scalar_t));
  const scalar_t* gp = static_cast<const scalar_t*>(g.data);
  const scalar_t* yp = static_cast<const scalar_t*>(y.data);
  const acc_t scale = static_cast<acc_t>(scale_d);
  launch_rows<scalar_t>(
      rows, N, vec,
      [&](auto vec_c, auto e_c, unsigned grid, dim3 block) {
        constexpr int V = decltype(vec_c)::value, E = decltype(e_c)::value;
        softmax_bwd_warp<scalar_t, acc_t, E, V>
            <<<grid, block, 0, stream>>>(gp, yp, op, L, rows, static_cast<int>(N), scale);
      },
      [&](auto vec_c, unsigned grid, int threads) {
        constexpr int V = decltype(vec_c)::value;
        softmax_bwd_block<scalar_t, acc_t, V><<<grid, threads, 0, stream>>>(gp, yp, op, L, rows, N, scale);
      });
}

// Rows must be unit-stride for coalesced loads; the rare other layouts are copied once (`keep` owns
// the copy). The kernels write a contiguous [rows, N]; for dim != -1 it is transposed back into the
// contiguous output the fake kernel promises.
Rows unit_rows(const st::Tensor& t, const st::View& v, st::Tensor& keep) {
  const int last = v.ndim - 1;
  if (v.size[last] <= 1 || v.stride[last] == 1) return {t.const_data_ptr(), v};
  keep = torch::stable::contiguous(st::as_strided(t, v));
  return {keep.const_data_ptr(), st::View::of(keep)};
}

st::Tensor finish(const st::Tensor& moved_out, int64_t dim, const st::View& shape, st::ScalarType dtype,
                  const st::Device& device) {
  if (dim == shape.ndim - 1) return moved_out;
  st::Tensor out = st::empty(shape.size, shape.ndim, dtype, device);
  st::Tensor dst = st::as_strided(out, st::View::of(out).move_last(static_cast<int>(dim)));
  torch::stable::copy_(dst, moved_out);
  return out;
}

st::Tensor masked_softmax_cuda(const st::Tensor& scores, const st::Tensor& mask, int64_t dim, double scale) {
  const SoftmaxArgs a = check_masked_softmax(scores, mask, dim, scale);
  const int32_t dev = scores.get_device_index();
  const st::DeviceGuard guard(dev);
  st::Tensor keep_x;
  const Rows x = unit_rows(a.xt, a.x, keep_x);
  const Rows m{a.yt.const_data_ptr(), a.y};
  st::Tensor out = st::empty(a.x.size, a.x.ndim, scores.scalar_type(), scores.device());
  const st::View shape = st::View::of(scores);
  if (out.numel() == 0) return finish(out, a.dim, shape, scores.scalar_type(), scores.device());
  void* o = out.mutable_data_ptr();
  const cudaStream_t stream = st::current_stream(dev);
  THO_DISPATCH_V2(scores.scalar_type(), "masked_softmax_cuda", AT_WRAP([&] {
                    launch_forward<scalar_t>(x, m, static_cast<scalar_t*>(o), a.rows, a.N, scale, stream);
                  }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return finish(out, a.dim, shape, scores.scalar_type(), scores.device());
}

st::Tensor masked_softmax_backward_cuda(const st::Tensor& grad_output, const st::Tensor& output, int64_t dim,
                                        double scale) {
  const SoftmaxArgs a = check_masked_softmax_backward(grad_output, output, dim, scale);
  const int32_t dev = output.get_device_index();
  const st::DeviceGuard guard(dev);
  st::Tensor keep_g, keep_y;
  const Rows g = unit_rows(a.xt, a.x, keep_g);
  const Rows y = unit_rows(a.yt, a.y, keep_y);
  st::Tensor out = st::empty(a.y.size, a.y.ndim, output.scalar_type(), output.device());
  const st::View shape = st::View::of(output);
  if (out.numel() == 0) return finish(out, a.dim, shape, output.scalar_type(), output.device());
  void* o = out.mutable_data_ptr();
  const cudaStream_t stream = st::current_stream(dev);
  THO_DISPATCH_V2(output.scalar_type(), "masked_softmax_backward_cuda", AT_WRAP([&] {
                    launch_backward<scalar_t>(g, y, static_cast<scalar_t*>(o), a.rows, a.N, scale, stream);
                  }),
                  AT_EXPAND(AT_FLOATING_TYPES), st::ScalarType::Half, st::ScalarType::BFloat16);
  return finish(out, a.dim, shape, output.scalar_type(), output.device());
}

}  // namespace
}  // namespace maskattn

STABLE_TORCH_LIBRARY_IMPL(maskattn, CUDA, m) {
  m.impl("masked_softmax", TORCH_BOX(&maskattn::masked_softmax_cuda));
  m.impl("_masked_softmax_backward", TORCH_BOX(&maskattn::masked_softmax_backward_cuda));
}
