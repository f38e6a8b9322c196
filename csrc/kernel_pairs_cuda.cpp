// Python binding of the CUDA all-pairs kernel (kernel_pairs.cu): launches over kernel groups and
// sums the per-block float64 partials (torch's reductions are deterministic for a fixed shape).
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

extern "C" int entk_kernel_pairs_grid(int bf16, int gpad, int diag, int64_t R, int64_t N, int device);
extern "C" int entk_kernel_pairs_partials(const void* x, int bf16, int64_t R, int64_t N, int64_t st, int64_t sr,
                                          int64_t i0, int ni, int64_t j0, int nj, int diag, int symmetric,
                                          int64_t d, double* partials, int grid, int gpad, void* stream);

namespace {

constexpr int64_t kMaxDiagGroup = 16;  // one launch reads every element once up to T = 16
constexpr int64_t kGroup = 8;          // group width beyond that

int pow2_at_least(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

void check(int rc, const char* what) {
  TORCH_CHECK(rc == 0, "kernel_pairs (CUDA): ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(rc)));
}

torch::Tensor kernel_pairs(torch::Tensor x, bool symmetric, int64_t diag_offset) {
  TORCH_CHECK(x.is_cuda(), "kernel_pairs (CUDA): x must be on a CUDA device");
  TORCH_CHECK(x.dim() == 3, "kernel_pairs (CUDA): x must be (T, R, N)");
  TORCH_CHECK(x.stride(2) == 1 || x.size(2) <= 1, "kernel_pairs (CUDA): x must have unit column stride");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "kernel_pairs (CUDA): x must be float32 or bfloat16");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), R = x.size(1), N = x.size(2);
  const int bf16 = x.scalar_type() == at::kBFloat16;
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64).device(x.device());
  auto g = torch::zeros({T, T}, f64);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const int device = x.get_device();

  auto run = [&](int64_t i0, int64_t ni, int64_t j0, int64_t nj, bool diag, int gpad) {
    const int grid = entk_kernel_pairs_grid(bf16, gpad, diag, R, N, device);
    if (grid < 0) check(-grid, "grid sizing");
    // Poisoned: a block that failed to write its partial turns G into NaN instead of garbage.
    auto part = torch::full({grid, gpad, gpad}, std::numeric_limits<double>::quiet_NaN(), f64);
    check(entk_kernel_pairs_partials(x.data_ptr(), bf16, R, N, x.stride(0), x.stride(1), i0, static_cast<int>(ni),
                                     j0, static_cast<int>(nj), diag, symmetric, diag_offset,
                                     part.data_ptr<double>(), grid, gpad, stream),
          "launch");
    g.slice(0, i0, i0 + ni).slice(1, j0, j0 + nj) += part.sum(0).slice(0, 0, ni).slice(1, 0, nj);
  };
  if (T <= kMaxDiagGroup) {
    run(0, T, 0, T, true, pow2_at_least(T));
  } else {
    for (int64_t i0 = 0; i0 < T; i0 += kGroup) {
      const int64_t ni = std::min(kGroup, T - i0);
      run(i0, ni, i0, ni, true, static_cast<int>(kGroup));
      for (int64_t j0 = i0 + kGroup; j0 < T; j0 += kGroup)
        run(i0, ni, j0, std::min(kGroup, T - j0), false, static_cast<int>(kGroup));
    }
  }
  return torch::triu(g) + torch::triu(g, 1).t();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "entk fused ops, CUDA implementation";
  m.def("kernel_pairs", &kernel_pairs, "All-pairs Frobenius inner products of a (T, R, N) kernel tile",
        pybind11::arg("x"), pybind11::arg("symmetric"), pybind11::arg("diag_offset"));
}
