#pragma once
// The trainer: the engine (engine/engine.hpp) driven over the data. One optimizer step is
//   for each of grad_accum micro-batches: loss = engine.forward(ids); engine.backward(loss_sum / global tokens)
//   norm = engine.clip_grad_norm(); engine.optimizer_step() (or skip_step() when the norm is not finite)
// Data order is defined by the global batch: step s takes samples [s * G, (s + 1) * G), G = micro_batch x
// grad_accum x world size; rank r's micro-batch a holds samples s * G + (a * W + r) * micro_batch + [0, micro_batch).
// The same seed and G give the same samples per step at any world size and accumulation split. The loss is the
// mean over the targets of the global batch that the token file's loss mask keeps (all of them without a mask):
// every rank counts those of the whole global batch from the mask, so the normalisation is the same at any
// world size. Evaluation (--eval-every, on --eval-data or the --eval-fraction split) is the same mean over the
// first --eval-samples windows of the validation tokens, in file order.
//
// TrainerCore is compiled once per program: the recipe reaches it as its rules (RecipeRules) and the model through
// TrainableModel. Trainer<Model, Recipe> is the typed face a user names: it checks the recipe at compile time and
// makes its model.
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <set>
#include <thread>

#include "shardlm/core/compiled.hpp"
#include "shardlm/core/device.hpp"
#include "shardlm/core/host_memory.hpp"
#include "shardlm/core/numa.hpp"
#include "shardlm/core/progress.hpp"
#include "shardlm/core/log.hpp"
#include "shardlm/data/token_dataset.hpp"
#include "shardlm/dist/groups.hpp"
#include "shardlm/engine/engine.hpp"
#include "shardlm/io/hf.hpp"
#include "shardlm/io/peft.hpp"
#include "shardlm/io/safetensors.hpp"
#include "shardlm/model/init.hpp"
#include "shardlm/model/ops.hpp"
#include "shardlm/optim/schedule.hpp"
#include "shardlm/policy/policies.hpp"
#include "shardlm/train/async_save.hpp"
#include "shardlm/train/checkpoint.hpp"
#include "shardlm/train/expert_parallel.hpp"
#include "shardlm/train/frozen_base.hpp"
#include "shardlm/train/hf_shards.hpp"
#include "shardlm/train/memory_plan.hpp"
#include "shardlm/train/metrics.hpp"
#include "shardlm/train/model.hpp"
#include "shardlm/train/options.hpp"
#include "shardlm/train/preemption.hpp"
#include "shardlm/train/step_totals.hpp"

namespace shardlm::train {

/// Faults a test hands the trainer (the seam instead of environment reads inside the library).
struct Faults {
  /// These (1-based) steps' backward is NaN (the loss scale is NaN; the logged loss stays finite).
  std::set<int64_t> nan_steps;
  /// Rank 1 stops before the collectives of this step (a hang, for the timeout reports); < 0: none.
  int64_t hang_step = -1;
  /// Every rank waits this long after its checkpoint shard file is in place, before the commit (a window in which
  /// to kill a job mid-save).
  std::chrono::milliseconds save_delay{0};
};

/// The device of this rank: --device, with each rank of a multi-rank CUDA job on GPU LOCAL_RANK.
inline c10::Device rank_device(const DistOptions& o, const dist::LaunchEnv& env) {
  auto d = parse_device(o.device());
  if (d.is_cuda()) {
    if (!torch::cuda::is_available()) fail<ConfigError>("--device ", o.device(), ": no CUDA device is available");
    if (d.has_index() && env.distributed())
      fail<ConfigError>("--device ", o.device(), " names a GPU, but with ", env.world_size,
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

/// The process groups a recipe's sharding policy needs in this process's environment.
inline std::unique_ptr<dist::ProcessGroups> make_groups(const sharding::Rules& s, const DistOptions& o,
                                                        const dist::LaunchEnv& env, const c10::Device& d) {
  if (o.shard_group_size() > 0 && !s.takes_group_size())
    fail<ConfigError>("--shard-group-size applies to --sharding hybrid only (this run: ", s.name, ")");
  const int G = s.group_size(env.world_size, env.local_world_size, static_cast<int>(o.shard_group_size()));
  return std::make_unique<dist::ProcessGroups>(env, G, d, std::chrono::seconds(o.timeout()),
                                               static_cast<int>(o.expert_parallel()));
}

/// The recipe of a run: `typed` (a program's recipe, or the policy flags' in shardlm_train), its adapter and
/// quantization taken from the flags where it names none (a different --adapter or --quant is an error), and its
/// gradient collectives in --reduce-dtype: what the engine, the planner and checkpoint metadata read.
inline RecipeRules resolve_recipe(const TrainOptions& o, RecipeRules r) {
  r.precision = with_reduce_dtype(r.precision, reduce_dtype_named(o.dist().reduce_dtype()));
  const auto a = adapter_named(o.adapter().kind());
  if (!r.adapter.active()) r.adapter = a;
  else if (a.active() && a != r.adapter)
    fail<ConfigError>("--adapter ", a.name, ": the recipe's adapter policy is ", r.adapter.name);
  const auto& q = quant::rules_named(o.adapter().quant());
  if (!r.quant.quantized) r.quant = q;
  else if (q.quantized && q.name != r.quant.name)
    fail<ConfigError>("--quant ", q.name, ": the recipe's quantization policy is ", r.quant.name);
  if (r.quant.quantized && !r.adapter.active())
    fail<ConfigError>("--quant ", r.quant.name, " stores the frozen base quantized: it needs --adapter lora or dora (full "
                      "fine-tuning trains every weight)");
  const auto& out = o.output();
  if (!r.adapter.active() && (!out.export_adapter().empty() || !o.adapter().load().empty()))
    fail<ConfigError>(out.export_adapter().empty() ? "--load-adapter" : "--export-adapter", " needs --adapter lora or dora");
  if (r.adapter.active() && (!out.export_dir().empty() || !out.save_final().empty()))
    fail<ConfigError>(out.export_dir().empty() ? "--save-final" : "--export-dir", " writes full weights: with --adapter ",
                      r.adapter.name, " use --export-adapter DIR, and shardlm_merge for a merged checkpoint");
  if (!engine_serves(r.sharding, r.offload))
    fail<ConfigError>("--offload ", r.offload.name, " with --sharding ", r.sharding.name, ": ", SHARDLM_OFFLOAD_NEEDS_SHARDING);
  return r;
}

/// The memory planner's input (train/memory_plan.hpp) for a run of `recipe` in `env`.
inline plan::PlanInput plan_input(const TrainOptions& o, const RecipeRules& recipe, const model::ModelConfig& c,
                                  const dist::LaunchEnv& env) {
  plan::PlanInput in;
  in.model = c;
  in.recipe = recipe;
  in.world_size = env.world_size, in.gpus_per_node = env.local_world_size, in.shard_group_size = o.dist().shard_group_size();
  in.micro_batch = o.micro_batch(), in.seq_len = o.seq_len(), in.grad_accum = o.grad_accum();
  in.loss_chunk = o.model().loss_chunk();
  in.expert_parallel = o.dist().expert_parallel();
  in.lora_rank = o.adapter().rank(), in.lora_targets = model::split_targets(o.adapter().targets());
  return in;
}

template <class V>
class BasicTrainer {
 public:
  /// A trainer of the model `make_model` builds, with the recipe `recipe` (resolve_recipe), over `groups` (made
  /// from the environment when null).
  BasicTrainer(const TrainOptions& o, data::TokenDataset dataset, std::unique_ptr<dist::ProcessGroups> groups,
               const RecipeRules& recipe, const ModelFactory& make_model, Faults faults = {});

  /// One optimizer step over the global batch (grad_accum micro-batches of micro_batch samples per rank).
  StepMetrics step();

  /// Checkpoints the current step under --checkpoint-dir (a collective). With --async-save the files are written in
  /// the background and committed at a later step boundary, except for the run's `last` save (at the end, or on a
  /// stop), which returns once it and any save before it are committed. Returns the seconds the training thread
  /// was blocked.
  double save_checkpoint(bool last);

  /// Sets the validation tokens evaluate() reads (--eval-data, or the --eval-fraction split of --data).
  void set_eval_data(data::TokenDataset d);
  bool has_eval_data() const { return eval_data_.has_value(); }

  /// The mean loss over the validation windows' targets that the mask keeps, and their number (a collective: the
  /// windows are split over the ranks in micro-batches, the last ones padded). No gradients, no update.
  std::pair<double, int64_t> evaluate();

  /// The checkpoint this run resumed from (empty when it started fresh).
  const std::filesystem::path& resumed_from() const { return resumed_from_; }

  TrainableModel& trainable_model() { return *model_; }
  engine::Engine& engine() { return *engine_; }
  dist::ProcessGroups& groups() { return *groups_; }
  /// The recipe this run trains with (its adapter and quantization resolved).
  const RecipeRules& recipe() const { return recipe_; }
  /// The planner's prediction for this run (what the trainer prints at start on a GPU).
  plan::MemoryPlan memory_plan() const { return plan::plan_memory(plan_input(options_, recipe_, config_, env_)); }
  int rank() const { return groups_->rank(); }
  const model::ModelConfig& config() const { return config_; }
  const c10::Device& device() const { return device_; }
  const TrainOptions& options() const { return options_; }
  int64_t steps_done() const { return step_; }
  const model::AdapterConfig& adapter() const { return adapter_; }
  /// Offloaded: when the host steps (--offload-step, automatic resolved).
  engine::HostStep offload_step() const { return host_step_; }

  /// The full master weights with their Hugging Face names, unit by unit (a collective: every rank calls it;
  /// every rank gets them).
  std::vector<std::pair<std::string, at::Tensor>> full_weights();

  /// Writes the model as a Hugging Face checkpoint to `dir` from the shards, in the --model-dir checkpoint's
  /// dtype (bf16 for a preset); a collective: every rank calls it.
  void export_hf(const std::filesystem::path& dir);

  /// Writes the trained adapter as a PEFT adapter directory (a collective: every rank calls it; rank 0 writes).
  void export_adapter(const std::filesystem::path& dir);

  /// The master weights in unit order (one tensor per parameter).
  std::vector<at::Tensor> master_weights();

  /// This rank's gradient shards of the last step, reduced, one per unit (after the optimizer step on the
  /// device: clipped, since the fused kernel scales them in place; the host AdamW of offload leaves them).
  std::vector<at::Tensor> gradient_shards();

 private:
  /// The run's adapter, its targets resolved for the model (`all`: its projections).
  static model::AdapterConfig adapter_of(const TrainOptions& o, const RecipeRules& r, const model::ModelConfig& m) {
    auto a = o.adapter().config();
    a.kind = r.adapter;
    return a.resolved(m);
  }

  int64_t global_batch() const { return options_.micro_batch() * options_.grad_accum() * groups_->size(); }
  /// Samples a run may read: sample indices (step x global batch + ...) stay far inside int64.
  static constexpr int64_t max_samples = int64_t{1} << 62;

  /// Offloaded on a multi-socket host: this rank's threads (the host optimizer's among them, started later) on the
  /// CPUs of its GPU's NUMA node, where its pinned state is then allocated (core/numa.hpp). A launcher's binding is
  /// kept.
  void bind_near_gpu() {
#if SHARDLM_HAVE_CUDA
    char bus[32] = {};
    if (cudaDeviceGetPCIBusId(bus, sizeof bus, device_.index()) != cudaSuccess) return (void)cudaGetLastError();
    const auto node = numa::node_of_pci(bus);
    if (!node) return;
    const auto cpus = numa::bind_to_node(*node);
    if (!cpus.empty())
      log::info("shardlm: rank ", rank(), " (GPU ", bus, ") bound to the ", cpus.size(), " CPUs of NUMA node ", *node);
#endif
  }

  /// The step's metrics before it runs: its number and the targets of the global batch in the loss (every rank
  /// counts them all from the loss mask: no collective needed).
  StepMetrics start_metrics() {
    StepMetrics m;
    m.step = step_ + 1;
    const int64_t G = global_batch(), T = options_.seq_len();
    for (int64_t k = step_ * G; k < (step_ + 1) * G; ++k) m.loss_tokens += dataset_.counted_targets(sampler_.window_start(k), T);
    if (m.loss_tokens == 0 && rank() == 0)
      log::warn("step ", m.step, ": the loss mask leaves no target of the global batch in the loss");
    return m;
  }

  /// Refuses a run whose node cannot hold it: the memory plan's host bytes for this node against MemAvailable
  /// (--skip-memory-check: not asked). Every rank reads MemAvailable before any allocates its state, and the verdict
  /// is all-reduced, so that all stop together. (The placeholders of the model take no memory: never touched.)
  void check_host_memory() {
    if (options_.dist().skip_memory_check()) return;
    std::string error;
    double needed = 0;
    try {
      auto in = plan_input(options_, recipe_, config_, env_);
      // --offload-step auto steps speculatively only where the second copy of the state fits: the run needs at least
      // what it needs without it.
      const auto asked = engine::host_step_named(options_.offload().step());
      in.host_step = asked == engine::HostStep::automatic ? engine::HostStep::overlapped : asked;
      needed = plan::host_bytes_needed(plan::plan_memory(in), env_.local_world_size, !device_.is_cuda());
    } catch (const Error& e) {
      if (rank() == 0) log::warn("the memory plan is not available (", e.what(), "): host memory is not checked");
    }
    if (needed > 0)
      if (const auto available = host_memory_available()) try {
          plan::check_host_memory(needed, env_.local_world_size, *available);
        } catch (const ConfigError& e) {
          error = e.what();
        }
    auto failed = at::full({1}, error.empty() ? 0 : 1, at::TensorOptions().dtype(at::kInt).device(device_));
    groups_->world().all_reduce(failed, dist::Reduce::Sum, "host memory check");
    if (!error.empty()) fail<ConfigError>(error);
    if (const auto n = failed.cpu().item<int>(); n > 0)
      fail<ConfigError>("the host memory check failed on ", n, " rank(s) of another node (their errors say why; ",
                        "--skip-memory-check starts anyway)");
  }

  void hang_if_asked(int64_t step) {
    if (step != faults_.hang_step || rank() != 1) return;
    log::warn("injected fault: rank 1 hangs before step ", step);
    std::this_thread::sleep_for(std::chrono::hours(24));
  }

  /// Rank r's micro-batch a of this step: samples step * G + (a * W + r) * B + [0, B) of the sampler's order.
  std::pair<at::Tensor, at::Tensor> micro_batch(int64_t a) {
    const int64_t B = options_.micro_batch(), W = groups_->size();
    return batch(dataset_, step_ * global_batch() + (a * W + rank()) * B, -1);
  }

  /// Backward of one micro-batch's summed loss `loss` scaled by `scale` (1 / the global batch's targets), with
  /// the MoE router loss of its forward; the totals take the micro-batch's loss (and aux loss).
  void backward(const at::Tensor& loss, double scale, double global_tokens, bool last, StepTotals& totals) {
    // MoE: the router loss of this micro-batch enters the global loss as its mean over micro-batches and ranks
    // (each rank's own tokens, as data-parallel transformers training averages the per-device losses), weighted so
    // that the division by the counted targets leaves that mean (a loss mask keeping fewer targets does not inflate it).
    const double weight = global_tokens / static_cast<double>(options_.grad_accum() * groups_->size());
    const auto router = router_loss(scale * global_tokens / static_cast<double>(options_.grad_accum() * groups_->size()));
    engine_->backward(loss * scale, last, router.side_grads);
    totals.add_loss(loss.detach());
    if (router.loss.total.defined()) totals.add_router(router.loss.total.detach() * weight, router.loss.aux.detach() * weight);
  }

  /// The update, unless the gradient norm is not finite (the step is skipped).
  void update(StepMetrics& m) {
    const int64_t redone = engine_->redone_steps();
    if (!std::isfinite(m.grad_norm)) {
      m.skipped = true;
      log::warn("step ", m.step, ": gradient norm is not finite; the update is skipped");
      engine_->skip_step();
    } else {
      if (async_) async_->before_update();  // the snapshot of a save in flight is copied before the update
      engine_->optimizer_step();
    }
    // Offloaded with a speculative host step: the update made during the backward did not stand (clipping or a
    // non-finite norm) and was redone or dropped.
    m.host_step_redone = engine_->redone_steps() > redone;
    if (m.host_step_redone && rank() == 0)
      log::info("shardlm: step ", m.step, ": the speculative host update was ", m.skipped ? "dropped" : "redone with clipping",
                " (grad norm ", m.grad_norm, ", --grad-clip ", options_.optim().grad_clip(), "); ",
                engine_->redone_steps(), " so far");
  }

  /// The step's one all-reduce: the loss and aux sums, a stop request and the state of an asynchronous save travel
  /// together; then a save in flight is settled.
  void finish_step(StepMetrics& m, StepTotals& totals, double global_tokens) {
    if (StopSignals::received()) totals.vote_stop();
    if (async_ && async_->in_flight()) {
      const auto [writing, failed] = async_->votes();
      totals.vote_save(writing, failed);
    }
    const auto sums = totals.all_reduce(groups_->world());
    m.loss = sums.loss / global_tokens;
    if (sums.has_router) m.aux_loss = sums.aux / global_tokens;
    m.stop_requested = sums.stop > 0;
    if (async_ && async_->in_flight()) {
      const auto t0 = std::chrono::steady_clock::now();
      async_->settle(*groups_, sums.writing, sums.failed, options_.checkpoint().keep_last());
      m.save_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  }

  /// Timing, throughput and memory of a finished step.
  StepMetrics diagnostics(StepMetrics m, const StepClock& clock) {
    const int64_t W = groups_->size();
    if (recipe_.offload.host) {
      const auto work = engine_->host_work();
      m.host_step_s = work.seconds - host_work_.seconds;
      m.host_step_gbs = m.host_step_s > 0 ? (work.bytes - host_work_.bytes) / m.host_step_s / 1e9 : 0;
      host_work_ = work;
    }
    m.step_s = clock.elapsed();
    m.tokens = global_batch() * options_.seq_len();
    m.tokens_per_s = static_cast<double>(m.tokens) / W / m.step_s;  // per rank (per GPU)
    if (peak_flops_ > 0) m.mfu = m.tokens_per_s * config_.flops_per_token(options_.seq_len()) / peak_flops_;
    std::tie(m.mem_alloc_gb, m.mem_reserved_gb) = memory_gb(device_);
    ++step_;
    return m;
  }

  /// Offloaded: when the host steps. --offload-step auto is speculative where the planner's host bytes with the
  /// speculative step's second state fit in 90% of the host's available memory, else overlapped (exact, no memory).
  engine::HostStep host_step() const {
    const auto asked = engine::host_step_named(options_.offload().step());
    if (!recipe_.offload.host || asked != engine::HostStep::automatic) return asked;
    auto in = plan_input(options_, recipe_, config_, env_);
    in.host_step = engine::HostStep::speculative;
    const double needed = plan::plan_memory(in).host_total();
    const auto available = host_memory_available();
    const bool fits = available && needed <= 0.9 * static_cast<double>(*available);
    if (rank() == 0)
      log::info("shardlm: offload: the host steps ", fits ? "speculatively during the backward" : "during the next forward",
                " (", gib_text(needed), " per host with a second copy of the state; ",
                available ? gib_text(static_cast<double>(*available)) + " available" : std::string("available memory unknown"),
                "; --offload-step chooses)");
    return fits ? engine::HostStep::speculative : engine::HostStep::overlapped;
  }

  /// The engine over the model's units: each unit's trainable group filled by a --model-dir checkpoint read by
  /// ranges or by seeded initialization; under an adapter the frozen base in its own groups (quantized by --quant).
  void build_engine() {
    const auto& o = options_;
    engine::FrozenSpec frozen;
    if (adapter_.active()) {
      frozen.is_frozen = [](const std::string& name) { return !model::is_adapter_parameter(name); };
      frozen.codec = frozen_codecs(recipe_.quant, recipe_.precision.compute);  // --quant int4|fp8: the projections quantized
    }
    // --model-dir: each rank reads only its shards' byte ranges (train/hf_shards.hpp).
    // expert parallelism: where this rank's experts lie in the whole model (inactive without it)
    const auto experts = expert_ranges(*groups_, config_, recipe_.sharding.shards_state());
    std::unique_ptr<HfShardLoader> loader;
    if (!o.model().model_dir().empty())
      loader = std::make_unique<HfShardLoader>(o.model().model_dir(), *model_, groups_->shard().size(), groups_->shard().rank(),
                                               rank() == 0, io::ReadOptions{read_threads(env_.local_world_size)}, frozen,
                                               experts);
    // one seeded generator per unit: the same weights whatever the world size, adapter or not
    auto unit_seed = [&](size_t u) { return o.seed() + 0x9E3779B97F4A7C15ull * (u + 1); };
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
      if (experts.num_experts > 0)  // this rank's experts drawn as the run without expert parallelism draws them
        return init_with_expert_rows(params, config_.initializer_range, unit_seed(u), experts.first, config_.num_experts);
      engine::NamedTensors base, adapters;  // base: empty where frozen.rows draws the frozen base
      for (auto& item : params) (model::is_adapter_parameter(item.first) ? adapters : base).push_back(item);
      model::init_parameters(base, config_.initializer_range, unit_seed(u));
      model::init_adapter_parameters(adapters, o.seed() + 0xD1B54A32D192ED03ull * (u + 1));
    };
    engine_ = std::make_unique<engine::Engine>(
        *model_, *groups_, device_, recipe_,
        loader && !adapter_.active() ? engine::UnitInit(loader->filler()) : engine::UnitInit(init),
        engine::EngineOptions()
            .adamw(o.optim())
            .micro_batches(o.grad_accum())
            .frozen(frozen)
            .memory_trace(o.log().memory_trace())
            .host_step(host_step_ = host_step())
            .is_expert(is_expert_parameter));
    if (loader && rank() == 0) io::warn_unused(loader->checkpoint(), loader->used());
  }

  /// The router loss of the last forward (model/moe.hpp) and the gradients of each unit's side output for
  /// `scale` x its total term; empty when the model has no router.
  struct RouterTerms {
    model::RouterLoss loss;
    std::vector<at::Tensor> side_grads;
  };
  /// The summed next-token loss of one micro-batch: the head and the loss fused (--loss-chunk > 0, model/loss.hpp;
  /// `scale`: the factor backward will bring), or the plain loss on whole logits, whose logits go out of scope
  /// before backward (the loss keeps its own log-softmax).
  at::Tensor loss_sum_of(const at::Tensor& ids, const at::Tensor& targets, double scale = 1.0) {
    if (options_.model().loss_chunk() > 0) {
      model_->set_loss_targets(targets, options_.model().loss_chunk(), std::isnan(scale) ? 1.0 : scale);
      return engine_->forward(ids);
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
    const auto& c = options_.checkpoint();
    std::optional<std::filesystem::path> from;
    if (c.resume() == "auto") {
      if (!c.dir().empty()) from = latest_checkpoint(c.dir());
    } else if (c.resume() != "none") {
      from = std::filesystem::path(c.resume());
    }
    if (!from) return;
    const auto t0 = std::chrono::steady_clock::now();
    const auto meta = load_checkpoint(*engine_, *groups_, *from);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (meta.step > max_samples / global_batch())
      fail<IoError>((*from / "meta.json").string(), ": field 'step' ", meta.step, " x the global batch of ", global_batch(),
                    " samples is past the ", max_samples, " samples a run may read");
    step_ = meta.step;
    if (meta.global_batch > 0 && meta.global_batch != global_batch() && rank() == 0)
      log::warn("resuming with a global batch of ", global_batch(), " samples; the checkpoint's run used ",
                meta.global_batch, ": the data order differs from the original run's");
    resumed_from_ = *from;
    if (rank() == 0)
      log::info("shardlm: resumed from ", from->string(), " (step ", step_, ", saved by ", meta.world_size,
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
      fail<ConfigError>("--load-adapter ", dir.string(), ": a ", c.kind.name, " adapter of rank ", c.rank, " on ",
                        c.target_list(), ", but this run has --adapter ", adapter_.kind.name, " --lora-rank ",
                        adapter_.rank, " --lora-targets ", adapter_.target_list());
    if (c.alpha != adapter_.alpha || c.rslora != adapter_.rslora)
      log::warn("--load-adapter ", dir.string(), ": trained with lora_alpha ", c.alpha, (c.rslora ? " (rsLoRA)" : ""),
                "; this run scales with --lora-alpha ", adapter_.alpha, (adapter_.rslora ? " (rsLoRA)" : ""));
    size_t used = 0;
    for (size_t u = 0; u < engine_->num_units(); ++u) {
      std::map<std::string, at::Tensor> values;
      for (const auto& s : engine_->unit(u).slots()) {
        const auto it = peft.tensors.find(s.name);
        if (it == peft.tensors.end()) fail<IoError>(dir.string(), ": the adapter has no tensor '", io::peft_key(s.name, c), "'");
        if (it->second.sizes() != s.param.sizes())
          fail<IoError>(dir.string(), ": tensor '", io::peft_key(s.name, c), "' has shape ",
                        io::to_peft(s.name, it->second).sizes(), " but the model needs ", io::to_peft(s.name, s.param).sizes());
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
    const int64_t B = options_.micro_batch(), T = options_.seq_len();
    auto ids = at::empty({B, T}, at::kLong), targets = at::empty({B, T}, at::kLong);
    for (int64_t b = 0, k = first_sample; b < B; ++b, ++k) {
      const bool pad = eval_samples >= 0 && k >= eval_samples;
      const int64_t start = eval_samples < 0 ? sampler_.window_start(k) : (pad ? 0 : k * T);
      int64_t counted = 0;
      ids[b].copy_(d.slice(start, T, config_.vocab_size, vocab_fix_));
      targets[b].copy_(pad ? at::full({T}, -100, at::kLong)
                           : d.targets(start, T, config_.vocab_size, -100, &counted, vocab_fix_));
    }
    return {ids.to(device_), targets.to(device_)};
  }

  TrainOptions options_;
  RecipeRules recipe_;
  dist::LaunchEnv env_;
  c10::Device device_;
  model::ModelConfig config_;
  std::unique_ptr<dist::ProcessGroups> groups_;
  std::unique_ptr<TrainableModel> model_;
  model::AdapterConfig adapter_;
  data::TokenDataset dataset_;
  data::Sampler sampler_;
  std::optional<data::TokenDataset> eval_data_;
  int64_t eval_windows_ = 0;
  optim::CosineSchedule schedule_;
  Faults faults_;
  std::string vocab_fix_;  ///< what a token outside the vocabulary calls for (vocabulary_fix)
  std::unique_ptr<engine::Engine> engine_;
  std::filesystem::path resumed_from_;
  std::unique_ptr<AsyncCheckpointWriter> async_;  // --async-save
  double peak_flops_ = -1;
  engine::ShardStorage::HostWork host_work_;  // the host AdamW's work at the last step's end
  engine::HostStep host_step_ = engine::HostStep::sync;  // offloaded: when the host steps (resolved)
  int64_t step_ = 0;
};

/// The trainer compiled once per program (or once in shardlm::compiled: core/compiled.hpp).
using TrainerCore = BasicTrainer<void>;

template <class V>
BasicTrainer<V>::BasicTrainer(const TrainOptions& o, data::TokenDataset dataset, std::unique_ptr<dist::ProcessGroups> groups,
                              const RecipeRules& recipe, const ModelFactory& make_model, Faults faults)
    : options_((o.validate(), o)),
      recipe_(resolve_recipe(o, recipe)),
      env_(groups ? groups->env() : dist::LaunchEnv::from_environment()),
      device_(rank_device(o.dist(), env_)),
      config_(resolve_config(o.model())),
      groups_((check_expert_parallel(o, config_, env_.world_size),
               groups ? std::move(groups) : make_groups(recipe_.sharding, o.dist(), env_, device_))),
      // Uninitialized host tensors whose pages are never touched: the engine replaces each unit's parameters
      // by device tensors before filling them (autograd cannot re-point a meta parameter at real data).
      model_(make_model(config_, at::TensorOptions().device(at::kCPU).dtype(recipe_.precision.master))),
      adapter_(adapter_of(o, recipe_, config_)),
      dataset_(std::move(dataset)),
      sampler_(dataset_.size(), o.seq_len(), o.seed(), dataset_.name()),
      schedule_{o.optim().lr(), o.schedule().warmup_steps(), o.steps(), o.schedule().min_lr_ratio()},
      faults_(std::move(faults)),
      vocab_fix_(vocabulary_fix(o.model())) {
  if (device_.is_cuda()) {
    // Host work of a GPU rank (weight initialization; with offload, the optimizer step) gets this rank's share
    // of the cores (launchers set OMP_NUM_THREADS=1 for ranks that compute on GPUs).
    at::set_num_threads(std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / env_.local_world_size));
    if (recipe_.offload.host) bind_near_gpu();
  }
  if (o.steps() > max_samples / global_batch())
    fail<ConfigError>("--steps ", o.steps(), " x the global batch of ", global_batch(), " samples is past the ", max_samples,
                      " samples a run may read");
  check_host_memory();
  // LoRA / DoRA: the adapters' parameters train, the base is frozen (a FrozenUnit per unit, engine/frozen_unit.hpp).
  model_->add_adapters(adapter_);
  if (groups_->expert_parallel() != o.dist().expert_parallel())
    fail<ConfigError>("--expert-parallel ", o.dist().expert_parallel(), ": the process groups handed in have expert groups of ",
                      groups_->expert_parallel());
  if (groups_->expert_parallel() > 1) model_->set_expert_shard(expert_shard(*groups_, config_));
  // The default generators draw the adapters' dropout masks: seeded per rank (LibTorch seeds them at random).
  at::manual_seed(o.seed() * 1000003 + static_cast<uint64_t>(rank()));
  build_engine();
  if (device_.is_cuda() && recipe_.offload.host) {
    // A host step that overlaps the GPU's work leaves one core to the thread that keeps the GPU busy.
    int threads = at::get_num_threads();
    if (host_step_ != engine::HostStep::sync && threads > 2) at::set_num_threads(--threads);
    if (rank() == 0) log::info("shardlm: offload: the host optimizer uses ", threads, " threads per rank");
  }
  if (adapter_.dora()) init_magnitudes();
  if (!o.adapter().load().empty()) load_adapter(o.adapter().load());
  resume();
  if (o.checkpoint().async_save()) async_ = std::make_unique<AsyncCheckpointWriter>(device_);
  peak_flops_ = o.log().peak_tflops() > 0 ? o.log().peak_tflops() * 1e12 : (device_.is_cuda() ? 989e12 : -1);
}

template <class V>
StepMetrics BasicTrainer<V>::step() {
  StepClock clock(device_);
  StepMetrics m = start_metrics();
  const double global_tokens = static_cast<double>(std::max<int64_t>(m.loss_tokens, 1));
  const double scale = faults_.nan_steps.count(m.step) ? std::nan("") : 1.0 / global_tokens;
  hang_if_asked(m.step);
  m.lr = schedule_.at(step_);
  engine_->begin_step(m.lr);
  StepTotals totals(device_);
  for (int64_t a = 0; a < options_.grad_accum(); ++a) {
    auto [ids, targets] = clock.time(m.data_s, [&] { return micro_batch(a); });                // [B, T] each
    const auto loss = clock.time(m.forward_s, [&] { return loss_sum_of(ids, targets, scale); });  // summed, fp32
    clock.time(m.backward_s, [&] { backward(loss, scale, global_tokens, a + 1 == options_.grad_accum(), totals); });
  }
  clock.time(m.optimizer_s, [&] {
    m.grad_norm = engine_->clip_grad_norm(options_.optim().grad_clip());
    update(m);
    finish_step(m, totals, global_tokens);
  });
  return diagnostics(m, clock);
}

template <class V>
double BasicTrainer<V>::save_checkpoint(bool last) {
  const auto start = std::chrono::steady_clock::now();
  const auto blocked_s = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  const auto& c = options_.checkpoint();
  const nlohmann::json info = {{"sharding", std::string(recipe_.sharding.name)},
                               {"precision", std::string(recipe_.precision.name)},
                               {"reduce_dtype", reduce_dtype_name(recipe_.precision.reduce)},
                               {"adapter", std::string(adapter_.kind.name)}, {"quant", std::string(recipe_.quant.name)},
                               {"layers", config_.num_layers}, {"hidden_size", config_.hidden_size}, {"seed", options_.seed()},
                               {"global_batch", global_batch()}};
  if (async_) {
    async_->finish(*groups_, c.keep_last());
    if (!last) {
      async_->start(*engine_, *groups_, c.dir(), step_, info, faults_.save_delay);
      const double s = blocked_s();
      if (rank() == 0)
        log::info("shardlm: checkpoint ", async_->path().string(), ": writing in the background (training blocked ",
                  std::lround(s * 1e3), " ms)");
      return s;
    }
  }
  const auto path = train::save_checkpoint(*engine_, *groups_, c.dir(), step_, info, c.keep_last(), faults_.save_delay);
  const double s = blocked_s();
  if (rank() == 0) log::info("shardlm: checkpoint ", path.string(), " (training blocked ", std::lround(s * 1e3), " ms)");
  return s;
}

template <class V>
void BasicTrainer<V>::set_eval_data(data::TokenDataset d) {
  const int64_t T = options_.seq_len();
  const int64_t windows = d.size() > T ? (d.size() - 1) / T : 0;
  if (windows == 0)
    fail<ConfigError>("validation data ", d.name(), ": ", d.size(), " tokens are too few for one sample of --seq-len ", T, " (+1)");
  const int64_t wanted = options_.data().eval_samples();
  eval_windows_ = wanted > 0 ? std::min(wanted, windows) : windows;
  eval_data_ = std::move(d);
}

template <class V>
std::pair<double, int64_t> BasicTrainer<V>::evaluate() {
  SHARDLM_ASSERT(eval_data_, "evaluate() needs set_eval_data()");
  at::NoGradGuard no_grad;
  // Evaluation mode: no adapter dropout (--lora-dropout), so no draws that would shift the training masks.
  struct EvalMode {
    torch::nn::Module& m;
    explicit EvalMode(torch::nn::Module& module) : m(module) { m.eval(); }
    ~EvalMode() { m.train(); }
  } eval_mode(model_->module());
  const int64_t B = options_.micro_batch(), W = groups_->size();
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

template <class V>
std::vector<std::pair<std::string, at::Tensor>> BasicTrainer<V>::full_weights() {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t u = 0; u < engine_->num_units(); ++u) {
    for (auto& [name, t] : engine_->full_master(u)) out.emplace_back(io::hf_name(name), t.cpu());
    for (auto& [name, t] : engine_->full_experts(u)) out.emplace_back(io::hf_name(name), t.cpu());
  }
  return out;
}

template <class V>
void BasicTrainer<V>::export_hf(const std::filesystem::path& dir) {
  const auto& m = options_.model();
  train::export_hf(*engine_, *groups_,
                   {dir, checkpoint_dtype(m.model_dir()), static_cast<uint64_t>(options_.output().export_max_file_gb() * 1e9),
                    m.model_dir(), config_, expert_ranges(*groups_, config_, recipe_.sharding.shards_state())});
}

template <class V>
void BasicTrainer<V>::export_adapter(const std::filesystem::path& dir) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (size_t u = 0; u < engine_->num_units(); ++u)
    for (auto& [name, t] : engine_->full_master(u)) tensors.emplace_back(name, t.cpu());
  if (rank() != 0) return;
  const auto& m = options_.model();
  const auto base = !m.model_dir().empty() ? std::filesystem::absolute(m.model_dir()).string() : m.preset();
  io::write_peft_adapter(dir, adapter_, base, tensors);
  log::info("shardlm: exported the ", adapter_.kind.name, " adapter (", tensors.size(), " tensors) to ", dir.string());
}

template <class V>
std::vector<at::Tensor> BasicTrainer<V>::master_weights() {
  std::vector<at::Tensor> out;
  for (auto& [name, t] : full_weights()) out.push_back(t);
  return out;
}

template <class V>
std::vector<at::Tensor> BasicTrainer<V>::gradient_shards() {
  engine_->settle();
  std::vector<at::Tensor> out;
  for (size_t u = 0; u < engine_->num_units(); ++u) out.push_back(engine_->unit(u).grad());
  return out;
}

SHARDLM_EXTERN_TEMPLATE(class BasicTrainer<void>)

/// A trainer of `Model` (model::Llama3, model::Mixtral) with the policies of `Recipe` (a Policies<...>: its
/// static_asserts have checked the combination): the typed face of TrainerCore.
template <class Model, class Recipe>
class Trainer : public TrainerCore {
 public:
  /// A trainer in this process's environment (a single process when no launcher variables are set), over `groups`
  /// when given.
  Trainer(const TrainOptions& o, data::TokenDataset dataset, std::unique_ptr<dist::ProcessGroups> groups = nullptr,
          Faults faults = {})
      : TrainerCore(o, std::move(dataset), std::move(groups), Recipe::rules(), model_factory<Model>(), std::move(faults)) {}

  /// The model (its parameters: views of the engine's gathered buffers while a unit is gathered).
  Model& model() { return static_cast<ModelOf<Model>&>(trainable_model()).holder(); }
};

/// The training and validation data of a run: --data (or the program's embedded text), less its last
/// --eval-fraction, which is the validation split; or --eval-data. No validation data: nullopt.
inline std::pair<data::TokenDataset, std::optional<data::TokenDataset>> open_datasets(const DataOptions& o) {
  auto all = o.path().empty() ? data::TokenDataset::from_bytes(o.builtin_text(), o.builtin_name())
                              : data::TokenDataset::open(o.path());
  if (!o.eval_data().empty()) return {std::move(all), data::TokenDataset::open(o.eval_data())};
  if (o.eval_fraction() <= 0) return {std::move(all), std::nullopt};
  const auto held = static_cast<int64_t>(static_cast<double>(all.size()) * o.eval_fraction());
  auto eval = all.range(all.size() - held, held, detail::cat(all.name(), " (its last ", held, " tokens: --eval-fraction)"));
  return {all.range(0, all.size() - held, detail::cat(all.name(), " (its first ", all.size() - held, " tokens)")), std::move(eval)};
}
/// The training data of a run (see open_datasets).
inline data::TokenDataset open_dataset(const DataOptions& o) { return open_datasets(o).first; }

}  // namespace shardlm::train
