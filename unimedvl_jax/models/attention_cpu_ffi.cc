// Packed attention for XLA:CPU as an XLA FFI custom call (docs/packed_sequence.md §4.7, backend `cpu_ffi`).
//
// Each query row visits only the key slots [first, last] it may see (computed by the caller from the metadata) and
// tests the §4.3 mask per (query, key) pair, so the cost follows the allowed pairs (Σ sample_len²), with no block
// rounding and no score tiles in memory. Forward: scores of one row, softmax, P·V, and the row's log-sum-exp.
// Backward: the flash-attention recurrences per row (P recomputed from the log-sum-exp), dK / dV summed over runs of
// rows into per-share buffers added up at the end, so threads never write the same slot (docs/packed_sequence.md
// §4.7 has the layout of the work).
//
// Layouts (row-major, any leading batch dims flattened to B): q, out, d_out, dq (B, Tq, Hq, D); k, v, dk, dv
// (B, Tk, Hkv, D); metadata (B, T) int32; first / last (B, Tq) int32; lse, delta (B, Tq, Hq) fp32.

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Meta {
  const int32_t* sample;
  const int32_t* split;
  const int32_t* mode;
  const int32_t* index;
};

struct Geometry {
  int64_t batch, tq, tk, hq, hkv, d;
  int64_t group() const { return hq / hkv; }
};

// exp(x) for x <= 0 (Cephes' single-precision polynomial, ~1 ulp), written branch-free so that loops over it
// vectorise; -inf and anything below the float range give exactly 0.
inline float ExpNonPositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float t = clamped * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r * r + r) + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// Dot product over one head's D features. kD > 0 fixes D at compile time (fully unrolled, vectorised without a
// remainder loop); kD == 0 takes the runtime d.
template <int kD>
inline float Dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  const int64_t n = kD > 0 ? kD : d;
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float sum = 0.0f;
  for (int j = 0; j < 16; ++j) sum += acc[j];
  if constexpr (kD % 16 != 0 || kD == 0)
    for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y += a·x over d features (the runtime-D fallback paths).
inline void Axpy(float* __restrict y, float a, const float* __restrict x, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

// 16 floats as one value (GCC / Clang vector extension): one AVX-512 register, two AVX2 ones. Accumulators of this
// type stay in registers where float arrays get spilled to the stack.
typedef float Vec __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline Vec LoadVec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreVec(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// Horizontal sums of 16 vectors at once: a, b each hold K keys × P partial sums (lane = key · P + p); Fold<P>
// returns a's keys then b's, each with its P partials added pairwise down to P / 2. Four folds (P = 16, 8, 4, 2) turn
// 16 per-key vectors into one vector of the 16 keys' totals in key order: 45 shuffles and adds for 16 dot products,
// where one horizontal sum per key costs 8.
constexpr int FoldIndex(int p, int half, int i) {
  return (i < 8 ? 0 : kLanes) + (i % 8) / (p / 2) * p + i % (p / 2) + half;
}

// Lanes FoldIndex(kP, kHalf, i) of (a, b) for i = 0 … 15 (index ≥ 16: lane of b): Clang and GCC ≥ 12 have
// __builtin_shufflevector, older GCC its own __builtin_shuffle with a mask vector.
template <int kP, int kHalf, int... kI>
inline Vec FoldPick(Vec a, Vec b, std::integer_sequence<int, kI...>) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12 && !defined(UNIMEDVL_TEST_OLD_SHUFFLE))
  return __builtin_shufflevector(a, b, FoldIndex(kP, kHalf, kI)...);
#else
  typedef int32_t Lanes __attribute__((vector_size(64)));
  return __builtin_shuffle(a, b, Lanes{FoldIndex(kP, kHalf, kI)...});
#endif
}

template <int kP>
inline Vec Fold(Vec a, Vec b) {
  constexpr auto lanes = std::make_integer_sequence<int, kLanes>{};
  return FoldPick<kP, 0>(a, b, lanes) + FoldPick<kP, kP / 2>(a, b, lanes);
}

// Σ_lanes of each of v[0 … 15], as one vector (lane j = the sum of v[j]).
inline Vec SumEach16(Vec* v) {
  for (int i = 0; i < 8; ++i) v[i] = Fold<16>(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 4; ++i) v[i] = Fold<8>(v[2 * i], v[2 * i + 1]);
  for (int i = 0; i < 2; ++i) v[i] = Fold<4>(v[2 * i], v[2 * i + 1]);
  return Fold<2>(v[0], v[1]);
}

// o[j] = scale · x · rows[j · stride : j · stride + kD] for 16 consecutive rows (keys read in place, kD % 16 == 0).
template <int kD>
inline void Dot16(const float* x, const float* rows, int64_t stride, float scale, float* o) {
  constexpr int kV = kD / kLanes;
  Vec xv[kV], per_key[kLanes];
  for (int i = 0; i < kV; ++i) xv[i] = LoadVec(x + i * kLanes);
  for (int j = 0; j < kLanes; ++j) {
    const float* row = rows + j * stride;
    Vec acc = xv[0] * LoadVec(row);
    for (int i = 1; i < kV; ++i) acc += xv[i] * LoadVec(row + i * kLanes);
    per_key[j] = acc;
  }
  StoreVec(o, SumEach16(per_key) * scale);
}

// out = scale · Σ_j w[j] · rows[j·stride : j·stride + D], accumulated in registers (two interleaved partial sums
// hide the FMA latency); kD == 0 (runtime d) accumulates in `out`.
template <int kD>
inline void WeightedSum(const float* w, const float* rows, int64_t stride, int64_t n, float scale, float* out,
                        int64_t d) {
  if constexpr (kD > 0 && kD % kLanes == 0) {
    constexpr int kV = kD / kLanes;
    Vec even[kV] = {}, odd[kV] = {};
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      const float* a = rows + j * stride;
      const float* b = a + stride;
      for (int i = 0; i < kV; ++i) {
        even[i] += w[j] * LoadVec(a + i * kLanes);
        odd[i] += w[j + 1] * LoadVec(b + i * kLanes);
      }
    }
    if (j < n)
      for (int i = 0; i < kV; ++i) even[i] += w[j] * LoadVec(rows + j * stride + i * kLanes);
    for (int i = 0; i < kV; ++i) StoreVec(out + i * kLanes, (even[i] + odd[i]) * scale);
  } else {
    std::fill(out, out + d, 0.0f);
    for (int64_t j = 0; j < n; ++j) Axpy(out, w[j], rows + j * stride, d);
    for (int64_t i = 0; i < d; ++i) out[i] *= scale;
  }
}

// max_j x[j] and Σ_j x[j] over n values, in vector lanes (a scalar loop cannot be vectorised: float max and sum
// are not reassociated without -ffast-math).
inline float MaxOf(const float* x, int64_t n) {
  Vec acc = kNegInf - Vec{};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Vec v = LoadVec(x + j);
    acc = v > acc ? v : acc;
  }
  float m = kNegInf;
  for (int i = 0; i < kLanes; ++i) m = std::max(m, acc[i]);
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

inline float SumOf(const float* x, int64_t n) {
  Vec acc = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) acc += LoadVec(x + j);
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += acc[i];
  for (; j < n; ++j) total += x[j];
  return total;
}

// out[h] = scale[h] · Σ_j w[h · w_stride + j] · rows[j · stride + offset[h] : … + kD] for kHeads heads at once,
// so that each row of V (or K) is read once for all of them, not once per head (kD % 16 == 0, kHeads · kD / 16 ≤
// 16 accumulators).
template <int kD, int kHeads>
inline void WeightedSumHeads(const float* w, int64_t w_stride, const float* rows, const int64_t* offset,
                             int64_t stride, int64_t n, const float* scale, float* const* out) {
  constexpr int kV = kD / kLanes;
  Vec acc[kHeads][kV] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float* row = rows + j * stride;
    for (int h = 0; h < kHeads; ++h) {
      const float wj = w[h * w_stride + j];
      for (int i = 0; i < kV; ++i) acc[h][i] += wj * LoadVec(row + offset[h] + i * kLanes);
    }
  }
  for (int h = 0; h < kHeads; ++h)
    for (int i = 0; i < kV; ++i) StoreVec(out[h] + i * kLanes, acc[h][i] * scale[h]);
}

// Runs work(worker, unit) for unit = 0 … units - 1, each once, on the calling thread and up to threads - 1 tasks of
// XLA's CPU compute pool (the pool the rest of the program runs on, so the kernel neither starts threads nor competes
// with idle pool threads for the cores). `worker` < threads numbers the threads that took part (for per-thread work
// space). Units are claimed from a counter and the caller takes them too, so it only waits for units already being
// worked on: no deadlock when the pool is busy or smaller than asked, and a task that starts after the last unit
// was claimed does nothing (it only touches the shared counters, which it keeps alive).
template <class Work>
void RunUnits(ffi::ThreadPool& pool, int threads, int64_t units, Work work) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> workers{0};
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto progress = std::make_shared<Progress>();
  auto take_units = [progress, units, &work] {
    int worker = -1;
    for (int64_t unit; (unit = progress->next.fetch_add(1)) < units;) {
      if (worker < 0) worker = progress->workers.fetch_add(1);
      work(worker, unit);
      if (progress->done.fetch_add(1) + 1 == units) {
        std::lock_guard<std::mutex> lock(progress->mu);
        progress->all_done.notify_all();
      }
    }
  };
  for (int t = 1; t < std::min<int64_t>(threads, units); ++t) pool.Schedule(decltype(take_units)(take_units));
  take_units();
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->all_done.wait(lock, [&] { return progress->done.load() == units; });
}

// Runs body(worker, first_row, end_row) over rows [0, n) in tasks of about 1/8 of a thread's share (rows differ in
// cost), at most 16 rows each.
template <class Body>
void ParallelRows(ffi::ThreadPool& pool, int64_t n, int threads, Body body) {
  const int64_t rows_per_task = std::clamp<int64_t>(n / (8 * threads), 1, 16);
  RunUnits(pool, threads, (n + rows_per_task - 1) / rows_per_task, [&](int worker, int64_t task) {
    body(worker, task * rows_per_task, std::min(n, (task + 1) * rows_per_task));
  });
}

ffi::Error CheckGeometry(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, Geometry* g) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  if (qd.size() < 3 || qd.size() != kd.size())
    return ffi::Error::InvalidArgument("cpu_ffi attention: q and k must be (..., T, H, D) of equal rank");
  g->batch = 1;
  for (size_t i = 0; i + 3 < qd.size(); ++i) {
    if (qd[i] != kd[i]) return ffi::Error::InvalidArgument("cpu_ffi attention: q and k batch dims differ");
    g->batch *= qd[i];
  }
  const size_t r = qd.size();
  g->tq = qd[r - 3];
  g->hq = qd[r - 2];
  g->d = qd[r - 1];
  g->tk = kd[r - 3];
  g->hkv = kd[r - 2];
  if (kd[r - 1] != g->d || g->hkv == 0 || g->hq % g->hkv != 0)
    return ffi::Error::InvalidArgument("cpu_ffi attention: head dims or head counts do not match");
  return ffi::Error::Success();
}

// One call's operands: geometry, metadata, q / k / v, key ranges and the mask constants.
struct Call {
  Geometry g;
  Meta qm, km;
  const float *q, *k, *v;
  const int32_t *first, *last;
  float scale;
  int32_t causal, noise;
};

using MetaBuffers = std::array<ffi::Buffer<ffi::S32>, 4>;  // sample, split, mode, index

Meta MetaOf(const MetaBuffers& m) {
  return {m[0].typed_data(), m[1].typed_data(), m[2].typed_data(), m[3].typed_data()};
}

// The operands both entry points share, with the geometry checked.
ffi::Error ReadCall(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                    const MetaBuffers& q_meta, const MetaBuffers& k_meta, const ffi::Buffer<ffi::S32>& first,
                    const ffi::Buffer<ffi::S32>& last, float scale, int32_t causal, int32_t noise, Call* c) {
  if (auto err = CheckGeometry(q, k, &c->g); err.failure()) return err;
  c->qm = MetaOf(q_meta);
  c->km = MetaOf(k_meta);
  c->q = q.typed_data();
  c->k = k.typed_data();
  c->v = v.typed_data();
  c->first = first.typed_data();
  c->last = last.typed_data();
  c->scale = scale;
  c->causal = causal;
  c->noise = noise;
  return ffi::Error::Success();
}

// Key range of one row, clipped to the cache: [lo, lo + span).
struct Range {
  int64_t lo, span;
};

inline Range RowRange(const int32_t* first, const int32_t* last, int64_t row, int64_t tk) {
  const int64_t lo = std::max<int64_t>(first[row], 0), hi = std::min<int64_t>(last[row], tk - 1);
  return {lo, std::max<int64_t>(hi - lo + 1, 0)};
}

// Threads for a call: the threads of XLA's CPU compute pool (or $UNIMEDVL_CPU_ATTENTION_THREADS), but no more than
// one per kMinPairs (query head, key) pairs of work: below that, waking a pool thread costs more than it saves (a
// decoding step's rows over a short context).
int ThreadsFor(const ffi::ThreadPool& pool, const Call& c) {
  constexpr int64_t kMinPairs = 32 * 1024;
  static const int configured = [] {
    const char* env = std::getenv("UNIMEDVL_CPU_ATTENTION_THREADS");
    return env ? std::max(1, std::atoi(env)) : 0;
  }();
  const int64_t rows = c.g.batch * c.g.tq;
  int64_t keys = 0;
  for (int64_t row = 0; row < rows; ++row) keys += RowRange(c.first, c.last, row, c.g.tk).span;
  const int64_t threads = configured > 0 ? configured : std::max<int64_t>(pool.num_threads(), 1);
  return static_cast<int>(std::clamp<int64_t>(keys * c.g.hq / kMinPairs, 1, std::min(threads, rows)));
}

// Grows v to at least n elements (never shrinks: work space is reused from call to call).
template <class T>
void AtLeast(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// Per-thread work space for a run of query rows of one batch entry: the union of their key ranges, K (and V) of
// those slots transposed to (Hkv, D, U) so that one row's scores against consecutive keys are vector FMAs (no
// horizontal sums), the row's mask over its range, two (Hq, span) score buffers, and in the backward the thread's
// own dK / dV sums. Reused across calls (TilesPool), so a steady state allocates and pages in nothing; Prepare sizes
// it for a call.
struct Tiles {
  static constexpr int64_t kKeys = 64;  // keys per register block in Scores
  static constexpr int64_t kRunRows = 16;  // rows per run (StaticRows' chunk)
  // Tile row pitch: Tk + 16, not a power of two (with a 2^k stride the d loop's loads collide in the cache).
  int64_t pitch = 0;
  std::vector<float> kt, vt, a, b;
  std::vector<float> run_p, run_ds;  // backward: P and dS of the run's rows over the union, (row, Hq, U)
  std::vector<float> dk_sum, dv_sum;  // backward: this thread's dK / dV (B, Tk, Hkv, D), when not the outputs
  std::vector<float> ones;  // backward: a scale of 1 per query head
  std::vector<uint8_t> mask;
  int64_t lo = 0, width = 0, batch_entry = 0;  // the run's union of key ranges: [lo, lo + width)
  int64_t tile_entry = -1, tile_base = 0, tile_end = 0;  // kt / vt hold slots [tile_base, tile_end) of tile_entry
  const float *k_src = nullptr, *v_src = nullptr;
  bool with_v = false;  // backward: V is transposed too
  bool direct = false;  // one row: read K / V in place (transposing would cost as much as the row itself)

  void Prepare(const Geometry& g, bool backward) {
    pitch = g.tk + kLanes;
    with_v = backward;
    tile_entry = -1;
    tile_base = tile_end = 0;
    AtLeast(a, g.hq * g.tk);
    AtLeast(b, g.hq * g.tk);
    AtLeast(mask, g.tk);
    if (backward) {
      ones.assign(g.hq, 1.0f);
      AtLeast(run_p, kRunRows * g.hq * g.tk);
      AtLeast(run_ds, kRunRows * g.hq * g.tk);
    }
  }

  float* RunRow(std::vector<float>& run, int64_t run_row, int64_t h, const Geometry& g) {
    return run.data() + (run_row * g.hq + h) * width;
  }

  void ClearRun(int64_t rows, const Geometry& g) {
    std::fill(run_p.begin(), run_p.begin() + rows * g.hq * width, 0.0f);
    std::fill(run_ds.begin(), run_ds.begin() + rows * g.hq * width, 0.0f);
  }

  // dK[u] += Σ_{rows, heads of the group} dS · q and dV[u] += Σ P · dO for every key u of the union, summed in
  // registers over the run's rows before one update of each key row (dk / dv point at the union's first slot).
  template <int kD>
  void AccumulateKeyGradients(const float* q, const float* d_out, int64_t rows, const Geometry& g, float* dk,
                              float* dv) const {
    const int64_t grp = g.group(), d = g.d;
    for (int64_t u = 0; u < width; ++u) {
      for (int64_t hk = 0; hk < g.hkv; ++hk) {
        float* dk_row = dk + (u * g.hkv + hk) * d;
        float* dv_row = dv + (u * g.hkv + hk) * d;
        if constexpr (kD > 0 && kD % kLanes == 0) {
          constexpr int kV = kD / kLanes;
          Vec acc_k[kV] = {}, acc_v[kV] = {};
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t h = hk * grp; h < (hk + 1) * grp; ++h) {
              const float ds = run_ds[(r * g.hq + h) * width + u], p = run_p[(r * g.hq + h) * width + u];
              if (p == 0.0f) continue;  // outside the row's range or masked (dS = P · (dP - δ) is 0 there too)
              const float* qh = q + (r * g.hq + h) * kD;
              const float* doh = d_out + (r * g.hq + h) * kD;
              for (int i = 0; i < kV; ++i) {
                acc_k[i] += ds * LoadVec(qh + i * kLanes);
                acc_v[i] += p * LoadVec(doh + i * kLanes);
              }
            }
          for (int i = 0; i < kV; ++i) {
            StoreVec(dk_row + i * kLanes, LoadVec(dk_row + i * kLanes) + acc_k[i]);
            StoreVec(dv_row + i * kLanes, LoadVec(dv_row + i * kLanes) + acc_v[i]);
          }
        } else {
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t h = hk * grp; h < (hk + 1) * grp; ++h) {
              Axpy(dk_row, run_ds[(r * g.hq + h) * width + u], q + (r * g.hq + h) * d, d);
              Axpy(dv_row, run_p[(r * g.hq + h) * width + u], d_out + (r * g.hq + h) * d, d);
            }
        }
      }
    }
  }

  // Transposes key slots [from, to) of batch entry b into dst, whose row i (of Hkv·D) holds slot `tile_base + j` at j.
  void Transpose(const float* src, float* dst, const Geometry& g, int64_t b, int64_t from, int64_t to) const {
    const int64_t row = g.hkv * g.d;
    const float* slots = src + (b * g.tk + from) * row;
    for (int64_t i = 0; i < row; ++i)
      for (int64_t j = 0; j < to - from; ++j) dst[i * pitch + from - tile_base + j] = slots[j * row + i];
  }

  // Load the union of rows [begin, end)'s ranges (all in batch entry b). The transposed tiles keep the slots already
  // transposed for earlier runs of the same batch entry (runs advance through a sample, so mostly only the new
  // keys are transposed).
  void Load(const float* k, const float* v, const Geometry& g, int64_t b, const int32_t* first, const int32_t* last,
            int64_t begin, int64_t end) {
    int64_t hi = -1;
    lo = g.tk;
    for (int64_t row = begin; row < end; ++row) {
      const Range r = RowRange(first, last, row, g.tk);
      if (r.span == 0) continue;
      lo = std::min(lo, r.lo);
      hi = std::max(hi, r.lo + r.span - 1);
    }
    width = std::max<int64_t>(hi - lo + 1, 0);
    k_src = k;
    v_src = v;
    batch_entry = b;
    direct = end - begin == 1;
    if (direct || width == 0) return;
    const int64_t tile_size = g.hkv * g.d * pitch + kKeys;
    AtLeast(kt, tile_size);
    if (with_v) AtLeast(vt, tile_size);
    int64_t from = tile_end;
    if (b != tile_entry || lo < tile_base || tile_end <= tile_base) {  // start a new tile at lo
      tile_entry = b;
      tile_base = lo;
      from = lo;
    }
    if (hi + 1 > from) {
      Transpose(k, kt.data(), g, b, from, hi + 1);
      if (with_v) Transpose(v, vt.data(), g, b, from, hi + 1);
      tile_end = hi + 1;
    }
  }

  // out[h, j] = scale · Σ_d x[h, d] · key[lo + offset + j, h / G, d] for j < span and every query head h (key: K, or
  // V for dP). From the transposed tile: blocks of kKeys keys, then of 16, each held in registers across the d loop
  // (no store-to-load chain through the output).
  template <int kD>
  void Scores(const float* x, bool of_values, const Geometry& g, int64_t offset, int64_t span, float scale,
              float* out) const {
    const int64_t d_count = kD > 0 ? kD : g.d;
    if (direct) {  // keys in place: one dot per (key, head), the key row read once for all its query heads
      const int64_t stride = g.hkv * d_count;
      const float* rows = (of_values ? v_src : k_src) + (batch_entry * g.tk + lo + offset) * stride;
      for (int64_t h = 0; h < g.hq; ++h) {
        const float* xh = x + h * d_count;
        const float* head_rows = rows + (h / g.group()) * d_count;
        int64_t j = 0;
        if constexpr (kD > 0 && kD % kLanes == 0)
          for (; j + kLanes <= span; j += kLanes)
            Dot16<kD>(xh, head_rows + j * stride, stride, scale, out + h * span + j);
        for (; j < span; ++j) out[h * span + j] = Dot<kD>(xh, head_rows + j * stride, d_count) * scale;
      }
      return;
    }
    const std::vector<float>& tile = of_values ? vt : kt;
    for (int64_t h = 0; h < g.hq; ++h) {
      const float* base = tile.data() + (h / g.group()) * d_count * pitch + lo + offset - tile_base;
      const float* xh = x + h * d_count;
      float* o = out + h * span;
      int64_t j0 = 0;
      for (; j0 + kKeys <= span; j0 += kKeys)
        ScoreBlock<kKeys / kLanes>(xh, base + j0, pitch, d_count, scale, kKeys, o + j0);
      for (; j0 < span; j0 += kLanes)
        ScoreBlock<1>(xh, base + j0, pitch, d_count, scale, std::min<int64_t>(kLanes, span - j0), o + j0);
    }
  }

  // o[j] = scale · Σ_d x[d] · t[d·pitch + j] for j < n ≤ kV·16, the kV·16 sums held in registers across the d
  // loop.
  // Lanes past n read later tile rows (or the padding) and are not stored.
  template <int kV>
  void ScoreBlock(const float* x, const float* t, int64_t pitch, int64_t d_count, float scale, int64_t n,
                  float* o) const {
    Vec acc[kV] = {};
    for (int64_t d = 0; d < d_count; ++d) {
      const float xd = x[d];
      for (int i = 0; i < kV; ++i) acc[i] += xd * LoadVec(t + d * pitch + i * kLanes);
    }
    if (n == kV * kLanes) {
      for (int i = 0; i < kV; ++i) StoreVec(o + i * kLanes, acc[i] * scale);
    } else {
      float block[kV * kLanes];
      for (int i = 0; i < kV; ++i) StoreVec(block + i * kLanes, acc[i] * scale);
      std::memcpy(o, block, n * sizeof(float));
    }
  }

  // mask[j] = whether query `row` may see key slot key0 + j: docs/packed_sequence.md §4.3, same sample AND (key not
  // after the query OR same bidirectional split) AND NOT foreign noise, written branch-free so that it vectorises.
  void Mask(const Meta& qm, const Meta& km, int64_t row, int64_t key0, int64_t span, int32_t causal, int32_t noise) {
    const int32_t sample = qm.sample[row], split = qm.split[row], index = qm.index[row];
    const int32_t bidirectional = qm.mode[row] != causal;
    const int32_t *ks = km.sample + key0, *ksp = km.split + key0, *km_ = km.mode + key0, *ki = km.index + key0;
    for (int64_t j = 0; j < span; ++j) {
      const int32_t same_split = ksp[j] == split;
      const int32_t visible = (ki[j] <= index) | (same_split & bidirectional);
      const int32_t foreign_noise = (km_[j] == noise) & (1 - same_split);
      mask[j] = static_cast<uint8_t>((ks[j] == sample) & visible & (1 - foreign_noise));
    }
  }
};

// Runs body(share, first_row, end_row) over `shares` contiguous shares of rows [0, n), cut so that their key counts
// (row cost ≈ span + 16) are about equal, each share in runs of at most kRunRows rows and on one thread. Which rows a
// share holds depends only on the ranges and the share count, so per-share sums (dK, dV) are reproducible bit for
// bit, whichever thread works on a share.
template <class Body>
void StaticRows(ffi::ThreadPool& pool, int64_t n, int shares, const int32_t* first, const int32_t* last, int64_t tk,
                Body body) {
  std::vector<int64_t> cost(n + 1, 0);
  for (int64_t row = 0; row < n; ++row) {
    cost[row + 1] = cost[row] + RowRange(first, last, row, tk).span + 16;
  }
  std::vector<int64_t> bounds(shares + 1, n);
  bounds[0] = 0;
  for (int t = 1; t < shares; ++t)
    bounds[t] = std::lower_bound(cost.begin(), cost.end(), cost[n] * t / shares) - cost.begin();
  RunUnits(pool, shares, shares, [&](int, int64_t share) {
    for (int64_t start = bounds[share]; start < bounds[share + 1]; start += Tiles::kRunRows)
      body(share, start, std::min(bounds[share + 1], start + Tiles::kRunRows));
  });
}

// The Tiles of one call, taken from a process-wide free list and returned to it when the call ends.
class CallTiles {
 public:
  CallTiles(int count, const Geometry& g, bool backward) {
    {
      std::lock_guard<std::mutex> lock(Mutex());
      while (static_cast<int>(tiles_.size()) < count && !Free().empty()) {
        tiles_.push_back(std::move(Free().back()));
        Free().pop_back();
      }
    }
    while (static_cast<int>(tiles_.size()) < count) tiles_.push_back(std::make_unique<Tiles>());
    for (auto& t : tiles_) t->Prepare(g, backward);
  }
  ~CallTiles() {
    std::lock_guard<std::mutex> lock(Mutex());
    for (auto& t : tiles_) Free().push_back(std::move(t));
  }
  Tiles& operator[](int i) { return *tiles_[i]; }
  int size() const { return static_cast<int>(tiles_.size()); }

 private:
  static std::mutex& Mutex() {
    static std::mutex mu;
    return mu;
  }
  static std::vector<std::unique_ptr<Tiles>>& Free() {
    static auto* free = new std::vector<std::unique_ptr<Tiles>>();  // never destroyed: calls may run at exit
    return *free;
  }
  std::vector<std::unique_ptr<Tiles>> tiles_;
};

// Calls body(b, begin, stop) for the runs of rows [begin, end) that share a batch entry b (rows of entry b are
// b·Tq … b·Tq + Tq - 1).
template <class Body>
void SplitByEntry(int64_t tq, int64_t begin, int64_t end, Body body) {
  while (begin < end) {
    const int64_t b = begin / tq, stop = std::min(end, (b + 1) * tq);
    body(b, begin, stop);
    begin = stop;
  }
}

// out[h] = scale[h] · Σ_j w[h · span + j] · rows[j, h / G] for every query head h over the span's rows of V or K
// (read in place, (span, Hkv, D)), in chunks of heads that read each row once (WeightedSumHeads), or head by head
// for a runtime D.
template <int kD>
void WeightedRowsOfHeads(const float* w, int64_t span, const float* rows, const Geometry& g, const float* scale,
                         float* out) {
  const int64_t stride = g.hkv * g.d;
  if constexpr (kD > 0 && kD % kLanes == 0) {
    constexpr int kChunk = std::max(1, std::min(4, kLanes / (kD / kLanes)));
    int64_t h = 0;
    int64_t offset[kChunk];
    float* outs[kChunk];
    for (; h + kChunk <= g.hq; h += kChunk) {
      for (int i = 0; i < kChunk; ++i) {
        offset[i] = (h + i) / g.group() * kD;
        outs[i] = out + (h + i) * kD;
      }
      WeightedSumHeads<kD, kChunk>(w + h * span, span, rows, offset, stride, span, scale + h, outs);
    }
    for (; h < g.hq; ++h) {
      offset[0] = h / g.group() * kD;
      outs[0] = out + h * kD;
      WeightedSumHeads<kD, 1>(w + h * span, span, rows, offset, stride, span, scale + h, outs);
    }
  } else {
    for (int64_t h = 0; h < g.hq; ++h)
      WeightedSum<kD>(w + h * span, rows + h / g.group() * g.d, stride, span, scale[h], out + h * g.d, g.d);
  }
}

// Forward of the rows [begin, end) of batch entry b: output rows and their log-sum-exp.
template <int kD>
void ForwardRun(const Call& c, Tiles& t, int64_t b, int64_t begin, int64_t end, float* op, float* lsep) {
  const Geometry& g = c.g;
  const int64_t d = g.d;
  t.Load(c.k, c.v, g, b, c.first, c.last, begin, end);
  for (int64_t row = begin; row < end; ++row) {
    const Range r = RowRange(c.first, c.last, row, g.tk);
    float* orow = op + row * g.hq * d;  // every head's row is stored below (zeros where it sees no key)
    t.Scores<kD>(c.q + row * g.hq * d, false, g, r.lo - t.lo, r.span, c.scale, t.a.data());
    t.Mask(c.qm, c.km, row, b * g.tk + r.lo, r.span, c.causal, c.noise);
    float* inv_total = t.b.data();  // per head: 1 / Σ exp, 0 where the row sees no key
    for (int64_t h = 0; h < g.hq; ++h) {
      float* __restrict s = t.a.data() + h * r.span;
      for (int64_t j = 0; j < r.span; ++j) s[j] = t.mask[j] ? s[j] : kNegInf;
      const float m = MaxOf(s, r.span);
      if (m == kNegInf) {  // sees no key: output 0, no gradient
        std::fill(s, s + r.span, 0.0f);
        inv_total[h] = 0.0f;
        lsep[row * g.hq + h] = std::numeric_limits<float>::infinity();
        continue;
      }
      for (int64_t j = 0; j < r.span; ++j) s[j] = ExpNonPositive(s[j] - m);
      const float total = SumOf(s, r.span);
      inv_total[h] = 1.0f / total;
      lsep[row * g.hq + h] = m + std::log(total);
    }
    const float* vrows = c.v + (b * g.tk + r.lo) * g.hkv * d;
    WeightedRowsOfHeads<kD>(t.a.data(), r.span, vrows, g, inv_total, orow);
  }
}

template <int kD>
ffi::Error AttentionForwardD(ffi::ThreadPool& pool, const Call& c, float* op, float* lsep) {
  const int64_t rows = c.g.batch * c.g.tq;
  CallTiles tiles(ThreadsFor(pool, c), c.g, false);
  ParallelRows(pool, rows, tiles.size(), [&](int thread, int64_t begin, int64_t end) {
    SplitByEntry(c.g.tq, begin, end, [&](int64_t b, int64_t run_begin, int64_t run_end) {
      ForwardRun<kD>(c, tiles[thread], b, run_begin, run_end, op, lsep);
    });
  });
  return ffi::Error::Success();
}

// Backward of the rows [begin, end) of batch entry b: their dQ rows, and their dK / dV added into dkp / dvp (a
// thread's own buffers).
template <int kD>
void BackwardRun(const Call& c, Tiles& t, int64_t b, int64_t begin, int64_t end, const float* lsep, const float* dop,
                 const float* deltap, float* dqp, float* dkp, float* dvp) {
  const Geometry& g = c.g;
  const int64_t d = g.d;
  t.Load(c.k, c.v, g, b, c.first, c.last, begin, end);
  t.ClearRun(end - begin, g);
  for (int64_t row = begin; row < end; ++row) {
    const Range r = RowRange(c.first, c.last, row, g.tk);
    if (r.span == 0) continue;
    const float* qrow = c.q + row * g.hq * d;
    const float* dorow = dop + row * g.hq * d;
    float* dqrow = dqp + row * g.hq * d;
    float* probs = t.a.data();   // scores, then P
    float* dsc = t.b.data();     // dP, then dS
    t.Scores<kD>(qrow, false, g, r.lo - t.lo, r.span, c.scale, probs);
    t.Scores<kD>(dorow, true, g, r.lo - t.lo, r.span, 1.0f, dsc);
    t.Mask(c.qm, c.km, row, b * g.tk + r.lo, r.span, c.causal, c.noise);
    for (int64_t h = 0; h < g.hq; ++h) {
      float* __restrict p = probs + h * r.span;
      float* __restrict ds = dsc + h * r.span;
      const float lse_h = lsep[row * g.hq + h], dlt = deltap[row * g.hq + h];
      for (int64_t j = 0; j < r.span; ++j) {
        const float pj = t.mask[j] ? ExpNonPositive(p[j] - lse_h) : 0.0f;
        ds[j] = pj * (ds[j] - dlt) * c.scale;
        p[j] = pj;
      }
    }
    const int64_t at = r.lo - t.lo, run_row = row - begin;
    WeightedRowsOfHeads<kD>(dsc, r.span, c.k + (b * g.tk + r.lo) * g.hkv * d, g, t.ones.data(), dqrow);
    for (int64_t h = 0; h < g.hq; ++h) {
      std::memcpy(t.RunRow(t.run_p, run_row, h, g) + at, probs + h * r.span, r.span * sizeof(float));
      std::memcpy(t.RunRow(t.run_ds, run_row, h, g) + at, dsc + h * r.span, r.span * sizeof(float));
    }
  }
  t.AccumulateKeyGradients<kD>(c.q + begin * g.hq * d, dop + begin * g.hq * d, end - begin, g,
                               dkp + (b * g.tk + t.lo) * g.hkv * d, dvp + (b * g.tk + t.lo) * g.hkv * d);
}

template <int kD>
ffi::Error AttentionBackwardD(ffi::ThreadPool& pool, const Call& c, const float* lsep, const float* dop,
                             const float* deltap, float* dqp, float* dk0, float* dv0) {
  const Geometry& g = c.g;
  const int64_t rows = g.batch * g.tq, d = g.d;
  const int64_t kv_size = g.batch * g.tk * g.hkv * d;
  CallTiles tiles(ThreadsFor(pool, c), g, true);
  const int shares = tiles.size();
  std::fill(dqp, dqp + rows * g.hq * d, 0.0f);
  std::fill(dk0, dk0 + kv_size, 0.0f);
  std::fill(dv0, dv0 + kv_size, 0.0f);
  // Share 0 accumulates straight into dk / dv, the others into their Tiles' sums, added in afterwards in share order
  // (StaticRows: reproducible).
  for (int share = 1; share < shares; ++share) {
    for (auto* sum : {&tiles[share].dk_sum, &tiles[share].dv_sum}) {
      AtLeast(*sum, kv_size);
      std::fill(sum->begin(), sum->begin() + kv_size, 0.0f);
    }
  }
  StaticRows(pool, rows, shares, c.first, c.last, g.tk, [&](int share, int64_t begin, int64_t end) {
    Tiles& t = tiles[share];
    float* dkp = share == 0 ? dk0 : t.dk_sum.data();
    float* dvp = share == 0 ? dv0 : t.dv_sum.data();
    SplitByEntry(g.tq, begin, end, [&](int64_t b, int64_t run_begin, int64_t run_end) {
      BackwardRun<kD>(c, t, b, run_begin, run_end, lsep, dop, deltap, dqp, dkp, dvp);
    });
  });
  for (int share = 1; share < shares; ++share) {
    const float *dk_sum = tiles[share].dk_sum.data(), *dv_sum = tiles[share].dv_sum.data();
    for (int64_t i = 0; i < kv_size; ++i) dk0[i] += dk_sum[i];
    for (int64_t i = 0; i < kv_size; ++i) dv0[i] += dv_sum[i];
  }
  return ffi::Error::Success();
}

// Runs kernel(std::integral_constant<int, D>) for the usual head dims D (16, 32, 64, 128), else with D = 0 (runtime).
template <class Kernel>
ffi::Error DispatchHeadDim(int64_t d, Kernel kernel) {
  switch (d) {
    case 16: return kernel(std::integral_constant<int, 16>{});
    case 32: return kernel(std::integral_constant<int, 32>{});
    case 64: return kernel(std::integral_constant<int, 64>{});
    case 128: return kernel(std::integral_constant<int, 128>{});
    default: return kernel(std::integral_constant<int, 0>{});
  }
}

// Reads and checks the operands both entry points share, then runs kernel(head_dim, call) with D fixed at compile
// time where it is one of the usual head dims (DispatchHeadDim).
template <class Kernel>
ffi::Error WithCall(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                    const MetaBuffers& q_meta, const MetaBuffers& k_meta, const ffi::Buffer<ffi::S32>& first,
                    const ffi::Buffer<ffi::S32>& last, float scale, int32_t causal, int32_t noise, Kernel kernel) {
  Call c;
  if (auto err = ReadCall(q, k, v, q_meta, k_meta, first, last, scale, causal, noise, &c); err.failure()) return err;
  return DispatchHeadDim(c.g.d, [&](auto head_dim) { return kernel(head_dim, c); });
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::S32> q_sample, ffi::Buffer<ffi::S32> q_split,
                            ffi::Buffer<ffi::S32> q_mode, ffi::Buffer<ffi::S32> q_index,
                            ffi::Buffer<ffi::S32> k_sample, ffi::Buffer<ffi::S32> k_split,
                            ffi::Buffer<ffi::S32> k_mode, ffi::Buffer<ffi::S32> k_index,
                            ffi::Buffer<ffi::S32> first, ffi::Buffer<ffi::S32> last, float scale, int32_t causal,
                            int32_t noise, ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  return WithCall(q, k, v, {q_sample, q_split, q_mode, q_index}, {k_sample, k_split, k_mode, k_index}, first, last,
                  scale, causal, noise, [&](auto head_dim, const Call& c) {
                    return AttentionForwardD<decltype(head_dim)::value>(pool, c, out->typed_data(), lse->typed_data());
                  });
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::S32> q_sample, ffi::Buffer<ffi::S32> q_split,
                             ffi::Buffer<ffi::S32> q_mode, ffi::Buffer<ffi::S32> q_index,
                             ffi::Buffer<ffi::S32> k_sample, ffi::Buffer<ffi::S32> k_split,
                             ffi::Buffer<ffi::S32> k_mode, ffi::Buffer<ffi::S32> k_index,
                             ffi::Buffer<ffi::S32> first, ffi::Buffer<ffi::S32> last, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::F32> delta, float scale, int32_t causal,
                             int32_t noise, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                             ffi::ResultBuffer<ffi::F32> dv) {
  return WithCall(q, k, v, {q_sample, q_split, q_mode, q_index}, {k_sample, k_split, k_mode, k_index}, first, last,
                  scale, causal, noise, [&](auto head_dim, const Call& c) {
                    return AttentionBackwardD<decltype(head_dim)::value>(
                        pool, c, lse.typed_data(), d_out.typed_data(), delta.typed_data(), dq->typed_data(),
                        dk->typed_data(), dv->typed_data());
                  });
}

}  // namespace

#define META_ARGS                                                                              \
  .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()      \
      .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()  \
      .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()  \
      .Arg<ffi::Buffer<ffi::S32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnimedvlAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>() META_ARGS
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<int32_t>("noise")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(UnimedvlAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>() META_ARGS
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("causal")
                                  .Attr<int32_t>("noise")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
