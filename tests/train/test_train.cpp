// Trainer tests: AdamW against its formula, the LR schedule, clipping, token data and sampler, gradient
// accumulation equivalence, precision dtypes, loss going down, metrics keys, command-line errors.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <shardlm/shardlm.hpp>

#include <cmath>
#include <fstream>
#include <map>
#include <set>

#include "../test_util.hpp"

using namespace shardlm;
namespace fs = std::filesystem;

TEST_CASE("AdamW matches the decoupled-weight-decay formula (decay on matrices only)") {
  at::manual_seed(0);
  const double lr = 1e-2, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  std::vector<at::Tensor> params = {at::randn({3, 4}), at::randn({5})};
  std::vector<at::Tensor> ref;
  for (auto& p : params) ref.push_back(p.to(at::kDouble));
  optim::AdamW opt(params, optim::AdamWOptions().beta1(b1).beta2(b2).eps(eps).weight_decay(wd));
  std::vector<at::Tensor> m = {at::zeros({3, 4}, at::kDouble), at::zeros({5}, at::kDouble)}, v = m;
  for (int step = 1; step <= 3; ++step) {
    std::vector<at::Tensor> grads = {at::randn({3, 4}), at::randn({5})};
    opt.step(grads, lr);
    for (size_t i = 0; i < 2; ++i) {
      const auto g = grads[i].to(at::kDouble);
      if (ref[i].dim() >= 2) ref[i] = ref[i] * (1 - lr * wd);
      m[i] = b1 * m[i] + (1 - b1) * g;
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      const auto mhat = m[i] / (1 - std::pow(b1, step)), vhat = v[i] / (1 - std::pow(b2, step));
      ref[i] = ref[i] - lr * mhat / (vhat.sqrt() + eps);
    }
  }
  for (size_t i = 0; i < 2; ++i) CHECK(test::rel_err(params[i], ref[i]) < 1e-6);
  CHECK(opt.num_steps() == 3);
}

TEST_CASE("the fused AdamW's gradient scale divides the gradients, in place (how the engine clips)") {
  at::manual_seed(1);
  const auto p0 = at::randn({64}), g = at::randn({64});
  auto run = [&](const at::Tensor& grad, std::optional<at::Tensor> scale) {
    auto p = p0.clone(), m = at::zeros({64}), v = at::zeros({64}), step = at::zeros({});
    for (int i = 0; i < 3; ++i) {
      const auto gi = grad.clone();
      compat::fused_adamw({p}, {gi}, {m}, {v}, {step}, 1e-2, 0.9, 0.95, 0.1, 1e-8, scale);
      if (scale) CHECK(test::rel_err(gi, grad / scale->item<double>()) < 1e-6);  // unscaled in place
    }
    return p;
  };
  // A gradient of 1e-3 * g: Adam is nearly scale-free, but eps (1e-8) makes the result depend on the scale.
  const auto scaled = run(g, at::full({}, 1e3));
  const auto divided = run(g / 1e3, std::nullopt);
  CHECK(test::rel_err(scaled, divided) < 1e-6);
  CHECK(test::rel_err(run(g, std::nullopt), divided) > 1e-6);  // the scale does change the result
}

TEST_CASE("cosine schedule: linear warmup, cosine to min_ratio") {
  optim::CosineSchedule s{1.0, 10, 110, 0.1};
  CHECK(s.at(0) == doctest::Approx(0.1));
  CHECK(s.at(9) == doctest::Approx(1.0));
  CHECK(s.at(10) == doctest::Approx(1.0));
  CHECK(s.at(60) == doctest::Approx(0.55));
  CHECK(s.at(110) == doctest::Approx(0.1));
  CHECK(s.at(500) == doctest::Approx(0.1));
}

TEST_CASE("global-norm clipping") {
  std::vector<at::Tensor> g = {at::full({4}, 3.0), at::full({1}, 4.0)};  // norm sqrt(36 + 16)
  const double norm = optim::clip_grad_norm(g, 1.0);
  CHECK(norm == doctest::Approx(std::sqrt(52.0)));
  CHECK(optim::global_norm(g).item<double>() == doctest::Approx(1.0).epsilon(1e-5));
  std::vector<at::Tensor> small = {at::full({2}, 0.1)};
  optim::clip_grad_norm(small, 1.0);
  CHECK(small[0][0].item<double>() == doctest::Approx(0.1));
}

TEST_CASE("token files: .bin is mmapped uint32, .txt is bytes; bad files are named") {
  const auto dir = test::temp_dir("data");
  std::vector<uint32_t> tokens = {5, 1, 70000, 3};
  std::ofstream(dir / "t.bin", std::ios::binary).write(reinterpret_cast<const char*>(tokens.data()), 16);
  const auto d = data::TokenDataset::open(dir / "t.bin");
  CHECK(d.size() == 4);
  CHECK(d[2] == 70000);
  CHECK(at::equal(d.slice(0, 2, 100), at::tensor({5, 1}, at::kLong)));
  CHECK_THROWS_WITH_AS(d.slice(1, 3, 100), doctest::Contains("token 70000 at position 2 is outside"), IoError);
  std::ofstream(dir / "odd.bin", std::ios::binary) << "abcde";
  CHECK_THROWS_WITH_AS(data::TokenDataset::open(dir / "odd.bin"), doctest::Contains("not a whole number of uint32"), IoError);
  CHECK_THROWS_WITH_AS(data::TokenDataset::open(dir / "x.csv"), doctest::Contains("unknown token file type"), IoError);
  std::ofstream(dir / "t.txt") << "\xff" "ab";
  const auto t = data::TokenDataset::open(dir / "t.txt");
  CHECK(t.size() == 3);
  CHECK(t[0] == 255);
  CHECK(t[1] == 'a');
  compat::remove_all(dir);
}

TEST_CASE("sampler: every window once per epoch, fixed by the seed") {
  data::Sampler a(1001, 10, 7), b(1001, 10, 7), c(1001, 10, 8);
  CHECK(a.num_windows() == 100);
  std::set<int64_t> seen;
  bool differs = false;
  for (int64_t k = 0; k < 100; ++k) {
    const auto s = a.window_start(k);
    CHECK(s == b.window_start(k));
    differs |= s != c.window_start(k);
    seen.insert(s);
    CHECK(s + 11 <= 1001);
  }
  CHECK(seen.size() == 100);
  CHECK(differs);
  CHECK_THROWS_WITH_AS(data::Sampler(5, 10, 0), doctest::Contains("too few"), IoError);
}

namespace {
std::string text_corpus() {
  std::string s;
  for (int i = 0; i < 200; ++i) s += "the quick brown fox jumps over the lazy dog " + std::to_string(i % 7) + ". ";
  return s;
}
TrainOptions tiny(const std::string& corpus) {
  TrainOptions o;
  o.preset = "llama3-debug";
  o.layers = 2;
  o.seq_len = 32;
  o.micro_batch = 4;
  o.steps = 3;
  o.lr = 1e-3;
  o.warmup_steps = 0;
  o.builtin_text = corpus;
  return o;
}
}  // namespace

TEST_CASE("gradient accumulation: the same global batch gives the same gradients, losses and weights") {
  const auto corpus = text_corpus();
  std::vector<std::vector<double>> losses;
  std::vector<std::vector<at::Tensor>> grads, weights;
  for (auto [micro, accum] : {std::pair{4, 1}, std::pair{2, 2}, std::pair{1, 4}}) {
    auto o = tiny(corpus);
    o.micro_batch = micro, o.grad_accum = accum, o.grad_clip = 0;
    train::Trainer<model::Llama3, Policies<>> t(o, train::open_dataset(o));
    losses.emplace_back();
    for (int s = 0; s < 3; ++s) {
      losses.back().push_back(t.step().loss);
      if (s == 0) grads.push_back(t.gradient_shards());
    }
    weights.push_back(t.master_weights());
  }
  for (size_t r = 1; r < losses.size(); ++r) {
    for (size_t s = 0; s < 3; ++s) CHECK(losses[r][s] == doctest::Approx(losses[0][s]).epsilon(1e-5));
    double worst_grad = 0, worst_weight = 0;
    for (size_t i = 0; i < grads[0].size(); ++i) {
      worst_grad = std::max(worst_grad, test::rel_err(grads[r][i], grads[0][i]));
      worst_weight = std::max(worst_weight, test::rel_err(weights[r][i], weights[0][i]));
    }
    MESSAGE("split ", r, ": max grad rel err ", worst_grad, ", max weight rel err after 3 steps ", worst_weight);
    CHECK(worst_grad < 1e-5);
    // Adam divides by sqrt(v): an element whose gradient is ~0 moves by up to lr whatever its sign, so fp32
    // summation-order noise shows in the weights at the lr scale (1e-3) and no finer.
    CHECK(worst_weight < 1e-3);
  }
}

TEST_CASE("checkpointing policies: recomputed blocks give the gradients of kept activations") {
  const auto corpus = text_corpus();
  auto o = tiny(corpus);
  o.layers = 3, o.grad_clip = 0;
  auto grads_of = [&]<class Checkpointing>(Checkpointing) {
    train::Trainer<model::Llama3, Policies<sharding::FullShard, Checkpointing>> t(o, train::open_dataset(o));
    t.step();
    return t.gradient_shards();
  };
  const auto none = grads_of(checkpointing::None{});
  for (const auto& other : {grads_of(checkpointing::EveryBlock{}), grads_of(checkpointing::EveryNth<2>{})}) {
    REQUIRE(other.size() == none.size());
    double worst = 0;
    for (size_t u = 0; u < none.size(); ++u) worst = std::max(worst, test::rel_err(other[u], none[u]));
    MESSAGE("max gradient rel err vs no checkpointing: ", worst);
    CHECK(worst <= 1e-6);
  }
  CHECK(checkpointing::EveryNth<2>::name == "every-2");
  CHECK(checkpointing::EveryNth<12>::name == "every-12");
}

TEST_CASE("Mixtral through the engine: gradients of CE + coef x aux equal plain autograd, kept or recomputed") {
  const auto corpus = text_corpus();
  auto o = tiny(corpus);
  o.preset = "mixtral-debug", o.micro_batch = 2, o.grad_accum = 2, o.grad_clip = 0;
  const auto run = [&]<class Recipe>(Recipe) {
    train::Trainer<model::Mixtral, Recipe> t(o, train::open_dataset(o));
    auto weights = t.full_weights();  // before the step
    const auto m = t.step();
    return std::tuple{std::move(weights), m, t.gradient_shards()};
  };
  const auto [weights, kept, grads] = run(Policies<sharding::NoShard>{});
  const auto [weights_ac, recomputed, grads_ac] = run(Policies<sharding::FullShard, checkpointing::EveryBlock>{});

  // The same step by plain autograd: each micro-batch's mean CE + coef x aux, averaged over the micro-batches.
  const auto c = train::resolve_config(o);
  model::Mixtral ref(c);
  {
    std::map<std::string, at::Tensor> by_name;
    for (auto& [name, t] : weights) by_name[name.rfind("model.", 0) == 0 ? name.substr(6) : name] = t;
    at::NoGradGuard no_grad;
    for (auto& item : ref->named_parameters()) item.value().copy_(by_name.at(item.key()));
  }
  auto dataset = train::open_dataset(o);
  data::Sampler sampler(dataset.size(), o.seq_len, o.seed, dataset.name());
  const auto reference = [&](bool with_router) {
    for (auto& p : ref->parameters()) p.mutable_grad() = at::Tensor();
    double loss = 0, aux = 0;
    for (int64_t a = 0; a < o.grad_accum; ++a) {
      auto windows = at::empty({o.micro_batch, o.seq_len + 1}, at::kLong);
      for (int64_t b = 0; b < o.micro_batch; ++b)
        windows[b].copy_(dataset.slice(sampler.window_start(a * o.micro_batch + b), o.seq_len + 1, c.vocab_size));
      std::vector<at::Tensor> stats;
      const auto logits = ref->forward(windows.narrow(1, 0, o.seq_len), &stats);
      const auto router = model::router_loss(stats, c);
      const auto ce = model::ops::next_token_loss_sum(logits, windows.narrow(1, 1, o.seq_len)) /
                      static_cast<double>(o.micro_batch * o.seq_len);
      const auto micro = (with_router ? ce + router.total : ce) / static_cast<double>(o.grad_accum);
      micro.backward();
      loss += micro.item<double>(), aux += router.aux.item<double>() / static_cast<double>(o.grad_accum);
    }
    std::vector<at::Tensor> out;  // every parameter's gradient, in unit order
    for (size_t u = 0; u < ref->num_units(); ++u)
      for (auto& [name, p] : ref->unit_parameters(u)) out.push_back(p.grad().clone());
    return std::tuple{loss, aux, out};
  };
  const auto [ce_only_loss, ce_only_aux, ce_only] = reference(false);
  const auto [loss, aux, expected] = reference(true);
  CHECK(kept.loss == doctest::Approx(loss).epsilon(1e-5));
  CHECK(kept.aux_loss == doctest::Approx(aux).epsilon(1e-5));
  CHECK(recomputed.loss == doctest::Approx(loss).epsilon(1e-5));
  // Parameter by parameter (the routers' gradients hold the aux term): the engine's flat gradients, unit by unit.
  double worst = 0, worst_ac = 0, aux_effect = 0;
  for (size_t u = 0, i = 0; u < grads.size(); ++u) {
    int64_t offset = 0;
    for (auto& [name, p] : ref->unit_parameters(u)) {
      const int64_t n = p.numel();
      const auto want = expected[i].reshape({-1});
      worst = std::max(worst, test::rel_err(grads[u].narrow(0, offset, n), want));
      worst_ac = std::max(worst_ac, test::rel_err(grads_ac[u].narrow(0, offset, n), want));
      if (name.find("mlp.gate.") != std::string::npos) aux_effect = std::max(aux_effect, test::rel_err(ce_only[i], expected[i]));
      offset += n, ++i;
    }
  }
  MESSAGE("loss ", kept.loss, " (aux ", kept.aux_loss, "): max grad rel err kept ", worst, ", recomputed ", worst_ac,
          "; the aux term moves the router gradients by ", aux_effect);
  CHECK(aux_effect > 1e-2);  // the comparison below would see a missing aux gradient
  CHECK(worst < 1e-4);
  CHECK(worst_ac < 1e-4);
}

TEST_CASE("precision policies set the dtypes of master weights and compute weights") {
  const auto corpus = text_corpus();
  auto o = tiny(corpus);
  SUBCASE("MixedBF16: fp32 master, bf16 compute") {
    train::Trainer<model::Llama3, Policies<precision::MixedBF16>> t(o, train::open_dataset(o));
    const auto m = t.step();
    CHECK(std::isfinite(m.loss));
    for (const auto& w : t.master_weights()) CHECK((w.scalar_type() == at::kFloat));
    for (const auto& p : t.model()->parameters()) CHECK((p.scalar_type() == at::kBFloat16));
    // the compute weights are the master weights rounded to bf16; gradients are reduced in fp32
    CHECK(at::equal(t.model()->parameters()[0], t.master_weights()[0].to(at::kBFloat16)));
    for (const auto& g : t.gradient_shards()) CHECK((g.scalar_type() == at::kFloat));
  }
  SUBCASE("PureBF16: bf16 everywhere") {
    train::Trainer<model::Llama3, Policies<precision::PureBF16>> t(o, train::open_dataset(o));
    CHECK(std::isfinite(t.step().loss));
    for (const auto& w : t.master_weights()) CHECK((w.scalar_type() == at::kBFloat16));
    for (const auto& g : t.gradient_shards()) CHECK((g.scalar_type() == at::kBFloat16));
  }
}

TEST_CASE("offloaded on one rank: bf16 host gradients train exactly as fp32 device gradients") {
  const auto corpus = text_corpus();
  auto o = tiny(corpus);
  o.grad_clip = 0.5;  // clipping active: the norm summed on the device scales the upcast gradients
  using Mixed = Policies<sharding::FullShard, precision::MixedBF16>;
  using MixedOffload = Policies<sharding::FullShard, precision::MixedBF16, offload::Cpu>;
  train::Trainer<model::Llama3, Mixed> ref(o, train::open_dataset(o));
  train::Trainer<model::Llama3, MixedOffload> off(o, train::open_dataset(o));
  for (int s = 0; s < 4; ++s) {
    const auto a = ref.step(), b = off.step();
    CHECK(std::abs(a.loss - b.loss) <= 1e-6 * a.loss);
    CHECK(std::abs(a.grad_norm - b.grad_norm) <= 1e-6 * a.grad_norm);
    for (const auto& g : off.gradient_shards()) CHECK((g.scalar_type() == at::kBFloat16));
  }
  const auto wa = ref.master_weights(), wb = off.master_weights();
  for (size_t i = 0; i < wa.size(); ++i) CHECK(test::rel_err(wb[i], wa[i]) < 1e-6);
  // With accumulation the host sums in fp32.
  o.grad_accum = 2;
  train::Trainer<model::Llama3, MixedOffload> accum(o, train::open_dataset(o));
  accum.step();
  for (const auto& g : accum.gradient_shards()) CHECK((g.scalar_type() == at::kFloat));
}

TEST_CASE("the loss goes down, and the metrics JSONL carries every DESIGN.md key") {
  const auto corpus = text_corpus();
  const auto dir = test::temp_dir("run");
  auto o = tiny(corpus);
  o.steps = 40;
  o.lr = 3e-3;
  o.warmup_steps = 5;
  o.log_every = 20;
  o.metrics = (dir / "m.jsonl").string();
  CHECK(run_trainer<model::Llama3, Policies<sharding::NoShard, precision::FP32>>(o) == 0);
  std::ifstream in(o.metrics);
  std::string line;
  std::vector<nlohmann::json> rows;
  while (std::getline(in, line)) rows.push_back(nlohmann::json::parse(line));
  REQUIRE(rows.size() == 40);
  for (const char* key : {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu", "step_s", "data_s", "forward_s",
                          "backward_s", "optimizer_s", "mem_alloc_gb", "mem_reserved_gb"})
    CHECK_MESSAGE(rows.back().contains(key), "metrics lack ", key);
  const double first = rows.front()["loss"], last = rows.back()["loss"];
  MESSAGE("loss ", first, " -> ", last);
  CHECK(last < 0.5 * first);
  compat::remove_all(dir);
}

TEST_CASE("command line: defaults, overrides and errors that name the flag") {
  const char* ok[] = {"prog", "--steps", "7", "--lr", "0.01", "--data", "x.bin"};
  const auto o = cli::parse(7, ok);
  CHECK(o.steps == 7);
  CHECK(o.lr == 0.01);
  CHECK(o.seq_len == TrainOptions{}.seq_len);
  const char* unknown[] = {"prog", "--stepz", "7"};
  CHECK_THROWS_WITH(cli::parse(3, unknown), doctest::Contains("stepz"));
  const char* bad_value[] = {"prog", "--steps", "many", "--data", "x.bin"};
  CHECK_THROWS_WITH(cli::parse(5, bad_value), doctest::Contains("many"));
  const char* negative[] = {"prog", "--micro-batch", "0", "--data", "x.bin"};
  CHECK_THROWS_WITH_AS(cli::parse(5, negative), doctest::Contains("--micro-batch must be positive"), ConfigError);
  const char* no_data[] = {"prog"};
  CHECK_THROWS_WITH_AS(cli::parse(1, no_data), doctest::Contains("--data is required"), ConfigError);
  CHECK_THROWS_WITH_AS(parse_device("tpu"), doctest::Contains("--device 'tpu'"), ConfigError);
}
