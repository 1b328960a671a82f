#pragma once
// Trainer options and their command line. Every numeric choice is a run-time option; policies are types (a
// program that picks them at run time, shardlm_train, names them with PolicyOptions). Options come in small groups,
// the LibTorch way: fluent setters, one line per field, and each part of the trainer takes the group it needs:
//
//   TrainOptions().seq_len(128).steps(300).optim(optim::AdamWOptions().lr(3e-3)).data(DataOptions().path("x.bin"))
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/arg.hpp"
#include "shardlm/core/compiled.hpp"
#include "shardlm/core/errors.hpp"
#include "shardlm/core/json.hpp"
#include "shardlm/engine/schedule.hpp"
#include "shardlm/model/adapter.hpp"
#include "shardlm/model/config.hpp"
#include "shardlm/optim/options.hpp"
#include "shardlm/policy/dispatch.hpp"
#include "shardlm/quant/layout.hpp"

namespace shardlm {

/// The model: a Hugging Face directory or a preset, and how it computes.
struct ModelOptions {
  /// Hugging Face directory to start from (instead of a preset).
  SHARDLM_ARG(std::string, model_dir);
  /// Model preset when no model_dir.
  SHARDLM_ARG(std::string, preset) = "llama3-debug";
  /// Override the preset's number of layers (0: keep).
  SHARDLM_ARG(int64_t, layers) = 0;
  /// Override the preset's vocabulary size (0: keep).
  SHARDLM_ARG(int64_t, vocab_size) = 0;
  /// Tokens per chunk of the fused head and loss (0: whole logits and the plain loss, model/loss.hpp).
  SHARDLM_ARG(int64_t, loss_chunk) = 4096;
  /// How a MoE model's experts compute: auto, loop, padded or grouped (model/moe.hpp).
  SHARDLM_ARG(std::string, moe_kernel) = "auto";
  /// How RMSNorm, SwiGLU and RoPE compute on bf16 GPU tensors: fused (CUDA kernels) or aten (model/block_kernels.hpp).
  SHARDLM_ARG(std::string, block_kernels) = "fused";
};

/// The training and validation data.
struct DataOptions {
  /// Token file (.bin uint32, with its .mask) or text (.txt, bytes as tokens).
  SHARDLM_ARG(std::string, path);
  /// Text used as the dataset when no path is given (the examples' embedded corpus).
  SHARDLM_ARG(std::string_view, builtin_text);
  /// The name the embedded text is reported by.
  SHARDLM_ARG(std::string, builtin_name) = "embedded corpus";
  /// Validation token file (instead of an eval_fraction split).
  SHARDLM_ARG(std::string, eval_data);
  /// Hold out this last fraction of the data's tokens for validation.
  SHARDLM_ARG(double, eval_fraction) = 0;
  /// Evaluate every N steps (0: only at the end, when there is validation data).
  SHARDLM_ARG(int64_t, eval_every) = 0;
  /// Windows of seq_len + 1 tokens evaluated (0: the whole validation data).
  SHARDLM_ARG(int64_t, eval_samples) = 0;
  /// Whether the program reads data (shardlm_plan does not).
  SHARDLM_ARG(bool, required) = true;
};

/// The learning-rate schedule: linear warmup, then cosine decay over the run's steps.
struct ScheduleOptions {
  /// Linear warmup steps.
  SHARDLM_ARG(int64_t, warmup_steps) = 10;
  /// The cosine decay ends at this fraction of the peak learning rate.
  SHARDLM_ARG(double, min_lr_ratio) = 0.1;
};

/// Training checkpoints (train/checkpoint.hpp) and the run's tolerance of bad steps.
struct CheckpointOptions {
  /// Sharded training checkpoints go here.
  SHARDLM_ARG(std::string, dir);
  /// Checkpoint every N steps (0: only at the end); needs dir.
  SHARDLM_ARG(int64_t, save_every) = 0;
  /// auto (the newest committed checkpoint, if any), none, or a checkpoint path.
  SHARDLM_ARG(std::string, resume) = "auto";
  /// After each commit keep only the newest K committed checkpoints (0: all).
  SHARDLM_ARG(int64_t, keep_last) = 0;
  /// Write checkpoints in a background thread from a host snapshot.
  SHARDLM_ARG(bool, async_save) = false;
  /// Stop with an error after this many non-finite steps in a row (0: never).
  SHARDLM_ARG(int64_t, max_bad_steps) = 10;
};

/// What the run writes at its end.
struct OutputOptions {
  /// The trained weights (Hugging Face names, one safetensors file).
  SHARDLM_ARG(std::string, save_final);
  /// The trained model as a Hugging Face checkpoint.
  SHARDLM_ARG(std::string, export_dir);
  /// export_dir: the size at which weight files are cut.
  SHARDLM_ARG(double, export_max_file_gb) = 5;
  /// The trained adapter (PEFT format).
  SHARDLM_ARG(std::string, export_adapter);
};

/// The adapter on a frozen base (model/adapter.hpp) and the base's storage.
struct AdapterOptions {
  /// none (full fine-tuning), lora or dora.
  SHARDLM_ARG(std::string, kind) = "none";
  /// LoRA rank r.
  SHARDLM_ARG(int64_t, rank) = 16;
  /// LoRA alpha: the update is scaled by alpha / r.
  SHARDLM_ARG(double, alpha) = 16;
  /// Dropout on the adapter's input.
  SHARDLM_ARG(double, dropout) = 0;
  /// Scale alpha / sqrt(rank) instead of alpha / rank (rsLoRA).
  SHARDLM_ARG(bool, rslora) = false;
  /// Layers that get an adapter: all (the model's projections), or some of q,k,v,o,gate,up,down (Llama), q,k,v,o,gate_up,down,router (Mixtral).
  SHARDLM_ARG(std::string, targets) = "all";
  /// Start the adapter from this PEFT adapter directory.
  SHARDLM_ARG(std::string, load);
  /// Storage of the frozen base: none (compute dtype), int4 or fp8.
  SHARDLM_ARG(std::string, quant) = "none";

 public:
  /// The adapter as the model builds it (the kind's rules from its name: the CLI mapping).
  model::AdapterConfig config() const {
    model::AdapterConfig a;
    a.kind = adapter_named(kind_), a.rank = rank_, a.alpha = alpha_, a.dropout = dropout_, a.rslora = rslora_;
    a.targets = model::split_targets(targets_);
    return a;
  }
};

/// The job: the device, the shard groups, the gradient collectives' dtype and the collectives' patience.
struct DistOptions {
  /// cpu, cuda or cuda:N.
  SHARDLM_ARG(std::string, device) = "cpu";
  /// HybridShard: ranks per shard group (0: the ranks of one node).
  SHARDLM_ARG(int64_t, shard_group_size) = 0;
  /// Expert parallelism: ranks of an expert group, each holding num_experts / N of every MoE layer's experts (1: none).
  SHARDLM_ARG(int64_t, expert_parallel) = 1;
  /// The gradient reduce-scatters' and all-reduces' dtype: policy (the precision policy's), fp32 or bf16.
  SHARDLM_ARG(std::string, reduce_dtype) = "policy";
  /// Seconds to wait for every rank at rendezvous, group setup and each collective.
  SHARDLM_ARG(int64_t, timeout) = 300;
  /// Start even when the memory plan needs more host memory than the node has available (train/host_memory.hpp).
  SHARDLM_ARG(bool, skip_memory_check) = false;
};

/// What the run reports.
struct LogOptions {
  /// JSONL file, one object per step.
  SHARDLM_ARG(std::string, metrics);
  /// A log line every N steps.
  SHARDLM_ARG(int64_t, every) = 10;
  /// TensorBoard event files (scalars) go into this directory.
  SHARDLM_ARG(std::string, tensorboard);
  /// MFU denominator in TFLOP/s (0: 989 on CUDA, none on CPU).
  SHARDLM_ARG(double, peak_tflops) = 0;
  /// After each unit's forward and backward, log the CUDA allocator's bytes (what the planner predicts).
  SHARDLM_ARG(bool, memory_trace) = false;
};

/// CPU offload (offload::Cpu): when the host steps (engine/offload.hpp's HostStep).
struct OffloadOptions {
  /// auto (speculative where the host has room for a second copy of the state, else overlapped), sync, overlapped
  /// or speculative.
  SHARDLM_ARG(std::string, step) = "auto";
};

/// The policies of a program that picks them at run time (shardlm_train, the step benchmark): tag names.
struct PolicyOptions {
  /// none (DDP), grad-op (ZeRO-2), full (ZeRO-3) or hybrid.
  SHARDLM_ARG(std::string, sharding) = "full";
  /// fp32, mixed-bf16, pure-bf16 or fp8.
  SHARDLM_ARG(std::string, precision) = "fp32";
  /// none, every-block, every-K or selective.
  SHARDLM_ARG(std::string, checkpointing) = "none";
  /// none or cpu.
  SHARDLM_ARG(std::string, offload) = "none";
};

struct TrainOptions {
  /// Tokens per sample.
  SHARDLM_ARG(int64_t, seq_len) = 256;
  /// Samples per micro-batch, per rank.
  SHARDLM_ARG(int64_t, micro_batch) = 8;
  /// Micro-batches per optimizer step.
  SHARDLM_ARG(int64_t, grad_accum) = 1;
  /// Optimizer steps (0: load, then save or export only).
  SHARDLM_ARG(int64_t, steps) = 100;
  /// Seed of initialization and data order.
  SHARDLM_ARG(uint64_t, seed) = 0;
  /// The model.
  SHARDLM_ARG(ModelOptions, model);
  /// The data.
  SHARDLM_ARG(DataOptions, data);
  /// AdamW and clipping.
  SHARDLM_ARG(optim::AdamWOptions, optim);
  /// The learning-rate schedule.
  SHARDLM_ARG(ScheduleOptions, schedule);
  /// Training checkpoints.
  SHARDLM_ARG(CheckpointOptions, checkpoint);
  /// What the run writes at its end.
  SHARDLM_ARG(OutputOptions, output);
  /// The adapter and the frozen base's storage.
  SHARDLM_ARG(AdapterOptions, adapter);
  /// The job.
  SHARDLM_ARG(DistOptions, dist);
  /// Reporting.
  SHARDLM_ARG(LogOptions, log);
  /// CPU offload's host step.
  SHARDLM_ARG(OffloadOptions, offload);
  /// The policies, for programs that pick them at run time.
  SHARDLM_ARG(PolicyOptions, policy);

 public:
  /// Refuses every value that cannot work, naming its flag.
  void validate() const {
    auto positive = [](int64_t v, const char* flag) {
      if (v <= 0) fail<ConfigError>("--", flag, " must be positive, got ", v);
    };
    positive(seq_len_, "seq-len");
    positive(micro_batch_, "micro-batch");
    positive(grad_accum_, "grad-accum");
    // Bounds far past any run, so that sample and token counts (x the world size) cannot overflow.
    constexpr int64_t big = int64_t{1} << 32;
    if (seq_len_ > big) fail<ConfigError>("--seq-len must be at most ", big, ", got ", seq_len_);
    if (micro_batch_ > big / grad_accum_)
      fail<ConfigError>("--micro-batch ", micro_batch_, " x --grad-accum ", grad_accum_, " samples per rank and step is over ",
                        "the limit of ", big);
    if (steps_ < 0) fail<ConfigError>("--steps must be >= 0, got ", steps_);
    positive(log_.every(), "log-every");
    optim_.validate();
    if (schedule_.warmup_steps() < 0) fail<ConfigError>("--warmup-steps must be >= 0, got ", schedule_.warmup_steps());
    if (!(schedule_.min_lr_ratio() >= 0 && schedule_.min_lr_ratio() <= 1))
      fail<ConfigError>("--min-lr-ratio must lie in [0, 1], got ", schedule_.min_lr_ratio());
    if (model_.layers() < 0) fail<ConfigError>("--layers must be >= 0, got ", model_.layers());
    if (model_.vocab_size() < 0) fail<ConfigError>("--vocab-size must be >= 0 (0: the preset's), got ", model_.vocab_size());
    if (model_.loss_chunk() < 0)
      fail<ConfigError>("--loss-chunk must be >= 0 (0: the plain loss on whole logits), got ", model_.loss_chunk());
    model::expert_kernel_named(model_.moe_kernel());
    model::block_kernels_named(model_.block_kernels());
    engine::host_step_named(offload_.step());
    if (dist_.shard_group_size() < 0) fail<ConfigError>("--shard-group-size must be >= 0, got ", dist_.shard_group_size());
    if (dist_.expert_parallel() < 1 || dist_.expert_parallel() > (int64_t{1} << 20))
      fail<ConfigError>("--expert-parallel must lie in [1, 1048576] (1: none), got ", dist_.expert_parallel());
    reduce_dtype_named(dist_.reduce_dtype());
    // A day bounds every wait: larger values would overflow the clocks the collectives are timed with.
    if (dist_.timeout() <= 0 || dist_.timeout() > 86400)
      fail<ConfigError>("--dist-timeout must lie in [1, 86400] seconds, got ", dist_.timeout());
    const auto& c = checkpoint_;
    if (c.save_every() < 0) fail<ConfigError>("--save-every must be >= 0, got ", c.save_every());
    if (!(output_.export_max_file_gb() > 0) || !std::isfinite(output_.export_max_file_gb()))
      fail<ConfigError>("--export-max-file-gb must be positive, got ", output_.export_max_file_gb());
    if (c.max_bad_steps() < 0) fail<ConfigError>("--max-bad-steps must be >= 0, got ", c.max_bad_steps());
    if (c.keep_last() < 0) fail<ConfigError>("--keep-last must be >= 0, got ", c.keep_last());
    const auto& d = data_;
    if (!(d.eval_fraction() >= 0 && d.eval_fraction() < 1))
      fail<ConfigError>("--eval-fraction must lie in [0, 1), got ", d.eval_fraction());
    if (d.eval_fraction() > 0 && !d.eval_data().empty()) fail<ConfigError>("--eval-fraction and --eval-data exclude each other");
    if (d.eval_every() < 0) fail<ConfigError>("--eval-every must be >= 0, got ", d.eval_every());
    if (d.eval_samples() < 0) fail<ConfigError>("--eval-samples must be >= 0, got ", d.eval_samples());
    if (d.eval_every() > 0 && d.eval_data().empty() && d.eval_fraction() == 0)
      fail<ConfigError>("--eval-every needs validation data: --eval-data FILE or --eval-fraction X");
    if (c.save_every() > 0 && c.dir().empty()) fail<ConfigError>("--save-every needs --checkpoint-dir");
    if (c.keep_last() > 0 && c.dir().empty()) fail<ConfigError>("--keep-last needs --checkpoint-dir");
    if (c.async_save() && c.dir().empty()) fail<ConfigError>("--async-save needs --checkpoint-dir");
    if (c.resume() != "auto" && c.resume() != "none" && c.dir().empty() && !std::filesystem::exists(c.resume()))
      fail<ConfigError>("--resume ", c.resume(), ": no such checkpoint directory");
    adapter_.config().validate();
    quant::rules_named(adapter_.quant());
    if (d.path().empty() && d.builtin_text().empty() && d.required())
      fail<ConfigError>("--data is required (a .bin token file or a .txt file)");
  }

  /// The recipe the policy flags name (shardlm_train), with the adapter and quantization flags.
  RecipeRules recipe() const {
    return recipe_named(policy_.sharding(), policy_.precision(), policy_.checkpointing(), policy_.offload(),
                        adapter_.kind(), adapter_.quant());
  }
};

namespace train {
/// The model config a run uses: model_dir's config.json, or the preset (with layers, vocab_size), and the
/// run's expert kernel.
inline model::ModelConfig resolve_config(const ModelOptions& o) {
  model::ModelConfig c;
  if (!o.model_dir().empty()) {
    c = model::load_config(o.model_dir());
    if (o.layers() > 0)
      fail<ConfigError>("--layers cannot change a checkpoint's depth (", c.num_layers, " in ", o.model_dir(), ")");
    if (o.vocab_size() > 0)
      fail<ConfigError>("--vocab-size cannot change a checkpoint's vocabulary (", c.vocab_size, " in ", o.model_dir(), ")");
  } else {
    c = model::preset(o.preset(), o.layers());
    if (o.vocab_size() > 0) c.vocab_size = o.vocab_size();
  }
  c.expert_kernel = model::expert_kernel_named(o.moe_kernel());
  c.block_kernels = model::block_kernels_named(o.block_kernels());
  return c;
}

/// What a token outside the vocabulary of resolve_config(o) calls for (the end of that error): a preset's vocabulary is
/// a flag; a checkpoint's is its tokenizer's.
inline std::string vocabulary_fix(const ModelOptions& o) {
  if (!o.model_dir().empty())
    return detail::cat("the data was not tokenized for ", o.model_dir(), ": tokenize it with that model's tokenizer.json");
  return "pass --vocab-size N with N above the data's largest token id (128256 for Llama 3's tokenizer)";
}
}  // namespace train

namespace cli {

/// Flags a program adds to the trainer's (shardlm_plan's --world-size), declared bound to its own variables.
using ExtraFlags = std::function<void(cxxopts::Options&)>;

namespace detail {
/// The trainer's flags bound to the fields of `o` (a parse stores each given value, and each absent flag's
/// default: the field's value when the options were made, which --help shows).
inline cxxopts::Options trainer_flags(const char* program, TrainOptions& o, std::string& config, bool policy_flags,
                                      const ExtraFlags& extra) {
  cxxopts::Options opts(program, "shardlm trainer");
  auto s = [](auto& v) { return cxxopts::value<std::decay_t<decltype(v)>>(v)->default_value(shardlm::detail::cat(v)); };
  auto b = [](bool& v) { return cxxopts::value<bool>(v)->default_value(v ? "true" : "false"); };
  auto& m = o.model();
  auto& d = o.data();
  auto& opt = o.optim();
  auto& c = o.checkpoint();
  auto& out = o.output();
  auto& a = o.adapter();
  auto& log = o.log();
  opts.add_options()
    ("config", "read flags from this JSON object (keys: flag names without --); flags given on the command line win", s(config))
    ("model-dir", "Hugging Face model directory to start from", s(m.model_dir()))
    ("preset", "model preset when no --model-dir (llama3-debug, llama3-8b, llama3-70b, llama3-405b, mixtral-debug, mixtral-8x7b, mixtral-8x22b)", s(m.preset()))
    ("layers", "override the number of layers (0: the preset's)", s(m.layers()))
    ("vocab-size", "override the preset's vocabulary size (0: the preset's); token ids must be below it", s(m.vocab_size()))
    ("data", "token file: .bin (uint32 tokens) or .txt (bytes as tokens)", s(d.path()))
    ("seq-len", "tokens per sample", s(o.seq_len()))
    ("micro-batch", "samples per micro-batch", s(o.micro_batch()))
    ("grad-accum", "micro-batches per optimizer step", s(o.grad_accum()))
    ("steps", "optimizer steps (0: load, then save or export only)", s(o.steps()))
    ("lr", "peak learning rate", s(opt.lr()))
    ("warmup-steps", "linear warmup steps", s(o.schedule().warmup_steps()))
    ("min-lr-ratio", "cosine decay ends at this fraction of --lr", s(o.schedule().min_lr_ratio()))
    ("weight-decay", "AdamW decoupled weight decay (matrices and embeddings)", s(opt.weight_decay()))
    ("beta1", "AdamW beta1", s(opt.beta1()))
    ("beta2", "AdamW beta2", s(opt.beta2()))
    ("grad-clip", "max global gradient norm (0: off)", s(opt.grad_clip()))
    ("loss-chunk", "tokens per chunk of the fused LM head and cross-entropy, which never holds whole logits "
                   "(0: whole logits and the plain loss)", s(m.loss_chunk()))
    ("moe-kernel", "how a MoE model's experts compute: auto, loop, padded or grouped", s(m.moe_kernel()))
    ("block-kernels", "how RMSNorm, SwiGLU and RoPE compute on bf16 GPU tensors: fused (the project's CUDA kernels) "
                      "or aten (ATen ops)", s(m.block_kernels()))
    ("seed", "seed of initialization and data order", s(o.seed()))
    ("device", "cpu, cuda or cuda:N", s(o.dist().device()))
    ("metrics", "write one JSON object per step to this file", s(log.metrics()))
    ("log-every", "print a log line every N steps", s(log.every()))
    ("peak-tflops", "peak TFLOP/s for MFU (0: 989 on CUDA, none on CPU)", s(log.peak_tflops()))
    ("memory-trace", "log the GPU allocator's bytes after each unit's forward and backward (rank 0)", b(log.memory_trace()))
    ("offload-step", "with --offload cpu, when the host steps: auto (speculative where the host has room for a second copy "
                     "of the state, else overlapped), sync, overlapped (during the next forward) or speculative (during "
                     "the backward, redone when clipping applies)", s(o.offload().step()))
    ("shard-group-size", "HybridShard: ranks per shard group (0: the ranks of one node)", s(o.dist().shard_group_size()))
    ("expert-parallel", "MoE: ranks that split every layer's experts between them, N consecutive ranks each holding "
                        "num_experts / N (tokens travel to their experts by all-to-all; 1: none)", s(o.dist().expert_parallel()))
    ("reduce-dtype", "dtype of the gradient reduce-scatters and all-reduces: policy (the precision's), fp32 or bf16 "
                     "(half the bytes with mixed-bf16; gradients still accumulate in fp32)", s(o.dist().reduce_dtype()))
    ("dist-timeout", "seconds to wait for every rank to join, and for each collective (a hang is then reported)", s(o.dist().timeout()))
    ("skip-memory-check", "start even when the memory plan needs more host memory than this node has available", b(o.dist().skip_memory_check()))
    ("save-final", "write the trained weights here (one safetensors file, Hugging Face names)", s(out.save_final()))
    ("export-dir", "export the trained model here as a Hugging Face checkpoint (sharded safetensors + index, config.json)", s(out.export_dir()))
    ("export-max-file-gb", "--export-dir: cut weight files at this size", s(out.export_max_file_gb()))
    ("checkpoint-dir", "write sharded training checkpoints under this directory", s(c.dir()))
    ("save-every", "checkpoint every N steps (0: only at the end of the run)", s(c.save_every()))
    ("resume", "auto (newest committed checkpoint in --checkpoint-dir), none, or a checkpoint directory", s(c.resume()))
    ("keep-last", "after each checkpoint commits, remove older committed ones beyond the newest K (0: keep all)", s(c.keep_last()))
    ("async-save", "write checkpoints in a background thread from a host copy of the shards (needs that much host memory)", b(c.async_save()))
    ("max-bad-steps", "stop with an error after N steps in a row with a non-finite gradient norm (0: never)", s(c.max_bad_steps()))
    ("adapter", "none (full fine-tuning), lora or dora (the base frozen; docs/adapters.md)", s(a.kind()))
    ("lora-rank", "LoRA rank r", s(a.rank()))
    ("lora-alpha", "LoRA alpha: the update is scaled by alpha / r", s(a.alpha()))
    ("lora-dropout", "dropout on the adapter's input", s(a.dropout()))
    ("use-rslora", "scale by alpha / sqrt(r) (rsLoRA)", b(a.rslora()))
    ("lora-targets", "layers that get an adapter: all (every projection of the model), or a list of q,k,v,o and gate,up,down "
                     "(Llama) or gate_up,down,router (Mixtral's experts and router)", s(a.targets()))
    ("load-adapter", "start the adapter from this PEFT adapter directory", s(a.load()))
    ("export-adapter", "write the trained adapter here at the end (PEFT: adapter_config.json, adapter_model.safetensors)", s(out.export_adapter()))
    ("quant", "storage of the frozen base under --adapter: none (compute dtype), int4 (4.5 bits, HQQ-style groups of "
              "64) or fp8 (e4m3, row scales); docs/quantization.md", s(a.quant()))
    ("eval-data", "validation token file (.bin with its .mask, or .txt)", s(d.eval_data()))
    ("eval-fraction", "hold out this last fraction of --data's tokens as the validation split", s(d.eval_fraction()))
    ("eval-every", "evaluate on the validation data every N steps (0: at the end only, when there is some)", s(d.eval_every()))
    ("eval-samples", "validation windows of --seq-len + 1 tokens to evaluate (0: all)", s(d.eval_samples()))
    ("tensorboard", "write TensorBoard event files (scalars) into this directory (rank 0)", s(log.tensorboard()))
    ("h,help", "print this help");
  if (policy_flags) {
    auto& p = o.policy();
    opts.add_options()("precision", "fp32, mixed-bf16, pure-bf16 or fp8", s(p.precision()))(
        "sharding", "none (DDP), grad-op (ZeRO-2), full (ZeRO-3) or hybrid", s(p.sharding()))(
        "checkpointing", "none, every-block or every-K (recompute every K-th block in backward), or selective (keep only the matmul outputs)", s(p.checkpointing()))(
        "offload", "none or cpu", s(p.offload()));
  }
  if (extra) extra(opts);
  return opts;
}

/// `--config FILE`'s flags as `--key=value` arguments, each checked alone (errors name the file and the key).
inline std::vector<std::string> config_arguments(const std::string& file, const std::function<void(int, const char**)>& parse_one) {
  try {
    regular_file_size(file, "a JSON object of flags");
  } catch (const IoError& e) {
    fail<IoError>("--config ", e.what());
  }
  nlohmann::json j;
  try {
    j = read_json(file);  // the size and depth limits of core/json.hpp
  } catch (const IoError& e) {
    fail<ConfigError>("--config ", e.what());
  }
  if (!j.is_object()) fail<ConfigError>("--config ", file, ": must hold a JSON object of flags, got ", j.type_name());
  std::vector<std::string> out;
  for (const auto& [key, value] : j.items()) {
    if (key == "config" || key == "help" || key == "h") fail<ConfigError>("--config ", file, ": key '", key, "' is not allowed there");
    std::string text;
    if (value.is_string()) text = value.get<std::string>();
    else if (value.is_boolean()) text = value.get<bool>() ? "true" : "false";
    else if (value.is_number()) text = value.dump();
    else fail<ConfigError>("--config ", file, ": key '", key, "': the value must be a string, number or boolean, got ", value.type_name());
    out.push_back("--" + key + "=" + text);
    const char* argv[] = {"shardlm", out.back().c_str()};
    try {
      parse_one(2, argv);
    } catch (const cxxopts::exceptions::no_such_option&) {
      fail<ConfigError>("--config ", file, ": unknown key '", key, "' (keys are flag names without --; --help lists them)");
    } catch (const cxxopts::exceptions::exception& e) {
      fail<ConfigError>("--config ", file, ": key '", key, "': ", e.what());
    }
  }
  return out;
}
}  // namespace detail

/// Parses the trainer flags over `defaults`, after those of `--config FILE` (a JSON object whose keys are flag
/// names), so the command line overrides the file. `--help` prints every flag with its default and exits 0.
/// A bad flag or value is a ConfigError naming it.
/// With `policy_flags`, also --precision, --sharding, --checkpointing, --offload (the policy-matrix programs).
/// (A template of nothing only so that shardlm::compiled can compile it once: core/compiled.hpp; call parse().)
template <class V = void>
TrainOptions parse_once(int argc, const char* const* argv, TrainOptions o, bool policy_flags, const ExtraFlags& extra) {
  const char* program = argc > 0 ? argv[0] : "shardlm";
  const TrainOptions defaults = o;
  // Each parse below starts from fresh options bound to fresh variables, so nothing leaks between them.
  const auto try_parse = [&](int n, const char** args) {
    TrainOptions scratch = defaults;
    std::string config;
    auto opts = detail::trainer_flags(program, scratch, config, policy_flags, extra);
    return opts.parse(n, args).unmatched();
  };
  std::vector<const char*> args(argv, argv + argc);
  if (args.empty()) args.push_back(program);
  // --config FILE (or --config=FILE), taken out of the command line and replaced, in front, by its flags.
  std::vector<std::string> from_file;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string_view a = args[i];
    if (a != "--config" && !a.starts_with("--config=")) continue;
    if (a == "--config" && i + 1 == args.size()) fail<ConfigError>("--config needs a file");
    const std::string file = a == "--config" ? args[i + 1] : std::string(a.substr(9));
    from_file = detail::config_arguments(file, [&](int n, const char** x) { try_parse(n, x); });
    args.erase(args.begin() + static_cast<std::ptrdiff_t>(i), args.begin() + static_cast<std::ptrdiff_t>(i + (a == "--config" ? 2 : 1)));
    break;
  }
  std::vector<const char*> all{args[0]};
  for (const auto& f : from_file) all.push_back(f.c_str());
  all.insert(all.end(), args.begin() + 1, args.end());
  std::string config;
  auto opts = detail::trainer_flags(program, o, config, policy_flags, extra);
  cxxopts::ParseResult r;
  try {
    r = opts.parse(static_cast<int>(all.size()), all.data());
  } catch (const cxxopts::exceptions::incorrect_argument_type& e) {
    // Name the flag: the shortest prefix of the command line that fails ends with its value.
    for (size_t n = 2; n <= args.size(); ++n) {
      try {
        try_parse(static_cast<int>(n), args.data());
      } catch (const cxxopts::exceptions::missing_argument&) {
      } catch (const cxxopts::exceptions::exception&) {
        // A value may start with '-' (--seed -1): a flag is '-' and a letter, or "--".
        const auto is_flag = [](std::string_view a) {
          return a.size() > 1 && a[0] == '-' && (a[1] == '-' || std::isalpha(static_cast<unsigned char>(a[1])));
        };
        const std::string_view flag = is_flag(args[n - 1]) || n == 2 ? "" : args[n - 2];
        fail<ConfigError>(flag, flag.empty() ? "" : " ", args[n - 1], ": ", e.what());
      }
    }
    throw;
  }
  if (!r.unmatched().empty()) fail<ConfigError>("unexpected argument '", r.unmatched().front(), "'");
  if (r.count("help")) {
    std::cout << opts.help() << '\n';
    std::exit(0);
  }
  o.validate();
  if (policy_flags) o.recipe();  // the policy flags' errors before anything is built
  return o;
}

SHARDLM_EXTERN_TEMPLATE(TrainOptions parse_once<void>(int, const char* const*, TrainOptions, bool, const ExtraFlags&))

/// Parses the trainer flags: see parse_once.
inline TrainOptions parse(int argc, const char* const* argv, TrainOptions o = {}, bool policy_flags = false,
                          const ExtraFlags& extra = {}) {
  return parse_once<void>(argc, argv, std::move(o), policy_flags, extra);
}

}  // namespace cli
}  // namespace shardlm
