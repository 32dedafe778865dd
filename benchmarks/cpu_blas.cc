// XLA:CPU FFI handler (benchmarks/cpu_blas.py): y[M, N] = x[M, K] @ w (float32, row major) through a BLAS sgemm (sgemv for one row),
// with w [K, N], or w [N, K] used transposed (transpose_w = 1: a tied embedding table as the LM head).
// The BLAS is not linked here: Python hands over the addresses of numpy's bundled OpenBLAS
// cblas_sgemm and cblas_sgemv (ILP64) once, through cpu_blas_set, so the library ships nothing of its own.
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// CBLAS with 64-bit integers; the enums are CBLAS's ints.
using Sgemm = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                       float, float*, int64_t);
using Sgemv = void (*)(int, int, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*,
                       int64_t);
Sgemm sgemm = nullptr;
Sgemv sgemv = nullptr;

constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;
constexpr int kTrans = 112;

ffi::Error Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                  int32_t transpose_w) {
  if (sgemm == nullptr || sgemv == nullptr)
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "cpu_blas: the BLAS functions were not set");
  auto xd = x.dimensions(), wd = w.dimensions();
  int64_t k = transpose_w ? wd[1] : wd[0], n = transpose_w ? wd[0] : wd[1];
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != k)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_blas: expects x [M, K] and w [K, N] (or [N, K])");
  int64_t m = xd[0];
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (m == 1) {  // one row: a matrix-vector product (gemm's packing costs more than it saves)
    sgemv(kRowMajor, transpose_w ? kNoTrans : kTrans, wd[0], wd[1], 1.0f, w.typed_data(), wd[1], x.typed_data(), 1,
          0.0f, y->typed_data(), 1);
    return ffi::Error::Success();
  }
  sgemm(kRowMajor, kNoTrans, transpose_w ? kTrans : kNoTrans, m, n, k, 1.0f, x.typed_data(), k, w.typed_data(), wd[1],
        0.0f, y->typed_data(), n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CpuBlasMatmulF32, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("transpose_w"));

extern "C" void cpu_blas_set(void* gemm, void* gemv) {
  sgemm = reinterpret_cast<Sgemm>(gemm);
  sgemv = reinterpret_cast<Sgemv>(gemv);
}
