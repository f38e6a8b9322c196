// All-pairs Frobenius inner products of T kernel tiles on CUDA.
// Contract: engine/ops/kernel_pairs.py. x is (T, R, N) float32 or bfloat16 (as uint16 bits) with
// unit column stride; the binding (kernel_pairs_cuda.cpp) turns per-block float64 partials into G.
//
// Memory-bound by design (T(T+1)/2 FMAs per T values read: 8.5 FMA per 4-byte element at T=16),
// so the layout is chosen for reading each element once with coalesced loads:
//  - each thread owns one column at a time and keeps the T values of that column (all kernels)
//    and the T(T+1)/2 pair sums in registers (136 float32 accumulators at T=16);
//  - work items are (row, 4096-column segment) pairs, handed to a persistent grid round-robin, so
//    the triangular row lengths of the symmetric mode balance across blocks;
//  - float32 sums per thread are flushed (warp shuffle tree, then float64 in shared memory) every
//    FLUSH x THREADS elements: float32 within a tile, float64 across tiles, no atomics, so results
//    are bitwise reproducible.
// T > 16 runs as several launches over 8-kernel groups (the binding), rereading columns per group.
// This file includes no torch headers so that nvcc alone can compile it (CI checks sm_90 builds).
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int THREADS = 128;
constexpr int NWARPS = THREADS / 32;
constexpr int64_t SEG = 4096;   // columns per work item
constexpr int64_t FLUSH = 256;  // float32 terms per thread (at most) before a float64 flush

__device__ __forceinline__ float load_value(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_value(const uint16_t* p) {
  return __uint_as_float(static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
}

template <int GI, int GJ, bool DIAG>
struct Pairs {
  static constexpr int count = DIAG ? GI * (GI + 1) / 2 : GI * GJ;
  __host__ __device__ static constexpr int index(int i, int j) {
    return DIAG ? i * GI - i * (i - 1) / 2 + (j - i) : i * GJ + j;
  }
};

template <int NP>
__device__ __forceinline__ void flush(float (&acc)[NP], double (*wsum)[NP]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    float v = acc[p];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) wsum[warp][p] += static_cast<double>(v);
    acc[p] = 0.f;
  }
}

// Pairs between kernels [i0, i0 + ni) and [j0, j0 + nj) (the same group when DIAG: i <= j only).
// GI/GJ are the padded group sizes; the slots past ni/nj hold copies of the last kernel, and the
// partials of pairs involving them are written but not used.
template <typename In, int GI, int GJ, bool DIAG>
__global__ void __launch_bounds__(THREADS) kernel_pairs_kernel(const In* __restrict__ x, int64_t R, int64_t N,
                                                               int64_t st, int64_t sr, int64_t i0, int ni,
                                                               int64_t j0, int nj, bool symmetric, int64_t d,
                                                               double* __restrict__ partials) {
  using P = Pairs<GI, GJ, DIAG>;
  constexpr int NP = P::count;
  __shared__ double wsum[NWARPS][NP];
  for (int e = threadIdx.x; e < NWARPS * NP; e += THREADS) (&wsum[0][0])[e] = 0.0;
  __syncthreads();

  float acc[NP];
#pragma unroll
  for (int p = 0; p < NP; ++p) acc[p] = 0.f;

  const int64_t nseg = (N + SEG - 1) / SEG;
  const int64_t items = R * nseg;
  int64_t since_flush = 0;  // block-uniform, so every lane of every warp joins each flush
  for (int64_t w = blockIdx.x; w < items; w += gridDim.x) {
    const int64_t r = w / nseg;
    int64_t cb = (w % nseg) * SEG;
    const int64_t ce = cb + SEG < N ? cb + SEG : N;
    if (symmetric && cb < r - d) cb = r - d;  // columns below the diagonal are never read
    if (cb >= ce) continue;
    const In* xi = x + i0 * st + r * sr;
    const In* xj = x + j0 * st + r * sr;
    for (int64_t c = cb + threadIdx.x; c < ce; c += THREADS) {
      // Unpredicated loads: a padded kernel slot (k >= ni) re-reads the last real kernel (an L1
      // hit) and only feeds pair sums the binding discards. Predicating them instead ran out of
      // the 7 predicate registers at T = 16 and serialized the remaining loads (SASS: 7 loads
      // in flight, then one at a time; bfloat16 measured 3x slower than float32 on an H200).
      float a[GI], b[GJ];
#pragma unroll
      for (int k = 0; k < GI; ++k) a[k] = load_value(xi + (k < ni ? k : ni - 1) * st + c);
      if (!DIAG) {
#pragma unroll
        for (int k = 0; k < GJ; ++k) b[k] = load_value(xj + (k < nj ? k : nj - 1) * st + c);
      }
      const float wgt = (symmetric && c + d != r) ? 2.f : 1.f;  // 2 above the diagonal, 1 on it
#pragma unroll
      for (int i = 0; i < GI; ++i) {
        const float ai = wgt * a[i];
#pragma unroll
        for (int j = DIAG ? i : 0; j < GJ; ++j) acc[P::index(i, j)] += ai * (DIAG ? a[j] : b[j]);
      }
    }
    since_flush += ce - cb;
    if (since_flush >= FLUSH * THREADS) {
      flush<NP>(acc, wsum);
      since_flush = 0;
    }
  }
  flush<NP>(acc, wsum);
  __syncthreads();
  for (int e = threadIdx.x; e < GI * GJ; e += THREADS) {
    const int i = e / GJ, j = e % GJ;
    double v = 0.0;
    if (!DIAG || j >= i) {
      for (int wp = 0; wp < NWARPS; ++wp) v += wsum[wp][P::index(i, j)];  // fixed order: reproducible
    }
    partials[static_cast<int64_t>(blockIdx.x) * GI * GJ + e] = v;
  }
}

template <typename In, int GI, int GJ, bool DIAG>
int grid_for(int device, int64_t items) {
  int sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return -static_cast<int>(err);
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel_pairs_kernel<In, GI, GJ, DIAG>, THREADS, 0);
  if (err != cudaSuccess) return -static_cast<int>(err);
  const int64_t full = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  return static_cast<int>(items < full ? (items > 0 ? items : 1) : full);
}

template <typename In, int GI, int GJ, bool DIAG>
int launch(const void* x, int64_t R, int64_t N, int64_t st, int64_t sr, int64_t i0, int ni, int64_t j0, int nj,
           int symmetric, int64_t d, double* partials, int grid, cudaStream_t stream) {
  kernel_pairs_kernel<In, GI, GJ, DIAG><<<grid, THREADS, 0, stream>>>(
      static_cast<const In*>(x), R, N, st, sr, i0, ni, j0, nj, symmetric != 0, d, partials);
  return static_cast<int>(cudaGetLastError());
}

// One dispatch table for grid sizing and launching: (dtype, padded group, diag).
template <template <typename, int, int, bool> class F, typename... Args>
int dispatch(int bf16, int gpad, int diag, Args... args) {
  // Off-diagonal groups are at most 8 wide (16x16 would need 256 accumulators and spill).
  if (!diag && gpad > 8) return -static_cast<int>(cudaErrorInvalidValue);
#define ENTK_CASE(IN, G)                                                                      \
  if (gpad == G) {                                                                            \
    constexpr int GO = G > 8 ? 8 : G;                                                         \
    return diag ? F<IN, G, G, true>::run(args...) : F<IN, GO, GO, false>::run(args...);       \
  }
  if (bf16) {
    ENTK_CASE(uint16_t, 1) ENTK_CASE(uint16_t, 2) ENTK_CASE(uint16_t, 4) ENTK_CASE(uint16_t, 8)
    ENTK_CASE(uint16_t, 16)
  } else {
    ENTK_CASE(float, 1) ENTK_CASE(float, 2) ENTK_CASE(float, 4) ENTK_CASE(float, 8) ENTK_CASE(float, 16)
  }
#undef ENTK_CASE
  return -static_cast<int>(cudaErrorInvalidValue);
}

template <typename In, int GI, int GJ, bool DIAG>
struct GridF {
  static int run(int device, int64_t items) { return grid_for<In, GI, GJ, DIAG>(device, items); }
};
template <typename In, int GI, int GJ, bool DIAG>
struct LaunchF {
  template <typename... A>
  static int run(A... a) {
    return launch<In, GI, GJ, DIAG>(a...);
  }
};

}  // namespace

// Blocks to launch for a (row count x columns) tile: occupancy x SMs, at most one per work item.
// Returns a negative cudaError_t on failure.
extern "C" int entk_kernel_pairs_grid(int bf16, int gpad, int diag, int64_t R, int64_t N, int device) {
  const int64_t items = R * ((N + SEG - 1) / SEG);
  return dispatch<GridF>(bf16, gpad, diag, device, items);
}

// Writes partials[grid][gpad][gpad] (float64; zeros below the diagonal when diag). Returns a cudaError_t.
extern "C" int entk_kernel_pairs_partials(const void* x, int bf16, int64_t R, int64_t N, int64_t st, int64_t sr,
                                          int64_t i0, int ni, int64_t j0, int nj, int diag, int symmetric,
                                          int64_t d, double* partials, int grid, int gpad, void* stream) {
  if (ni > gpad || nj > gpad || ni < 1 || nj < 1 || grid < 1) return static_cast<int>(cudaErrorInvalidValue);
  const int rc = dispatch<LaunchF>(bf16, gpad, diag, x, R, N, st, sr, i0, ni, j0, nj, symmetric, d, partials,
                                   grid, static_cast<cudaStream_t>(stream));
  return rc < 0 ? -rc : rc;
}
