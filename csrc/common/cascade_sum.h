#pragma once
// Pairwise summation for the CPU kernels' long reductions (a softmax denominator over 10^5-10^6
// rows, a pooled feature sum over a whole-slide bag).
//
// A single running float sum of n terms carries a rounding error that grows with n (and, for many
// terms of similar size, grows systematically: at n = 10^6 a float32 denominator is off by ~1e-3).
// The kernels here sum short blocks with a running (vectorised) accumulator and feed the block sums
// to a Cascade, which adds them pairwise - block 2i with block 2i+1, then pairs of pairs, like a
// binary counter - so the error grows with block + log2(n / block) instead of n. The block sums are
// merged in the order they arrive, so the result does not depend on the thread schedule. Cost: one
// extra add per block, amortised.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

namespace maskattn {
namespace cpu {

// Rows (or elements) summed by one running accumulator before its block goes to the cascade.
constexpr int64_t kSumBlock = 128;

// Pairwise sum of a stream of values of type T (a scalar or a GCC vector type).
template <typename T>
class Cascade {
 public:
  void add(T v) {
    int j = 0;
    for (uint64_t c = count_; c & 1; c >>= 1, ++j) v = level_[j] + v;
    level_[j] = v;
    ++count_;
  }
  // The sum of everything added (T{} when nothing was).
  T total() const {
    T s{};
    bool first = true;
    for (int j = 0; (count_ >> j) != 0; ++j) {
      if (!((count_ >> j) & 1)) continue;
      s = first ? level_[j] : level_[j] + s;
      first = false;
    }
    return s;
  }

 private:
  T level_[64];
  uint64_t count_ = 0;
};

// Running sum of a stream of scalars: Block at a time, the blocks added pairwise.
template <typename T, int64_t Block = kSumBlock>
class BlockedSum {
 public:
  void add(T v) {
    block_ += v;
    if (++n_ == Block) {
      cascade_.add(block_);
      block_ = T(0);
      n_ = 0;
    }
  }
  T total() const {
    Cascade<T> c = cascade_;
    if (n_) c.add(block_);
    return c.total();
  }

 private:
  T block_ = T(0);
  int64_t n_ = 0;
  Cascade<T> cascade_;
};

// How ArrayCascade combines its arrays: elementwise addition of n values. Another merge (e.g. the
// online-softmax states of masked_channel_attention_pool) provides the same four members.
template <typename T>
struct ArrayAdd {
  int64_t n;
  int64_t size() const { return n; }
  // a block buffer as handed out: the caller accumulates into it
  void init(T* b) const { std::fill(b, b + n, T(0)); }
  // the total of no block
  void identity(T* out) const { std::fill(out, out + n, T(0)); }
  // acc = l (+) acc
  void merge(const T* l, T* acc) const {
    for (int64_t i = 0; i < n; ++i) acc[i] = l[i] + acc[i];
  }
};

// Pairwise merge of a stream of arrays (block sums of a pooled [K, D] output), elementwise like
// Cascade. The caller fills each block in place - block() hands out a buffer prepared by the
// merge's init (zeroed, for a sum), add_block() takes it into the cascade - and buffers move
// between levels by pointer, so a block costs one fill plus, amortised, one merge: no copies.
// Storage grows to about log2(#blocks) arrays of op.size() values; reset() starts a new stream
// that reuses them.
template <typename T, typename Op = ArrayAdd<T>>
class ArrayCascade {
 public:
  explicit ArrayCascade(int64_t n) : ArrayCascade(Op{n}) {}
  explicit ArrayCascade(const Op& op) : op_(op), size_(op.size()) {}
  // A new stream merged with `op`, whose size() is at most the first one's.
  void reset(const Op& op) {
    for (int j = 0; (count_ >> j) != 0; ++j) {
      if ((count_ >> j) & 1) free_.push_back(level_[j]);
    }
    count_ = 0;
    op_ = op;
  }
  // A buffer for the next block; pass it back through add_block().
  T* block() {
    if (free_.empty()) {
      store_.emplace_back(new T[size_]);
      free_.push_back(store_.back().get());
    }
    T* b = free_.back();
    free_.pop_back();
    op_.init(b);
    return b;
  }
  void add_block(T* carry) {
    int j = 0;
    for (uint64_t c = count_; c & 1; c >>= 1, ++j) {
      op_.merge(level_[j], carry);
      free_.push_back(level_[j]);
    }
    level_[j] = carry;
    ++count_;
  }
  bool empty() const { return count_ == 0; }
  // out = every block added, merged (the merge's identity when none was).
  void total(T* out) const {
    bool first = true;
    for (int j = 0; (count_ >> j) != 0; ++j) {
      if (!((count_ >> j) & 1)) continue;
      const T* l = level_[j];
      if (first) {
        std::copy(l, l + op_.size(), out);
      } else {
        op_.merge(l, out);
      }
      first = false;
    }
    if (first) op_.identity(out);
  }

 private:
  Op op_;
  int64_t size_;
  uint64_t count_ = 0;
  T* level_[64] = {};
  std::vector<T*> free_;
  std::vector<std::unique_ptr<T[]>> store_;
};

// Pairwise merge of parts[0..n) (parts[i] at base + i * stride) into parts[0], in place and in a
// fixed order: merge(a, b) sets part a to a (+) b. The per-chunk partials of a parallel reduction.
template <typename T, typename Merge>
void pairwise_merge_inplace(T* base, int64_t n, int64_t stride, Merge&& merge) {
  for (int64_t step = 1; step < n; step *= 2) {
    for (int64_t i = 0; i + step < n; i += 2 * step) merge(base + i * stride, base + (i + step) * stride);
  }
}

// The same for sums: each part an array of len values.
template <typename T>
void pairwise_reduce_inplace(T* base, int64_t n, int64_t stride, int64_t len) {
  pairwise_merge_inplace(base, n, stride, [len](T* a, const T* b) {
    for (int64_t d = 0; d < len; ++d) a[d] = a[d] + b[d];
  });
}

}  // namespace cpu
}  // namespace maskattn
