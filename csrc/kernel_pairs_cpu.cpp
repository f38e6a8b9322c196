// All-pairs Frobenius inner products of T kernel tiles on the CPU (C++/OpenMP).
// Contract: engine/ops/kernel_pairs.py. x is (T, R, N) float32 or bfloat16 with unit column
// stride; G[i][j] = sum_{r,c} w(r,c) x[i,r,c] x[j,r,c] in float64, w from the symmetric mode.
//
// Layout of the work: rows are split into a fixed number of row blocks (independent of the
// thread count, so results are bitwise identical for any OMP_NUM_THREADS). Each row is cut into
// chunks of L columns that are copied (and, for bfloat16, widened) into a per-thread float32
// buffer of TP x L values (TP = T rounded up to 4, zero rows beyond T), which stays in L1.
// A 4x4 register-blocked micro-kernel forms the 4x4 kernel-pair dot products of the chunk in
// float32 with 8-wide vectors; each chunk's sums are added in float64 to the block's partial,
// and the partials are summed in block order.
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t L = 512;  // chunk columns: 16 kernels x 512 x 4 B = 32 KB, the L1 size here
constexpr int V = 8;        // vector lanes (GCC generic vectors: AVX2/AVX-512 on x86, NEON pairs on Arm)
typedef float vf __attribute__((vector_size(V * sizeof(float))));

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename In>
inline float widen(In v);
template <>
inline float widen<float>(float v) { return v; }
template <>
inline float widen<uint16_t>(uint16_t v) { return bf16_bits_to_float(v); }

inline float hsum(vf v) {
  float s = 0.f;
  for (int k = 0; k < V; ++k) s += v[k];
  return s;
}

// acc[(i0+p) * tp + j0+q] += scale * sum_k buf[i0+p][k] * buf[j0+q][k], p, q < 4, k < len (len % V == 0).
inline void block4x4(const float* buf, int64_t tp, int64_t i0, int64_t j0, int64_t len, double scale, double* acc) {
  vf s[4][4];
  for (int p = 0; p < 4; ++p)
    for (int q = 0; q < 4; ++q) s[p][q] = vf{};
  const float* a = buf + i0 * L;
  const float* b = buf + j0 * L;
  for (int64_t k = 0; k < len; k += V) {
    vf av[4], bv[4];
    for (int p = 0; p < 4; ++p) std::memcpy(&av[p], a + p * L + k, sizeof(vf));
    for (int q = 0; q < 4; ++q) std::memcpy(&bv[q], b + q * L + k, sizeof(vf));
    for (int p = 0; p < 4; ++p)
      for (int q = 0; q < 4; ++q) s[p][q] += av[p] * bv[q];
  }
  for (int p = 0; p < 4; ++p)
    for (int q = 0; q < 4; ++q) acc[(i0 + p) * tp + j0 + q] += scale * static_cast<double>(hsum(s[p][q]));
}

// Kernel t's row r starts at base[t] + r * row_stride[t]: one stacked (T, R, N) tensor, or T
// separate matrices (memory maps, views) read in place without stacking them first.
template <typename In>
void kernel_pairs_impl(const std::vector<const In*>& base, const std::vector<int64_t>& row_stride, int64_t R,
                       int64_t N, bool symmetric, int64_t d, double* g /* T x T, zeroed */) {
  const int64_t T = static_cast<int64_t>(base.size());
  const int64_t tp = (T + 3) / 4 * 4;
  // Fixed work split: ~256K elements per row block, at most 4096 blocks (bounded partials memory).
  int64_t rpb = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(N, 1));
  rpb = std::max(rpb, (R + 4095) / 4096);
  const int64_t nb = (R + rpb - 1) / rpb;
  std::vector<double> partials(static_cast<size_t>(nb * tp * tp), 0.0);

#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> storage(static_cast<size_t>(tp * L + 16), 0.f);
    float* buf = storage.data();
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nb; ++blk) {
      double* acc = partials.data() + blk * tp * tp;
      for (int64_t r = blk * rpb; r < std::min(R, (blk + 1) * rpb); ++r) {
        int64_t c_begin = 0;
        double scale = 1.0;
        if (symmetric) {
          const int64_t cd = r - d;  // the diagonal's column in this row
          if (cd >= N) continue;     // the whole row lies below the diagonal
          if (cd >= 0) {             // diagonal element: weight 1, products in float32 like the rest
            for (int64_t i = 0; i < T; ++i) {
              const float xi = widen<In>(base[i][r * row_stride[i] + cd]);
              for (int64_t j = i; j < T; ++j)
                acc[i * tp + j] += static_cast<double>(xi * widen<In>(base[j][r * row_stride[j] + cd]));
            }
          }
          c_begin = std::max<int64_t>(0, cd + 1);
          scale = 2.0;
        }
        for (int64_t c0 = c_begin; c0 < N; c0 += L) {
          const int64_t len = std::min(L, N - c0);
          const int64_t padded = (len + V - 1) / V * V;
          for (int64_t t = 0; t < T; ++t) {
            const In* src = base[t] + r * row_stride[t] + c0;
            float* dst = buf + t * L;
            for (int64_t k = 0; k < len; ++k) dst[k] = widen<In>(src[k]);
            for (int64_t k = len; k < padded; ++k) dst[k] = 0.f;
          }
          for (int64_t i0 = 0; i0 < tp; i0 += 4)
            for (int64_t j0 = i0; j0 < tp; j0 += 4) block4x4(buf, tp, i0, j0, padded, scale, acc);
        }
      }
    }
  }
  for (int64_t blk = 0; blk < nb; ++blk)
    for (int64_t i = 0; i < T; ++i)
      for (int64_t j = i; j < T; ++j) g[i * T + j] += partials[blk * tp * tp + i * tp + j];
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < i; ++j) g[i * T + j] = g[j * T + i];
}

template <typename In>
torch::Tensor run(const std::vector<torch::Tensor>& xs, bool symmetric, int64_t diag_offset) {
  const int64_t T = static_cast<int64_t>(xs.size());
  std::vector<const In*> base(T);
  std::vector<int64_t> row_stride(T);
  for (int64_t t = 0; t < T; ++t) {
    base[t] = reinterpret_cast<const In*>(xs[t].data_ptr());
    row_stride[t] = xs[t].stride(0);
  }
  auto g = torch::zeros({T, T}, torch::dtype(torch::kFloat64));
  {
    pybind11::gil_scoped_release nogil;
    kernel_pairs_impl<In>(base, row_stride, xs[0].size(0), xs[0].size(1), symmetric, diag_offset,
                          g.data_ptr<double>());
  }
  return g;
}

torch::Tensor kernel_pairs_list(std::vector<torch::Tensor> xs, bool symmetric, int64_t diag_offset) {
  TORCH_CHECK(!xs.empty(), "kernel_pairs (C++): need at least one kernel");
  const auto dtype = xs[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "kernel_pairs (C++): kernels must be float32 or bfloat16");
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu(), "kernel_pairs (C++): kernels must be on the CPU");
    TORCH_CHECK(x.dim() == 2 && x.sizes() == xs[0].sizes(), "kernel_pairs (C++): kernels must be (R, N), all alike");
    TORCH_CHECK(x.scalar_type() == dtype, "kernel_pairs (C++): kernels must share one dtype");
    TORCH_CHECK(x.stride(1) == 1 || x.size(1) <= 1, "kernel_pairs (C++): kernels must have unit column stride");
  }
  return dtype == at::kFloat ? run<float>(xs, symmetric, diag_offset) : run<uint16_t>(xs, symmetric, diag_offset);
}

torch::Tensor kernel_pairs(torch::Tensor x, bool symmetric, int64_t diag_offset) {
  TORCH_CHECK(x.dim() == 3, "kernel_pairs (C++): x must be (T, R, N)");
  return kernel_pairs_list(x.unbind(0), symmetric, diag_offset);  // views: no copy
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "entk fused ops, C++/OpenMP CPU implementation";
  m.def("kernel_pairs", &kernel_pairs, "All-pairs Frobenius inner products of a (T, R, N) kernel tile",
        pybind11::arg("x"), pybind11::arg("symmetric"), pybind11::arg("diag_offset"));
  m.def("kernel_pairs_list", &kernel_pairs_list,
        "The same for T separate (R, N) matrices, read in place (memory maps, views)", pybind11::arg("xs"),
        pybind11::arg("symmetric"), pybind11::arg("diag_offset"));
}
