#pragma once
// Trainer options and their command line. Every numeric choice is a run-time option; policies are types.
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/model/adapter.hpp"
#include "shardlm/quant/layout.hpp"
#include "shardlm/model/config.hpp"

namespace shardlm {

struct TrainOptions {
  std::string model_dir;                 ///< Hugging Face directory to start from (instead of a preset)
  std::string preset = "llama3-debug";   ///< model preset when no model_dir
  int64_t layers = 0;                    ///< override the number of layers (0: keep)
  int64_t vocab_size = 0;                ///< override a preset's vocabulary size (0: keep)
  std::string data;                      ///< token file (.bin uint32) or text (.txt, bytes as tokens)
  int64_t seq_len = 256;
  int64_t micro_batch = 8;
  int64_t grad_accum = 1;
  int64_t steps = 100;
  double lr = 1e-3;
  int64_t warmup_steps = 10;
  double min_lr_ratio = 0.1;             ///< cosine decay ends at min_lr_ratio x lr
  double weight_decay = 0.1;
  double beta1 = 0.9, beta2 = 0.95;
  double grad_clip = 1.0;                ///< max global grad norm (0: no clipping)
  int64_t loss_chunk = 4096;             ///< tokens per chunk of the fused head and loss (0: whole logits, model/loss.hpp)
  uint64_t seed = 0;
  std::string device = "cpu";
  std::string metrics;                   ///< JSONL file, one object per step
  int64_t log_every = 10;
  double peak_tflops = 0;                ///< MFU denominator (0: 989 on CUDA, none on CPU)
  std::string precision = "fp32";        ///< shardlm_train only: picks the compiled policy
  std::string sharding = "full";         ///< shardlm_train only: picks the compiled policy
  std::string checkpointing = "none";    ///< shardlm_train only: picks the compiled policy
  std::string offload = "none";          ///< shardlm_train only: picks the compiled policy
  int64_t shard_group_size = 0;          ///< HybridShard: ranks per shard group (0: the ranks of one node)
  int64_t dist_timeout = 300;            ///< seconds to wait for every rank at rendezvous, group setup and each collective
  std::string save_final;                ///< write the trained weights (HF names, safetensors) here at the end
  std::string export_dir;                ///< export the trained model as a Hugging Face checkpoint here at the end
  double export_max_file_gb = 5;         ///< export: the size at which weight files are cut
  std::string checkpoint_dir;            ///< sharded training checkpoints go here (train/checkpoint.hpp)
  int64_t save_every = 0;                ///< checkpoint every N steps (0: only at the end); needs checkpoint_dir
  std::string resume = "auto";           ///< auto (newest committed checkpoint, if any), none, or a checkpoint path
  int64_t keep_last = 0;                 ///< after each commit keep only the newest K committed checkpoints (0: all)
  bool async_save = false;               ///< write checkpoints in a background thread from a host snapshot
  int64_t max_bad_steps = 10;            ///< stop with an error after this many non-finite steps in a row (0: never)
  std::string adapter = "none";          ///< none (full fine-tuning), lora or dora: the base frozen (model/adapter.hpp)
  int64_t lora_rank = 16;
  double lora_alpha = 16;
  double lora_dropout = 0;
  bool use_rslora = false;               ///< scale alpha / sqrt(rank) instead of alpha / rank
  std::string lora_targets = "q,k,v,o,gate,up,down";
  std::string load_adapter;              ///< start the adapter from this PEFT adapter directory
  std::string export_adapter;            ///< write the trained adapter here at the end (PEFT format)
  std::string quant = "none";            ///< storage of the frozen base under an adapter: none, int4 or fp8
  std::string eval_data;                 ///< validation token file (instead of an --eval-fraction split)
  double eval_fraction = 0;              ///< hold out this last fraction of --data's tokens for validation
  int64_t eval_every = 0;                ///< evaluate every N steps (0: only at the end, when there is validation data)
  int64_t eval_samples = 0;              ///< windows of --seq-len + 1 tokens evaluated (0: the whole validation data)
  std::string tensorboard;               ///< write TensorBoard event files (scalars) into this directory
  /// Text used as the dataset when --data is not given (the examples' embedded corpus).
  std::string_view builtin_text;
  std::string builtin_name = "embedded corpus";

  void validate() const {
    auto positive = [](int64_t v, const char* flag) {
      if (v <= 0) fail<ConfigError>("--", flag, " must be positive, got ", v);
    };
    positive(seq_len, "seq-len");
    positive(micro_batch, "micro-batch");
    positive(grad_accum, "grad-accum");
    if (steps < 0) fail<ConfigError>("--steps must be >= 0, got ", steps);
    positive(log_every, "log-every");
    if (!(lr > 0)) fail<ConfigError>("--lr must be positive, got ", lr);
    if (warmup_steps < 0) fail<ConfigError>("--warmup-steps must be >= 0, got ", warmup_steps);
    if (layers < 0) fail<ConfigError>("--layers must be >= 0, got ", layers);
    if (min_lr_ratio < 0 || min_lr_ratio > 1) fail<ConfigError>("--min-lr-ratio must lie in [0, 1], got ", min_lr_ratio);
    if (grad_clip < 0) fail<ConfigError>("--grad-clip must be >= 0, got ", grad_clip);
    if (loss_chunk < 0) fail<ConfigError>("--loss-chunk must be >= 0 (0: the plain loss on whole logits), got ", loss_chunk);
    if (shard_group_size < 0) fail<ConfigError>("--shard-group-size must be >= 0, got ", shard_group_size);
    positive(dist_timeout, "dist-timeout");
    if (save_every < 0) fail<ConfigError>("--save-every must be >= 0, got ", save_every);
    if (!(export_max_file_gb > 0)) fail<ConfigError>("--export-max-file-gb must be positive, got ", export_max_file_gb);
    if (max_bad_steps < 0) fail<ConfigError>("--max-bad-steps must be >= 0, got ", max_bad_steps);
    if (keep_last < 0) fail<ConfigError>("--keep-last must be >= 0, got ", keep_last);
    if (!(eval_fraction >= 0 && eval_fraction < 1)) fail<ConfigError>("--eval-fraction must lie in [0, 1), got ", eval_fraction);
    if (eval_fraction > 0 && !eval_data.empty()) fail<ConfigError>("--eval-fraction and --eval-data exclude each other");
    if (eval_every < 0) fail<ConfigError>("--eval-every must be >= 0, got ", eval_every);
    if (eval_samples < 0) fail<ConfigError>("--eval-samples must be >= 0, got ", eval_samples);
    if (eval_every > 0 && eval_data.empty() && eval_fraction == 0)
      fail<ConfigError>("--eval-every needs validation data: --eval-data FILE or --eval-fraction X");
    if (save_every > 0 && checkpoint_dir.empty()) fail<ConfigError>("--save-every needs --checkpoint-dir");
    if (keep_last > 0 && checkpoint_dir.empty()) fail<ConfigError>("--keep-last needs --checkpoint-dir");
    if (async_save && checkpoint_dir.empty()) fail<ConfigError>("--async-save needs --checkpoint-dir");
    if (resume != "auto" && resume != "none" && checkpoint_dir.empty() && !std::filesystem::exists(resume))
      fail<ConfigError>("--resume ", resume, ": no such checkpoint directory");
    adapter_config().validate();
    quant::check_policy(quant);
    if (data.empty() && builtin_text.empty() && needs_data)
      fail<ConfigError>("--data is required (a .bin token file or a .txt file)");
  }
  bool needs_data = true;                ///< false for programs that read no data (shardlm_plan)

  model::AdapterConfig adapter_config() const {
    model::AdapterConfig a;
    a.kind = adapter, a.rank = lora_rank, a.alpha = lora_alpha, a.dropout = lora_dropout, a.rslora = use_rslora;
    a.targets = model::split_targets(lora_targets);
    return a;
  }
};

namespace train {
/// The model config a run uses: --model-dir's config.json, or the preset (with --layers, --vocab-size).
inline model::ModelConfig resolve_config(const TrainOptions& o) {
  if (!o.model_dir.empty()) {
    auto c = model::load_config(o.model_dir);
    if (o.layers > 0) fail<ConfigError>("--layers cannot change a checkpoint's depth (", c.num_layers, " in ", o.model_dir, ")");
    if (o.vocab_size > 0) fail<ConfigError>("--vocab-size cannot change a checkpoint's vocabulary (", c.vocab_size, " in ", o.model_dir, ")");
    return c;
  }
  auto c = model::preset(o.preset, o.layers);
  if (o.vocab_size < 0) fail<ConfigError>("--vocab-size must be positive, got ", o.vocab_size);
  if (o.vocab_size > 0) c.vocab_size = o.vocab_size;
  return c;
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
  opts.add_options()
    ("config", "read flags from this JSON object (keys: flag names without --); flags given on the command line win", s(config))
    ("model-dir", "Hugging Face model directory to start from", s(o.model_dir))
    ("preset", "model preset when no --model-dir (llama3-debug, llama3-8b, llama3-70b, llama3-405b, mixtral-debug, mixtral-8x7b, mixtral-8x22b)", s(o.preset))
    ("layers", "override the number of layers (0: the preset's)", s(o.layers))
    ("vocab-size", "override the preset's vocabulary size (0: the preset's)", s(o.vocab_size))
    ("data", "token file: .bin (uint32 tokens) or .txt (bytes as tokens)", s(o.data))
    ("seq-len", "tokens per sample", s(o.seq_len))
    ("micro-batch", "samples per micro-batch", s(o.micro_batch))
    ("grad-accum", "micro-batches per optimizer step", s(o.grad_accum))
    ("steps", "optimizer steps (0: load, then save or export only)", s(o.steps))
    ("lr", "peak learning rate", s(o.lr))
    ("warmup-steps", "linear warmup steps", s(o.warmup_steps))
    ("min-lr-ratio", "cosine decay ends at this fraction of --lr", s(o.min_lr_ratio))
    ("weight-decay", "AdamW decoupled weight decay (matrices and embeddings)", s(o.weight_decay))
    ("beta1", "AdamW beta1", s(o.beta1))
    ("beta2", "AdamW beta2", s(o.beta2))
    ("grad-clip", "max global gradient norm (0: off)", s(o.grad_clip))
    ("loss-chunk", "tokens per chunk of the fused LM head and cross-entropy, which never holds whole logits "
                   "(0: whole logits and the plain loss)", s(o.loss_chunk))
    ("seed", "seed of initialization and data order", s(o.seed))
    ("device", "cpu, cuda or cuda:N", s(o.device))
    ("metrics", "write one JSON object per step to this file", s(o.metrics))
    ("log-every", "print a log line every N steps", s(o.log_every))
    ("peak-tflops", "peak TFLOP/s for MFU (0: 989 on CUDA, none on CPU)", s(o.peak_tflops))
    ("shard-group-size", "HybridShard: ranks per shard group (0: the ranks of one node)", s(o.shard_group_size))
    ("dist-timeout", "seconds to wait for every rank to join, and for each collective (a hang is then reported)", s(o.dist_timeout))
    ("save-final", "write the trained weights here (one safetensors file, Hugging Face names)", s(o.save_final))
    ("export-dir", "export the trained model here as a Hugging Face checkpoint (sharded safetensors + index, config.json)", s(o.export_dir))
    ("export-max-file-gb", "--export-dir: cut weight files at this size", s(o.export_max_file_gb))
    ("checkpoint-dir", "write sharded training checkpoints under this directory", s(o.checkpoint_dir))
    ("save-every", "checkpoint every N steps (0: only at the end of the run)", s(o.save_every))
    ("resume", "auto (newest committed checkpoint in --checkpoint-dir), none, or a checkpoint directory", s(o.resume))
    ("keep-last", "after each checkpoint commits, remove older committed ones beyond the newest K (0: keep all)", s(o.keep_last))
    ("async-save", "write checkpoints in a background thread from a host copy of the shards (needs that much host memory)",
     cxxopts::value<bool>(o.async_save)->default_value(o.async_save ? "true" : "false"))
    ("max-bad-steps", "stop with an error after N steps in a row with a non-finite gradient norm (0: never)", s(o.max_bad_steps))
    ("adapter", "none (full fine-tuning), lora or dora (the base frozen; docs/adapters.md)", s(o.adapter))
    ("lora-rank", "LoRA rank r", s(o.lora_rank))
    ("lora-alpha", "LoRA alpha: the update is scaled by alpha / r", s(o.lora_alpha))
    ("lora-dropout", "dropout on the adapter's input", s(o.lora_dropout))
    ("use-rslora", "scale by alpha / sqrt(r) (rsLoRA)", cxxopts::value<bool>(o.use_rslora)->default_value(o.use_rslora ? "true" : "false"))
    ("lora-targets", "layers that get an adapter, among q,k,v,o,gate,up,down", s(o.lora_targets))
    ("load-adapter", "start the adapter from this PEFT adapter directory", s(o.load_adapter))
    ("export-adapter", "write the trained adapter here at the end (PEFT: adapter_config.json, adapter_model.safetensors)", s(o.export_adapter))
    ("quant", "storage of the frozen base under --adapter: none (compute dtype), int4 (4.5 bits, HQQ-style groups of "
              "64) or fp8 (e4m3, row scales); docs/quantization.md", s(o.quant))
    ("eval-data", "validation token file (.bin with its .mask, or .txt)", s(o.eval_data))
    ("eval-fraction", "hold out this last fraction of --data's tokens as the validation split", s(o.eval_fraction))
    ("eval-every", "evaluate on the validation data every N steps (0: at the end only, when there is some)", s(o.eval_every))
    ("eval-samples", "validation windows of --seq-len + 1 tokens to evaluate (0: all)", s(o.eval_samples))
    ("tensorboard", "write TensorBoard event files (scalars) into this directory (rank 0)", s(o.tensorboard))
    ("h,help", "print this help");
  if (policy_flags)
    opts.add_options()("precision", "fp32, mixed-bf16 or pure-bf16", s(o.precision))(
        "sharding", "none (DDP), grad-op (ZeRO-2), full (ZeRO-3) or hybrid", s(o.sharding))(
        "checkpointing", "none, every-block or every-2 (recompute blocks in backward)", s(o.checkpointing))(
        "offload", "none or cpu", s(o.offload));
  if (extra) extra(opts);
  return opts;
}

/// `--config FILE`'s flags as `--key=value` arguments, each checked alone (errors name the file and the key).
inline std::vector<std::string> config_arguments(const std::string& file, const std::function<void(int, const char**)>& parse_one) {
  std::ifstream in(file);
  if (!in) fail<IoError>("--config ", file, ": cannot open");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail<ConfigError>("--config ", file, ": malformed JSON: ", e.what());
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
inline TrainOptions parse(int argc, const char* const* argv, TrainOptions o = {}, bool policy_flags = false,
                          const ExtraFlags& extra = {}) {
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
        const std::string_view flag = args[n - 1][0] == '-' || n == 2 ? "" : args[n - 2];
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
  return o;
}

}  // namespace cli
}  // namespace shardlm
