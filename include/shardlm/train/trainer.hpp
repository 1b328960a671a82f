#pragma once
// The trainer: the engine (engine/engine.hpp) driven over the data. One optimizer step is
//   for each of grad_accum micro-batches: logits = engine.forward(ids); engine.backward(loss_sum / global tokens)
//   norm = engine.clip_grad_norm(); engine.optimizer_step(lr)
// Data order is defined by the global batch: step s takes samples [s * G, (s + 1) * G), G = micro_batch x
// grad_accum x world size; rank r's micro-batch a holds samples s * G + (a * W + r) * micro_batch + [0, micro_batch).
// The same seed and G give the same samples per step at any world size and accumulation split. The loss is the
// mean over the targets of the global batch that the token file's loss mask keeps (all of them without a mask):
// every rank counts those of the whole global batch from the mask, so the normalisation is the same at any
// world size. Evaluation (--eval-every, on --eval-data or the --eval-fraction split) is the same mean over the
// first --eval-samples windows of the validation tokens, in file order.
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <set>
#include <sstream>
#include <thread>

#include "shardlm/core/device.hpp"
#include "shardlm/core/progress.hpp"
#include "shardlm/core/log.hpp"
#include "shardlm/data/token_dataset.hpp"
#include "shardlm/dist/groups.hpp"
#include "shardlm/engine/engine.hpp"
#include "shardlm/io/hf.hpp"
#include "shardlm/io/peft.hpp"
#include "shardlm/io/safetensors.hpp"
#include "shardlm/model/init.hpp"
#include "shardlm/model/llama.hpp"
#include "shardlm/model/mixtral.hpp"
#include "shardlm/model/ops.hpp"
#include "shardlm/optim/schedule.hpp"
#include "shardlm/policy/policies.hpp"
#include "shardlm/train/async_save.hpp"
#include "shardlm/train/checkpoint.hpp"
#include "shardlm/train/frozen_base.hpp"
#include "shardlm/train/memory_plan.hpp"
#include "shardlm/train/hf_shards.hpp"
#include "shardlm/train/metrics.hpp"
#include "shardlm/train/options.hpp"
#include "shardlm/train/preemption.hpp"
#include "shardlm/train/tensorboard.hpp"

namespace shardlm::train {

/// The device of this rank: --device, with each rank of a multi-rank CUDA job on GPU LOCAL_RANK.
inline c10::Device rank_device(const TrainOptions& o, const dist::LaunchEnv& env) {
  auto d = parse_device(o.device);
  if (d.is_cuda()) {
    if (!torch::cuda::is_available()) fail<ConfigError>("--device ", o.device, ": no CUDA device is available");
    if (d.has_index() && env.distributed())
      fail<ConfigError>("--device ", o.device, " names a GPU, but with ", env.world_size,
                        " ranks each rank takes GPU LOCAL_RANK: use --device cuda");
    if (!d.has_index()) d = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(env.distributed() ? env.local_rank : 0));
    if (d.index() >= static_cast<int>(torch::cuda::device_count()))
      fail<ConfigError>("LOCAL_RANK ", env.local_rank, " needs GPU ", int(d.index()), " but this node has ",
                        torch::cuda::device_count(), ": start at most that many ranks per node");
#if SHARDLM_HAVE_CUDA
    c10::cuda::set_device(d.index());
#endif
  }
  return d;
}

/// The process groups a recipe needs in this process's environment.
template <class Recipe>
std::unique_ptr<dist::ProcessGroups> make_groups(const TrainOptions& o, const dist::LaunchEnv& env, const c10::Device& d) {
  const int G = engine::EnginePolicy<Recipe>::shard_group_size(env.world_size, env.local_world_size,
                                                                static_cast<int>(o.shard_group_size));
  if (o.shard_group_size > 0 && !std::is_same_v<typename Recipe::Sharding, sharding::HybridShard>)
    fail<ConfigError>("--shard-group-size applies to --sharding hybrid only (this run: ", Recipe::Sharding::name, ")");
  return std::make_unique<dist::ProcessGroups>(env, G, d, std::chrono::seconds(o.dist_timeout));
}

/// The adapter of a run: the flags, with a recipe's adapter policy as the default (a different --adapter is an error).
template <class Recipe>
model::AdapterConfig resolve_adapter(const TrainOptions& o) {
  auto a = o.adapter_config();
  using Tag = adapter_of_t<Recipe>;
  if constexpr (!std::is_same_v<Tag, adapter::None>) {
    if (a.kind == "none") a.kind = Tag::name;
    else if (a.kind != Tag::name) fail<ConfigError>("--adapter ", a.kind, ": the recipe's adapter policy is ", Tag::name);
  }
  a.validate();
  if (!a.active() && (!o.export_adapter.empty() || !o.load_adapter.empty()))
    fail<ConfigError>(o.export_adapter.empty() ? "--load-adapter" : "--export-adapter", " needs --adapter lora or dora");
  if (a.active() && (!o.export_dir.empty() || !o.save_final.empty()))
    fail<ConfigError>(o.export_dir.empty() ? "--save-final" : "--export-dir", " writes full weights: with --adapter ", a.kind,
                      " use --export-adapter DIR, and shardlm_merge for a merged checkpoint");
  return a;
}

/// The storage of a run's frozen base: --quant, with a recipe's quantization policy as the default (a different
/// --quant is an error); quantization needs an adapter (`adapter`: the run's, resolve_adapter).
template <class Recipe>
std::string resolve_quant(const TrainOptions& o, const model::AdapterConfig& adapter) {
  std::string q = o.quant;
  quant::check_policy(q);
  using Tag = quant_of_t<Recipe>;
  if constexpr (!std::is_same_v<Tag, quant::NoQuant>) {
    if (q == "none") q = Tag::name;
    else if (q != Tag::name) fail<ConfigError>("--quant ", q, ": the recipe's quantization policy is ", Tag::name);
  }
  if (q != "none" && !adapter.active())
    fail<ConfigError>("--quant ", q, " stores the frozen base quantized: it needs --adapter lora or dora (full "
                      "fine-tuning trains every weight)");
  return q;
}

/// The memory planner's input (train/memory_plan.hpp) for a run of `Recipe` in `env`.
template <class Recipe>
plan::PlanInput plan_input(const TrainOptions& o, const model::ModelConfig& c, const dist::LaunchEnv& env) {
  plan::PlanInput in;
  in.model = c;
  in.sharding = Recipe::Sharding::name, in.precision = Recipe::Precision::name;
  in.checkpointing = Recipe::Checkpointing::name, in.offload = Recipe::Offload::name;
  in.world_size = env.world_size, in.gpus_per_node = env.local_world_size, in.shard_group_size = o.shard_group_size;
  in.micro_batch = o.micro_batch, in.seq_len = o.seq_len, in.grad_accum = o.grad_accum, in.loss_chunk = o.loss_chunk;
  const auto adapter = resolve_adapter<Recipe>(o);
  in.adapter = adapter.kind, in.lora_rank = o.lora_rank, in.lora_targets = model::split_targets(o.lora_targets);
  in.quant = resolve_quant<Recipe>(o, adapter);
  return in;
}

template <class Model, class Recipe>
class Trainer {
  using Precision = typename Recipe::Precision;
  using Engine = engine::Engine<typename Model::ContainedType, Recipe>;

 public:
  /// A trainer in this process's environment (a single process when no launcher variables are set).
  Trainer(const TrainOptions& o, data::TokenDataset dataset) : Trainer(o, std::move(dataset), nullptr) {}

  /// A trainer over `groups` (made from the environment when null).
  Trainer(const TrainOptions& o, data::TokenDataset dataset, std::unique_ptr<dist::ProcessGroups> groups)
      : options_((o.validate(), o)),
        env_(groups ? groups->env() : dist::LaunchEnv::from_environment()),
        device_(rank_device(o, env_)),
        config_(resolve_config(o)),
        groups_(groups ? std::move(groups) : make_groups<Recipe>(o, env_, device_)),
        // Uninitialized host tensors whose pages are never touched: the engine replaces each unit's parameters
        // by device tensors before filling them (autograd cannot re-point a meta parameter at real data).
        model_(config_, at::TensorOptions().device(at::kCPU).dtype(Precision::master)),
        adapter_(resolve_adapter<Recipe>(o)),
        quant_(resolve_quant<Recipe>(o, adapter_)),
        dataset_(std::move(dataset)),
        sampler_(dataset_.size(), o.seq_len, o.seed, dataset_.name()),
        schedule_{o.lr, o.warmup_steps, o.steps, o.min_lr_ratio} {
    if (device_.is_cuda()) {
      // Host work of a GPU rank (weight initialization; with offload, the optimizer step) gets this rank's share
      // of the cores (launchers set OMP_NUM_THREADS=1 for ranks that compute on GPUs).
      const int threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / env_.local_world_size);
      at::set_num_threads(threads);
      if (Recipe::Offload::to_host && rank() == 0)
        log::info("shardlm: offload: the host optimizer uses ", threads, " threads per rank");
    }
    // LoRA / DoRA: the adapters' parameters train, the base is frozen (a FrozenUnit per unit, engine/frozen_unit.hpp).
    if (adapter_.active() && config_.is_moe())
      fail<ConfigError>("--adapter ", adapter_.kind, ": adapters are built for Llama models only (this model is a ",
                        config_.model_type, ")");
    model_->add_adapters(adapter_);
    // The default generators draw the adapters' dropout masks: seeded per rank (LibTorch seeds them at random).
    at::manual_seed(o.seed * 1000003 + static_cast<uint64_t>(rank()));
    engine::FrozenSpec frozen;
    if (adapter_.active()) {
      frozen.is_frozen = [](const std::string& name) { return !model::is_adapter_parameter(name); };
      frozen.codec = frozen_codecs(quant_, Precision::compute);  // --quant int4|fp8: the projections quantized
    }
    // --model-dir: each rank reads only its shards' byte ranges (train/hf_shards.hpp).
    std::unique_ptr<HfShardLoader<typename Model::ContainedType>> loader;
    if (!o.model_dir.empty())
      loader = std::make_unique<HfShardLoader<typename Model::ContainedType>>(
          o.model_dir, *model_, groups_->shard().size(), groups_->shard().rank(), rank() == 0,
          io::ReadOptions{read_threads(env_.local_world_size)}, frozen);
    // one seeded generator per unit: the same weights whatever the world size, adapter or not
    auto unit_seed = [&](size_t u) { return o.seed + 0x9E3779B97F4A7C15ull * (u + 1); };
    if (loader && adapter_.active()) frozen.rows = loader->frozen_filler();
    std::unique_ptr<Progress> drawing;
    if (!loader && adapter_.active()) {  // random: each rank draws only its shard's rows of the frozen base
      drawing = std::make_unique<Progress>("initializing the frozen base", model_->num_units(), rank() == 0, -1,
                                           nullptr, Progress::Units::units);
      frozen.rows = [&](size_t u, const engine::FrozenUnit& unit) {
        engine::NamedTensors base;
        for (auto& item : model_->unit_parameters(u))
          if (!model::is_adapter_parameter(item.first)) base.push_back(item);
        std::vector<model::RowSpan> spans;
        for (const auto& part : unit.shard_parts()) {
          const auto at = std::find_if(base.begin(), base.end(), [&](const auto& b) { return b.first == part.slot->name; });
          SHARDLM_ASSERT(at != base.end(), "frozen ", part.slot->name, " is not a base parameter of unit ", u);
          spans.push_back({static_cast<size_t>(at - base.begin()), part.row0, part.rows});
        }
        auto rows = model::init_parameter_rows(base, config_.initializer_range, unit_seed(u), spans);
        drawing->add(1);  // counted when drawn: the codec then encodes them (on the GPU: asynchronously)
        if (u + 1 == model_->num_units()) drawing->finish();
        return rows;
      };
    }
    auto init = [&](size_t u, engine::NamedTensors& params) {
      engine::NamedTensors base, adapters;  // base: empty where frozen.rows draws the frozen base
      for (auto& item : params) (model::is_adapter_parameter(item.first) ? adapters : base).push_back(item);
      model::init_parameters(base, config_.initializer_range, unit_seed(u));
      model::init_adapter_parameters(adapters, o.seed + 0xD1B54A32D192ED03ull * (u + 1));
    };
    engine_ = std::make_unique<Engine>(*model_, *groups_, device_,
                                       loader && !adapter_.active() ? engine::UnitInit(loader->filler()) : engine::UnitInit(init),
                                       engine::AdamWHyper{o.beta1, o.beta2, 1e-8, o.weight_decay}, static_cast<int>(o.grad_accum),
                                       frozen);
    if (loader && rank() == 0) io::warn_unused(loader->checkpoint(), loader->used());
    if (adapter_.dora()) init_magnitudes();
    if (!o.load_adapter.empty()) load_adapter(o.load_adapter);
    resume();
    if (o.async_save) async_ = std::make_unique<AsyncCheckpointWriter>(device_);
    peak_flops_ = o.peak_tflops > 0 ? o.peak_tflops * 1e12 : (device_.is_cuda() ? 989e12 : -1);
    // Fault injection for tests: SHARDLM_INJECT_NAN_STEPS=3,5 makes the backward of those (1-based) steps NaN (the
    // loss scale is NaN; the logged loss stays finite).
    if (const char* steps = std::getenv("SHARDLM_INJECT_NAN_STEPS")) {
      std::stringstream in(steps);
      for (std::string item; std::getline(in, item, ',');)
        if (!item.empty()) nan_steps_.insert(std::stoll(item));
    }
    // SHARDLM_INJECT_HANG=S makes rank 1 stop before the collectives of step S (a hang, for the timeout reports).
    if (const char* step = std::getenv("SHARDLM_INJECT_HANG")) hang_step_ = std::atoll(step);
  }

  /// One optimizer step over the global batch (grad_accum micro-batches of micro_batch samples per rank).
  StepMetrics step() {
    using clock = std::chrono::steady_clock;
    const auto secs = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
    auto sync = [&] { if (device_.is_cuda()) torch::cuda::synchronize(device_.index()); };
    if (device_.is_cuda()) compat::reset_cuda_peak(device_.index());
    StepMetrics m;
    m.step = step_ + 1;
    const int64_t B = options_.micro_batch, T = options_.seq_len, W = groups_->size();
    const int64_t global = B * options_.grad_accum * W;
    const auto t_start = clock::now();
    // The targets in the loss of the whole global batch (every rank counts them all: no collective needed).
    int64_t counted = 0;
    for (int64_t k = step_ * global; k < (step_ + 1) * global; ++k)
      counted += dataset_.counted_targets(sampler_.window_start(k), T);
    if (counted == 0 && rank() == 0) log::warn("step ", m.step, ": the loss mask leaves no target of the global batch in the loss");
    const double global_tokens = static_cast<double>(std::max<int64_t>(counted, 1));
    m.loss_tokens = counted;
    if (m.step == hang_step_ && rank() == 1) {
      log::warn("SHARDLM_INJECT_HANG: rank 1 hangs before step ", m.step);
      std::this_thread::sleep_for(std::chrono::hours(24));
    }
    engine_->begin_step();
    // [loss, stop, ranks still writing an asynchronous checkpoint, ranks whose write failed, MoE aux loss]
    auto loss_sum = at::zeros({5}, at::TensorOptions().device(device_).dtype(at::kFloat));
    bool has_router = false;
    for (int64_t a = 0; a < options_.grad_accum; ++a) {
      auto t0 = clock::now();
      auto [ids, targets] = batch(dataset_, step_ * global + (a * W + rank()) * B, -1);  // [B, T] each
      sync();
      auto t1 = clock::now();
      // The fused head and loss never holds the whole logits [B, T, V]; the plain loss's go out of scope before
      // backward: nothing there reads them (the loss keeps its own log-softmax), so their memory is free for the
      // backward of the head.
      const double scale = nan_steps_.count(m.step) ? std::nan("") : 1.0 / global_tokens;
      const auto sum = loss_sum_of(ids, targets, scale);
      sync();
      auto t2 = clock::now();
      // MoE: the router loss of this micro-batch enters the global loss as its mean over micro-batches and ranks
      // (each rank's own tokens, as data-parallel transformers training averages the per-device losses).
      const auto router = router_loss(scale * global_tokens / static_cast<double>(options_.grad_accum * W));
      engine_->backward(sum * scale, a + 1 == options_.grad_accum, router.side_grads);
      loss_sum.narrow(0, 0, 1) += sum.detach();
      if (router.loss.total.defined()) {
        has_router = true;
        // weighted so that the division by the counted targets below leaves the mean over micro-batches and ranks
        // (a loss mask keeping fewer targets does not inflate it)
        const double weight = global_tokens / static_cast<double>(options_.grad_accum * W);
        loss_sum.narrow(0, 0, 1) += router.loss.total.detach() * weight;
        loss_sum.narrow(0, 4, 1) += router.loss.aux.detach() * weight;
      }
      sync();
      auto t3 = clock::now();
      m.data_s += secs(t0, t1), m.forward_s += secs(t1, t2), m.backward_s += secs(t2, t3);
    }
    const auto t_opt = clock::now();
    m.grad_norm = engine_->clip_grad_norm(options_.grad_clip);
    m.lr = schedule_.at(step_);
    if (std::isfinite(m.grad_norm)) {
      if (async_) async_->before_update();  // the snapshot of a save in flight is copied before the update
      engine_->optimizer_step(m.lr);
    } else {
      m.skipped = true;
      log::warn("step ", m.step, ": gradient norm is not finite; the update is skipped");
    }
    if (StopSignals::received()) loss_sum.narrow(0, 1, 1).fill_(1.0);  // a stop request travels with the loss
    if (async_ && async_->in_flight()) {  // so does the state of an asynchronous save
      const auto [writing, failed] = async_->votes();
      loss_sum.narrow(0, 2, 1).fill_(writing), loss_sum.narrow(0, 3, 1).fill_(failed);
    }
    groups_->world().all_reduce(loss_sum, dist::Reduce::Sum, "loss");
    const auto reduced_tensor = loss_sum.cpu();
    const float* reduced = reduced_tensor.data_ptr<float>();
    m.loss = reduced[0] / global_tokens;
    if (has_router) m.aux_loss = reduced[4] / global_tokens;
    m.stop_requested = reduced[1] > 0;
    if (async_ && async_->in_flight()) {
      const auto t0 = clock::now();
      async_->settle(*groups_, reduced[2], reduced[3], options_.keep_last);
      m.save_s += secs(t0, clock::now());
    }
    sync();
    const auto t_end = clock::now();
    m.optimizer_s = secs(t_opt, t_end);
    m.step_s = secs(t_start, t_end);
    m.tokens = global * T;
    m.tokens_per_s = static_cast<double>(m.tokens) / W / m.step_s;  // per rank (per GPU)
    if (peak_flops_ > 0) m.mfu = m.tokens_per_s * config_.flops_per_token(T) / peak_flops_;
    std::tie(m.mem_alloc_gb, m.mem_reserved_gb) = memory_gb(device_);
    ++step_;
    return m;
  }

  /// Checkpoints the current step under --checkpoint-dir (a collective). With --async-save the files are written in
  /// the background and committed at a later step boundary, except for the run's `last` save (at the end, or on a
  /// stop), which returns once it and any save before it are committed. Returns the seconds the training thread
  /// was blocked.
  double save_checkpoint(bool last) {
    const auto start = std::chrono::steady_clock::now();
    const auto blocked_s = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
    const nlohmann::json info = {{"sharding", Recipe::Sharding::name}, {"precision", Precision::name}, {"adapter", adapter_.kind},
                                 {"quant", quant_},
                                 {"layers", config_.num_layers}, {"hidden_size", config_.hidden_size}, {"seed", options_.seed},
                                 {"global_batch", options_.micro_batch * options_.grad_accum * groups_->size()}};
    if (async_) {
      async_->finish(*groups_, options_.keep_last);
      if (!last) {
        async_->start(*engine_, *groups_, options_.checkpoint_dir, step_, info);
        const double s = blocked_s();
        if (rank() == 0)
          log::info("shardlm: checkpoint ", async_->path().string(), ": writing in the background (training blocked ",
                    std::lround(s * 1e3), " ms)");
        return s;
      }
    }
    const auto path =
        train::save_checkpoint(*engine_, *groups_, options_.checkpoint_dir, step_, info, options_.keep_last);
    const double s = blocked_s();
    if (rank() == 0) log::info("shardlm: checkpoint ", path.string(), " (training blocked ", std::lround(s * 1e3), " ms)");
    return s;
  }
  /// Sets the validation tokens evaluate() reads (--eval-data, or the --eval-fraction split of --data).
  void set_eval_data(data::TokenDataset d) {
    const int64_t windows = d.size() > options_.seq_len ? (d.size() - 1) / options_.seq_len : 0;
    if (windows == 0)
      fail<ConfigError>("validation data ", d.name(), ": ", d.size(), " tokens are too few for one sample of --seq-len ",
                        options_.seq_len, " (+1)");
    eval_windows_ = options_.eval_samples > 0 ? std::min(options_.eval_samples, windows) : windows;
    eval_data_ = std::move(d);
  }
  bool has_eval_data() const { return eval_data_.has_value(); }

  /// The mean loss over the validation windows' targets that the mask keeps, and their number (a collective: the
  /// windows are split over the ranks in micro-batches, the last ones padded). No gradients, no update.
  std::pair<double, int64_t> evaluate() {
    SHARDLM_ASSERT(eval_data_, "evaluate() needs set_eval_data()");
    at::NoGradGuard no_grad;
    // Evaluation mode: no adapter dropout (--lora-dropout), so no draws that would shift the training masks.
    struct EvalMode {
      Model& m;
      explicit EvalMode(Model& model) : m(model) { m->eval(); }
      ~EvalMode() { m->train(); }
    } eval_mode(model_);
    const int64_t B = options_.micro_batch, W = groups_->size();
    auto sums = at::zeros({2}, at::TensorOptions().device(device_).dtype(at::kDouble));  // [loss sum, targets]
    for (int64_t j = 0; j * W * B < eval_windows_; ++j) {  // the same number of forwards on every rank
      auto [ids, targets] = batch(*eval_data_, (j * W + rank()) * B, eval_windows_);
      sums[0] += loss_sum_of(ids, targets).to(at::kDouble);
      sums[1] += targets.ne(-100).sum().to(at::kDouble);
    }
    groups_->world().all_reduce(sums, dist::Reduce::Sum, "eval loss");
    const auto host = sums.cpu();
    const auto n = static_cast<int64_t>(host[1].item<double>());
    return {n > 0 ? host[0].item<double>() / static_cast<double>(n) : std::nan(""), n};
  }

  /// The checkpoint this run resumed from (empty when it started fresh).
  const std::filesystem::path& resumed_from() const { return resumed_from_; }

  Model& model() { return model_; }
  Engine& engine() { return *engine_; }
  dist::ProcessGroups& groups() { return *groups_; }
  /// The planner's prediction for this run (what the trainer prints at start on a GPU).
  plan::MemoryPlan memory_plan() const { return plan::plan_memory(plan_input<Recipe>(options_, config_, env_)); }
  int rank() const { return groups_->rank(); }
  const model::ModelConfig& config() const { return config_; }
  const c10::Device& device() const { return device_; }
  int64_t steps_done() const { return step_; }

  /// The full master weights with their Hugging Face names, unit by unit (a collective: every rank calls it;
  /// every rank gets them).
  std::vector<std::pair<std::string, at::Tensor>> full_weights() {
    std::vector<std::pair<std::string, at::Tensor>> out;
    for (size_t u = 0; u < engine_->num_units(); ++u)
      for (auto& [name, t] : engine_->full_master(u)) out.emplace_back(io::hf_name(name), t.cpu());
    return out;
  }

  /// Writes the model as a Hugging Face checkpoint to `dir` from the shards, in the --model-dir checkpoint's
  /// dtype (bf16 for a preset); a collective: every rank calls it.
  void export_hf(const std::filesystem::path& dir) {
    train::export_hf(*engine_, *groups_,
                     {dir, checkpoint_dtype(options_.model_dir), static_cast<uint64_t>(options_.export_max_file_gb * 1e9),
                      options_.model_dir, config_});
  }

  /// Writes the trained adapter as a PEFT adapter directory (a collective: every rank calls it; rank 0 writes).
  void export_adapter(const std::filesystem::path& dir) {
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (size_t u = 0; u < engine_->num_units(); ++u)
      for (auto& [name, t] : engine_->full_master(u)) tensors.emplace_back(name, t.cpu());
    if (rank() != 0) return;
    const auto base = !options_.model_dir.empty() ? std::filesystem::absolute(options_.model_dir).string() : options_.preset;
    io::write_peft_adapter(dir, adapter_, base, tensors);
    log::info("shardlm: exported the ", adapter_.kind, " adapter (", tensors.size(), " tensors) to ", dir.string());
  }
  const model::AdapterConfig& adapter() const { return adapter_; }
  /// The storage of the frozen base: none, int4 or fp8 (--quant).
  const std::string& quant() const { return quant_; }

  /// The master weights in unit order (one tensor per parameter).
  std::vector<at::Tensor> master_weights() {
    std::vector<at::Tensor> out;
    for (auto& [name, t] : full_weights()) out.push_back(t);
    return out;
  }

  /// This rank's gradient shards of the last step, reduced, one per unit (after the optimizer step on the
  /// device: clipped, since the fused kernel scales them in place; the host AdamW of offload leaves them).
  std::vector<at::Tensor> gradient_shards() {
    std::vector<at::Tensor> out;
    for (size_t u = 0; u < engine_->num_units(); ++u) out.push_back(engine_->unit(u).grad());
    return out;
  }

 private:
  /// The router loss of the last forward (model/moe.hpp) and the gradients of each unit's side output for
  /// `scale` x its total term; empty when the model has no router.
  struct RouterTerms {
    model::RouterLoss loss;
    std::vector<at::Tensor> side_grads;
  };
  /// The summed next-token loss of one micro-batch: the head and the loss fused (--loss-chunk > 0, model/loss.hpp;
  /// `scale`: the factor backward will bring), or the plain loss on whole logits.
  at::Tensor loss_sum_of(const at::Tensor& ids, const at::Tensor& targets, double scale = 1.0) {
    if constexpr (requires { model_->set_loss_targets(targets, int64_t{1}, 1.0); }) {
      if (options_.loss_chunk > 0) {
        model_->set_loss_targets(targets, options_.loss_chunk, std::isnan(scale) ? 1.0 : scale);
        return engine_->forward(ids);
      }
    }
    return model::ops::next_token_loss_sum(engine_->forward(ids), targets);
  }

  RouterTerms router_loss(double scale) {
    const auto& sides = engine_->side_outputs();
    std::vector<at::Tensor> leaves;
    for (const auto& s : sides) leaves.push_back(s.defined() ? s.detach().requires_grad_(true) : at::Tensor());
    RouterTerms out{model::router_loss(leaves, config_), {}};
    if (!out.loss.total.defined() || !out.loss.total.requires_grad()) return out;
    std::vector<at::Tensor> inputs;
    for (const auto& l : leaves)
      if (l.defined()) inputs.push_back(l);
    const auto grads = torch::autograd::grad({out.loss.total * scale}, inputs, {}, std::nullopt, false, /*allow_unused=*/true);
    out.side_grads.resize(sides.size());
    for (size_t u = 0, i = 0; u < sides.size(); ++u)
      if (leaves[u].defined()) out.side_grads[u] = grads[i++];
    return out;
  }

  /// --resume: auto takes the newest committed checkpoint under --checkpoint-dir (none: a fresh start).
  void resume() {
    std::optional<std::filesystem::path> from;
    if (options_.resume == "auto") {
      if (!options_.checkpoint_dir.empty()) from = latest_checkpoint(options_.checkpoint_dir);
    } else if (options_.resume != "none") {
      from = std::filesystem::path(options_.resume);
    }
    if (!from) return;
    const auto t0 = std::chrono::steady_clock::now();
    const nlohmann::json meta = load_checkpoint(*engine_, *groups_, *from);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    step_ = meta.at("step").get<int64_t>();
    const int64_t global = options_.micro_batch * options_.grad_accum * groups_->size();
    if (meta.contains("global_batch") && meta["global_batch"].get<int64_t>() != global && rank() == 0)
      log::warn("resuming with a global batch of ", global, " samples; the checkpoint's run used ",
                meta["global_batch"].get<int64_t>(), ": the data order differs from the original run's");
    resumed_from_ = *from;
    if (rank() == 0)
      log::info("shardlm: resumed from ", from->string(), " (step ", step_, ", saved by ", meta.at("world_size").get<int>(),
                " rank(s); loaded in ", std::round(load_s * 1e3) / 1e3, " s)");
  }

  /// DoRA starts with each magnitude at its base weight's row norms (B = 0: the adapted model is the base).
  void init_magnitudes() {
    constexpr std::string_view m = "lora_magnitude_vector";
    for (size_t u = 0; u < engine_->num_units(); ++u) {
      std::map<std::string, at::Tensor> weights, norms;
      std::vector<std::string> magnitudes;
      for (auto& [name, p] : model_->unit_parameters(u)) {
        weights[name] = p;
        if (name.size() > m.size() && name.compare(name.size() - m.size(), m.size(), m) == 0) magnitudes.push_back(name);
      }
      if (magnitudes.empty()) continue;
      engine_->with_gathered(u, [&] {
        at::NoGradGuard no_grad;
        for (const auto& name : magnitudes) {
          const auto& w = weights.at(name.substr(0, name.size() - m.size()) + "weight");  // [out, in]
          norms[name] = at::linalg_vector_norm(w.to(at::kFloat), 2, {1}, false);       // [out]
        }
        engine_->set_trainable(u, norms);
      });
    }
  }

  /// --load-adapter: the adapter's tensors from a PEFT adapter directory with this run's rank, kind and targets.
  void load_adapter(const std::filesystem::path& dir) {
    const auto peft = io::read_peft_adapter(dir);
    const auto& c = peft.config;
    auto sorted = [](std::vector<std::string> v) { return std::sort(v.begin(), v.end()), v; };
    if (c.kind != adapter_.kind || c.rank != adapter_.rank || sorted(c.targets) != sorted(adapter_.targets))
      fail<ConfigError>("--load-adapter ", dir.string(), ": a ", c.kind, " adapter of rank ", c.rank, " on ",
                        c.target_modules().size(), " target module(s), but this run has --adapter ", adapter_.kind,
                        " --lora-rank ", adapter_.rank, " --lora-targets ", options_.lora_targets);
    if (c.alpha != adapter_.alpha || c.rslora != adapter_.rslora)
      log::warn("--load-adapter ", dir.string(), ": trained with lora_alpha ", c.alpha, (c.rslora ? " (rsLoRA)" : ""),
                "; this run scales with --lora-alpha ", adapter_.alpha, (adapter_.rslora ? " (rsLoRA)" : ""));
    size_t used = 0;
    for (size_t u = 0; u < engine_->num_units(); ++u) {
      std::map<std::string, at::Tensor> values;
      for (const auto& s : engine_->unit(u).slots()) {
        const auto it = peft.tensors.find(s.name);
        if (it == peft.tensors.end()) fail<IoError>(dir.string(), ": the adapter has no tensor '", io::peft_key(s.name), "'");
        if (it->second.sizes() != s.param.sizes())
          fail<IoError>(dir.string(), ": tensor '", io::peft_key(s.name), "' has shape ", it->second.sizes(),
                        " but the model needs ", s.param.sizes());
        values[s.name] = it->second.to(engine_->unit(u).master().device());
      }
      used += values.size();
      engine_->set_trainable(u, values);
    }
    if (used != peft.tensors.size())
      fail<IoError>(dir.string(), ": ", peft.tensors.size() - used, " adapter tensor(s) match no layer of the model");
    if (rank() == 0) log::info("shardlm: adapter loaded from ", dir.string(), " (", used, " tensors)");
  }

  /// Samples k .. k + B - 1 as (inputs, next-token targets with masked ones -100), each [B, T] on the device: of
  /// the run (`eval_samples` < 0: the sampler's order) or windows k.. of `d` in file order, those at or past
  /// `eval_samples` padded with targets that all are -100.
  std::pair<at::Tensor, at::Tensor> batch(const data::TokenDataset& d, int64_t first_sample, int64_t eval_samples) {
    const int64_t B = options_.micro_batch, T = options_.seq_len;
    auto ids = at::empty({B, T}, at::kLong), targets = at::empty({B, T}, at::kLong);
    for (int64_t b = 0, k = first_sample; b < B; ++b, ++k) {
      const bool pad = eval_samples >= 0 && k >= eval_samples;
      const int64_t start = eval_samples < 0 ? sampler_.window_start(k) : (pad ? 0 : k * T);
      int64_t counted = 0;
      ids[b].copy_(d.slice(start, T, config_.vocab_size));
      targets[b].copy_(pad ? at::full({T}, -100, at::kLong) : d.targets(start, T, config_.vocab_size, -100, &counted));
    }
    return {ids.to(device_), targets.to(device_)};
  }

  TrainOptions options_;
  dist::LaunchEnv env_;
  c10::Device device_;
  model::ModelConfig config_;
  std::unique_ptr<dist::ProcessGroups> groups_;
  Model model_;
  model::AdapterConfig adapter_;
  std::string quant_;
  data::TokenDataset dataset_;
  data::Sampler sampler_;
  std::optional<data::TokenDataset> eval_data_;
  int64_t eval_windows_ = 0;
  optim::CosineSchedule schedule_;
  std::unique_ptr<Engine> engine_;
  std::filesystem::path resumed_from_;
  std::unique_ptr<AsyncCheckpointWriter> async_;  // --async-save
  std::set<int64_t> nan_steps_;  // SHARDLM_INJECT_NAN_STEPS
  int64_t hang_step_ = -1;       // SHARDLM_INJECT_HANG
  double peak_flops_ = -1;
  int64_t step_ = 0;
};

/// The training and validation data of a run: --data (or the program's embedded text), less its last
/// --eval-fraction, which is the validation split; or --eval-data. No validation data: nullopt.
inline std::pair<data::TokenDataset, std::optional<data::TokenDataset>> open_datasets(const TrainOptions& o) {
  auto all = o.data.empty() ? data::TokenDataset::from_bytes(o.builtin_text, o.builtin_name) : data::TokenDataset::open(o.data);
  if (!o.eval_data.empty()) return {std::move(all), data::TokenDataset::open(o.eval_data)};
  if (o.eval_fraction <= 0) return {std::move(all), std::nullopt};
  const auto held = static_cast<int64_t>(static_cast<double>(all.size()) * o.eval_fraction);
  auto eval = all.range(all.size() - held, held, detail::cat(all.name(), " (its last ", held, " tokens: --eval-fraction)"));
  return {all.range(0, all.size() - held, detail::cat(all.name(), " (its first ", all.size() - held, " tokens)")), std::move(eval)};
}
/// The training data of a run (see open_datasets).
inline data::TokenDataset open_dataset(const TrainOptions& o) { return open_datasets(o).first; }

}  // namespace shardlm::train

namespace shardlm {

/// Calls f(model::Llama3{nullptr}) or f(model::Mixtral{nullptr}) as config `c` names (a type tag: f builds the
/// model), so a program compiles both models for each recipe it dispatches to.
template <class F>
decltype(auto) with_model(const model::ModelConfig& c, F&& f) {
  if (!c.is_moe()) return f(model::Llama3{nullptr});
  return f(model::Mixtral{nullptr});
}

/// Trains `Model` with `Recipe` as the options say, on one process or as one rank of a job (launched by
/// shardlm_launch, torchrun or srun): rank 0 logs every --log-every steps and writes --metrics and --save-final.
template <class Model, class Recipe>
int run_trainer(const TrainOptions& options) {
  // The adapter and quantization policies are run-time choices of the engine of the recipe without them: no
  // instantiation of their own (a recipe with quantization names an adapter).
  if constexpr (!std::is_same_v<adapter_of_t<Recipe>, adapter::None>) {
    auto o = options;
    const auto adapter = train::resolve_adapter<Recipe>(options);
    o.adapter = adapter.kind;
    o.quant = train::resolve_quant<Recipe>(options, adapter);
    return run_trainer<Model, typename Recipe::WithoutAdapter>(o);
  } else {
  const auto& o = options;
  o.validate();
  auto [train_data, eval_data] = train::open_datasets(o);
  train::Trainer<Model, Recipe> trainer(o, std::move(train_data));
  if (eval_data) trainer.set_eval_data(std::move(*eval_data));
  train::StopSignals::install();
  const bool lead = trainer.rank() == 0;
  const auto& c = trainer.config();
  const auto& g = trainer.groups();
  if (lead)
    log::info("shardlm: ", c.num_layers, " layers, hidden ", c.hidden_size, ", ", c.num_params() / 1e6, "M parameters | ",
              Recipe::Sharding::name, " / ", Recipe::Checkpointing::name, " / ", Recipe::Offload::name, " / ",
              Recipe::Precision::name,
              trainer.adapter().active() ? detail::cat(" | ", trainer.adapter().kind, " rank ", trainer.adapter().rank, " on ",
                                                       o.lora_targets, " | base ", trainer.quant() == "none" ?
                                                       std::string(dtype_name(Recipe::Precision::compute)) : trainer.quant())
                                         : std::string(),
              " | ", g.size(), " rank(s) on ", trainer.device().type() == c10::kCUDA ? "cuda" : "cpu",
              g.size() > 1 ? detail::cat(" (", g.env().source, "; shard groups of ", g.shard_group_size(), ")") : std::string(),
              " | global batch ", o.micro_batch * o.grad_accum * g.size(), " x ", o.seq_len, " tokens");
  if (lead && trainer.device().is_cuda()) log::info("shardlm: memory plan (train/memory_plan.hpp): ", trainer.memory_plan().table());
  train::MetricsWriter metrics(lead ? o.metrics : std::string(), /*append=*/!trainer.resumed_from().empty());
  train::tensorboard::Writer board(lead ? o.tensorboard : std::string());
  double first_loss = 0, last_loss = 0;
  const int64_t start = trainer.steps_done();
  // A bar with the ETA when rank 0 writes to a terminal (log lines take its place, then it is drawn again).
  Progress bar("training", static_cast<uint64_t>(std::max<int64_t>(o.steps - start, 0)),
               lead && ::isatty(STDOUT_FILENO) == 1 && ::isatty(STDERR_FILENO) == 1, 1, nullptr, Progress::Units::steps);
  if (start >= o.steps && lead) log::info("shardlm: nothing to train: the run is at step ", start, " of --steps ", o.steps);
  int64_t bad_in_a_row = 0;
  double save_stall = 0;
  for (int64_t s = start; s < o.steps; ++s) {
    auto m = trainer.step();
    bad_in_a_row = m.skipped ? bad_in_a_row + 1 : 0;
    const bool too_many_bad = o.max_bad_steps > 0 && bad_in_a_row >= o.max_bad_steps;
    const bool stop = m.stop_requested && m.step < o.steps;
    if (!too_many_bad && !o.checkpoint_dir.empty() &&
        ((o.save_every > 0 && m.step % o.save_every == 0) || m.step == o.steps || stop))
      m.save_s += trainer.save_checkpoint(/*last=*/m.step == o.steps || stop);
    save_stall += m.save_s;
    if (trainer.has_eval_data() && ((o.eval_every > 0 && m.step % o.eval_every == 0) || m.step == o.steps)) {
      const auto t0 = std::chrono::steady_clock::now();
      std::tie(m.eval_loss, m.eval_tokens) = trainer.evaluate();
      bar.clear();
      if (lead)
        log::info("eval step ", m.step, " | loss ", m.eval_loss, " | ppl ", std::exp(m.eval_loss), " | ", m.eval_tokens,
                  " targets | ", std::lround(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e3), " ms");
    }
    metrics.write(m);
    if (board.enabled()) {
      std::vector<std::pair<std::string, float>> v = {
          {"train/loss", m.loss}, {"train/grad_norm", m.grad_norm}, {"train/lr", m.lr}, {"train/tokens_per_s", m.tokens_per_s},
          {"train/step_s", m.step_s}, {"memory/allocated_gb", m.mem_alloc_gb}, {"memory/reserved_gb", m.mem_reserved_gb}};
      if (m.mfu >= 0) v.emplace_back("train/mfu", m.mfu);
      if (m.eval_loss >= 0) v.emplace_back("eval/loss", m.eval_loss);
      board.scalars(m.step, v);
    }
    if (too_many_bad)
      fail<Error>(bad_in_a_row, " steps in a row (", m.step - bad_in_a_row + 1, "..", m.step,
                  ") had a non-finite gradient norm and were skipped (--max-bad-steps ", o.max_bad_steps,
                  "): stopping; the weights are those of step ", m.step - bad_in_a_row,
                  o.checkpoint_dir.empty() ? std::string() : "; --resume auto restarts from the last checkpoint");
    if (s == start) first_loss = m.loss;
    last_loss = m.loss;
    if (lead && (m.step % o.log_every == 0 || m.step == start + 1 || m.step == o.steps)) {
      bar.clear();
      log::info(m.line(o.steps));
    }
    bar.add(1);
    if (stop) {
      bar.clear();
      if (o.checkpoint_dir.empty()) {
        if (lead) log::warn("stopping after step ", m.step, " on a signal, without --checkpoint-dir: nothing was saved");
        return 128 + SIGTERM;
      }
      if (lead) log::info("shardlm: stopping after step ", m.step, " on a signal (preemption); --resume auto continues");
      return 0;
    }
  }
  bar.clear();
  if (!o.save_final.empty()) {
    auto weights = trainer.full_weights();
    if (lead) io::save_safetensors(o.save_final, weights);
  }
  if (!o.export_dir.empty()) trainer.export_hf(o.export_dir);
  if (!o.export_adapter.empty()) trainer.export_adapter(o.export_adapter);
  if (lead && o.steps > start)
    log::info("shardlm: trained ", o.steps - start, " steps (", start + 1, "..", o.steps, "): loss ", first_loss, " -> ",
              last_loss, o.checkpoint_dir.empty() ? std::string()
                                                  : detail::cat("; checkpoints blocked training ", std::round(save_stall * 1e3) / 1e3, " s in all"));
  return 0;
  }
}

}  // namespace shardlm
