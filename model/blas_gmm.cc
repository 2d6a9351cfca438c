// Grouped matmul on the host CPU for the dropless MoE (`moe.gmm_impl='blas'`, model/host_blas.py):
// one BLAS sgemm per group of rows, no padding. The sgemm is NumPy's bundled OpenBLAS
// (`scipy_cblas_sgemm64_`, ILP64), loaded into the process before this library, one thread per
// sgemm; the groups' rows are shared out over XLA's own CPU thread pool.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                       const float*, int64_t, float, float*, int64_t);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

Sgemm LoadSgemm() {
  static Sgemm sgemm = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "scipy_cblas_sgemm64_"));
  return sgemm;
}

// OpenBLAS's own threads would compete with XLA's for the same cores: every sgemm here runs on
// the thread that calls it (a thread-local setting; NumPy's global one is left as it is).
void SingleThreadedHere() {
  using SetLocal = int (*)(int);
  static SetLocal set_local =
      reinterpret_cast<SetLocal>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads_local"));
  thread_local bool done = false;
  if (!done && set_local != nullptr) set_local(1);
  done = true;
}

struct Task {
  int64_t rows, n, k, a_off, b_off, y_off;
  int trans_a, trans_b;
  int64_t lda, ldb, ldc;
};

// The tasks shared by the calling thread and the helpers it schedules: each takes the next task
// until none is left; the caller waits for the last one. Helpers that start late find no work.
struct Work {
  std::vector<Task> tasks;
  const float *a, *b;
  float* y;
  Sgemm sgemm;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Run() {
    SingleThreadedHere();
    for (int64_t i; (i = next.fetch_add(1)) < static_cast<int64_t>(tasks.size());) {
      const Task& t = tasks[i];
      sgemm(kRowMajor, t.trans_a, t.trans_b, t.rows, t.n, t.k, 1.0f, a + t.a_off, t.lda,
            b + t.b_off, t.ldb, 0.0f, y + t.y_off, t.ldc);
      if (done.fetch_add(1) + 1 == static_cast<int64_t>(tasks.size())) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

// mode 0: y[rows of g] = a[rows of g] @ b[g]    (a [M, K], b [G, K, N], y [M, N])
// mode 1: y[rows of g] = a[rows of g] @ b[g].T  (a [M, K], b [G, N, K], y [M, N])
// mode 2: y[g] = a[rows of g].T @ b[rows of g]  (a [M, K], b [M, N], y [G, K, N])
// Rows past the last group are zero in modes 0 and 1; an empty group's y[g] is zero in mode 2.
// Each group's rows (modes 0, 1) or each group (mode 2) are split into single-threaded sgemm
// tasks run on XLA's own CPU thread pool, so that no second pool competes for the cores.
ffi::Error GroupedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                         ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> y,
                         int64_t mode) {
  auto work = std::make_shared<Work>();
  work->sgemm = LoadSgemm();
  if (work->sgemm == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "scipy_cblas_sgemm64_ is not loaded");
  }
  work->a = a.typed_data();
  work->b = b.typed_data();
  work->y = y->typed_data();
  const int64_t groups = sizes.dimensions()[0];
  const int32_t* size = sizes.typed_data();
  const int64_t m = a.dimensions()[0], k = a.dimensions()[1];
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t row = 0;
  if (mode == 2) {
    const int64_t n = b.dimensions()[1];
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t rows = std::min<int64_t>(size[g], m - row);
      if (rows <= 0) {
        std::memset(work->y + g * k * n, 0, sizeof(float) * k * n);
        continue;
      }
      work->tasks.push_back({k, n, rows, row * k, row * n, g * k * n, kTrans, kNoTrans, k, n, n});
      row += rows;
    }
  } else {
    const int64_t n = mode == 0 ? b.dimensions()[2] : b.dimensions()[1];
    for (int64_t g = 0; g < groups && row < m; ++g) {
      const int64_t rows = std::min<int64_t>(size[g], m - row);
      const int64_t step = std::max<int64_t>(64, (rows + threads - 1) / threads);
      for (int64_t r = 0; r < rows; r += step) {
        const int64_t part = std::min(step, rows - r);
        work->tasks.push_back({part, n, k, (row + r) * k, g * k * n, (row + r) * n, kNoTrans,
                               mode == 0 ? kNoTrans : kTrans, k, mode == 0 ? n : k, n});
      }
      row += std::max<int64_t>(rows, 0);
    }
    if (row < m) std::memset(work->y + row * n, 0, sizeof(float) * (m - row) * n);
  }
  if (work->tasks.empty()) return ffi::Error::Success();
  const int64_t helpers = std::min<int64_t>(threads, work->tasks.size()) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == static_cast<int64_t>(work->tasks.size()); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RoutedGroupedMatmul, GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode"));
