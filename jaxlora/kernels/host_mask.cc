// The grammar masks of a decode step, fetched from the host: a custom call that calls the function
// the engine registered (a Python function through ctypes, which takes the GIL itself). Why not
// jax's io_callback: a program holding one is never kept in JAX's persistent compilation cache,
// so every replica start would compile its decode program again; this call names its target by
// string and takes the engine's id as an operand, so the program is the same for every engine and
// process and loads from the cache. See jaxlora/kernels/__init__.py (`host_masks`).
//
//   source [] int32, fed [rows] int32 -> masks [rows, words] int32 = fn(source, fed)
#include <atomic>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using S32Scalar = ffi::Buffer<ffi::S32, 0>;
using S32Vec = ffi::Buffer<ffi::S32, 1>;
using S32Mat = ffi::Buffer<ffi::S32, 2>;
using S32MatOut = ffi::ResultBuffer<ffi::S32, 2>;

// (source, fed, rows, out, words) -> 0 on success
typedef int32_t (*MaskFn)(int32_t, const int32_t*, int64_t, int32_t*, int64_t);
static std::atomic<MaskFn> mask_fn{nullptr};

extern "C" void jaxlora_set_mask_fn(MaskFn fn) { mask_fn.store(fn); }

static ffi::Error HostMaskImpl(S32Scalar source, S32Vec fed, S32MatOut out) {
  MaskFn fn = mask_fn.load();
  if (fn == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "no grammar mask function registered");
  const int64_t rows = fed.dimensions()[0], words = out->dimensions()[1];
  if (fn(source.typed_data()[0], fed.typed_data(), rows, out->typed_data(), words) != 0)
    return ffi::Error(ffi::ErrorCode::kInternal, "the grammar mask function failed (see the replica's log)");
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxloraHostMask, HostMaskImpl,
                              ffi::Ffi::Bind().Arg<S32Scalar>().Arg<S32Vec>().Ret<S32Mat>());
