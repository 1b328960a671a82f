// Micro-benchmarks of the host-side pieces (Google Benchmark), each with counters in its field's units (a counter
// `X=v/s` reads "v X per second"):
//   safetensors_header   validating a checkpoint's JSON header (MB/s of header, tensors/s)
//   tokenizer_encode     Llama 3's tokenizer.json on real English (MB/s, tokens/s): a fresh piece cache each
//                        iteration (cold) or the cache of the text's pieces kept (warm)
//   adamw                the offloaded host AdamW (optim::host_adamw) against LibTorch's fused CPU kernel
//                        (compat::fused_adamw) on the same sizes (params/s, GB/s of optimizer state moved)
//   dequantize           int4 and fp8 frozen weights to bf16 on the CPU (GB/s read + written)
//   shard_copy           the engine's shard copies and casts on the host (GB/s read + written)
//   head_loss            the LM head and loss, forward and backward on the CPU: the chunked fused path
//                        (model/loss.hpp) against the plain loss on whole logits (tokens/s, GFLOP/s)
//   crc32c               the checksum of checkpoint shards (core/crc32c.hpp): the SSE4.2 path and the tables, on
//                        bytes in the cache and from memory (GB/s)
//   checkpoint_file      writing and reading back a shard file in chunks, with and without the CRC32C of each
//                        chunk where the checkpoint writer and reader take it: what checksums cost a save and a load
//                        (GB/s; the file in TMPDIR: on a tmpfs the disk does not hide the CPU)
// Rates divide by real time where the work runs on LibTorch's threads (AdamW, dequantize, shard_copy, head_loss),
// by the thread's CPU time where it is one thread's (safetensors_header, tokenizer_encode).
// Run: build/bin/micro_benchmark --tokenizer ../shared/data/llama3-tokenizer/tokenizer.json; a smoke run adds
// --benchmark_min_time=0 (one iteration each, tests/packaging); figures: docs/benchmarks.md.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <shardlm/core/compat.hpp>
#include <shardlm/core/crc32c.hpp>
#include <shardlm/core/files.hpp>
#include <shardlm/data/tokenizer.hpp>
#include <shardlm/io/safetensors_format.hpp>
#include <shardlm/model/loss.hpp>
#include <shardlm/model/ops.hpp>
#include <shardlm/optim/host_adamw.hpp>
#include <shardlm/quant/policies.hpp>

using namespace shardlm;
using benchmark::Counter;

namespace {

struct Options {
  std::string tokenizer;                     ///< a Llama 3 tokenizer.json ("": the tokenizer benchmarks are skipped)
  std::string corpus = SHARDLM_CORPUS_PATH;  ///< the text the tokenizer encodes (examples/data/corpus.txt)
};
Options options;

/// A counter `name=v/s` of `per_iteration` units done by each iteration.
void rate(benchmark::State& state, const char* name, double per_iteration) {
  state.counters[name] = Counter(per_iteration, Counter::kIsIterationInvariantRate);
}

// ---- safetensors header ----------------------------------------------------------------------------------------

/// The header of one file holding every tensor of a Llama 3 405B-shaped model with `layers` layers (bf16).
std::string llama_header(int64_t layers, uint64_t& data_size) {
  const int64_t C = 16384, I = 53248, V = 128256, kv = 1024;
  std::vector<io::TensorInfo> tensors;
  auto add = [&](std::string name, std::vector<int64_t> shape) { tensors.push_back({std::move(name), "BF16", std::move(shape)}); };
  add("model.embed_tokens.weight", {V, C});
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {C});
    add(p + "self_attn.q_proj.weight", {C, C});
    add(p + "self_attn.k_proj.weight", {kv, C});
    add(p + "self_attn.v_proj.weight", {kv, C});
    add(p + "self_attn.o_proj.weight", {C, C});
    add(p + "post_attention_layernorm.weight", {C});
    add(p + "mlp.gate_proj.weight", {I, C});
    add(p + "mlp.up_proj.weight", {I, C});
    add(p + "mlp.down_proj.weight", {C, I});
  }
  add("model.norm.weight", {C});
  add("lm_head.weight", {V, C});
  auto text = io::safetensors_header_text(tensors, {}, "bench.safetensors");
  data_size = tensors.back().end;
  return text;
}

void safetensors_header(benchmark::State& state) {
  uint64_t data_size = 0;
  const auto text = llama_header(state.range(0), data_size);
  size_t tensors = 0;
  for (auto _ : state) {
    const auto header = io::parse_safetensors_header(text, data_size, "bench.safetensors");
    tensors = header.tensors.size();
    benchmark::DoNotOptimize(header.tensors.data());
  }
  rate(state, "MB", text.size() / 1e6);
  rate(state, "tensors", static_cast<double>(tensors));
  state.SetLabel(std::to_string(text.size() / 1024) + " KiB of header");
}

// ---- tokenizer -------------------------------------------------------------------------------------------------

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void tokenizer_encode(benchmark::State& state, bool warm) {
  if (options.tokenizer.empty() || !std::filesystem::exists(options.tokenizer)) {
    state.SkipWithError(("no Llama 3 tokenizer.json at '" + options.tokenizer + "': pass --tokenizer FILE").c_str());
    return;
  }
  static const data::Tokenizer loaded = data::Tokenizer::from_file(options.tokenizer);  // never encodes: empty cache
  const auto text = read_file(options.corpus);
  data::Tokenizer tokenizer = loaded;
  if (warm) benchmark::DoNotOptimize(tokenizer.encode(text).size());
  size_t tokens = 0;
  for (auto _ : state) {
    if (!warm) {  // a copy of the loaded tokenizer: its piece cache empty, as for a text never seen
      state.PauseTiming();
      tokenizer = loaded;
      state.ResumeTiming();
    }
    const auto ids = tokenizer.encode(text);
    tokens = ids.size();
    benchmark::DoNotOptimize(ids.data());
  }
  rate(state, "MB", text.size() / 1e6);
  rate(state, "tokens", static_cast<double>(tokens));
  state.SetLabel(std::to_string(text.size() / 1024) + " KiB -> " + std::to_string(tokens) + " tokens");
}

// ---- AdamW -----------------------------------------------------------------------------------------------------

/// Parameters and moments of `param` dtype, gradients of `grad` dtype, n elements each, at values of training.
struct AdamWState {
  at::Tensor p, g, m, v, step = at::zeros({}, at::kFloat);
  AdamWState(int64_t n, at::ScalarType param, at::ScalarType grad)
      : p((at::randn({n}) * 0.02).to(param)), g((at::randn({n}) * 1e-3).to(grad)),
        m((at::randn({n}) * 1e-4).to(param)), v((at::rand({n}) * 1e-6).to(param)) {}
  /// Bytes an update reads (p, g, m, v) and writes (p, m, v).
  double bytes() const {
    return static_cast<double>(p.numel()) * (6 * p.element_size() + g.element_size());
  }
};

enum class AdamWKernel { host, fused, fused_upcast };

void adamw(benchmark::State& state, AdamWKernel kernel, at::ScalarType param, at::ScalarType grad) {
  AdamWState s(state.range(0), param, grad);
  const double lr = 1e-4, beta1 = 0.9, beta2 = 0.95, wd = 0.1, eps = 1e-8;
  int64_t step = 0;
  for (auto _ : state) {
    if (kernel == AdamWKernel::host) {
      optim::host_adamw(s.p, s.g, s.m, s.v, optim::AdamWStep{lr, beta1, beta2, wd, eps, ++step});
    } else {
      // LibTorch's kernel wants one dtype: bf16 gradients beside fp32 state are upcast first (a pass of their own).
      const auto g = kernel == AdamWKernel::fused_upcast ? s.g.to(param) : s.g;
      compat::fused_adamw({s.p}, {g}, {s.m}, {s.v}, {s.step}, lr, beta1, beta2, wd, eps);
    }
  }
  rate(state, "params", static_cast<double>(s.p.numel()));
  rate(state, "GB", s.bytes() / 1e9);
  state.SetLabel(std::to_string(at::get_num_threads()) + " threads");
}

// ---- dequantization --------------------------------------------------------------------------------------------

template <class P>
void dequantize(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1);
  static std::map<std::pair<int64_t, int64_t>, at::Tensor> quantized;  // quantized once per shape (int4 fits grids)
  auto& q = quantized[{rows, cols}];
  if (!q.defined()) {
    q = at::empty({rows * P::row_bytes(cols)}, at::kByte);
    P::quantize_rows((at::randn({rows, cols}) * 0.02).to(at::kBFloat16), q);
  }
  auto out = at::empty({rows, cols}, at::kBFloat16);
  for (auto _ : state) {
    P::dequantize_rows(q, cols, out);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  rate(state, "GB", (q.numel() + out.numel() * 2) / 1e9);
  rate(state, "weights", static_cast<double>(out.numel()));
}

// ---- shard copies and casts ------------------------------------------------------------------------------------

enum class ShardOp { copy, cast, accumulate };

/// What the engine does with a shard on the host: the fp32 master cast to the compute dtype (to gather), bf16
/// gradients cast into the fp32 shard (first micro-batch) or added to it (accumulation), a plain copy.
void shard_copy(benchmark::State& state, ShardOp op, at::ScalarType from, at::ScalarType to) {
  const int64_t n = state.range(0);
  const auto src = at::randn({n}).to(from);
  auto dst = at::zeros({n}, to);
  for (auto _ : state) {
    op == ShardOp::accumulate ? dst.add_(src) : dst.copy_(src);
    benchmark::DoNotOptimize(dst.data_ptr());
  }
  const double bytes = n * (src.element_size() + dst.element_size() * (op == ShardOp::accumulate ? 2.0 : 1.0));
  rate(state, "GB", bytes / 1e9);
}

// ---- LM head and loss ------------------------------------------------------------------------------------------

/// Forward and backward of the head and loss over N tokens of hidden size C and vocabulary V (fp32, the CPU's
/// dtype): chunk 0 is the plain path (whole logits, model/ops.hpp), else the fused path `chunk` tokens at a time.
void head_loss(benchmark::State& state) {
  const int64_t chunk = state.range(0), N = 1024, C = 256, V = 32000;
  const auto h = (at::randn({N, C}) * 0.5).requires_grad_();
  const auto w = (at::randn({V, C}) * 0.02).requires_grad_();
  const auto targets = at::randint(V, {N}, at::kLong);
  for (auto _ : state) {
    h.mutable_grad() = at::Tensor();
    w.mutable_grad() = at::Tensor();
    const auto loss = chunk == 0 ? model::ops::next_token_loss_sum(at::mm(h, w.t()), targets)
                                 : model::ops::linear_cross_entropy_sum(h, w, targets, chunk);
    loss.backward();
    benchmark::DoNotOptimize(w.grad().data_ptr());
  }
  rate(state, "tokens", static_cast<double>(N));
  rate(state, "GFLOP", 6.0 * N * C * V / 1e9);  // three GEMMs of N x C x V: logits, dh, dW
  state.SetLabel(chunk == 0 ? "plain: whole logits" : "fused: " + std::to_string(chunk) + " tokens a chunk");
}

// ---- checkpoint checksums --------------------------------------------------------------------------------------

/// Bytes that are not all the same (a CRC's speed does not depend on them; a file system's might).
const std::vector<unsigned char>& checksum_bytes(size_t n) {
  static std::map<size_t, std::vector<unsigned char>> made;
  auto& v = made[n];
  if (v.empty()) {
    v.resize(n);
    for (size_t i = 0; i < n; ++i) v[i] = static_cast<unsigned char>((i * 2654435761u) >> 13);
  }
  return v;
}

/// CRC32C of range(0) bytes: 256 KiB stay in the cache, 128 MiB come from memory.
void crc32c(benchmark::State& state, bool tables) {
  if (!tables && !crc32c_hardware()) {
    state.SkipWithError("this CPU has no SSE4.2 crc32 instruction: the tables serve");
    return;
  }
  const auto& data = checksum_bytes(static_cast<size_t>(state.range(0)));
  for (auto _ : state)
    benchmark::DoNotOptimize(tables ? ~shardlm::detail::crc32c_raw_table(~0u, data.data(), data.size())
                                    : shardlm::crc32c(data.data(), data.size()));
  rate(state, "GB", static_cast<double>(data.size()) / 1e9);
}

/// 128 MiB of a shard file written (or read back) range(0) KiB at a time, with the CRC32C of each chunk (range(1))
/// taken where the checkpoint code takes it: before each write, after each read.
void checkpoint_file(benchmark::State& state, bool read) {
  const uint64_t chunk = static_cast<uint64_t>(state.range(0)) << 10;
  const bool checked = state.range(1) != 0;
  const auto& data = checksum_bytes(size_t{128} << 20);
  const auto path = (std::filesystem::temp_directory_path() / "micro_benchmark_checkpoint.tmp").string();
  std::vector<unsigned char> back(data.size(), 1);  // its pages touched: no page faults in the reads
  const auto write = [&] {
    shardlm::detail::Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (fd.get() < 0) throw std::runtime_error(path + ": cannot create");
    uint32_t crc = 0;
    for (uint64_t at = 0; at < data.size(); at += chunk) {
      const uint64_t n = std::min<uint64_t>(chunk, data.size() - at);
      if (checked) crc = crc32c_extend(crc, data.data() + at, n);
      shardlm::detail::pwrite_all(fd.get(), data.data() + at, n, at, path);
    }
    return crc;
  };
  if (read) write();
  for (auto _ : state) {
    if (!read) {
      benchmark::DoNotOptimize(write());
      continue;
    }
    shardlm::detail::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    uint32_t crc = 0;
    for (uint64_t at = 0; at < back.size(); at += chunk) {
      const uint64_t n = std::min<uint64_t>(chunk, back.size() - at);
      shardlm::detail::pread_all(fd.get(), back.data() + at, n, at, path);
      if (checked) crc = crc32c_extend(crc, back.data() + at, n);
    }
    benchmark::DoNotOptimize(crc);
  }
  std::filesystem::remove(path);
  rate(state, "GB", static_cast<double>(data.size()) / 1e9);
  state.SetLabel(std::string(checked ? "with" : "without") + " CRC32C, in " + path);
}

void register_all() {
  benchmark::RegisterBenchmark("safetensors_header", safetensors_header)->ArgName("layers")->Arg(32)->Arg(126);
  benchmark::RegisterBenchmark("tokenizer_encode/cold", tokenizer_encode, false)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("tokenizer_encode/warm", tokenizer_encode, true)->Unit(benchmark::kMillisecond);

  const auto f32 = at::kFloat, bf16 = at::kBFloat16;
  struct AdamWCase { const char* name; AdamWKernel kernel; at::ScalarType param, grad; };
  for (const auto& c : {AdamWCase{"adamw/libtorch_fused/fp32", AdamWKernel::fused, f32, f32},
                        AdamWCase{"adamw/host/fp32", AdamWKernel::host, f32, f32},
                        AdamWCase{"adamw/libtorch_fused/fp32_bf16grad_upcast", AdamWKernel::fused_upcast, f32, bf16},
                        AdamWCase{"adamw/host/fp32_bf16grad", AdamWKernel::host, f32, bf16},
                        AdamWCase{"adamw/libtorch_fused/bf16", AdamWKernel::fused, bf16, bf16},
                        AdamWCase{"adamw/host/bf16", AdamWKernel::host, bf16, bf16}})
    benchmark::RegisterBenchmark(c.name, adamw, c.kernel, c.param, c.grad)
        ->ArgName("params")->Arg(1 << 20)->Arg(1 << 24)->Unit(benchmark::kMillisecond)->UseRealTime();

  benchmark::RegisterBenchmark("dequantize/int4", dequantize<quant::Int4>)->Args({1024, 4096})
      ->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("dequantize/fp8", dequantize<quant::FP8>)->Args({1024, 4096})
      ->Unit(benchmark::kMillisecond)->UseRealTime();

  struct ShardCase { const char* name; ShardOp op; at::ScalarType from, to; };
  for (const auto& c : {ShardCase{"shard_copy/fp32", ShardOp::copy, f32, f32},
                        ShardCase{"shard_copy/cast_fp32_to_bf16", ShardOp::cast, f32, bf16},
                        ShardCase{"shard_copy/cast_bf16_to_fp32", ShardOp::cast, bf16, f32},
                        ShardCase{"shard_copy/accumulate_bf16_into_fp32", ShardOp::accumulate, bf16, f32}})
    benchmark::RegisterBenchmark(c.name, shard_copy, c.op, c.from, c.to)
        ->ArgName("elements")->Arg(1 << 24)->Unit(benchmark::kMillisecond)->UseRealTime();

  benchmark::RegisterBenchmark("head_loss", head_loss)->ArgName("chunk")->Arg(0)->Arg(128)->Arg(512)
      ->Unit(benchmark::kMillisecond)->UseRealTime();

  for (const bool tables : {false, true})
    benchmark::RegisterBenchmark(tables ? "crc32c/tables" : "crc32c/sse42", crc32c, tables)
        ->ArgName("bytes")->Arg(256 << 10)->Arg(128 << 20)->Unit(benchmark::kMillisecond);
  for (const bool read : {false, true})
    benchmark::RegisterBenchmark(read ? "checkpoint_file/read" : "checkpoint_file/write", checkpoint_file, read)
        ->ArgNames({"chunk_KiB", "crc"})->ArgsProduct({{256, 8192}, {0, 1}})->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);  // takes the --benchmark_* flags
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--tokenizer" || arg == "--corpus") && i + 1 < argc) {
      (arg == "--tokenizer" ? options.tokenizer : options.corpus) = argv[++i];
    } else {
      std::cerr << "micro_benchmark: unknown argument '" << arg
                << "': use --tokenizer FILE, --corpus FILE and Google Benchmark's --benchmark_* flags\n";
      return 1;
    }
  }
  if (!std::filesystem::exists(options.corpus)) {
    std::cerr << "micro_benchmark: --corpus " << options.corpus << ": no such file\n";
    return 1;
  }
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
