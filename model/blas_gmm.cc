// The experts' SwiGLU of the dropless MoE on the host CPU (`moe.gmm_impl='blas'`,
// model/host_blas.py): y = (silu(x @ w_gate[g]) * (x @ w_up[g])) @ w_down[g] on each group g's
// rows, forward and backward in one call each, with single-threaded sgemms from NumPy's bundled
// OpenBLAS (`scipy_cblas_sgemm64_`, ILP64, loaded into the process before this library) and no
// padding. The work is shared out over XLA's own CPU thread pool. Each task keeps its rows'
// hidden activations in its own cache-sized buffer, so the three matmuls and the elementwise work
// of a group's rows run back to back on one core, and a layer makes two calls (one wake-up of the
// pool each) instead of nine.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <climits>
#include <cstdint>
#include <cstring>
#include <functional>
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

// Tasks 0..n-1 shared by the calling thread and the pool threads it schedules: each takes the
// next task until none is left; the caller returns when the last one is done. Helpers that start
// late find no work.
struct Parallel {
  int64_t n;
  std::function<void(int64_t)> fn;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Run() {
    SingleThreadedHere();
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      fn(i);
      if (done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> fn) {
  if (n <= 0) return;
  auto work = std::make_shared<Parallel>();
  work->n = n;
  work->fn = std::move(fn);
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == n; });
}

struct Rows {
  int64_t group, begin, count;
};

// Each group's rows in equal parts of at most a quarter of each thread's share of all m rows (at
// least 64, at most `max_rows`): a balanced routing gives about one task per group, and a large
// group is still spread over the pool. Returns the tasks and sets `used` to the rows covered by
// the groups.
std::vector<Rows> RowTasks(const int32_t* size, int64_t groups, int64_t m, int64_t threads,
                           int64_t* used, int64_t max_rows = INT64_MAX) {
  const int64_t share = (m + 4 * threads - 1) / (4 * threads);
  const int64_t chunk = std::max<int64_t>(64, std::min(share, max_rows));
  std::vector<Rows> tasks;
  int64_t row = 0;
  for (int64_t g = 0; g < groups && row < m; ++g) {
    const int64_t rows = std::min<int64_t>(std::max<int32_t>(size[g], 0), m - row);
    const int64_t parts = (rows + chunk - 1) / chunk;
    const int64_t step = parts > 0 ? (rows + parts - 1) / parts : 1;
    for (int64_t r = 0; r < rows; r += step) tasks.push_back({g, row + r, std::min(step, rows - r)});
    row += rows;
  }
  *used = row;
  return tasks;
}

ffi::Error NoSgemm() {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "scipy_cblas_sgemm64_ is not loaded");
}

// exp(x) for the sigmoid: Cephes' range reduction and degree-6 polynomial (about 1 ulp), in plain
// arithmetic so that the loops below vectorise. x is clamped to [-87.3, 88.37], where 2^n stays a
// normal float; a NaN stays NaN (comparisons with it are false, and the polynomial carries it).
inline float Exp(float x) {
  x = x > 88.37f ? 88.37f : x;
  x = x < -87.3f ? -87.3f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#define ROUTED_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// h = silu(g) * u, silu(g) = g * sigmoid(g).
ROUTED_VECTOR_CLONES void SwigluHidden(const float* g, const float* u, float* h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] / (1.0f + Exp(-g[i])) * u[i];
}

// From dh (overwritten by dg): h = silu(g) * u, du = dh * silu(g), dg = dh * u * silu'(g) with
// silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g).
ROUTED_VECTOR_CLONES void SwigluGrads(const float* g, const float* u, float* dh_dg, float* h,
                                      float* du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.0f / (1.0f + Exp(-g[i])), silu = g[i] * s;
    h[i] = silu * u[i];
    du[i] = dh_dg[i] * silu;
    dh_dg[i] = dh_dg[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
  }
}

float* Scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

// x [M, D], w_gate/w_up [G, D, F], w_down [G, F, D] -> y [M, D] and the residuals gate, up
// [M, F] (x @ w_gate[g], x @ w_up[g]). Rows past the last group are zero.
ffi::Error SwigluForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wg,
                         ffi::Buffer<ffi::F32> wu, ffi::Buffer<ffi::F32> wd,
                         ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> y,
                         ffi::ResultBuffer<ffi::F32> gate, ffi::ResultBuffer<ffi::F32> up) {
  const Sgemm sgemm = LoadSgemm();
  if (sgemm == nullptr) return NoSgemm();
  const int64_t m = x.dimensions()[0], d = x.dimensions()[1], f = wg.dimensions()[2];
  const float *px = x.typed_data(), *pg = wg.typed_data(), *pu = wu.typed_data();
  const float* pd = wd.typed_data();
  float *py = y->typed_data(), *pgate = gate->typed_data(), *pup = up->typed_data();
  int64_t used = 0;
  // A task's hidden activations stay within about 4 MB (its own buffer, kept per thread).
  std::vector<Rows> tasks = RowTasks(sizes.typed_data(), sizes.dimensions()[0], m,
                                     pool.num_threads(), &used, (int64_t{1} << 20) / f);
  std::memset(py + used * d, 0, sizeof(float) * (m - used) * d);
  std::memset(pgate + used * f, 0, sizeof(float) * (m - used) * f);
  std::memset(pup + used * f, 0, sizeof(float) * (m - used) * f);
  ParallelFor(pool, tasks.size(), [&](int64_t i) {
    const Rows& t = tasks[i];
    const float* xr = px + t.begin * d;
    float *gr = pgate + t.begin * f, *ur = pup + t.begin * f, *h = Scratch(t.count * f);
    sgemm(kRowMajor, kNoTrans, kNoTrans, t.count, f, d, 1.0f, xr, d, pg + t.group * d * f, f,
          0.0f, gr, f);
    sgemm(kRowMajor, kNoTrans, kNoTrans, t.count, f, d, 1.0f, xr, d, pu + t.group * d * f, f,
          0.0f, ur, f);
    SwigluHidden(gr, ur, h, t.count * f);
    sgemm(kRowMajor, kNoTrans, kNoTrans, t.count, d, f, 1.0f, h, f, pd + t.group * f * d, d, 0.0f,
          py + t.begin * d, d);
  });
  return ffi::Error::Success();
}

// The backward of SwigluForward from dy [M, D]: dx [M, D], dw_gate, dw_up [G, D, F], dw_down
// [G, F, D]; hidden, d_gate, d_up [M, F] are scratch the call fills (h and the two gradients of
// the pre-activations) between its two rounds: rows first (dx), then one task per weight gradient
// of each group.
ffi::Error SwigluBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wg,
                          ffi::Buffer<ffi::F32> wu, ffi::Buffer<ffi::F32> wd,
                          ffi::Buffer<ffi::S32> sizes, ffi::Buffer<ffi::F32> gate,
                          ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dwg,
                          ffi::ResultBuffer<ffi::F32> dwu, ffi::ResultBuffer<ffi::F32> dwd,
                          ffi::ResultBuffer<ffi::F32> hidden, ffi::ResultBuffer<ffi::F32> d_gate,
                          ffi::ResultBuffer<ffi::F32> d_up) {
  const Sgemm sgemm = LoadSgemm();
  if (sgemm == nullptr) return NoSgemm();
  const int64_t m = x.dimensions()[0], d = x.dimensions()[1], f = wg.dimensions()[2];
  const int64_t groups = sizes.dimensions()[0];
  const float *px = x.typed_data(), *pg = wg.typed_data(), *pu = wu.typed_data();
  const float *pd = wd.typed_data(), *pgate = gate.typed_data(), *pup = up.typed_data();
  const float* pdy = dy.typed_data();
  float *pdx = dx->typed_data(), *ph = hidden->typed_data();
  float *pdg = d_gate->typed_data(), *pdu = d_up->typed_data();
  float* dw[3] = {dwd->typed_data(), dwg->typed_data(), dwu->typed_data()};
  int64_t used = 0;
  std::vector<Rows> tasks = RowTasks(sizes.typed_data(), groups, m, pool.num_threads(), &used);
  std::memset(pdx + used * d, 0, sizeof(float) * (m - used) * d);
  ParallelFor(pool, tasks.size(), [&](int64_t i) {
    const Rows& t = tasks[i];
    const int64_t at = t.begin * f;
    sgemm(kRowMajor, kNoTrans, kTrans, t.count, f, d, 1.0f, pdy + t.begin * d, d,
          pd + t.group * f * d, d, 0.0f, pdg + at, f);  // dh = dy @ w_down.T, then d_gate
    SwigluGrads(pgate + at, pup + at, pdg + at, ph + at, pdu + at, t.count * f);
    sgemm(kRowMajor, kNoTrans, kTrans, t.count, d, f, 1.0f, pdg + at, f, pg + t.group * d * f, f,
          0.0f, pdx + t.begin * d, d);
    sgemm(kRowMajor, kNoTrans, kTrans, t.count, d, f, 1.0f, pdu + at, f, pu + t.group * d * f, f,
          1.0f, pdx + t.begin * d, d);
  });
  std::vector<int64_t> start(groups + 1, 0);
  for (const Rows& t : tasks) start[t.group + 1] = t.begin + t.count;
  for (int64_t g = 0; g < groups; ++g) start[g + 1] = std::max(start[g + 1], start[g]);
  ParallelFor(pool, 3 * groups, [&](int64_t i) {
    const int64_t g = i / 3, which = i % 3, rows = start[g + 1] - start[g], r0 = start[g];
    float* out = dw[which] + g * d * f;
    if (rows == 0) return (void)std::memset(out, 0, sizeof(float) * d * f);
    if (which == 0) {  // dw_down[g] = h.T @ dy  [F, D]
      sgemm(kRowMajor, kTrans, kNoTrans, f, d, rows, 1.0f, ph + r0 * f, f, pdy + r0 * d, d, 0.0f,
            out, d);
    } else {  // dw_gate[g] = x.T @ d_gate, dw_up[g] = x.T @ d_up  [D, F]
      sgemm(kRowMajor, kTrans, kNoTrans, d, f, rows, 1.0f, px + r0 * d, d,
            (which == 1 ? pdg : pdu) + r0 * f, f, 0.0f, out, f);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RoutedSwigluForward, SwigluForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_gate
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_down
                                  .Arg<ffi::Buffer<ffi::S32>>()  // sizes
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gate
                                  .Ret<ffi::Buffer<ffi::F32>>());  // up

XLA_FFI_DEFINE_HANDLER_SYMBOL(RoutedSwigluBackward, SwigluBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_gate
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_down
                                  .Arg<ffi::Buffer<ffi::S32>>()  // sizes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // gate
                                  .Arg<ffi::Buffer<ffi::F32>>()  // up
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_gate
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_up
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_down
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hidden (scratch)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_gate (scratch)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d_up (scratch)
