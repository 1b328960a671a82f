// Model tests: each op against a direct formula in fp64, presets, and parity with transformers on the
// golden fixtures (tests/golden/make_llama_fixtures.py; directory in SHARDLM_GOLDEN_DIR).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <shardlm/shardlm.hpp>

#include <cmath>
#include <numbers>

#include "../test_util.hpp"

using namespace shardlm;
using model::ops::Rope;
using test::rel_err;

TEST_CASE("rms_norm equals x / sqrt(mean(x^2) + eps) * w") {
  at::manual_seed(1);
  const auto x = at::randn({2, 3, 8}, at::kDouble), w = at::randn({8}, at::kDouble);
  const auto ref = x / at::sqrt(x.pow(2).mean(-1, true) + 1e-5) * w;
  CHECK(rel_err(model::ops::rms_norm(x.to(at::kFloat), w.to(at::kFloat), 1e-5), ref) < 1e-6);
}

TEST_CASE("rope inverse frequencies") {
  const int64_t D = 16;
  model::RopeConfig rope;
  rope.theta = 500000.0;
  auto direct = [&](int64_t i) { return 1.0 / std::pow(rope.theta, 2.0 * i / D); };
  SUBCASE("default: theta^(-2i/D)") {
    const auto f = model::ops::rope_inv_freq(rope, D);
    for (int64_t i = 0; i < D / 2; ++i) CHECK(f[i].item<double>() == doctest::Approx(direct(i)).epsilon(1e-6));
  }
  SUBCASE("linear: divided by the factor") {
    rope.type = "linear", rope.factor = 4;
    const auto f = model::ops::rope_inv_freq(rope, D);
    for (int64_t i = 0; i < D / 2; ++i) CHECK(f[i].item<double>() == doctest::Approx(direct(i) / 4).epsilon(1e-6));
  }
  SUBCASE("llama3: high frequencies kept, low divided by factor, smooth in between") {
    rope.type = "llama3", rope.factor = 8, rope.low_freq_factor = 1, rope.high_freq_factor = 4;
    rope.original_max_position_embeddings = 64;
    const auto f = model::ops::rope_inv_freq(rope, D);
    int kept = 0, divided = 0, blended = 0;
    for (int64_t i = 0; i < D / 2; ++i) {
      const double inv = direct(i), wavelen = 2 * std::numbers::pi / inv;
      const double low_wavelen = 64.0 / 1, high_wavelen = 64.0 / 4;
      double expect;
      if (wavelen < high_wavelen) {
        expect = inv, ++kept;
      } else if (wavelen > low_wavelen) {
        expect = inv / 8, ++divided;
      } else {
        const double smooth = (64.0 / wavelen - 1) / (4 - 1);
        expect = (1 - smooth) * inv / 8 + smooth * inv, ++blended;
      }
      CHECK(f[i].item<double>() == doctest::Approx(expect).epsilon(1e-5));
    }
    CHECK(kept > 0);  // the test covers all three bands
    CHECK(divided > 0);
    CHECK(blended > 0);
  }
}

TEST_CASE("apply_rope rotates each pair (i, i + D/2) by position x frequency") {
  at::manual_seed(2);
  const int64_t T = 5, D = 8;
  const auto inv = at::rand({D / 2}, at::kFloat);
  const auto r = model::ops::rope_tables(inv, T, at::kFloat);
  const auto x = at::randn({1, 2, T, D});
  const auto y = model::ops::apply_rope(x, r);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < D / 2; ++i) {
      const double a = t * inv[i].item<double>(), x1 = x[0][1][t][i].item<double>(), x2 = x[0][1][t][i + D / 2].item<double>();
      CHECK(y[0][1][t][i].item<double>() == doctest::Approx(x1 * std::cos(a) - x2 * std::sin(a)).epsilon(1e-5));
      CHECK(y[0][1][t][i + D / 2].item<double>() == doctest::Approx(x2 * std::cos(a) + x1 * std::sin(a)).epsilon(1e-5));
    }
}

TEST_CASE("attention equals softmax(q k^T / sqrt(D) + causal mask) v with shared KV heads") {
  at::manual_seed(3);
  const int64_t B = 2, T = 6, C = 16, H = 4, Hkv = 2, D = 8;
  auto w = [&](int64_t out, int64_t in) { return at::randn({out, in}, at::kDouble) * 0.3; };
  const auto x = at::randn({B, T, C}, at::kDouble), wq = w(H * D, C), wk = w(Hkv * D, C), wv = w(Hkv * D, C), wo = w(C, H * D);
  const auto rope = model::ops::rope_tables(at::rand({D / 2}, at::kDouble), T, at::kDouble);
  const auto got = model::ops::attention(x, wq, wk, wv, wo, rope, H, Hkv, D);
  // Reference: explicit scores, heads repeated.
  auto q = model::ops::apply_rope(at::matmul(x, wq.t()).view({B, T, H, D}).transpose(1, 2), rope);
  auto k = model::ops::apply_rope(at::matmul(x, wk.t()).view({B, T, Hkv, D}).transpose(1, 2), rope);
  auto v = at::matmul(x, wv.t()).view({B, T, Hkv, D}).transpose(1, 2);
  k = k.repeat_interleave(H / Hkv, 1), v = v.repeat_interleave(H / Hkv, 1);
  auto scores = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(D));
  scores = scores.masked_fill(at::ones({T, T}, at::kBool).triu(1), -INFINITY);
  const auto ref = at::matmul(at::matmul(scores.softmax(-1), v).transpose(1, 2).reshape({B, T, H * D}), wo.t());
  CHECK(rel_err(got, ref) < 1e-10);
}

TEST_CASE("swiglu equals down(silu(gate x) * up x)") {
  at::manual_seed(4);
  const auto x = at::randn({3, 8}, at::kDouble), g = at::randn({12, 8}, at::kDouble), u = at::randn({12, 8}, at::kDouble),
             d = at::randn({8, 12}, at::kDouble);
  const auto gx = at::matmul(x, g.t());
  const auto ref = at::matmul(gx / (1 + at::exp(-gx)) * at::matmul(x, u.t()), d.t());
  CHECK(rel_err(model::ops::swiglu(x, g, u, d), ref) < 1e-12);
}

TEST_CASE("next_token_loss is the mean of -log softmax at the next token") {
  at::manual_seed(5);
  const auto logits = at::randn({2, 4, 7}, at::kDouble);
  const auto ids = at::randint(7, {2, 4}, at::kLong);
  double total = 0;
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t + 1 < 4; ++t) total -= logits[b][t].log_softmax(-1)[ids[b][t + 1].item<int64_t>()].item<double>();
  CHECK(model::ops::next_token_loss(logits, ids).item<double>() == doctest::Approx(total / 6).epsilon(1e-6));
}

TEST_CASE("presets: parameter counts, and a 405B model built on the meta device allocates nothing") {
  CHECK(model::preset("llama3-8b").num_params() == 8030261248);
  CHECK(model::preset("llama3-70b").num_params() == 70553706496);
  const auto c = model::preset("llama3-405b");
  CHECK(c.num_params() == 405853388800);
  model::Llama3 m(c, at::TensorOptions().device(at::kMeta));
  int64_t n = 0;
  for (const auto& p : m->parameters()) n += p.numel();
  CHECK(n == c.num_params());
  CHECK(model::preset("llama3-8b", 4).num_layers == 4);
  CHECK_THROWS_WITH_AS(model::preset("llama3-9b"), doctest::Contains("unknown preset 'llama3-9b'"), ConfigError);
}

TEST_CASE("tied embeddings: no lm_head parameter, logits use the embedding") {
  auto c = model::preset("llama3-debug", 1);
  c.tie_word_embeddings = true;
  model::Llama3 m(c);
  model::init_weights(*m, 0.02, 0);
  for (const auto& item : m->named_parameters()) CHECK(item.key().find("lm_head") == std::string::npos);
  const auto x = at::randn({1, 3, c.hidden_size});
  CHECK(rel_err(m->head(x), at::linear(m->norm->forward(x), m->embed_tokens->weight)) == 0);
}

// --- parity with transformers -------------------------------------------------------------------------

namespace {
std::vector<std::filesystem::path> golden_dirs() {
  const char* root = std::getenv("SHARDLM_GOLDEN_DIR");
  std::vector<std::filesystem::path> dirs;
  if (!root) return dirs;
  for (const auto& e : std::filesystem::directory_iterator(root))
    if (std::filesystem::exists(e.path() / "reference.safetensors")) dirs.push_back(e.path());
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}
}  // namespace

TEST_CASE("parity with transformers in fp32: logits, loss, gradients") {
  const auto dirs = golden_dirs();
  if (dirs.empty()) {
    MESSAGE("SHARDLM_GOLDEN_DIR is unset or empty: run tests/golden/make_llama_fixtures.py (CTest does)");
    REQUIRE(std::getenv("SHARDLM_GOLDEN_DIR") == nullptr);  // set but empty is a failure
    return;
  }
  CHECK(dirs.size() >= 4);
  for (const auto& dir : dirs) {
    CAPTURE(dir.filename().string());
    auto m = io::load_hf_model<model::Llama3>(dir, at::kCPU, at::kFloat);
    io::SafetensorsFile ref(dir / "reference.safetensors");
    const auto ids = io::SafetensorsFile(dir / "input.safetensors").read("input_ids");
    const auto logits = m->forward(ids);
    const auto loss = model::ops::next_token_loss(logits, ids);
    const double e_logits = rel_err(logits, ref.read("logits"));
    const double e_loss = std::abs(loss.item<double>() - ref.read("loss").item<double>());
    loss.backward();
    double e_grad = 0;
    int64_t grads = 0;
    for (const auto& item : m->named_parameters()) {
      const auto name = "grad." + io::hf_name(item.key());
      REQUIRE_MESSAGE(ref.find(name), "reference has no ", name);
      e_grad = std::max(e_grad, rel_err(item.value().grad(), ref.read(name)));
      ++grads;
    }
    MESSAGE(dir.filename().string(), ": logits rel err ", e_logits, ", loss err ", e_loss, ", max grad rel err ", e_grad,
            " over ", grads, " tensors");
    CHECK(e_logits < 1e-4);
    CHECK(e_loss < 1e-5);
    CHECK(e_grad < 1e-4);
    CHECK(grads == static_cast<int64_t>(ref.tensors().size()) - 2);  // every parameter's gradient is compared
  }
}

// --- LoRA and DoRA: parity with PEFT (tests/golden/make_peft_fixtures.py; directory in SHARDLM_PEFT_GOLDEN_DIR) ---

TEST_CASE("adapters: LoRA adds s B A x; rsLoRA scales by alpha / sqrt(r); DoRA at m = ||W + s B A|| equals LoRA") {
  auto c = model::preset("llama3-debug", 1);
  model::AdapterConfig a;
  a.kind = "lora", a.rank = 4, a.alpha = 8, a.targets = {"q"};
  CHECK(a.scale() == 2.0);
  a.rslora = true;
  CHECK(a.scale() == doctest::Approx(4.0));
  at::manual_seed(3);
  model::Linear plain(16, 8, true, at::TensorOptions()), lora(16, 8, true, at::TensorOptions()),
      dora(16, 8, true, at::TensorOptions());
  plain->weight.set_data(at::randn({8, 16})), plain->bias.set_data(at::randn({8}));
  for (auto* l : {&lora, &dora}) {
    (*l)->add_adapter(4, 0.5, 0.0, l == &dora);
    (*l)->weight.set_data(plain->weight.detach().clone()), (*l)->bias.set_data(plain->bias.detach().clone());
    (*l)->lora_A->weight.set_data(at::randn({4, 16})), (*l)->lora_B->weight.set_data(at::randn({8, 4}));
  }
  dora->lora_A->weight.set_data(lora->lora_A->weight.detach().clone());
  dora->lora_B->weight.set_data(lora->lora_B->weight.detach().clone());
  const auto merged = plain->weight + 0.5 * at::matmul(lora->lora_B->weight, lora->lora_A->weight);  // [8, 16]
  dora->lora_magnitude_vector.set_data(at::linalg_vector_norm(merged, 2, {1}, false).detach());
  const auto x = at::randn({2, 3, 16});
  const auto want = at::linear(x, merged, plain->bias);
  CHECK(rel_err(lora->forward(x), want) < 1e-6);
  CHECK(rel_err(dora->forward(x), want) < 1e-6);
  a.targets = {"gate", "nope"};
  CHECK_THROWS_WITH_AS(model::Llama3(c)->add_adapters(a), doctest::Contains("'nope' is not a target"), ConfigError);
}

TEST_CASE("parity with PEFT in fp32: LoRA and DoRA logits, loss and adapter gradients") {
  const char* root = std::getenv("SHARDLM_PEFT_GOLDEN_DIR");
  if (!root) {
    MESSAGE("SHARDLM_PEFT_GOLDEN_DIR is unset: run tests/golden/make_peft_fixtures.py (CTest does)");
    return;
  }
  int variants = 0;
  for (const auto& e : std::filesystem::directory_iterator(root)) {
    const auto dir = e.path();
    if (!std::filesystem::exists(dir / "reference.safetensors")) continue;
    CAPTURE(dir.filename().string());
    ++variants;
    auto m = io::load_hf_model<model::Llama3>(dir / "base", at::kCPU, at::kFloat);
    const auto adapter = io::read_peft_adapter(dir / "adapter");
    m->add_adapters(adapter.config);
    io::load_adapter_weights(*m, adapter, (dir / "adapter").string());
    for (auto& item : m->named_parameters())
      if (!model::is_adapter_parameter(item.key())) item.value().requires_grad_(false);  // the frozen base
    io::SafetensorsFile ref(dir / "reference.safetensors");
    const auto ids = io::SafetensorsFile(dir / "input.safetensors").read("input_ids");
    const auto logits = m->forward(ids);
    const auto loss = model::ops::next_token_loss(logits, ids);
    const double e_logits = rel_err(logits, ref.read("logits"));
    const double e_loss = std::abs(loss.item<double>() - ref.read("loss").item<double>()) / ref.read("loss").item<double>();
    loss.backward();
    double e_grad = 0;
    int64_t grads = 0;
    for (const auto& item : m->named_parameters()) {
      if (!model::is_adapter_parameter(item.key())) {
        CHECK_FALSE(item.value().grad().defined());
        continue;
      }
      const auto name = "grad." + io::peft_key(item.key());
      REQUIRE_MESSAGE(ref.find(name), "reference has no ", name);
      e_grad = std::max(e_grad, rel_err(item.value().grad(), ref.read(name)));
      ++grads;
    }
    MESSAGE(dir.filename().string(), ": logits rel err ", e_logits, ", loss rel err ", e_loss, ", max adapter grad rel err ",
            e_grad, " over ", grads, " tensors");
    CHECK(e_logits < 1e-4);
    CHECK(e_loss < 1e-4);
    CHECK(e_grad < 1e-4);
    CHECK(grads == static_cast<int64_t>(ref.tensors().size()) - 2);
  }
  CHECK(variants >= 3);
}
