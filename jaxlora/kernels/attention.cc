// Decode attention on CPU: one new token per row against that row's KV cache, reading only the
// cache entries the token can see. Called from JAX through XLA's FFI; see jaxlora/kernels/__init__.py.
// Semantics (model.attention for one query position p per row; G = N / K query heads per kv head):
//
//   for b, n:  kv = n // G;  seen = [s for s in range(S) if s <= p[b] and (W == 0 or s > p[b] - W)]
//       w = softmax([dot(q[b, n], k[b, kv, s]) / sqrt(H) for s in seen])
//       out[b, n] = sum(w[j] * v[b, kv, seen[j]] for j)
//
// q [B, N, H], k and v [B, K, S, H], positions [B], window attribute W (0 = none) -> out [B, N, H],
// all float32. A position past the cache end sees the whole cache (clipped to the window); a row
// that sees no entry at all (a negative position, or a window wholly past the cache end) gets
// NaN, as the masked XLA form's softmax over nothing does. Only free decode rows get there.
// Every (row, kv head) is computed by one thread in a fixed order from its own data only, so a
// row's bits do not depend on the other rows or on the thread.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel.h"

namespace ffi = xla::ffi;

using F32Cube = ffi::Buffer<ffi::F32, 3>;
using F32Quad = ffi::Buffer<ffi::F32, 4>;
using S32Vec = ffi::Buffer<ffi::S32, 1>;
using F32CubeOut = ffi::ResultBuffer<ffi::F32, 3>;

constexpr int64_t kLanes = 16;

// dot(a, b) over H: kLanes partial sums (which vectorize), the tail, then a fixed pairwise tree.
static inline __attribute__((always_inline)) float dot(const float* a, const float* b, int64_t H) {
  float acc[kLanes] = {0};
  int64_t h = 0;
  for (; h + kLanes <= H; h += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[h + l] * b[h + l];
  for (int64_t l = 0; h < H; ++h, ++l) acc[l] += a[h] * b[h];
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// exp(x) for the softmax, written out rather than libm's so that every host and every ISA build
// gives the same bits (and the loop vectorizes): x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in
// a short high part and a low part, so n * ln2_hi is exact), exp(r) by its Taylor series to r^7
// (truncation error < 6e-9 relative), then 2^n through the exponent bits. Below -87 the result
// would be subnormal: 0, as a float softmax weight that small is. NaN stays NaN.
static inline __attribute__((always_inline)) float softmax_exp(float x) {
  const bool nan = x != x;
  const float xc = nan ? 0.0f : std::min(std::max(x, -87.0f), 88.0f);
  const float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln2): adding 1.5 * 2^23 rounds
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return nan ? x : (x < -87.0f ? 0.0f : p * two_n);
}

// The G query heads of one kv head of one row, over cache entries [lo, hi].
JAXLORA_CLONES
static void attend(const float* q, const float* k, const float* v, float* out, int64_t G, int64_t H, int64_t lo,
                   int64_t hi, float* w) {
  const float root = std::sqrt(static_cast<float>(H));
  const int64_t n = hi - lo + 1;
  k += lo * H;
  v += lo * H;
  for (int64_t g = 0; g < G; ++g) {
    const float* q_g = q + g * H;
    float top = -INFINITY;
    for (int64_t s = 0; s < n; ++s) {
      w[s] = dot(q_g, k + s * H, H) / root;
      top = w[s] > top ? w[s] : top;
    }
    for (int64_t s = 0; s < n; ++s) w[s] = softmax_exp(w[s] - top);
    float total = 0.0f;
    for (int64_t s = 0; s < n; ++s) total += w[s];
    float* o = out + g * H;
    for (int64_t h = 0; h < H; ++h) o[h] = 0.0f;
    for (int64_t s = 0; s < n; ++s) {
      const float p = w[s] / total;
      const float* v_s = v + s * H;
      for (int64_t h = 0; h < H; ++h) o[h] += p * v_s[h];
    }
  }
}

static ffi::Error AttentionImpl(ffi::ThreadPool pool, F32Cube q, F32Quad k, F32Quad v, S32Vec positions,
                                int64_t window, F32CubeOut out) {
  const int64_t B = q.dimensions()[0], N = q.dimensions()[1], H = q.dimensions()[2];
  const int64_t K = k.dimensions()[1], S = k.dimensions()[2];
  bool same_kv = true;
  for (int d = 0; d < 4; ++d) same_kv = same_kv && v.dimensions()[d] == k.dimensions()[d];
  if (K < 1 || S < 1 || N % K != 0 || k.dimensions()[0] != B || k.dimensions()[3] != H || !same_kv ||
      positions.dimensions()[0] != B || out->dimensions()[0] != B || out->dimensions()[1] != N ||
      out->dimensions()[2] != H) {
    return ffi::Error::InvalidArgument("decode attention: inconsistent shapes");
  }
  const int64_t G = N / K;
  const float* Q = q.typed_data();
  const float* Kc = k.typed_data();
  const float* Vc = v.typed_data();
  const int32_t* P = positions.typed_data();
  float* O = out->typed_data();
  jaxlora::parallel_for(pool, B * K, [=](int64_t item) {
    const int64_t b = item / K, kv = item % K;
    const int64_t p = P[b];
    const int64_t hi = std::min<int64_t>(p, S - 1);
    const int64_t lo = window > 0 ? std::max<int64_t>(p - window + 1, 0) : 0;
    const int64_t head = (b * N + kv * G) * H, cache = (b * K + kv) * S * H;
    if (lo > hi) {  // sees nothing
      std::fill(O + head, O + head + G * H, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    thread_local std::vector<float> w;
    w.resize(S);
    attend(Q + head, Kc + cache, Vc + cache, O + head, G, H, lo, hi, w.data());
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxloraDecodeAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Cube>()
                                  .Arg<F32Quad>()
                                  .Arg<F32Quad>()
                                  .Arg<S32Vec>()
                                  .Attr<int64_t>("window")
                                  .Ret<F32Cube>());
