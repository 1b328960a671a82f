// Trainer tests: AdamW against its formula, the LR schedule, clipping, token data and sampler, gradient
// accumulation equivalence, precision dtypes, loss going down, metrics keys, command-line errors, packing and
// loss masks, evaluation, resuming the sampler, TensorBoard event files, --config files, the frozen group and
// LoRA/DoRA runs.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <shardlm/shardlm.hpp>

#include <array>
#include <chrono>
#include <cmath>
#include <functional>
#include <fstream>
#include <map>
#include <sstream>
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

TEST_CASE("host AdamW (offload): the fused kernel's update, from fp32 or bf16 gradients and state") {
  at::manual_seed(2);
  const int64_t n = 100003;  // not a multiple of any vector width or grain
  const double lr = 1e-2, wd = 0.1, coef = 0.5;
  auto run = [&](at::ScalarType state, at::ScalarType grad_dtype, bool host) {
    at::manual_seed(3);
    auto p = at::randn({n}).to(state), m = at::zeros({n}, state), v = at::zeros({n}, state), step = at::zeros({});
    for (int i = 1; i <= 3; ++i) {
      const auto g = at::randn({n}).to(grad_dtype);
      if (host) {
        optim::host_adamw(p, g, m, v, optim::AdamWStep{lr, 0.9, 0.95, wd, 1e-8, i, coef});
      } else {  // the reference: LibTorch's fused kernel, clipping as its gradient scale, gradients in the state dtype
        compat::fused_adamw({p}, {g.to(state)}, {m}, {v}, {step}, lr, 0.9, 0.95, wd, 1e-8, at::full({}, 1 / coef));
      }
    }
    return std::array<at::Tensor, 3>{p.to(at::kFloat), m.to(at::kFloat), v.to(at::kFloat)};
  };
  SUBCASE("fp32 state, fp32 and bf16 gradients") {
    for (auto gd : {at::kFloat, at::kBFloat16}) {
      const auto ours = run(at::kFloat, gd, true), ref = run(at::kFloat, gd, false);
      for (int k = 0; k < 3; ++k) CHECK(test::rel_err(ours[k], ref[k]) < 1e-6);
    }
  }
  SUBCASE("bf16 state (pure-bf16), bf16 gradients: within bf16 rounding") {
    const auto ours = run(at::kBFloat16, at::kBFloat16, true), ref = run(at::kBFloat16, at::kBFloat16, false);
    at::manual_seed(3);
    const auto p0 = at::randn({n}).to(at::kBFloat16).to(at::kFloat);
    // the moments to bf16 precision; the parameters' change (~3 lr = 0.03, a few bf16 steps of p) to a few %
    CHECK(test::rel_err(ours[1], ref[1]) < 1e-2);
    CHECK(test::rel_err(ours[2], ref[2]) < 1e-2);
    CHECK(test::rel_err(ours[0] - p0, ref[0] - p0) < 5e-2);
  }
  SUBCASE("dtypes it does not take are named") {
    auto p = at::zeros({4}, at::kDouble);
    CHECK_THROWS_WITH_AS(optim::host_adamw(p, p, p, p, {}), doctest::Contains("host AdamW"), ConfigError);
  }
}

TEST_CASE("CUDA: the AdamW kernel gives LibTorch's fused AdamW bit for bit, from fp32 and bf16 gradients") {
  if (!torch::cuda::is_available()) {
    MESSAGE("no CUDA device: skipped (scripts/gpu.sh runs it)");
    return;
  }
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  // Runs at element offsets 0, 1 and 3 of their buffers (the scalar head before 16-byte loads), of lengths that are no
  // multiple of 4; weight decay on and off; clipping (a gradient scale) on some steps.
  for (const int64_t offset : {0, 1, 3}) {
    for (const int64_t n : {int64_t{5}, int64_t{1000003}}) {
      for (const auto grad_dtype : {at::kFloat, at::kBFloat16}) {
        CAPTURE(offset);
        CAPTURE(n);
        CAPTURE(grad_dtype);
        at::manual_seed(7);
        const auto buffer = [&] { return at::empty({n + offset}, cuda).narrow(0, offset, n); };
        auto p = buffer(), m = buffer(), v = buffer();
        p.copy_(at::randn({n}, cuda)), m.zero_(), v.zero_();
        auto rp = p.clone(), rm = m.clone(), rv = v.clone(), step = at::zeros({}, cuda);
        REQUIRE(optim::adamw_kernel_serves(p, at::empty({1}, cuda.dtype(grad_dtype))));
        for (int64_t i = 1; i <= 4; ++i) {
          const auto g = (at::randn({n}, cuda) * (i == 3 ? 1e-6 : 1.0)).to(grad_dtype);  // step 3: tiny gradients
          auto gbuf = at::empty({n + offset}, cuda.dtype(grad_dtype)).narrow(0, offset, n);
          gbuf.copy_(g);
          const double coef = i % 2 == 0 ? 0.37 : 1.0, wd = i == 4 ? 0.0 : 0.1;
          optim::adamw_run(p, gbuf, m, v, optim::AdamWStep{1e-2, 0.9, 0.95, wd, 1e-8, i, coef});
          std::optional<at::Tensor> scale;
          if (coef != 1.0) scale = at::full({}, 1.0 / coef, cuda);
          compat::fused_adamw({rp}, {g.to(at::kFloat)}, {rm}, {rv}, {step}, 1e-2, 0.9, 0.95, wd, 1e-8, scale);
        }
        CHECK(at::equal(p, rp));
        CHECK(at::equal(m, rm));
        CHECK(at::equal(v, rv));
      }
    }
  }
}

TEST_CASE("CUDA: precision::FP8's float8 linear through _scaled_mm against its emulation, forward and backward") {
  if (!torch::cuda::is_available()) {
    MESSAGE("no CUDA device: skipped (scripts/gpu.sh fp8 runs it)");
    return;
  }
  const at::Device cuda(at::kCUDA);
  if (!compat::has_scaled_mm_rowwise(cuda)) {
    CHECK_THROWS_WITH_AS(model::fp8::matmul_on(cuda), doctest::Contains("--precision fp8 needs row-wise float8 matmuls"),
                         ConfigError);
    MESSAGE("no sm90+ GPU: the float8 path is refused, nothing more to compare");
    return;
  }
  REQUIRE((model::fp8::matmul_on(cuda) == model::fp8::Matmul::scaled_mm));
  using model::fp8::LinearFunction;
  // Llama3-8B's projection shapes at 4096 tokens, and a token count that is no multiple of 16 (padded for _scaled_mm)
  const std::vector<std::array<int64_t, 3>> shapes{{4096, 4096, 1024}, {4096, 14336, 4096}, {4096, 4096, 14336}, {37, 128, 384}};
  for (const auto& shape : shapes) {
    const int64_t M = shape[0], K = shape[1], N = shape[2];
    CAPTURE(M);
    CAPTURE(K);
    CAPTURE(N);
    at::manual_seed(3);
    auto x = at::randn({M, K}).to(at::kBFloat16);
    x[1].zero_();
    x[2][3] = 1e4;
    const auto w = (at::randn({N, K}) * 0.02).to(at::kBFloat16);
    const auto dy = at::randn({M, N}).to(at::kBFloat16);
    // the codes and scales on the GPU are the CPU's (the same ATen ops)
    const auto qc = model::fp8::quantize_rows(x), qg = model::fp8::quantize_rows(x.to(cuda));
    CHECK(at::equal(qc.codes.view(at::kByte), qg.codes.view(at::kByte).cpu()));
    CHECK(at::equal(qc.scale, qg.scale.cpu()));
    auto run = [&](model::fp8::Matmul how) {
      const auto xr = x.to(cuda).requires_grad_(), wr = w.to(cuda).requires_grad_();
      const auto y = LinearFunction::apply(xr, wr, static_cast<int64_t>(how));
      y.backward(dy.to(cuda));
      return std::tuple{y.detach().cpu(), xr.grad().cpu(), wr.grad().cpu()};
    };
    const auto [y_mm, dx_mm, dw_mm] = run(model::fp8::Matmul::scaled_mm);
    const auto [y_em, dx_em, dw_em] = run(model::fp8::Matmul::emulated);
    const double ey = test::rel_err(y_mm, y_em), edx = test::rel_err(dx_mm, dx_em);
    MESSAGE("_scaled_mm vs emulation: y rel err ", ey, " (fast accumulation), dx ", edx, "; vs bf16: y ",
            test::rel_err(y_mm, at::linear(x, w).to(at::kFloat)));
    // The forward uses the tensor cores' fast accumulation (torchao's default), whose FP8 partial sums keep fewer
    // bits than fp32: its error grows with K (measured on an H100: 1.1% at K = 14336, 0.5% at K = 4096, against one
    // bf16 rounding of the output, 0.4%). The input gradient accumulates in fp32, as the emulation does: one rounding.
    CHECK(ey < 2e-2);
    CHECK(edx < 1e-2);
    CHECK(at::equal(dw_mm, dw_em));  // the weight gradient is the same bf16 product on both paths
    CHECK(y_mm[1].abs().max().item<float>() == 0.0f);
    CHECK(y_mm.isfinite().all().item<bool>());
  }
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
  o.model().preset() = "llama3-debug";
  o.model().layers() = 2;
  o.seq_len() = 32;
  o.micro_batch() = 4;
  o.steps() = 3;
  o.optim().lr() = 1e-3;
  o.schedule().warmup_steps() = 0;
  o.data().builtin_text() = corpus;
  return o;
}
}  // namespace

TEST_CASE("gradient accumulation: the same global batch gives the same gradients, losses and weights") {
  const auto corpus = text_corpus();
  std::vector<std::vector<double>> losses;
  std::vector<std::vector<at::Tensor>> grads, weights;
  for (auto [micro, accum] : {std::pair{4, 1}, std::pair{2, 2}, std::pair{1, 4}}) {
    auto o = tiny(corpus);
    o.micro_batch() = micro, o.grad_accum() = accum, o.optim().grad_clip() = 0;
    train::Trainer<model::Llama3, Policies<>> t(o, train::open_dataset(o.data()));
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
  o.model().layers() = 3, o.optim().grad_clip() = 0;
  auto grads_of = [&]<class Checkpointing>(Checkpointing) {
    train::Trainer<model::Llama3, Policies<sharding::FullShard, Checkpointing>> t(o, train::open_dataset(o.data()));
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
  // Selective (fp32): the same ATen ops in backward (model/selective.hpp), a norm's input gradients added in another
  // order: fp32 rounding.
  const auto selective = grads_of(checkpointing::Selective{});
  REQUIRE(selective.size() == none.size());
  double worst = 0;
  for (size_t u = 0; u < none.size(); ++u) worst = std::max(worst, test::rel_err(selective[u], none[u]));
  MESSAGE("selective: max gradient rel err vs no checkpointing: ", worst);
  CHECK(worst <= 1e-6);
  CHECK(checkpointing::Selective::rules.name() == "selective");
  CHECK(checkpointing::EveryNth<2>::rules.name() == "every-2");
  CHECK(checkpointing::EveryNth<12>::rules.name() == "every-12");
}

TEST_CASE("Mixtral through the engine: gradients of CE + coef x aux equal plain autograd, kept or recomputed") {
  const auto corpus = text_corpus();
  auto o = tiny(corpus);
  o.model().preset() = "mixtral-debug", o.micro_batch() = 2, o.grad_accum() = 2, o.optim().grad_clip() = 0;
  const auto run = [&]<class Recipe>(Recipe) {
    train::Trainer<model::Mixtral, Recipe> t(o, train::open_dataset(o.data()));
    auto weights = t.full_weights();  // before the step
    const auto m = t.step();
    return std::tuple{std::move(weights), m, t.gradient_shards()};
  };
  const auto [weights, kept, grads] = run(Policies<sharding::NoShard>{});
  const auto [weights_ac, recomputed, grads_ac] = run(Policies<sharding::FullShard, checkpointing::EveryBlock>{});

  // The same step by plain autograd: each micro-batch's mean CE + coef x aux, averaged over the micro-batches.
  const auto c = train::resolve_config(o.model());
  model::Mixtral ref(c);
  {
    std::map<std::string, at::Tensor> by_name;
    for (auto& [name, t] : weights) by_name[name.rfind("model.", 0) == 0 ? name.substr(6) : name] = t;
    at::NoGradGuard no_grad;
    for (auto& item : ref->named_parameters()) item.value().copy_(by_name.at(item.key()));
  }
  auto dataset = train::open_dataset(o.data());
  data::Sampler sampler(dataset.size(), o.seq_len(), o.seed(), dataset.name());
  const auto reference = [&](bool with_router) {
    for (auto& p : ref->parameters()) p.mutable_grad() = at::Tensor();
    double loss = 0, aux = 0;
    for (int64_t a = 0; a < o.grad_accum(); ++a) {
      auto windows = at::empty({o.micro_batch(), o.seq_len() + 1}, at::kLong);
      for (int64_t b = 0; b < o.micro_batch(); ++b)
        windows[b].copy_(dataset.slice(sampler.window_start(a * o.micro_batch() + b), o.seq_len() + 1, c.vocab_size));
      std::vector<at::Tensor> stats;
      const auto logits = ref->forward(windows.narrow(1, 0, o.seq_len()), &stats);
      const auto router = model::router_loss(stats, c);
      const auto ce = model::ops::next_token_loss_sum(logits, windows.narrow(1, 1, o.seq_len())) /
                      static_cast<double>(o.micro_batch() * o.seq_len());
      const auto micro = (with_router ? ce + router.total : ce) / static_cast<double>(o.grad_accum());
      micro.backward();
      loss += micro.item<double>(), aux += router.aux.item<double>() / static_cast<double>(o.grad_accum());
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
    train::Trainer<model::Llama3, Policies<precision::MixedBF16>> t(o, train::open_dataset(o.data()));
    const auto m = t.step();
    CHECK(std::isfinite(m.loss));
    for (const auto& w : t.master_weights()) CHECK((w.scalar_type() == at::kFloat));
    for (const auto& p : t.model()->parameters()) CHECK((p.scalar_type() == at::kBFloat16));
    // the compute weights are the master weights rounded to bf16; on one rank with one micro-batch nothing is
    // reduced and nothing accumulates: the gradient shards keep autograd's bf16 (offload::Rules::grad_dtype)
    CHECK(at::equal(t.model()->parameters()[0], t.master_weights()[0].to(at::kBFloat16)));
    for (const auto& g : t.gradient_shards()) CHECK((g.scalar_type() == at::kBFloat16));
    // micro-batches accumulate in fp32
    auto accum = o;
    accum.grad_accum(2);
    train::Trainer<model::Llama3, Policies<precision::MixedBF16>> a(accum, train::open_dataset(accum.data()));
    CHECK(std::isfinite(a.step().loss));
    for (const auto& g : a.gradient_shards()) CHECK((g.scalar_type() == at::kFloat));
  }
  SUBCASE("PureBF16: bf16 everywhere") {
    train::Trainer<model::Llama3, Policies<precision::PureBF16>> t(o, train::open_dataset(o.data()));
    CHECK(std::isfinite(t.step().loss));
    for (const auto& w : t.master_weights()) CHECK((w.scalar_type() == at::kBFloat16));
    for (const auto& g : t.gradient_shards()) CHECK((g.scalar_type() == at::kBFloat16));
  }
}

TEST_CASE("offloaded on one rank: bf16 host gradients train exactly as fp32 device gradients") {
  const auto corpus = text_corpus();
  auto o = tiny(corpus);
  o.optim().grad_clip() = 0.5;  // clipping active: the norm summed on the device scales the upcast gradients
  using Mixed = Policies<sharding::FullShard, precision::MixedBF16>;
  using MixedOffload = Policies<sharding::FullShard, precision::MixedBF16, offload::Cpu>;
  train::Trainer<model::Llama3, Mixed> ref(o, train::open_dataset(o.data()));
  train::Trainer<model::Llama3, MixedOffload> off(o, train::open_dataset(o.data()));
  // Step 1 from the same weights: the same gradients (bf16 on the host, exactly the fp32 ones rounded from bf16)
  // and, through the host AdamW, master weights within fp32 rounding of the fused kernel's.
  auto a = ref.step(), b = off.step();
  CHECK(a.loss == b.loss);
  CHECK(std::abs(a.grad_norm - b.grad_norm) <= 1e-6 * a.grad_norm);
  for (const auto& g : off.gradient_shards()) CHECK((g.scalar_type() == at::kBFloat16));
  auto wa = ref.master_weights(), wb = off.master_weights();
  for (size_t i = 0; i < wa.size(); ++i) CHECK(test::rel_err(wb[i], wa[i]) < 1e-6);
  // Later steps: fp32 rounding differences flip the bf16 rounding of a few compute weights, so mixed-bf16's
  // tolerance (that of dist_policy_matrix).
  for (int s = 1; s < 4; ++s) {
    a = ref.step(), b = off.step();
    CHECK(std::abs(a.loss - b.loss) <= 1e-4 * a.loss);
  }
  wa = ref.master_weights(), wb = off.master_weights();
  for (size_t i = 0; i < wa.size(); ++i) CHECK(test::rel_err(wb[i], wa[i]) < 1e-3);
  // With accumulation the host sums in fp32.
  o.grad_accum() = 2;
  train::Trainer<model::Llama3, MixedOffload> accum(o, train::open_dataset(o.data()));
  accum.step();
  for (const auto& g : accum.gradient_shards()) CHECK((g.scalar_type() == at::kFloat));
}

TEST_CASE("the loss goes down, and the metrics JSONL carries every DESIGN.md key") {
  const auto corpus = text_corpus();
  const auto dir = test::temp_dir("run");
  auto o = tiny(corpus);
  o.steps() = 40;
  o.optim().lr() = 3e-3;
  o.schedule().warmup_steps() = 5;
  o.log().every() = 20;
  o.log().metrics() = (dir / "m.jsonl").string();
  CHECK(run_trainer<model::Llama3, Policies<sharding::NoShard, precision::FP32>>(o) == 0);
  std::ifstream in(o.log().metrics());
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
  CHECK(o.steps() == 7);
  CHECK(o.optim().lr() == 0.01);
  CHECK(o.seq_len() == TrainOptions{}.seq_len());
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

TEST_CASE("frozen unit: row-interleaved bytes sharded over 3 ranks, rows cut by shard boundaries, gathered back") {
  // A codec of 4 cols + 1 bytes per row (fp32 values and a marker byte), so that rows straddle the shards.
  engine::FrozenCodec codec{"test",
                            [](int64_t cols) { return 4 * cols + 1; },
                            [](const at::Tensor& rows) {
                              const auto values = rows.to(at::kFloat).contiguous().view(at::kByte);  // [n, 4 cols]
                              return at::cat({values, at::full({rows.size(0), 1}, 0x7f, values.options())}, 1);
                            },
                            [](const at::Tensor& bytes, int64_t cols, const at::Tensor& out) {
                              REQUIRE(bytes.select(1, 4 * cols).eq(0x7f).all().item<bool>());
                              const auto values = at::empty({bytes.size(0), 4 * cols}, bytes.options());
                              out.copy_(values.copy_(bytes.narrow(1, 0, 4 * cols)).view(at::kFloat));
                            }};
  const auto pick = [&](const std::string&, const at::Tensor&) { return codec; };
  at::manual_seed(4);
  const std::vector<at::Tensor> values = {at::randn({7, 5}), at::randn({3}), at::randn({2, 3, 4})};
  auto params = [&] {
    return engine::NamedTensors{{"a", values[0].clone()}, {"norm", values[1].clone()}, {"c", values[2].clone()}};
  };
  std::vector<at::Tensor> shards;
  for (int r = 0; r < 3; ++r) {
    engine::FrozenUnit unit("u", params(), 3, r, pick);
    CHECK(unit.padded_bytes() % 48 == 0);
    unit.store(unit.rows_from_params(), at::kCPU, at::kFloat, /*offload=*/false);
    shards.push_back(unit.shard());
  }
  auto own = params();
  engine::FrozenUnit whole("u", own, 1, 0, pick);
  whole.store(whole.rows_from_params(), at::kCPU, at::kFloat, false);
  const auto joined = at::cat(shards);
  CHECK(at::equal(joined.narrow(0, 0, whole.padded_bytes()), whole.shard()));  // the 3 shards are the one buffer
  for (const auto& [name, p] : own) CHECK_FALSE(p.requires_grad());
  dist::SelfCommunicator self;
  whole.allocate();
  whole.gather(self);
  for (size_t i = 0; i < values.size(); ++i) CHECK(at::equal(own[i].second, values[i]));
  whole.release();
  CHECK(own[0].second.storage().nbytes() == 0);  // released in place: the parameters are views of the values buffer
}

TEST_CASE("LoRA and DoRA runs: the base is frozen, only adapters train and are checkpointed; resume is exact") {
  const auto corpus = text_corpus();
  auto o = tiny(corpus);
  o.adapter().rank() = 4, o.adapter().targets() = "q,v,down";
  SUBCASE("LoRA: B starts at zero, the frozen base never changes") {
    train::Trainer<model::Llama3, Policies<sharding::FullShard, adapter::LoRA>> t(o, train::open_dataset(o.data()));
    const auto before = t.full_weights();
    CHECK(before.size() == 2 * 3 * 2);  // 2 layers x 3 targets x (A, B)
    std::vector<at::Tensor> base;
    for (size_t u = 0; u < t.engine().num_units(); ++u) base.push_back(t.engine().frozen(u).shard().clone());
    for (const auto& [name, w] : before)
      if (name.find("lora_B") != std::string::npos) CHECK(w.abs().max().item<double>() == 0);
    const auto m = t.step();
    CHECK(std::isfinite(m.loss));
    t.step();
    const auto after = t.full_weights();
    for (size_t i = 0; i < after.size(); ++i) CHECK_FALSE(at::equal(after[i].second, before[i].second));
    for (size_t u = 0; u < base.size(); ++u) CHECK(at::equal(t.engine().frozen(u).shard(), base[u]));
    CHECK(t.engine().unit(0).empty());  // the embedding has no adapter: nothing trains there
  }
  SUBCASE("DoRA: each magnitude starts at its base weight's row norms") {
    train::Trainer<model::Llama3, Policies<adapter::DoRA>> t(o, train::open_dataset(o.data()));
    auto& layer = *t.model()->layers[1]->attn->q_proj;  // NoShard: the parameters stay gathered
    int found = 0;
    for (const auto& [name, w] : t.full_weights())
      if (name == "model.layers.1.self_attn.q_proj.lora_magnitude_vector") {
        CHECK(test::rel_err(w, at::linalg_vector_norm(layer.weight.to(at::kFloat), 2, {1}, false)) < 1e-6);
        ++found;
      }
    CHECK(found == 1);
    CHECK(std::isfinite(t.step().loss));
  }
  SUBCASE("a checkpoint holds the adapters and their AdamW state only; resuming gives the same next step") {
    const auto dir = test::temp_dir("lora-ckpt");
    o.steps() = 3;
    train::Trainer<model::Llama3, Policies<sharding::FullShard, adapter::LoRA>> straight(o, train::open_dataset(o.data()));
    double third = 0;
    for (int s = 0; s < 3; ++s) third = straight.step().loss;
    auto first = o;
    first.checkpoint().dir() = dir.string();  // --steps 3 (the schedule's length), stopped after 2
    {
      train::Trainer<model::Llama3, Policies<sharding::FullShard, adapter::LoRA>> t(first, train::open_dataset(first.data()));
      t.step(), t.step();
      t.save_checkpoint(/*last=*/true);
    }
    int64_t saved = 0;
    for (const auto& e : fs::recursive_directory_iterator(dir))
      if (e.path().extension() == ".safetensors") {
        const io::SafetensorsFile file(e.path());
        for (const auto& info : file.tensors())
          if (info.name.find("master") != std::string::npos) saved += info.numel();
      }
    CHECK(saved == 2 * (4 * (128 + 128) + 4 * (128 + 64) + 4 * (384 + 128)));  // q, v, down adapters of 2 layers
    auto second = first;
    train::Trainer<model::Llama3, Policies<sharding::FullShard, adapter::LoRA>> resumed(second, train::open_dataset(second.data()));
    CHECK(resumed.steps_done() == 2);
    CHECK(resumed.step().loss == third);
    const auto a = resumed.full_weights(), b = straight.full_weights();
    for (size_t i = 0; i < a.size(); ++i) CHECK(at::equal(a[i].second, b[i].second));
    compat::remove_all(dir);
  }
}

namespace {
/// A LoRA run on the quantized base Q against the same run on a plain base (NoShard: the parameters stay gathered,
/// in place): the quantized run's projections hold dequantize(quantize(W)) of the plain run's W, everything else
/// is equal; with the plain run's projections set to those values, training gives the same losses and adapters.
template <class Model, class Q>
void check_quantized_base(const TrainOptions& o, int projections) {
  train::Trainer<Model, Policies<adapter::LoRA>> plain(o, train::open_dataset(o.data()));
  train::Trainer<Model, Policies<adapter::LoRA, Q>> quantized(o, train::open_dataset(o.data()));
  CHECK(quantized.recipe().quant.name == Q::name);
  auto mine = quantized.model()->named_parameters();
  int changed = 0;
  for (auto& item : plain.model()->named_parameters()) {
    at::NoGradGuard no_grad;
    auto& w = item.value();
    const auto& q = mine[item.key()];
    if (!train::quantizes(item.key(), w)) {
      CHECK_MESSAGE(at::equal(q, w), item.key());
      continue;
    }
    const int64_t cols = w.size(-1), rows = w.numel() / cols;  // a MoE's experts [E, out, in]: E x out rows
    const auto bytes = at::empty({rows * Q::row_bytes(cols)}, at::kByte);
    Q::quantize_rows(w.reshape({rows, cols}), bytes);
    const auto values = at::empty({rows, cols}, w.options().dtype(at::kBFloat16));
    Q::dequantize_rows(bytes, cols, values);
    CHECK_MESSAGE(at::equal(q, values.view(w.sizes()).to(w.scalar_type())), item.key());
    CHECK(test::rel_err(q, w) > 1e-3);  // quantized: not the plain values
    w.copy_(values.view(w.sizes()));
    ++changed;
  }
  CHECK(changed == projections);
  for (int s = 0; s < 3; ++s) CHECK(plain.step().loss == quantized.step().loss);
  const auto a = plain.full_weights(), b = quantized.full_weights();
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) CHECK(at::equal(a[i].second, b[i].second));
}
}  // namespace

TEST_CASE("--quant int4|fp8: the projections of the frozen base are quantized, training sees their dequantized values") {
  const auto corpus = text_corpus();
  auto o = tiny(corpus);
  o.adapter().rank() = 4, o.adapter().targets() = "q,v,down";
  SUBCASE("int4") { check_quantized_base<model::Llama3, quant::Int4>(o, 2 * 7); }  // every projection of 2 layers
  SUBCASE("fp8") { check_quantized_base<model::Llama3, quant::FP8>(o, 2 * 7); }
  SUBCASE("Mixtral on int4: the fused experts quantized as rows, the router plain; LoRA on q, v and the experts' down") {
    o.model().preset() = "mixtral-debug";
    check_quantized_base<model::Mixtral, quant::Int4>(o, 2 * 6);  // q, k, v, o, gate_up, down of 2 layers
  }
  SUBCASE("DoRA on int4 under FullShard on 1 rank: magnitudes are the row norms of the dequantized weights") {
    o.adapter().kind() = "dora", o.adapter().quant() = "int4";
    train::Trainer<model::Llama3, Policies<sharding::FullShard>> t(o, train::open_dataset(o.data()));
    CHECK(t.engine().frozen(1).shard().numel() < t.config().block_params());  // under a byte per value (fp32: 4)
    const auto w = t.full_weights();
    int found = 0;
    t.engine().with_gathered(1, [&] {
      const auto& q = *t.model()->layers[0]->attn->q_proj;
      for (const auto& [name, m] : w)
        if (name == "model.layers.0.self_attn.q_proj.lora_magnitude_vector") {
          CHECK(test::rel_err(m, at::linalg_vector_norm(q.weight, 2, {1}, false)) < 1e-6);
          ++found;
        }
    });
    CHECK(found == 1);
    CHECK(std::isfinite(t.step().loss));
  }
  SUBCASE("errors name the flag") {
    o.adapter().quant() = "int8";
    CHECK_THROWS_WITH_AS(o.validate(), doctest::Contains("--quant 'int8' is not a quantization policy"), ConfigError);
    o.adapter().quant() = "fp8";
    CHECK_THROWS_WITH_AS((train::Trainer<model::Llama3, Policies<>>(o, train::open_dataset(o.data()))),
                         doctest::Contains("--quant fp8 stores the frozen base quantized: it needs --adapter lora or dora"),
                         ConfigError);
    o.adapter().kind() = "lora";
    CHECK_THROWS_WITH_AS((train::Trainer<model::Llama3, Policies<adapter::LoRA, quant::Int4>>(o, train::open_dataset(o.data()))),
                         doctest::Contains("--quant fp8: the recipe's quantization policy is int4"), ConfigError);
    CHECK_THROWS_WITH_AS(train::frozen_codecs(quant::Int4::rules, at::kFloat)("layers.0.mlp.down_proj.weight", at::empty({8, 96})),
                         doctest::Contains("down_proj.weight has 96 columns; use --quant fp8 or none"), ConfigError);
    CHECK(train::frozen_codecs(quant::Int4::rules, at::kFloat)("layers.0.input_layernorm.weight", at::empty({96})).name == "none");
  }
}

namespace {
/// Writes `tokens` and `mask` as NAME.bin + NAME.mask (the files shardlm_tokenize writes).
fs::path write_shard(const fs::path& dir, const std::string& name, const std::vector<uint32_t>& tokens,
                     const std::vector<uint8_t>& mask) {
  data::ShardWriter w(dir / name, 0);
  w.write(tokens, mask);
  return w.finish().front();
}
/// The corpus's bytes as tokens, with a mask that leaves out runs of targets (as prompts would be).
std::pair<std::vector<uint32_t>, std::vector<uint8_t>> masked_corpus() {
  const auto text = text_corpus();
  std::vector<uint32_t> tokens(text.begin(), text.end());
  std::vector<uint8_t> mask(tokens.size());
  for (size_t i = 0; i < mask.size(); ++i) mask[i] = (i / 11) % 3 != 0;
  return {tokens, mask};
}
/// The mean next-token loss of the model on windows (start, T + 1) of `d`, over the targets the mask keeps,
/// computed by the single-device forward (reference for the trainer; NoShard keeps the full parameters in place).
template <class Model>
std::pair<double, int64_t> reference_loss(Model& model, const data::TokenDataset& d, const std::vector<int64_t>& starts,
                                          int64_t T) {
  at::NoGradGuard no_grad;
  double sum = 0;
  int64_t n = 0;
  for (const auto start : starts) {
    const auto ids = d.slice(start, T, 1 << 20).unsqueeze(0);
    const auto logp = at::log_softmax(model->forward(ids).to(at::kDouble), -1)[0];  // [T, V]
    for (int64_t t = 0; t < T; ++t) {
      if (d.mask() && !(*d.mask())[start + t + 1]) continue;
      sum -= logp[t][d[start + t + 1]].template item<double>();
      ++n;
    }
  }
  return {sum / n, n};
}
}  // namespace

TEST_CASE("packing: windows of T + 1 tokens at stride T over the document stream; targets carry the mask") {
  // Two documents ending with EOS (9), packed: windows cross the boundary, the last partial window is dropped.
  std::vector<uint32_t> tokens = {1, 2, 3, 9, 4, 5, 6, 7, 9, 8, 8};
  std::vector<uint8_t> mask = {0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1};
  const auto dir = test::temp_dir("packing");
  const auto d = data::TokenDataset::open(write_shard(dir, "docs", tokens, mask));
  REQUIRE(d.mask());
  data::Sampler s(d.size(), 4, 0);
  CHECK(s.num_windows() == 2);  // (11 - 1) / 4: tokens [0, 4] and [4, 8]; 8..10 make no full window
  std::set<int64_t> starts{s.window_start(0), s.window_start(1)};
  CHECK(starts == std::set<int64_t>{0, 4});
  int64_t n = 0;
  // window 1 = tokens [4, 8]: inputs 4 5 6 7, targets 5 6 7 9 with masks 0 1 1 1 (token 4 is only an input)
  CHECK(at::equal(d.slice(4, 4, 100), at::tensor({4, 5, 6, 7}, at::kLong)));
  CHECK(at::equal(d.targets(4, 4, 100, -100, &n), at::tensor({-100, 6, 7, 9}, at::kLong)));
  CHECK(n == 3);
  CHECK(d.counted_targets(4, 4) == 3);
  // window 0 crosses into the second document: targets 2 3 9 4 with masks 1 1 1 0
  CHECK(at::equal(d.targets(0, 4, 100, -100, &n), at::tensor({2, 3, 9, -100}, at::kLong)));
  CHECK(n == 3);
  // a range shares the mapping, mask included
  const auto r = d.range(4, 7, "tail");
  CHECK(r.size() == 7);
  CHECK(r[0] == 4);
  CHECK(at::equal(r.targets(0, 4, 100, -100, &n), at::tensor({-100, 6, 7, 9}, at::kLong)));
  // a mask entry that is not 0/1 is named when a window reads it
  std::vector<uint8_t> bad = mask;
  bad[6] = 7;
  const auto b = data::TokenDataset::open(write_shard(dir, "bad", tokens, bad));
  CHECK_THROWS_WITH_AS(b.targets(4, 4, 100, -100, &n), doctest::Contains("bad.mask: entry 6 is 7, not 0 or 1"), IoError);
  compat::remove_all(dir);
}

TEST_CASE("sampler: resuming at sample k gives the batches of the uninterrupted run") {
  data::Sampler run(1001, 10, 3);
  std::vector<int64_t> all;
  for (int64_t k = 0; k < 350; ++k) all.push_back(run.window_start(k));  // three and a half epochs
  for (int64_t resume_at : {0, 64, 99, 100, 257}) {
    data::Sampler resumed(1001, 10, 3);  // the state of a run is its sample index: step x global batch
    for (int64_t k = resume_at; k < 350; ++k) REQUIRE(resumed.window_start(k) == all[static_cast<size_t>(k)]);
  }
}

TEST_CASE("loss masks: the loss is the mean over kept targets of the global batch, at any accumulation split") {
  const auto dir = test::temp_dir("masked");
  const auto [tokens, mask] = masked_corpus();
  auto o = tiny("");
  o.data().path() = write_shard(dir, "corpus", tokens, mask).string();
  o.optim().grad_clip() = 0;
  std::vector<std::vector<double>> losses;
  std::vector<std::vector<at::Tensor>> weights, grads;
  for (auto [micro, accum] : {std::pair{4, 1}, std::pair{1, 4}}) {
    o.micro_batch() = micro, o.grad_accum() = accum;
    train::Trainer<model::Llama3, Policies<sharding::NoShard>> t(o, train::open_dataset(o.data()));
    REQUIRE(train::open_dataset(o.data()).mask());
    // The reference: the same 4 windows through the plain forward, kept targets only.
    data::Sampler sampler(static_cast<int64_t>(tokens.size()), o.seq_len(), o.seed());
    std::vector<int64_t> starts;
    int64_t kept = 0;
    for (int64_t k = 0; k < 4; ++k) starts.push_back(sampler.window_start(k));
    for (auto s : starts)
      for (int64_t i = 1; i <= o.seq_len(); ++i) kept += mask[static_cast<size_t>(s + i)];
    const auto [ref, n] = reference_loss(t.model(), train::open_dataset(o.data()), starts, o.seq_len());
    REQUIRE(n == kept);
    REQUIRE(kept < 4 * o.seq_len());  // the mask does leave targets out
    losses.emplace_back();
    const auto m = t.step();
    MESSAGE("split ", micro, "x", accum, ": loss ", m.loss, " (reference ", ref, "), ", m.loss_tokens, " of ", m.tokens,
            " targets in the loss");
    CHECK(m.loss_tokens == kept);
    CHECK(m.loss == doctest::Approx(ref).epsilon(1e-5));
    losses.back().push_back(m.loss);
    grads.push_back(t.gradient_shards());
    for (int s = 1; s < 3; ++s) losses.back().push_back(t.step().loss);
    weights.push_back(t.master_weights());
  }
  for (size_t s = 0; s < 3; ++s) CHECK(losses[1][s] == doctest::Approx(losses[0][s]).epsilon(1e-5));
  double worst = 0, worst_grad = 0;
  for (size_t i = 0; i < weights[0].size(); ++i) worst = std::max(worst, test::rel_err(weights[1][i], weights[0][i]));
  for (size_t i = 0; i < grads[0].size(); ++i) worst_grad = std::max(worst_grad, test::rel_err(grads[1][i], grads[0][i]));
  MESSAGE("4x1 vs 1x4: max gradient rel err ", worst_grad, ", max weight rel err after 3 steps ", worst);
  CHECK(worst_grad < 1e-5);
  CHECK(worst < 1e-3);  // Adam's sign-like steps show fp32 summation noise at the lr scale (see the test above)
  compat::remove_all(dir);
}

TEST_CASE("--loss-chunk: the fused head and loss trains as the plain loss on whole logits, masked targets included") {
  const auto dir = test::temp_dir("fused_loss");
  const auto [tokens, mask] = masked_corpus();
  auto o = tiny("");
  o.data().path() = write_shard(dir, "corpus", tokens, mask).string();
  o.optim().grad_clip() = 0;
  std::vector<std::vector<double>> losses;
  std::vector<std::vector<at::Tensor>> grads;
  for (int64_t chunk : {0, 1024, 37, 1}) {  // 0: the plain loss; 4 x 32 = 128 tokens: one chunk, 4 chunks, 128
    CAPTURE(chunk);
    o.model().loss_chunk() = chunk;
    train::Trainer<model::Llama3, Policies<>> t(o, train::open_dataset(o.data()));
    losses.emplace_back();
    for (int s = 0; s < 3; ++s) {
      losses.back().push_back(t.step().loss);
      if (s == 0) grads.push_back(t.gradient_shards());
    }
  }
  for (size_t r = 1; r < losses.size(); ++r) {
    for (size_t s = 0; s < 3; ++s) CHECK(losses[r][s] == doctest::Approx(losses[0][s]).epsilon(1e-6));
    double worst = 0;
    for (size_t i = 0; i < grads[0].size(); ++i) worst = std::max(worst, test::rel_err(grads[r][i], grads[0][i]));
    MESSAGE("chunking ", r, ": max gradient rel err vs the plain loss ", worst);
    CHECK(worst < 1e-5);
  }
  compat::remove_all(dir);
}

TEST_CASE("evaluation: the --eval-fraction split, the eval loss against the plain forward, eval_loss in the JSONL") {
  const auto dir = test::temp_dir("eval");
  const auto [tokens, mask] = masked_corpus();
  auto o = tiny("");
  o.data().path() = write_shard(dir, "corpus", tokens, mask).string();
  o.data().eval_fraction() = 0.25;
  const auto [train_data, eval_data] = train::open_datasets(o.data());
  REQUIRE(eval_data);
  const auto held = static_cast<int64_t>(tokens.size() * 0.25);
  CHECK(eval_data->size() == held);
  CHECK(train_data.size() == static_cast<int64_t>(tokens.size()) - held);
  CHECK((*eval_data)[0] == tokens[tokens.size() - held]);
  REQUIRE(eval_data->mask());
  {
    o.data().eval_samples() = 9;  // not a multiple of micro-batch x world: the last micro-batch is padded
    train::Trainer<model::Llama3, Policies<sharding::NoShard>> t(o, train_data);
    t.set_eval_data(*eval_data);
    t.step();
    std::vector<int64_t> starts;
    for (int64_t w = 0; w < 9; ++w) starts.push_back(w * o.seq_len());
    const auto [ref, n] = reference_loss(t.model(), *eval_data, starts, o.seq_len());
    const auto [loss, targets] = t.evaluate();
    MESSAGE("eval loss ", loss, " over ", targets, " targets (reference ", ref, " over ", n, ")");
    CHECK(targets == n);
    CHECK(loss == doctest::Approx(ref).epsilon(1e-5));
    CHECK(t.evaluate().first == loss);  // evaluation changes nothing
  }
  // run_trainer evaluates every --eval-every steps and at the end; rows carry eval_loss only then
  o.data().eval_samples() = 0;
  o.steps() = 5;
  o.data().eval_every() = 2;
  o.log().metrics() = (dir / "m.jsonl").string();
  o.log().tensorboard() = (dir / "tb").string();
  CHECK(run_trainer<model::Llama3, Policies<sharding::NoShard>>(o) == 0);
  std::ifstream in(o.log().metrics());
  std::vector<int64_t> evaluated;
  for (std::string line; std::getline(in, line);) {
    const auto row = nlohmann::json::parse(line);
    if (row.contains("eval_loss")) {
      evaluated.push_back(row["step"]);
      CHECK(std::isfinite(row["eval_loss"].get<double>()));
      CHECK(row["eval_tokens"].get<int64_t>() > 0);
    }
  }
  CHECK(evaluated == std::vector<int64_t>{2, 4, 5});
  // --eval-data: the whole training file, and another file (with its mask) for validation
  auto e = tiny("");
  e.data().path() = o.data().path();
  e.data().eval_data() = write_shard(dir, "valid", {1, 2, 3, 4, 5}, {0, 1, 1, 0, 1}).string();
  const auto [all, valid] = train::open_datasets(e.data());
  CHECK(all.size() == static_cast<int64_t>(tokens.size()));
  REQUIRE(valid);
  CHECK(valid->size() == 5);
  CHECK(valid->counted_targets(0, 4) == 3);  // targets 2 3 4 5: masks 1 1 0 1
  compat::remove_all(dir);
}

TEST_CASE("the training progress bar: steps, rate and ETA on a terminal, erased for log lines") {
  std::ostringstream out;
  Progress bar("training", 8, /*enabled=*/true, /*terminal=*/1, &out, Progress::Units::steps);
  bar.add(1);
  CHECK(out.str().find("shardlm: training [###...........................] 1 of 8 steps, ") != std::string::npos);
  CHECK(out.str().find(" steps/s, ETA ") != std::string::npos);
  out.str("");
  bar.clear();
  CHECK(out.str() == "\r\x1b[K");
  out.str("");
  bar.clear();  // nothing drawn: nothing to erase
  CHECK(out.str().empty());
  bar.add(1);  // drawn again at once after a clear
  CHECK(out.str().find("2 of 8 steps") != std::string::npos);
}

TEST_CASE("a progress report in units: a line per 10% in a log, then the count and the seconds") {
  std::ostringstream out;
  Progress report("initializing", 4, /*enabled=*/true, /*terminal=*/0, &out, Progress::Units::units);
  for (int i = 0; i < 4; ++i) report.add(1);
  report.finish();
  CHECK(out.str().find("shardlm: initializing: 50% (2 of 4 units, ") != std::string::npos);
  CHECK(out.str().find(" units/s, ETA ") != std::string::npos);
  CHECK(out.str().find("shardlm: initializing: 4 units in ") != std::string::npos);
  CHECK(out.str().find("GB") == std::string::npos);
}

namespace {
/// A reader of TensorBoard event files: checks each record's framing and both CRCs, and decodes the Event
/// fields it meets (wall_time, step, file_version, summary values) from the protocol-buffer wire format.
struct Event {
  double wall_time = 0;
  int64_t step = -1;
  std::string file_version;
  std::map<std::string, float> scalars;
};
uint64_t read_varint(std::string_view& s) {
  uint64_t v = 0;
  for (int shift = 0;; shift += 7) {
    REQUIRE(!s.empty());
    const auto b = static_cast<uint8_t>(s[0]);
    s.remove_prefix(1);
    v |= uint64_t(b & 0x7F) << shift;
    if (!(b & 0x80)) return v;
  }
}
template <class T>
T read_fixed(std::string_view& s) {
  REQUIRE(s.size() >= sizeof(T));
  T v;
  std::memcpy(&v, s.data(), sizeof(T));
  s.remove_prefix(sizeof(T));
  return v;
}
std::string_view read_bytes(std::string_view& s) {
  const auto n = read_varint(s);
  REQUIRE(s.size() >= n);
  const auto out = s.substr(0, n);
  s.remove_prefix(n);
  return out;
}
std::vector<Event> read_events(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::string_view s = all;
  std::vector<Event> events;
  while (!s.empty()) {
    REQUIRE(s.size() >= 12);
    const auto header = s.substr(0, 8);
    const auto length = read_fixed<uint64_t>(s);
    CHECK(read_fixed<uint32_t>(s) == train::tensorboard::masked_crc(header));
    REQUIRE(s.size() >= length + 4);
    std::string_view data = s.substr(0, length);
    s.remove_prefix(length);
    CHECK(read_fixed<uint32_t>(s) == train::tensorboard::masked_crc(data));
    Event e;
    while (!data.empty()) {
      const auto key = read_varint(data);
      switch (key) {
        case (1 << 3) | 1: e.wall_time = read_fixed<double>(data); break;
        case (2 << 3) | 0: e.step = static_cast<int64_t>(read_varint(data)); break;
        case (3 << 3) | 2: e.file_version = read_bytes(data); break;
        case (5 << 3) | 2: {
          auto summary = read_bytes(data);
          while (!summary.empty()) {
            REQUIRE(read_varint(summary) == ((1 << 3) | 2));
            auto value = read_bytes(summary);
            std::string tag;
            float v = NAN;
            while (!value.empty()) {
              const auto k = read_varint(value);
              if (k == ((1 << 3) | 2)) tag = read_bytes(value);
              else if (k == ((2 << 3) | 5)) v = read_fixed<float>(value);
              else FAIL("unexpected field in Summary.Value: ", k);
            }
            e.scalars[tag] = v;
          }
          break;
        }
        default: FAIL("unexpected field in Event: ", key);
      }
    }
    events.push_back(e);
  }
  return events;
}
}  // namespace

TEST_CASE("TensorBoard event files: CRC32C, record framing and the Event fields, read back") {
  // CRC32C check values (RFC 3720 B.4): 32 zero bytes, and "123456789"
  CHECK(train::tensorboard::crc32c(std::string(32, '\0')) == 0x8A9136AAu);
  CHECK(train::tensorboard::crc32c("123456789") == 0xE3069283u);
  const auto dir = test::temp_dir("tb");
  fs::path file;
  {
    train::tensorboard::Writer w(dir / "run");
    file = w.path();
    w.scalars(1, {{"train/loss", 5.5f}, {"train/lr", 1e-3f}});
    w.scalars(2, {{"train/loss", 4.25f}, {"eval/loss", 4.5f}});
  }
  CHECK(file.filename().string().starts_with("events.out.tfevents."));
  const auto events = read_events(file);
  REQUIRE(events.size() == 3);
  CHECK(events[0].file_version == "brain.Event:2");
  CHECK(events[0].wall_time > 1.7e9);
  CHECK(events[1].step == 1);
  CHECK(events[1].scalars == std::map<std::string, float>{{"train/loss", 5.5f}, {"train/lr", 1e-3f}});
  CHECK(events[2].step == 2);
  CHECK(events[2].scalars.at("eval/loss") == 4.5f);
  CHECK(events[2].wall_time >= events[1].wall_time);
  compat::remove_all(dir);
}

TEST_CASE("--config FILE.json: keys are flag names, the command line overrides them, bad keys and values are named") {
  const auto dir = test::temp_dir("config");
  const auto file = (dir / "run.json").string();
  std::ofstream(file) << R"({"steps": 12, "lr": 0.02, "data": "a.bin", "async-save": true, "checkpoint-dir": "ck"})";
  const std::string config = "--config=" + file;
  const char* args[] = {"prog", "--steps", "30", config.c_str()};
  const auto o = cli::parse(4, args);
  CHECK(o.steps() == 30);  // the command line wins, before or after --config
  CHECK(o.optim().lr() == 0.02);
  CHECK(o.data().path() == "a.bin");
  CHECK(o.checkpoint().async_save());
  CHECK(o.seq_len() == TrainOptions{}.seq_len());
  const auto error = [&](const std::string& json) {
    std::ofstream(file) << json;
    const char* a[] = {"prog", "--config", file.c_str()};
    try {
      cli::parse(3, a);
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(error(R"({"stepz": 3})") == "--config " + file + ": unknown key 'stepz' (keys are flag names without --; --help lists them)");
  CHECK(error(R"({"steps": "many", "data": "a.bin"})").starts_with("--config " + file + ": key 'steps': "));
  CHECK(error(R"({"steps": [1, 2]})") == "--config " + file + ": key 'steps': the value must be a string, number or boolean, got array");
  CHECK(error(R"([1])") == "--config " + file + ": must hold a JSON object of flags, got array");
  CHECK(error(R"({"steps": )").starts_with("--config " + file + ": malformed JSON"));
  CHECK(error(R"({"steps": -1, "data": "a.bin"})") == "--steps must be >= 0, got -1");
  const char* missing[] = {"prog", "--config", "no-such.json"};
  CHECK_THROWS_WITH_AS(cli::parse(3, missing), "--config no-such.json: cannot open: No such file or directory", IoError);
  const char* eval_alone[] = {"prog", "--data", "a.bin", "--eval-every", "5"};
  CHECK_THROWS_WITH_AS(cli::parse(5, eval_alone), doctest::Contains("--eval-every needs validation data"), ConfigError);
  const char* bad_value[] = {"prog", "--data", "a.bin", "--lr", "fast"};
  CHECK_THROWS_WITH_AS(cli::parse(5, bad_value), doctest::Contains("--lr fast: "), ConfigError);
  compat::remove_all(dir);
}

TEST_CASE("the planner replays the engine's schedule: the same gathers, releases, recomputes and reductions, every recipe") {
  auto config = model::preset("llama3-debug", 3);
  const auto env = dist::LaunchEnv::from_environment();
  dist::ProcessGroups groups(env, 1, at::Device(at::kCPU), std::chrono::seconds(60));
  const auto ids = at::randint(config.vocab_size, {2, 8}, at::kLong);  // [B, T]
  int recipes = 0;
  for (bool tied : {false, true})
    for (const auto* s : {"none", "grad-op", "full", "hybrid"})
      for (const auto* c : {"none", "every-block", "every-2", "selective"})
        for (const auto* off : {"none", "cpu"})
          for (const auto* p : {"fp32", "mixed-bf16", "pure-bf16"})
            for (int64_t accum : {1, 3}) {
              const auto sharding = sharding_named(s);
              if (!engine_serves(sharding, offload_named(off))) continue;
              const auto rules = recipe_named(s, p, c, off);
              config.tie_word_embeddings = tied;
              model::Llama3 m(config, at::TensorOptions().dtype(rules.precision.master));
              engine::UnitModelOf units(*m);
              engine::Trace trace;
              engine::Engine e(units, groups, at::Device(at::kCPU), rules,
                               engine::UnitInit([&](size_t u, engine::NamedTensors& params) {
                                 model::init_parameters(params, config.initializer_range, u + 1);
                               }),
                               engine::EngineOptions().micro_batches(accum).trace(&trace));
              e.begin_step();
              for (int64_t a = 0; a < accum; ++a)
                e.backward(model::ops::next_token_loss_sum(e.forward(ids), ids), a + 1 == accum);
              plan::PlanInput in;
              in.model = config, in.recipe = rules, in.grad_accum = accum, in.micro_batch = 2, in.seq_len = 8;
              const auto planned = plan::plan_memory(in).trace;
              std::string engine_side, planner_side;
              for (const auto& event : trace) engine_side += event.str() + ", ";
              for (const auto& event : planned) planner_side += event.str() + ", ";
              CAPTURE(rules.describe());
              CAPTURE(tied);
              CAPTURE(accum);
              CHECK(engine_side == planner_side);
              CHECK(trace.size() >= static_cast<size_t>(3 * (config.num_layers + 2)));  // forward, backward, reduce of each unit
              ++recipes;
            }
  CHECK(recipes == 2 * 28 * 3 * 2);  // 28 sharding x checkpointing x offload combinations the engine serves, 3 precisions
}

// ---- Hardening (docs/testing.md): checkpoint metadata and checksums, token files changed under a job, the host
// memory preflight, optimizer and time options. End-to-end runs of the same classes: tests/hardening.

namespace {
/// A valid format-2 meta.json: two units (6 elements, and 5 padded to 6) over a shard group of 2.
nlohmann::json valid_meta() {
  return {{"format", 2}, {"step", 4}, {"optimizer_steps", 3}, {"world_size", 4}, {"shard_group_size", 2},
          {"global_batch", 8},
          {"units", {{{"name", "embedding"}, {"numel", 6}, {"padded", 6}}, {{"name", "block 0"}, {"numel", 5}, {"padded", 6}}}},
          {"checksum", "crc32c"},
          {"checksums", {{"shard-0-of-2.safetensors", {"0123abcd", "89abcdef"}}, {"shard-1-of-2.safetensors", {"00000000", "ffffffff"}}}}};
}
std::string meta_error(const nlohmann::json& j) {
  try {
    train::CheckpointMeta::parse(j, "ck/meta.json");
  } catch (const IoError& e) {
    return e.what();
  }
  return "no error";
}
}  // namespace

TEST_CASE("checkpoint meta.json: every field checked, each error naming the file and the key") {
  const auto m = train::CheckpointMeta::parse(valid_meta(), "ck/meta.json");
  CHECK(m.step == 4);
  CHECK(m.saved_shard(1) == 3);
  CHECK(m.checksums[1][1] == 0xffffffffu);
  const auto with = [](const std::function<void(nlohmann::json&)>& change) {
    auto j = valid_meta();
    change(j);
    return meta_error(j);
  };
  const std::string f = "ck/meta.json: ";
  CHECK(with([](auto& j) { j["step"] = -1; }) == f + "field 'step' must be an integer in 0..1099511627776, got -1");
  CHECK(with([](auto& j) { j["step"] = 2.5; }) == f + "field 'step' must be an integer in 0..1099511627776, got 2.5");
  CHECK(with([](auto& j) { j["step"] = 4.0; }) == f + "field 'step' must be an integer in 0..1099511627776, got 4.0");
  CHECK(with([](auto& j) { j["step"] = "4"; }) == f + "field 'step' must be an integer in 0..1099511627776, got \"4\"");
  CHECK(with([](auto& j) { j["step"] = 18446744073709551615ull; }).starts_with(f + "field 'step' must be an integer"));
  CHECK(with([](auto& j) { j.erase("step"); }) == f + "missing field 'step'");
  CHECK(with([](auto& j) { j["optimizer_steps"] = 5; }) == f + "field 'optimizer_steps' must be an integer in 0..4, got 5");
  CHECK(with([](auto& j) { j["world_size"] = 0; }) == f + "field 'world_size' must be an integer in 1..1048576, got 0");
  CHECK(with([](auto& j) { j["shard_group_size"] = 5; }) == f + "field 'shard_group_size' must be an integer in 1..4, got 5");
  CHECK(with([](auto& j) { j["shard_group_size"] = 3; }) == f + "field 'shard_group_size' 3 does not divide field 'world_size' 4");
  CHECK(with([](auto& j) { j["units"] = 3; }) == f + "field 'units' must be a list, got 3");
  CHECK(with([](auto& j) { j["units"][1] = "block"; }) == f + "field 'units[1]' must be a JSON object, got \"block\"");
  CHECK(with([](auto& j) { j["units"][1]["numel"] = -5; }) == f + "field 'units[1].numel' must be an integer in 0..1099511627776, got -5");
  CHECK(with([](auto& j) { j["units"][1]["padded"] = 4; }) == f + "field 'units[1].padded' must be an integer in 5..1099511627776, got 4");
  CHECK(with([](auto& j) { j["units"][1]["padded"] = 7; }) ==
        f + "field 'units[1].padded' 7 is not the 5 elements padded to a multiple of the shard group size 2");
  CHECK(with([](auto& j) { j["units"][1]["padded"] = 8; }) ==
        f + "field 'units[1].padded' 8 is not the 5 elements padded to a multiple of the shard group size 2");
  CHECK(with([](auto& j) { j["format"] = 4; }) == f + "field 'format' must be an integer in 1..3, got 4");
  CHECK(with([](auto& j) { j["checksum"] = "md5"; }) == f + "field 'checksum' is 'md5', expected 'crc32c'");
  CHECK(with([](auto& j) { j["checksums"].erase("shard-1-of-2.safetensors"); }) ==
        f + "field 'checksums' lists 1 shard files, expected 2 (the shard group size)");
  CHECK(with([](auto& j) { j["checksums"]["shard-1-of-2.safetensors"].push_back("00000000"); }) ==
        f + "field 'checksums.shard-1-of-2.safetensors' holds 3 checksums, expected one per unit (2)");
  CHECK(with([](auto& j) { j["checksums"]["shard-0-of-2.safetensors"][1] = "89ABCDEF"; }) ==
        f + "field 'checksums.shard-0-of-2.safetensors[1]' is \"89ABCDEF\", expected a CRC32C of 8 hex digits");
  CHECK(with([](auto& j) { j["checksums"]["shard-0-of-2.safetensors"][1] = 12345; }) ==
        f + "field 'checksums.shard-0-of-2.safetensors[1]' is 12345, expected a CRC32C of 8 hex digits");
  CHECK(meta_error(nlohmann::json::array()) == f.substr(0, f.size() - 2) + ": the file must be a JSON object, got a list");
  // Format 1 (before checksums): no checksum keys, read without them.
  auto old = valid_meta();
  old["format"] = 1;
  old.erase("checksum"), old.erase("checksums");
  CHECK_FALSE(train::CheckpointMeta::parse(old, "ck/meta.json").has_checksums());
  // meta.json on disk: a directory, a file over the size limit, one nested too deep
  const auto dir = test::temp_dir("meta");
  fs::create_directories(dir / "meta.json");
  CHECK_THROWS_WITH_AS(train::CheckpointMeta::read(dir), ((dir / "meta.json").string() + ": is a directory, expected a JSON file").c_str(), IoError);
  fs::remove(dir / "meta.json");
  std::ofstream(dir / "meta.json") << std::string(100, '[') << std::string(100, ']');
  CHECK_THROWS_WITH_AS(train::CheckpointMeta::read(dir), doctest::Contains("meta.json: JSON nested more than 64 levels deep"), IoError);
  compat::remove_all(dir);
}

TEST_CASE("checkpoint meta.json with expert parallelism (format 3): the experts' files checked, parameters mapped by name") {
  // 4 ranks at --expert-parallel 2, each expert file set sharded over 2 ranks; unit 1 holds a dense parameter of 6
  // elements and two expert parameters of 4 x 2 and 4 x 3 elements (2 of 4 experts per file set)
  auto j = valid_meta();
  j["format"] = 3;
  j["units"][1] = {{"name", "block 0"}, {"numel", 6}, {"padded", 6}};
  const auto crcs = nlohmann::json::array({"00000000", "00000000"});
  j["experts"] = {{"expert_parallel", 2}, {"shard_group_size", 2},
                  {"units", {{{"numel", 0}, {"padded", 0}, {"params", nlohmann::json::array()}},
                             {{"numel", 10}, {"padded", 10}, {"params", {"w1", "w2"}}}}},
                  {"checksums", {{"experts-0-of-2.shard-0-of-2.safetensors", crcs},
                                 {"experts-0-of-2.shard-1-of-2.safetensors", crcs},
                                 {"experts-1-of-2.shard-0-of-2.safetensors", crcs},
                                 {"experts-1-of-2.shard-1-of-2.safetensors", crcs}}}};
  const auto m = train::CheckpointMeta::parse(j, "ck/meta.json");
  REQUIRE(m.has_experts());
  CHECK(m.experts.files() == 4);
  CHECK(m.experts.file_name(3) == "experts-1-of-2.shard-1-of-2.safetensors");
  CHECK(m.experts.saved_shard(1) == 5);
  // the model's order: w1 (every expert: 8 elements), the dense parameter, w2 (12)
  const std::vector<std::pair<std::string, int64_t>> params = {{"w1", 8}, {"norm", 6}, {"w2", 12}};
  const train::CheckpointLayout layout(m, 1, params, "ck", "block 0");
  std::vector<int64_t> runs;  // (set, element in its flat, count, element in the range) each
  const auto collect = [&](int64_t set, int64_t flat, int64_t n, int64_t at) { runs.insert(runs.end(), {set, flat, n, at}); };
  layout.map("w2", 3, 8, collect);  // elements 3..10 of w2: 3 in set 0 (after w1's 4), 5 in set 1
  CHECK(runs == std::vector<int64_t>{0, 7, 3, 0, 1, 4, 5, 3});
  runs.clear();
  layout.map("norm", 1, 4, collect);  // the dense flat
  CHECK(runs == std::vector<int64_t>{-1, 1, 4, 0});
  // the same unit in a checkpoint without expert parallelism: everything in the dense flat, in the model's order
  auto plain = valid_meta();
  plain["units"][1] = {{"name", "block 0"}, {"numel", 26}, {"padded", 26}};
  const auto flat = train::CheckpointMeta::parse(plain, "ck/meta.json");
  const train::CheckpointLayout whole(flat, 1, params, "ck", "block 0");
  runs.clear();
  whole.map("w2", 3, 8, collect);
  CHECK(runs == std::vector<int64_t>{-1, 17, 8, 0});
  CHECK_THROWS_WITH_AS(train::CheckpointLayout(flat, 1, {{"w1", 8}, {"w2", 12}}, "ck", "block 0"),
                       "ck: unit 1 (block 0) has 26 elements in the checkpoint and 20 in this model", IoError);
  CHECK_THROWS_WITH_AS(train::CheckpointLayout(m, 1, {{"w1", 8}, {"norm", 6}, {"w3", 12}}, "ck", "block 0"),
                       "ck: unit 1 (block 0) has 6 elements besides its experts in the checkpoint and 18 in this model",
                       IoError);
  CHECK_THROWS_WITH_AS(train::CheckpointLayout(m, 1, {{"w1", 8}, {"norm", 6}, {"w2", 13}}, "ck", "block 0"),
                       "ck: unit 1 (block 0): parameter 'w2' has 13 elements in this model, which its 2 expert file sets "
                       "cannot hold in equal parts", IoError);
  const auto with = [&](const std::function<void(nlohmann::json&)>& change) {
    auto k = j;
    change(k);
    return meta_error(k);
  };
  const std::string f = "ck/meta.json: ";
  CHECK(with([](auto& k) { k["experts"]["expert_parallel"] = 3; }) ==
        f + "field 'experts.expert_parallel' 3 does not divide field 'world_size' 4");
  CHECK(with([](auto& k) { k["experts"]["shard_group_size"] = 3; }) ==
        f + "field 'experts.shard_group_size' must be an integer in 1..2, got 3");
  CHECK(with([](auto& k) { k["experts"]["units"].erase(1); }) ==
        f + "field 'experts.units' lists 1 units, field 'units' 2");
  CHECK(with([](auto& k) { k["experts"]["units"][1]["padded"] = 12; }) ==
        f + "field 'experts.units[1].padded' 12 is not the 10 elements padded to a multiple of the experts' shard group size 2");
  CHECK(with([](auto& k) { k["experts"]["units"][1]["params"][0] = 7; }) ==
        f + "field 'experts.units[1].params[0]' is 7, expected a parameter's name");
  CHECK(with([](auto& k) { k["experts"]["units"][1]["params"][1] = "w1"; }) ==
        f + "field 'experts.units[1].params[1]' names 'w1' a second time");
  CHECK(with([](auto& k) { k["experts"]["units"][0]["params"] = {"w1"}; }) ==
        f + "field 'experts.units[0].params' lists 1 parameters for 0 elements");
  CHECK(with([](auto& k) { k["experts"]["checksums"].erase("experts-1-of-2.shard-1-of-2.safetensors"); }) ==
        f + "field 'experts.checksums' lists 3 expert files, expected 4 (expert_parallel x shard_group_size)");
  CHECK(with([](auto& k) { k["experts"]["checksums"]["experts-1-of-2.shard-0-of-2.safetensors"][0] = "x"; }) ==
        f + "field 'experts.checksums.experts-1-of-2.shard-0-of-2.safetensors[0]' is \"x\", expected a CRC32C of 8 hex digits");
}

TEST_CASE("CRC32C: the check values, the hardware and table paths agree, pieces combine") {
  CHECK(crc32c(std::string(32, '\0')) == 0x8A9136AAu);  // RFC 3720
  CHECK(crc32c(std::string(32, '\xff')) == 0x62A8AB43u);
  CHECK(crc32c("123456789") == 0xE3069283u);
  std::mt19937_64 rng(7);
  std::vector<unsigned char> buf(100000);
  for (auto& b : buf) b = static_cast<unsigned char>(rng());
  for (int i = 0; i < 200; ++i) {  // lengths across the three-stream blocks, any alignment
    const size_t off = rng() % 64, n = rng() % (buf.size() - 64), cut = n ? rng() % n : 0;
    const uint32_t whole = crc32c(buf.data() + off, n);
    CHECK(whole == ~shardlm::detail::crc32c_raw_table(~0u, buf.data() + off, n));
    CHECK(crc32c_combine(crc32c(buf.data() + off, cut), crc32c(buf.data() + off + cut, n - cut), n - cut) == whole);
    CHECK(crc32c_extend(crc32c(buf.data() + off, cut), buf.data() + off + cut, n - cut) == whole);
  }
  MESSAGE("CRC32C on this CPU: ", crc32c_hardware() ? "the SSE4.2 instruction" : "slice-by-8 tables");
}

TEST_CASE("checkpoint checksums: pieces read by different ranks combine into each file's CRC32C; a flipped bit is named") {
  // One unit of 1000 elements saved over 2 shard files of 500; the bytes of each file's covered elements (4 bytes
  // each) are read in pieces by 3 "ranks" cut at random places, each rank accumulating its own PieceCrc.
  std::mt19937_64 rng(11);
  train::CheckpointMeta meta;
  meta.format = 2, meta.world_size = meta.shard_group_size = 2;
  meta.units = {{"block 4", 999, 1000}};  // the last element is padding: not covered
  std::vector<std::vector<unsigned char>> files(2, std::vector<unsigned char>(500 * 4));
  for (auto& f : files)
    for (auto& b : f) b = static_cast<unsigned char>(rng());
  const uint64_t covered[2] = {500 * 4, 499 * 4};
  meta.checksums = {{crc32c(files[0].data(), covered[0])}, {crc32c(files[1].data(), covered[1])}};
  const auto combined = [&](const std::vector<std::vector<unsigned char>>& data) {
    std::vector<int32_t> sums(2 * 32);
    for (int trial = 0; trial < 3; ++trial) {
      std::vector<train::PieceCrc> ranks(3, train::PieceCrc(2));
      for (int64_t k = 0; k < 2; ++k)
        for (uint64_t at = 0; at < covered[k];) {  // pieces of random sizes, each given to a random rank
          const uint64_t n = std::min<uint64_t>(covered[k] - at, 1 + rng() % 300);
          ranks[rng() % 3].add(k, at, data[k].data() + at, n, covered[k]);
          at += n;
        }
      std::fill(sums.begin(), sums.end(), 0);
      for (const auto& r : ranks) {
        const auto c = r.counts();
        for (size_t i = 0; i < sums.size(); ++i) sums[i] += c[i];
      }
    }
    return sums;
  };
  CHECK_NOTHROW(train::PieceCrc::verify(combined(files), meta, 0, "block 4", "ck"));
  auto flipped = files;
  flipped[1][1234] ^= 0x04;
  CHECK_THROWS_WITH_AS(train::PieceCrc::verify(combined(flipped), meta, 0, "block 4", "ck"),
                       doctest::Contains("ck/shard-1-of-2.safetensors: unit 0 (block 4): its tensors fail their checksum: CRC32C "),
                       IoError);
  flipped = files;
  flipped[1][499 * 4 + 1] ^= 0x04;  // in the padding: never read, not covered
  CHECK_NOTHROW(train::PieceCrc::verify(combined(flipped), meta, 0, "block 4", "ck"));
}

TEST_CASE("token files are read by offset: a file or mask changed under a running job is an error naming it") {
  const auto dir = test::temp_dir("watched");
  std::vector<uint32_t> tokens(1000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint32_t>(i % 97);
  const auto write_tokens = [&](const fs::path& p) {
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(tokens.data()), 4000);
  };
  write_tokens(dir / "t.bin");
  std::ofstream(dir / "t.mask", std::ios::binary) << std::string(1000, '\1');
  const auto d = data::TokenDataset::open(dir / "t.bin");
  int64_t n = 0;
  CHECK(at::equal(d.slice(500, 3, 100), at::tensor({15, 16, 17}, at::kLong)));
  const auto name = (dir / "t.bin").string();
  fs::resize_file(dir / "t.bin", 40);  // truncated: a mapping would end the process with SIGBUS here
  CHECK_THROWS_WITH_AS(d.slice(500, 3, 100), (name + ": changed size while the job was reading it (4000 bytes when it was "
                                              "opened, 40 now): a file a job reads must not be rewritten until it ends").c_str(), IoError);
  write_tokens(dir / "t.bin");  // rewritten at the same size: the modification time tells
  const auto e = data::TokenDataset::open(dir / "t.bin");
  fs::last_write_time(dir / "t.bin", fs::last_write_time(dir / "t.bin") + std::chrono::seconds(5));
  CHECK_THROWS_WITH_AS(e.slice(0, 3, 100), doctest::Contains((name + ": was modified while the job was reading it (same size, 4000 bytes)").c_str()), IoError);
  write_tokens(dir / "t.bin");
  const auto m = data::TokenDataset::open(dir / "t.bin");
  CHECK(m.counted_targets(0, 8) == 8);
  fs::resize_file(dir / "t.mask", 10);
  CHECK_THROWS_WITH_AS(m.targets(0, 8, 100, -100, &n), doctest::Contains(((dir / "t.mask").string() + ": changed size while the job").c_str()), IoError);
  fs::create_directories(dir / "d.bin");
  CHECK_THROWS_WITH_AS(data::TokenDataset::open(dir / "d.bin"), doctest::Contains("d.bin: is a directory, expected a token file"), IoError);
  compat::remove_all(dir);
}

TEST_CASE("host memory preflight: the memory plan's bytes for a node against MemAvailable, naming both and the flag") {
  const auto dir = test::temp_dir("meminfo");
  std::ofstream(dir / "meminfo") << "MemTotal:       24683772 kB\nMemFree:        19781820 kB\nMemAvailable:   1048576 kB\n";
  CHECK(host_memory_available((dir / "meminfo").string()) == int64_t{1} << 30);
  std::ofstream(dir / "other") << "MemTotal: 5 kB\n";
  CHECK_FALSE(host_memory_available((dir / "other").string()).has_value());
  compat::remove_all(dir);
  plan::PlanInput in;
  in.model = model::preset("llama3-debug");
  in.recipe = recipe_named("full", "fp32", "none", "cpu", "none", "none");
  in.world_size = 4, in.gpus_per_node = 2, in.seq_len = 64;
  const auto p = plan::plan_memory(in);
  REQUIRE(p.host_total() > 0);
  CHECK(plan::host_bytes_needed(p, 2, false) == p.host_total());                    // GPUs: the offloaded state
  CHECK(plan::host_bytes_needed(p, 2, true) == p.host_total() + 2 * p.gpu_peak());  // CPU ranks: everything
  const double gib = 1024.0 * 1024 * 1024;
  CHECK_NOTHROW(plan::check_host_memory(3 * gib, 2, uint64_t{4} << 30));
  CHECK_THROWS_WITH_AS(plan::check_host_memory(3 * gib, 2, uint64_t{1} << 30),
                       "this node's 2 rank(s) need 3.00 GiB of host memory by the memory plan (1.50 GiB each; shardlm_plan "
                       "shows what for), but 1.00 GiB are available (MemAvailable in /proc/meminfo): use more nodes or a "
                       "smaller model, batch or --seq-len, or pass --skip-memory-check to start anyway",
                       ConfigError);
  const char* skip[] = {"prog", "--data", "a.bin", "--skip-memory-check"};
  CHECK(cli::parse(4, skip).dist().skip_memory_check());
}

TEST_CASE("optimizer hyperparameters are refused as torch.optim.AdamW refuses them; counts and times are bounded") {
  const auto error = [](std::vector<std::string> flags) {
    std::vector<const char*> argv = {"prog", "--data", "a.bin"};
    for (const auto& f : flags) argv.push_back(f.c_str());
    try {
      cli::parse(static_cast<int>(argv.size()), argv.data());
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(error({"--lr", "0"}) == "--lr must be positive and finite, got 0");
  CHECK(error({"--lr", "-1e-3"}) == "--lr must be positive and finite, got -0.001");
  CHECK(error({"--beta1", "1"}) == "--beta1 must lie in [0, 1), got 1");
  CHECK(error({"--beta1", "-0.1"}) == "--beta1 must lie in [0, 1), got -0.1");
  CHECK(error({"--beta2", "1.5"}) == "--beta2 must lie in [0, 1), got 1.5");
  CHECK(error({"--weight-decay", "-0.1"}) == "--weight-decay must be >= 0 and finite, got -0.1");
  CHECK(error({"--grad-clip", "-1"}) == "--grad-clip must be >= 0 and finite (0: off), got -1");
  CHECK(error({"--beta1", "0", "--beta2", "0", "--weight-decay", "0", "--grad-clip", "0"}) == "no error");  // the edges PyTorch takes
  CHECK_THROWS_WITH_AS(optim::AdamWOptions().eps(-1e-8).validate(), "AdamW eps must be >= 0 and finite, got -1e-08", ConfigError);
  CHECK_THROWS_WITH_AS(optim::AdamWOptions().eps(std::nan("")).validate(), doctest::Contains("AdamW eps must be >= 0 and finite"), ConfigError);
  CHECK(error({"--dist-timeout", "0"}) == "--dist-timeout must lie in [1, 86400] seconds, got 0");
  CHECK(error({"--dist-timeout", "86401"}) == "--dist-timeout must lie in [1, 86400] seconds, got 86401");
  CHECK(error({"--dist-timeout", "86400"}) == "no error");
  CHECK(error({"--seq-len", "8589934592"}) == "--seq-len must be at most 4294967296, got 8589934592");
  CHECK(error({"--micro-batch", "4294967296", "--grad-accum", "2"}) ==
        "--micro-batch 4294967296 x --grad-accum 2 samples per rank and step is over the limit of 4294967296");
  CHECK(error({"--seed", "-1"}).starts_with("--seed -1: "));  // a negative value names its flag
  // A day in the clocks the collectives are timed with: no overflow (a year, in nanoseconds, would be 3e16 of 9.2e18).
  const auto day = std::chrono::seconds(86400);
  CHECK(std::chrono::duration_cast<std::chrono::nanoseconds>(day).count() == 86400000000000LL);
  CHECK(std::chrono::steady_clock::now() + day > std::chrono::steady_clock::now());
}

TEST_CASE("offloaded host steps: overlapped and speculative give the sync step's losses and weights bit for bit") {
  const auto corpus = text_corpus();
  struct Run {
    std::vector<double> losses;
    std::vector<bool> redone;
    std::vector<at::Tensor> weights;
  };
  // 5 steps; step 3's backward is NaN (dropped: a speculative update is dropped too); `clip` decides whether the
  // speculative updates stand (a loose clip) or are redone with clipping (a tight one). After a clipped or dropped
  // step the next one does not speculate.
  const auto run = [&]<class Recipe>(Recipe, const char* mode, double clip, int64_t accum) {
    auto o = tiny(corpus);
    o.steps(5).grad_accum(accum).micro_batch(4 / accum);
    o.optim().grad_clip(clip);
    o.offload().step(mode);
    train::Faults faults;
    faults.nan_steps = {3};
    train::Trainer<model::Llama3, Recipe> t(o, train::open_dataset(o.data()), nullptr, faults);
    Run r;
    for (int s = 0; s < 5; ++s) {
      const auto m = t.step();
      r.losses.push_back(m.loss), r.redone.push_back(m.host_step_redone);
    }
    r.weights = t.master_weights();
    return r;
  };
  const auto check = [&]<class Recipe>(Recipe recipe, double clip, int64_t accum, std::vector<bool> redone) {
    CAPTURE(Recipe::rules().describe());
    CAPTURE(clip);
    CAPTURE(accum);
    const auto sync = run(recipe, "sync", clip, accum);
    for (const char* mode : {"overlapped", "speculative"}) {
      const std::string mode_name = mode;
      CAPTURE(mode_name);
      const auto other = run(recipe, mode, clip, accum);
      CHECK(other.losses == sync.losses);
      REQUIRE(other.weights.size() == sync.weights.size());
      for (size_t i = 0; i < sync.weights.size(); ++i) CHECK(at::equal(other.weights[i], sync.weights[i]));
      const bool speculative = std::string_view(mode) == "speculative";
      // A speculative step is redone when clipping applied and dropped with the NaN step; the other modes never.
      CHECK(other.redone == (speculative ? redone : std::vector<bool>(5, false)));
    }
  };
  using MixedOffload = Policies<sharding::FullShard, precision::MixedBF16, offload::Cpu>;
  using Fp32Offload = Policies<sharding::ShardGradOp, checkpointing::EveryBlock, offload::Cpu>;
  // No clipping: steps 1, 2 stand, 3 is dropped, 4 does not speculate, 5 stands.
  const std::vector<bool> loose{false, false, true, false, false};
  // Always clipping: step 1 is redone, and no later step speculates.
  const std::vector<bool> tight{true, false, false, false, false};
  check(MixedOffload{}, 1e9, 1, loose);
  check(MixedOffload{}, 1e-3, 1, tight);
  check(Fp32Offload{}, 1e9, 2, loose);  // accumulation: the norms taken on the host
  check(Fp32Offload{}, 1e-3, 2, tight);
}
