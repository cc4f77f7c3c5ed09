// BGMV for decoding on CPU: every row adds its own adapter's LoRA product, reading the adapter's
// weights in place in the slot stack (no per-row copies). Called from JAX through XLA's FFI; see
// jaxlora/kernels/__init__.py for why it exists and how it is built. Semantics (the reference loop):
//
//   for i in range(rows):
//       s = slots[i]
//       y[i] = scale[s] * ((x[i] @ a[s]) @ b[s])
//
// x [rows, D], a [S, D, R], b [S, R, O], scale [S], slots [rows] -> y [rows, O], all float32.
// Each row's sums run in a fixed order over its own data only, so a row's bits do not depend on
// the other rows, on which slot holds its adapter, or on which thread computed it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace ffi = xla::ffi;

// Aliases: the registration macro below would split template arguments at their commas.
using F32Vec = ffi::Buffer<ffi::F32, 1>;
using F32Mat = ffi::Buffer<ffi::F32, 2>;
using F32Cube = ffi::Buffer<ffi::F32, 3>;
using S32Vec = ffi::Buffer<ffi::S32, 1>;
using F32MatOut = ffi::ResultBuffer<ffi::F32, 2>;

// 16 float lanes; each build of the hot loop maps it onto its own ISA's registers.
typedef float v16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline __attribute__((always_inline)) void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }

// y_i = sc * ((x_i @ a_s) @ b_s) for one row. x @ a keeps 16 rank columns in registers and sums
// d in four interleaved partial sums, added as (0 + 1) + (2 + 3); @ b keeps 64 outputs in
// registers and sums r in order. The order is fixed by the shapes alone.
JAXLORA_CLONES
static void lora_row(const float* x_i, const float* a_s, const float* b_s, float sc, float* y_i, int64_t D, int64_t R,
                     int64_t O, float* xa) {
  int64_t r = 0;
  for (; r + 16 <= R; r += 16) {
    v16 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
      acc0 += x_i[d] * load16(a_s + d * R + r);
      acc1 += x_i[d + 1] * load16(a_s + (d + 1) * R + r);
      acc2 += x_i[d + 2] * load16(a_s + (d + 2) * R + r);
      acc3 += x_i[d + 3] * load16(a_s + (d + 3) * R + r);
    }
    for (; d < D; ++d) acc0 += x_i[d] * load16(a_s + d * R + r);
    store16(xa + r, ((acc0 + acc1) + (acc2 + acc3)) * sc);
  }
  for (; r < R; ++r) {  // ranks past the last multiple of 16: the same sums, one column at a time
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int64_t d = 0;
    for (; d + 4 <= D; d += 4)
      for (int64_t j = 0; j < 4; ++j) acc[j] += x_i[d + j] * a_s[(d + j) * R + r];
    for (; d < D; ++d) acc[0] += x_i[d] * a_s[d * R + r];
    xa[r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) * sc;
  }
  int64_t o = 0;
  for (; o + 64 <= O; o += 64) {
    v16 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
    for (int64_t k = 0; k < R; ++k) {
      const float* b_row = b_s + k * O + o;
      acc0 += xa[k] * load16(b_row);
      acc1 += xa[k] * load16(b_row + 16);
      acc2 += xa[k] * load16(b_row + 32);
      acc3 += xa[k] * load16(b_row + 48);
    }
    store16(y_i + o, acc0);
    store16(y_i + o + 16, acc1);
    store16(y_i + o + 32, acc2);
    store16(y_i + o + 48, acc3);
  }
  for (; o < O; ++o) {
    float acc = 0.0f;
    for (int64_t k = 0; k < R; ++k) acc += xa[k] * b_s[k * O + o];
    y_i[o] = acc;
  }
}

static ffi::Error BgmvImpl(ffi::ThreadPool pool, F32Mat x, F32Cube a, F32Cube b, F32Vec scale, S32Vec slots,
                           F32MatOut y) {
  const int64_t rows = x.dimensions()[0], D = x.dimensions()[1];
  const int64_t S = a.dimensions()[0], R = a.dimensions()[2], O = b.dimensions()[2];
  if (a.dimensions()[1] != D || b.dimensions()[0] != S || b.dimensions()[1] != R || scale.dimensions()[0] != S ||
      slots.dimensions()[0] != rows || y->dimensions()[0] != rows || y->dimensions()[1] != O || S < 1) {
    return ffi::Error::InvalidArgument("bgmv: inconsistent shapes");
  }
  const float* X = x.typed_data();
  const float* A = a.typed_data();
  const float* Bw = b.typed_data();
  const float* sc = scale.typed_data();
  const int32_t* sl = slots.typed_data();
  float* Y = y->typed_data();
  // Rows that share an adapter run on one thread, one after the other, so each adapter is read
  // from memory once (the second row finds it in cache); a large group is cut into chunks so
  // that both threads still work when every row uses one adapter.
  std::vector<int64_t> order(rows), first(S + 1, 0);  // rows sorted by slot (counting sort, stable)
  auto slot_of = [=](int64_t i) -> int64_t {  // never out of bounds (the engine passes 0 <= s < S)
    return std::min<int64_t>(std::max<int64_t>(sl[i], 0), S - 1);
  };
  for (int64_t i = 0; i < rows; ++i) ++first[slot_of(i) + 1];
  for (int64_t s = 0; s < S; ++s) first[s + 1] += first[s];
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < rows; ++i) order[fill[slot_of(i)]++] = i;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t chunk = std::max<int64_t>(1, (rows + 2 * threads - 1) / (2 * threads));
  struct Item {
    int64_t slot, begin, end;  // order[begin:end] use `slot`
  };
  std::vector<Item> items;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = first[s]; j < first[s + 1]; j += chunk) items.push_back({s, j, std::min(j + chunk, first[s + 1])});
  const Item* item_at = items.data();
  const int64_t* row_at = order.data();
  jaxlora::parallel_for(pool, static_cast<int64_t>(items.size()), [=](int64_t k) {
    const Item it = item_at[k];
    thread_local std::vector<float> xa;
    xa.resize(R);
    for (int64_t j = it.begin; j < it.end; ++j) {
      const int64_t i = row_at[j];
      lora_row(X + i * D, A + it.slot * D * R, Bw + it.slot * R * O, sc[it.slot], Y + i * O, D, R, O, xa.data());
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxloraBgmv, BgmvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Mat>()
                                  .Arg<F32Cube>()
                                  .Arg<F32Cube>()
                                  .Arg<F32Vec>()
                                  .Arg<S32Vec>()
                                  .Ret<F32Mat>());
