#pragma once
// A whole training run: the data, the trainer, the steps with their log lines, metrics, checkpoints, evaluation and
// preemption, then the exports. train::run is compiled once per program; run_trainer<Model, Recipe> is the typed
// entry a user's main calls, run_trainer(options) the one of a program that picks its recipe from the policy flags.
#include <unistd.h>

#include <cmath>
#include <csignal>

#include "shardlm/core/compiled.hpp"
#include "shardlm/core/log.hpp"
#include "shardlm/core/progress.hpp"
#include "shardlm/io/safetensors.hpp"
#include "shardlm/train/metrics.hpp"
#include "shardlm/train/tensorboard.hpp"
#include "shardlm/train/trainer.hpp"

namespace shardlm::train {

/// Trains the model `make_model` builds with `recipe` as the options say, on one process or as one rank of a job
/// (launched by shardlm_launch, torchrun or srun): rank 0 logs every --log-every steps and writes --metrics and
/// --save-final. Returns the process's exit code. (A template of nothing only so that shardlm::compiled can compile
/// it once: core/compiled.hpp; call run().)
template <class V = void>
int run_once(const TrainOptions& o, const RecipeRules& recipe, const ModelFactory& make_model, Faults faults) {
  o.validate();
  auto [train_data, eval_data] = open_datasets(o.data());
  TrainerCore trainer(o, std::move(train_data), nullptr, recipe, make_model, std::move(faults));
  if (eval_data) trainer.set_eval_data(std::move(*eval_data));
  StopSignals::install();
  const bool lead = trainer.rank() == 0;
  const auto& c = trainer.config();
  const auto& g = trainer.groups();
  const auto& a = trainer.adapter();
  const auto& r = trainer.recipe();
  if (lead)
    log::info("shardlm: ", c.num_layers, " layers, hidden ", c.hidden_size, ", ", c.num_params() / 1e6, "M parameters | ",
              r.describe(),
              a.active() ? detail::cat(" | ", a.kind.name, " rank ", a.rank, " on ", a.target_list(), " | base ",
                                       r.quant.quantized ? std::string(r.quant.name) : std::string(dtype_name(r.precision.compute)))
                         : std::string(),
              " | ", g.size(), " rank(s) on ", trainer.device().type() == c10::kCUDA ? "cuda" : "cpu",
              g.size() > 1 ? detail::cat(" (", g.env().source, "; shard groups of ", g.shard_group_size(),
                                         g.expert_parallel() > 1 ? detail::cat("; experts over groups of ", g.expert_parallel())
                                                                 : std::string(),
                                         ")")
                           : std::string(),
              " | global batch ", o.micro_batch() * o.grad_accum() * g.size(), " x ", o.seq_len(), " tokens");
  if (lead && trainer.device().is_cuda()) log::info("shardlm: memory plan (train/memory_plan.hpp): ", trainer.memory_plan().table());
  const auto& ck = o.checkpoint();
  MetricsWriter metrics(lead ? o.log().metrics() : std::string(), /*append=*/!trainer.resumed_from().empty());
  tensorboard::Writer board(lead ? o.log().tensorboard() : std::string());
  double first_loss = 0, last_loss = 0;
  const int64_t start = trainer.steps_done(), steps = o.steps();
  // A bar with the ETA when rank 0 writes to a terminal (log lines take its place, then it is drawn again).
  Progress bar("training", static_cast<uint64_t>(std::max<int64_t>(steps - start, 0)),
               lead && ::isatty(STDOUT_FILENO) == 1 && ::isatty(STDERR_FILENO) == 1, 1, nullptr, Progress::Units::steps);
  if (start >= steps && lead) log::info("shardlm: nothing to train: the run is at step ", start, " of --steps ", steps);
  int64_t bad_in_a_row = 0;
  double save_stall = 0;
  for (int64_t s = start; s < steps; ++s) {
    auto m = trainer.step();
    bad_in_a_row = m.skipped ? bad_in_a_row + 1 : 0;
    const bool too_many_bad = ck.max_bad_steps() > 0 && bad_in_a_row >= ck.max_bad_steps();
    const bool stop = m.stop_requested && m.step < steps;
    if (!too_many_bad && !ck.dir().empty() &&
        ((ck.save_every() > 0 && m.step % ck.save_every() == 0) || m.step == steps || stop))
      m.save_s += trainer.save_checkpoint(/*last=*/m.step == steps || stop);
    save_stall += m.save_s;
    if (trainer.has_eval_data() && ((o.data().eval_every() > 0 && m.step % o.data().eval_every() == 0) || m.step == steps)) {
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
                  ") had a non-finite gradient norm and were skipped (--max-bad-steps ", ck.max_bad_steps(),
                  "): stopping; the weights are those of step ", m.step - bad_in_a_row,
                  ck.dir().empty() ? std::string() : "; --resume auto restarts from the last checkpoint");
    if (s == start) first_loss = m.loss;
    last_loss = m.loss;
    if (lead && (m.step % o.log().every() == 0 || m.step == start + 1 || m.step == steps)) {
      bar.clear();
      log::info(m.line(steps));
    }
    bar.add(1);
    if (stop) {
      bar.clear();
      if (ck.dir().empty()) {
        if (lead) log::warn("stopping after step ", m.step, " on a signal, without --checkpoint-dir: nothing was saved");
        return 128 + SIGTERM;
      }
      if (lead) log::info("shardlm: stopping after step ", m.step, " on a signal (preemption); --resume auto continues");
      return 0;
    }
  }
  bar.clear();
  const auto& out = o.output();
  if (!out.save_final().empty()) {
    auto weights = trainer.full_weights();
    if (lead) io::save_safetensors(out.save_final(), weights);
  }
  if (!out.export_dir().empty()) trainer.export_hf(out.export_dir());
  if (!out.export_adapter().empty()) trainer.export_adapter(out.export_adapter());
  if (lead && steps > start)
    log::info("shardlm: trained ", steps - start, " steps (", start + 1, "..", steps, "): loss ", first_loss, " -> ",
              last_loss, ck.dir().empty() ? std::string()
                                          : detail::cat("; checkpoints blocked training ", std::round(save_stall * 1e3) / 1e3, " s in all"));
  return 0;
}

SHARDLM_EXTERN_TEMPLATE(int run_once<void>(const TrainOptions&, const RecipeRules&, const ModelFactory&, Faults))

/// See run_once.
inline int run(const TrainOptions& o, const RecipeRules& recipe, const ModelFactory& make_model, Faults faults = {}) {
  return run_once<void>(o, recipe, make_model, std::move(faults));
}

}  // namespace shardlm::train

namespace shardlm {

/// Trains `Model` (model::Llama3, model::Mixtral) with `Recipe` (a Policies<...>) as the options say: see train::run.
/// `faults`: a test's injected faults.
template <class Model, class Recipe>
int run_trainer(const TrainOptions& options, train::Faults faults = {}) {
  return train::run(options, Recipe::rules(), train::model_factory<Model>(), std::move(faults));
}

/// Trains with the recipe the policy flags name (options.policy(), shardlm_train) and the model the config names
/// (Llama 3 or Mixtral): see train::run.
inline int run_trainer(const TrainOptions& options, train::Faults faults = {}) {
  return train::run(options, options.recipe(), train::model_factory_for(train::resolve_config(options.model())),
                    std::move(faults));
}

}  // namespace shardlm
