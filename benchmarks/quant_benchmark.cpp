// Quantization of frozen weights on a GPU (scripts/gpu.sh quant): the CUDA dequantization kernels against the
// CPU reference (bit for bit, aligned and unaligned buffers, odd shapes), then, on a Llama3-405B MLP weight
// [16384, 53248], dequantization throughput of the kernel next to the ATen-op path, and the time to quantize one
// whole 405B layer (q, k, v, o, gate, up, down) on the GPU. One JSON line per measurement; exit code 1 if a
// comparison fails.
#include <shardlm/quant/policies.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <chrono>
#include <iostream>

using namespace shardlm;

namespace {

double seconds_of(auto&& f, int reps) {
  f();  // warm-up (compiles the kernel on first use)
  torch::cuda::synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f();
  torch::cuda::synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  return at::equal(a.cpu().contiguous().view(at::kShort), b.cpu().contiguous().view(at::kShort));
}

template <class P>
bool check(int64_t rows, int64_t cols, int64_t offset) {
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const int64_t n = rows * P::row_bytes(cols);
  const auto w = at::randn({rows, cols}, cuda) * 0.02;
  auto buffer = at::empty({n + offset}, cuda.dtype(at::kByte));
  const auto q = buffer.narrow(0, offset, n);  // offset 8: not 16-byte aligned, the kernel's byte-wise path
  P::quantize_rows(w, q);
  auto gpu = at::empty({rows, cols}, cuda.dtype(at::kBFloat16));
  P::dequantize_rows(q, cols, gpu);
  auto cpu = at::empty({rows, cols}, at::kBFloat16);
  P::dequantize_rows(q.cpu(), cols, cpu);
  // The ATen-op path on the GPU (the fallback when NVRTC is not available).
  auto aten = at::empty({rows, cols}, cuda.dtype(at::kBFloat16));
  P::dequantize_rows_aten(q, cols, aten);
  // Idempotence of quantization on the GPU.
  auto q2 = at::empty_like(q);
  P::quantize_rows(gpu, q2);
  auto again = at::empty_like(gpu);
  P::dequantize_rows(q2, cols, again);
  const double err = ((gpu.to(at::kDouble) - w.to(at::kDouble)).norm() / w.to(at::kDouble).norm()).item<double>();
  const bool ok = same_bits(gpu, cpu) && same_bits(aten, cpu) && same_bits(again, gpu);
  std::cout << nlohmann::json{{"check", std::string(P::name) + " kernel == cpu"}, {"rows", rows}, {"cols", cols},
                              {"offset", offset}, {"kernel_eq_cpu", same_bits(gpu, cpu)}, {"aten_eq_cpu", same_bits(aten, cpu)},
                              {"idempotent", same_bits(again, gpu)}, {"rel_frobenius", err}, {"result", ok ? "PASS" : "FAIL"}}
            << std::endl;
  return ok;
}

template <class P>
void throughput(int64_t rows, int64_t cols) {
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const auto w = (at::randn({rows, cols}, cuda) * 0.02).to(at::kBFloat16);
  auto q = at::empty({rows * P::row_bytes(cols)}, cuda.dtype(at::kByte));
  const double quant_s = seconds_of([&] { P::quantize_rows(w, q); }, 1);
  auto out = at::empty({rows, cols}, cuda.dtype(at::kBFloat16));
  const double kernel_s = seconds_of([&] { P::dequantize_rows(q, cols, out); }, 20);
  const double aten_s = seconds_of([&] { P::dequantize_rows_aten(q, cols, out); }, 3);
  const double bytes = static_cast<double>(q.numel() + out.numel() * 2);  // read + written
  std::cout << nlohmann::json{{"bench", std::string(P::name) + " dequantize"}, {"rows", rows}, {"cols", cols},
                              {"quantized_bytes", q.numel()}, {"kernel_ms", kernel_s * 1e3},
                              {"kernel_gb_s", bytes / kernel_s / 1e9}, {"aten_ms", aten_s * 1e3},
                              {"aten_gb_s", bytes / aten_s / 1e9}, {"quantize_ms", quant_s * 1e3}}
            << std::endl;
}

template <class P>
void quantize_layer() {
  // Llama3-405B: hidden 16384, intermediate 53248, 128 heads / 8 KV heads of 128.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{16384, 16384}, {1024, 16384}, {1024, 16384}, {16384, 16384},
                                                           {53248, 16384}, {53248, 16384}, {16384, 53248}};
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  double total = 0;
  int64_t params = 0, bytes = 0;
  for (const auto& [r, c] : shapes) {
    const auto w = (at::randn({r, c}, cuda) * 0.02).to(at::kBFloat16);
    auto q = at::empty({r * P::row_bytes(c)}, cuda.dtype(at::kByte));
    torch::cuda::synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    P::quantize_rows(w, q);
    torch::cuda::synchronize();
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    params += r * c, bytes += q.numel();
  }
  std::cout << nlohmann::json{{"bench", std::string(P::name) + " quantize one 405B layer"}, {"params", params},
                              {"quantized_bytes", bytes}, {"bytes_per_param", double(bytes) / params}, {"seconds", total}}
            << std::endl;
}

}  // namespace

int main() {
  if (!torch::cuda::is_available()) {
    std::cerr << "quant_benchmark: needs a CUDA device\n";
    return 1;
  }
  at::manual_seed(0);
  bool ok = true;
  for (const auto offset : {0, 8}) {
    for (const auto& [r, c] : std::vector<std::pair<int64_t, int64_t>>{{1, 64}, {37, 192}, {300, 4096}, {129, 14336}}) {
      ok &= check<quant::Int4>(r, c, offset);
      ok &= check<quant::FP8>(r, c, offset);
    }
    ok &= check<quant::FP8>(17, 200, offset);  // cols not a multiple of 16: the byte-wise path
  }
  throughput<quant::Int4>(16384, 53248);
  throughput<quant::FP8>(16384, 53248);
  quantize_layer<quant::Int4>();
  quantize_layer<quant::FP8>();
  return ok ? 0 : 1;
}
