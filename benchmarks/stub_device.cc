// A stub device op for benchmarks/engine_host.py: an XLA:CPU custom call that holds the
// computation for a fixed time without using a core or the Python GIL (an accelerator
// busy with a step), and records when each call ran, for the device-idle figure.
#include <time.h>

#include <atomic>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxSpans = 1 << 16;
double spans[kMaxSpans][2];  // CLOCK_MONOTONIC seconds, the clock of Python's time.perf_counter
std::atomic<int> num_spans{0};

double seconds(const timespec& t) { return t.tv_sec + t.tv_nsec * 1e-9; }

ffi::Error Busy(ffi::Buffer<ffi::S32> x, ffi::ResultBuffer<ffi::S32> y, float micros) {
  timespec start, until, end;
  clock_gettime(CLOCK_MONOTONIC, &start);
  long long ns = start.tv_nsec + static_cast<long long>(micros * 1000.0f);
  until.tv_sec = start.tv_sec + ns / 1000000000LL;
  until.tv_nsec = ns % 1000000000LL;
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, nullptr) != 0) {
  }
  std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  clock_gettime(CLOCK_MONOTONIC, &end);
  int i = num_spans.fetch_add(1) % kMaxSpans;
  spans[i][0] = seconds(start);
  spans[i][1] = seconds(end);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StubBusy, Busy,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::Buffer<ffi::S32>>().Attr<float>(
                                  "micros"));

// Copy the recorded (start, end) pairs into out[2 * max]; returns how many calls ran since the reset.
extern "C" int stub_spans(double* out, int max) {
  int n = num_spans.load();
  for (int i = 0; i < n && i < max && i < kMaxSpans; ++i) {
    out[2 * i] = spans[i][0];
    out[2 * i + 1] = spans[i][1];
  }
  return n;
}

extern "C" void stub_reset() { num_spans.store(0); }
