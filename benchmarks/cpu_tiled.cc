// XLA:CPU FFI handler (benchmarks/cpu_tiled.py): y[M, N] = x[M, K] @ w for the few rows of a decode step,
// float32, row major; w is [K, N], or [N, K] used transposed (transpose_w = 1: a tied embedding table).
// Measured against XLA's dot, not used by the engine (benchmarks/RESULTS.md: it did not beat it).
//
// At a few rows a product streams its weights once and does little arithmetic per weight. Here each
// thread takes a range of columns, keeps a tile of 8 rows x 48 columns in registers (AVX-512) and reads
// every weight once from memory (a second row tile reads it again from L2); K goes in blocks of rows of w
// swept across the columns, so the weights stream as a few sequential rows. The threads are XLA's own
// intra-op pool: work is shared through an atomic counter, so the calling thread never waits for a task
// that has not started (two such calls running at once cannot deadlock on a two-thread pool).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
#define JAXLLM_LANES 16
constexpr int kTileRows = 8;  // 8 rows x 3 vectors: 24 of 32 vector registers hold the tile
#elif defined(__AVX__)
#define JAXLLM_LANES 8
constexpr int kTileRows = 4;  // 4 x 3 of 16 registers
#else
#define JAXLLM_LANES 4
constexpr int kTileRows = 4;
#endif
constexpr int kLanes = JAXLLM_LANES;
constexpr int kPanelVectors = 3;
constexpr int kPanel = kPanelVectors * kLanes;  // columns of one register tile
constexpr int kBlockRows = 16;  // rows of w [K, N] one sweep reads (4-64 measured; 16 best)
constexpr int kNtColumns = 4;  // w [N, K]: columns of y (rows of w) one tile reduces together
constexpr int kNtRows = 4;     // w [N, K]: rows of x one tile holds
typedef float Vec __attribute__((vector_size(JAXLLM_LANES * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

inline float Sum(Vec v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// y[rows [0, R), columns [n0, n0 + V * kLanes)] (+)= x[:, k0:k1] @ w[k0:k1, those columns], w [K, N].
template <int R, int V>
void TileNN(const float* x, int64_t k_dim, const float* w, int64_t n_dim, float* y, int64_t n0, int64_t k0,
            int64_t k1) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = k0 == 0 ? Vec{} : Load(y + r * n_dim + n0 + v * kLanes);
  for (int64_t k = k0; k < k1; ++k) {
    const float* wk = w + k * n_dim + n0;
    Vec wv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) wv[v] = Load(wk + v * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * k_dim + k];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] += xs * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) Store(y + r * n_dim + n0 + v * kLanes, acc[r][v]);
}

// Columns [n0, n0 + count) one at a time (the tail narrower than a vector).
void ColumnsNN(const float* x, int64_t rows, int64_t k_dim, const float* w, int64_t n_dim, float* y, int64_t n0,
               int64_t count) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = n0; n < n0 + count; ++n) {
      float s = 0.0f;
      for (int64_t k = 0; k < k_dim; ++k) s += x[r * k_dim + k] * w[k * n_dim + n];
      y[r * n_dim + n] = s;
    }
}

template <int V>
void RowsNN(const float* x, int64_t rows, int64_t k_dim, const float* w, int64_t n_dim, float* y, int64_t n0,
            int64_t k0, int64_t k1) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    const float* xr = x + r0 * k_dim;
    float* yr = y + r0 * n_dim;
    switch (std::min<int64_t>(kTileRows, rows - r0)) {
#define JAXLLM_CASE(R)                                                                 \
  case R:                                                                              \
    if constexpr (R <= kTileRows) TileNN<R, V>(xr, k_dim, w, n_dim, yr, n0, k0, k1); \
    break;
      JAXLLM_CASE(1) JAXLLM_CASE(2) JAXLLM_CASE(3) JAXLLM_CASE(4)
      JAXLLM_CASE(5) JAXLLM_CASE(6) JAXLLM_CASE(7) JAXLLM_CASE(8)
#undef JAXLLM_CASE
    }
  }
}

// Columns [n0, n1) of y for all rows, w [K, N]. K goes in blocks of kBlockRows rows of w, each swept
// across the columns: the weights stream as that many sequential rows (which prefetchers follow),
// not as panels whose rows lie a whole row of w apart; the tile is saved in y between blocks.
void ColumnRangeNN(const float* x, int64_t rows, int64_t k_dim, const float* w, int64_t n_dim, float* y, int64_t n0,
                   int64_t n1) {
  const int64_t vector_end = n0 + (n1 - n0) / kLanes * kLanes;
  for (int64_t k0 = 0; k0 < k_dim; k0 += kBlockRows) {
    const int64_t k1 = std::min(k_dim, k0 + kBlockRows);
    int64_t n = n0;
    for (; n + kPanel <= vector_end; n += kPanel) RowsNN<kPanelVectors>(x, rows, k_dim, w, n_dim, y, n, k0, k1);
    for (; n < vector_end; n += kLanes) RowsNN<1>(x, rows, k_dim, w, n_dim, y, n, k0, k1);
  }
  if (vector_end < n1) ColumnsNN(x, rows, k_dim, w, n_dim, y, vector_end, n1 - vector_end);
}

// Rows [0, R) of x times rows [n0, n0 + C) of w [N, K] (columns of y), reduced along K.
template <int R, int C>
void TileNT(const float* x, int64_t k_dim, const float* w, int64_t n_dim, float* y, int64_t n0) {
  Vec acc[R][C] = {};
  int64_t k = 0;
  for (; k + kLanes <= k_dim; k += kLanes) {
    Vec wv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) wv[c] = Load(w + (n0 + c) * k_dim + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec xv = Load(x + r * k_dim + k);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] += xv * wv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = Sum(acc[r][c]);
      for (int64_t kk = k; kk < k_dim; ++kk) s += x[r * k_dim + kk] * w[(n0 + c) * k_dim + kk];
      y[r * n_dim + n0 + c] = s;
    }
}

template <int C>
void RowsNT(const float* x, int64_t rows, int64_t k_dim, const float* w, int64_t n_dim, float* y, int64_t n0) {
  for (int64_t r0 = 0; r0 < rows; r0 += kNtRows) {
    const float* xr = x + r0 * k_dim;
    float* yr = y + r0 * n_dim;
    switch (std::min<int64_t>(kNtRows, rows - r0)) {
      case 1: TileNT<1, C>(xr, k_dim, w, n_dim, yr, n0); break;
      case 2: TileNT<2, C>(xr, k_dim, w, n_dim, yr, n0); break;
      case 3: TileNT<3, C>(xr, k_dim, w, n_dim, yr, n0); break;
      default: TileNT<4, C>(xr, k_dim, w, n_dim, yr, n0); break;
    }
  }
}

void ColumnRangeNT(const float* x, int64_t rows, int64_t k_dim, const float* w, int64_t n_dim, float* y, int64_t n0,
                   int64_t n1) {
  int64_t n = n0;
  for (; n + kNtColumns <= n1; n += kNtColumns) RowsNT<kNtColumns>(x, rows, k_dim, w, n_dim, y, n);
  for (; n < n1; ++n) RowsNT<1>(x, rows, k_dim, w, n_dim, y, n);
}

// Work shared by the calling thread and pool tasks: chunks are claimed through `next`; the caller
// waits only for chunks already claimed, which are running.
struct Shared {
  std::function<void(int64_t)> body;
  int64_t total = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Drain() {
    int64_t finished = 0;
    for (int64_t i; (i = next.fetch_add(1)) < total; ++finished) body(i);
    if (finished > 0 && done.fetch_add(finished) + finished == total) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t total, std::function<void(int64_t)> body) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < total; ++i) body(i);
    return;
  }
  auto shared = std::make_shared<Shared>();
  shared->body = std::move(body);
  shared->total = total;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->Drain(); });
  shared->Drain();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == shared->total; });
}

// Columns per chunk: whole register panels, about four chunks per thread for balance.
int64_t ChunkColumns(int64_t n_dim, int64_t threads, int64_t multiple) {
  const int64_t target = (n_dim + 4 * threads - 1) / (4 * threads);
  return std::max<int64_t>(multiple, (target + multiple - 1) / multiple * multiple);
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y, int32_t transpose_w) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_tiled: expects x [M, K] and w [K, N] (or [N, K])");
  const int64_t rows = xd[0], k_dim = transpose_w ? wd[1] : wd[0], n_dim = transpose_w ? wd[0] : wd[1];
  if (xd[1] != k_dim)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_tiled: the contracting dimensions differ");
  if (rows == 0 || n_dim == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // w [N, K]: chunks of 8 tiles, so a task's rows of w are a few contiguous kilobytes at least
  const int64_t chunk = ChunkColumns(n_dim, threads, transpose_w ? kNtColumns * 8 : kPanel);
  const int64_t chunks = (n_dim + chunk - 1) / chunk;
  ParallelFor(pool, chunks, [=](int64_t i) {
    const int64_t n0 = i * chunk, n1 = std::min(n_dim, n0 + chunk);
    if (transpose_w)
      ColumnRangeNT(xp, rows, k_dim, wp, n_dim, yp, n0, n1);
    else
      ColumnRangeNN(xp, rows, k_dim, wp, n_dim, yp, n0, n1);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmSmallMatmulF32, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("transpose_w"));
