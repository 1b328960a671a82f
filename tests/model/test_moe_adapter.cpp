// Adapters on Mixtral (model/moe.hpp, io/peft.hpp): per-expert LoRA through each expert kernel against the merged
// weights, and parity with PEFT 0.21 (tests/golden/make_peft_mixtral_fixtures.py; directory in
// SHARDLM_PEFT_GOLDEN_DIR/mixtral): logits, loss, adapter gradients, the adapter after AdamW steps, saved keys.
#include <doctest/doctest.h>

#include <shardlm/shardlm.hpp>

#include <filesystem>
#include <set>

#include "../test_util.hpp"

using namespace shardlm;
using test::rel_err;

TEST_CASE("expert LoRA: every kernel adds s (x A_e^T) B_e^T to expert e's rows, as the merged weights W_e + s B_e A_e") {
  const int64_t N = 11, C = 16, I = 12, E = 4, k = 2, r = 3;
  const double s = 0.7;
  at::manual_seed(5);
  const auto x = at::randn({N, C}).requires_grad_(true);
  const auto gate_up = 0.3 * at::randn({E, 2 * I, C}), down = 0.3 * at::randn({E, C, I});   // frozen
  const auto logits = at::randn({N, E});
  model::ops::ExpertLoraFactors f;
  f.gate_up_A = (0.3 * at::randn({E, r, C})).requires_grad_(true), f.gate_up_B = (0.3 * at::randn({E, 2 * I, r})).requires_grad_(true);
  f.down_A = (0.3 * at::randn({E, r, I})).requires_grad_(true), f.down_B = (0.3 * at::randn({E, C, r})).requires_grad_(true);
  f.scale = s;
  const auto g = at::randn({N, C});
  const std::vector<at::Tensor> trained{x, f.gate_up_A, f.gate_up_B, f.down_A, f.down_B};
  const auto grads = [&](const at::Tensor& y) { return torch::autograd::grad({y}, trained, {g}); };
  // the reference: the merged weights through the loop kernel
  const auto route = model::ops::route_logits(logits, k);
  const auto merged = model::ops::moe_experts(x, gate_up + s * at::matmul(f.gate_up_B, f.gate_up_A),
                                              down + s * at::matmul(f.down_B, f.down_A), route, model::ExpertKernel::loop);
  const auto ref_g = grads(merged);
  for (const auto kernel : {model::ExpertKernel::loop, model::ExpertKernel::padded}) {
    CAPTURE(static_cast<int>(kernel));
    const auto y = model::ops::moe_experts(x, gate_up, down, route, kernel, &f);
    CHECK(rel_err(y, merged) < 1e-5);
    const auto got = grads(y);
    for (size_t i = 0; i < got.size(); ++i) {
      CAPTURE(i);
      CHECK(rel_err(got[i], ref_g[i]) < 1e-5);
    }
  }
  // only one projection adapted: the other's factors stay undefined
  model::ops::ExpertLoraFactors only_down;
  only_down.down_A = f.down_A, only_down.down_B = f.down_B, only_down.scale = s;
  const auto y = model::ops::moe_experts(x, gate_up, down, route, model::ExpertKernel::loop, &only_down);
  const auto ref = model::ops::moe_experts(x, gate_up, down + s * at::matmul(f.down_B, f.down_A), route,
                                           model::ExpertKernel::loop);
  CHECK(rel_err(y, ref) < 1e-5);
}

TEST_CASE("adapter targets on Mixtral: all = q,k,v,o,gate_up,down; Llama's MLP names, DoRA and dropout on the experts refused") {
  const auto moe = model::preset("mixtral-debug", 1), llama = model::preset("llama3-debug", 1);
  model::AdapterConfig a;
  a.kind = adapter::LoRA::rules;
  CHECK(a.resolved(moe).target_list() == "q,k,v,o,gate_up,down");
  CHECK(a.resolved(llama).target_list() == "q,k,v,o,gate,up,down");
  a.targets = {"q", "router", "down"};
  const auto r = a.resolved(moe);
  CHECK(r.target_modules() == std::vector<std::string>{"q_proj"});
  CHECK(r.target_parameters() == std::vector<std::string>{"gate.weight", "experts.down_proj"});
  a.targets = {"q", "gate"};
  CHECK_THROWS_WITH_AS(a.resolved(moe), doctest::Contains("has no gate_proj: its experts' projections are gate_up and down"),
                       ConfigError);
  a.targets = {"router"};
  CHECK_THROWS_WITH_AS(a.resolved(llama), doctest::Contains("'router' names a mixture of experts' router"), ConfigError);
  a.targets = {"all"};
  a.kind = adapter::DoRA::rules;
  CHECK_THROWS_WITH_AS(a.resolved(moe), doctest::Contains("DoRA on a mixture of experts' experts or router is not supported"),
                       ConfigError);
  a.targets = {"q", "k", "v", "o"};
  CHECK(a.resolved(moe).target_list() == "q,k,v,o");  // DoRA on the attention of a MoE
  a.kind = adapter::LoRA::rules, a.targets = {"router"}, a.dropout = 0.1;
  CHECK_THROWS_WITH_AS(a.resolved(moe), doctest::Contains("--lora-dropout 0.1: the adapters of a mixture of experts'"),
                       ConfigError);
  // the model's parameters: per-expert factors beside the fused weights, a Linear's adapter on the router
  a.dropout = 0, a.rank = 2, a.targets = {"gate_up", "router"};
  model::Mixtral m(moe);
  m->add_adapters(a);
  std::set<std::string> adapters;
  for (const auto& item : m->named_parameters())
    if (model::is_adapter_parameter(item.key())) adapters.insert(item.key() + " " + c10::str(item.value().sizes()));
  const std::set<std::string> expected{"layers.0.mlp.gate.lora_A.weight [2, 128]", "layers.0.mlp.gate.lora_B.weight [4, 2]",
                                       "layers.0.mlp.experts.gate_up_proj_lora.lora_A.weight [4, 2, 128]",
                                       "layers.0.mlp.experts.gate_up_proj_lora.lora_B.weight [4, 512, 2]"};
  CHECK(adapters == expected);
}

TEST_CASE("Mixtral adapters: parity with PEFT in fp32 (attention, experts, router; DoRA on attention): logits, loss, "
          "gradients, AdamW steps, saved adapter") {
  const char* root = std::getenv("SHARDLM_PEFT_GOLDEN_DIR");
  if (!root) {
    MESSAGE("SHARDLM_PEFT_GOLDEN_DIR is unset: run tests/golden/make_peft_mixtral_fixtures.py (CTest does)");
    return;
  }
  int variants = 0;
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::path(root) / "mixtral")) {
    const auto dir = e.path();
    if (!std::filesystem::exists(dir / "reference.safetensors")) continue;
    CAPTURE(dir.filename().string());
    ++variants;
    auto m = io::load_hf_model<model::Mixtral>(dir / "base", at::kCPU, at::kFloat);
    const auto adapter = io::read_peft_adapter(dir / "adapter");
    m->add_adapters(adapter.config);
    io::load_adapter_weights(*m, adapter, (dir / "adapter").string());
    std::vector<std::pair<std::string, at::Tensor>> trained;
    for (auto& item : m->named_parameters()) {
      if (model::is_adapter_parameter(item.key())) trained.emplace_back(item.key(), item.value());
      else item.value().requires_grad_(false);  // the frozen base
    }
    io::SafetensorsFile ref(dir / "reference.safetensors");
    const auto ids = io::SafetensorsFile(dir / "input.safetensors").read("input_ids");
    const auto loss_of = [&](at::Tensor* logits_out) {
      std::vector<at::Tensor> stats;
      const auto logits = m->forward(ids, &stats);
      if (logits_out) *logits_out = logits;
      return model::ops::next_token_loss(logits, ids) + model::router_loss(stats, m->config()).total;
    };
    at::Tensor logits;
    const auto loss = loss_of(&logits);
    const double e_logits = rel_err(logits, ref.read("logits"));
    const double e_loss = std::abs(loss.item<double>() - ref.read("loss").item<double>()) / ref.read("loss").item<double>();
    loss.backward();
    double e_grad = 0;
    for (const auto& [name, p] : trained) {
      const auto key = "grad." + io::peft_key(name, m->adapter());
      REQUIRE_MESSAGE(ref.find(key), "reference has no ", key);
      e_grad = std::max(e_grad, rel_err(io::to_peft(name, p.grad()), ref.read(key)));
    }
    // AdamW steps on the same batch, the first with the gradients above (torch.optim.AdamW in the fixture)
    std::vector<at::Tensor> params;
    for (const auto& item : trained) params.push_back(item.second);
    const auto o = optim::AdamWOptions().lr(1e-2).beta1(0.9).beta2(0.95).eps(1e-8).weight_decay(0.1);
    optim::AdamW adamw(params, o);
    for (int step = 0; step < 3; ++step) {
      if (step > 0) {
        for (auto& p : params) p.mutable_grad() = at::Tensor();
        loss_of(nullptr).backward();
      }
      std::vector<at::Tensor> grads;
      for (const auto& p : params) grads.push_back(p.grad());
      adamw.step(grads, o.lr());
    }
    double e_after = 0;
    for (const auto& [name, p] : trained)
      e_after = std::max(e_after, rel_err(io::to_peft(name, p), ref.read("after." + io::peft_key(name, m->adapter()))));
    // our save: PEFT's config fields and keys, PEFT's layouts (PEFT loading it: the peft_export_mixtral test)
    const auto out = test::temp_dir("moe-adapter");
    io::write_peft_adapter(out, m->adapter(), (dir / "base").string(), trained);
    io::SafetensorsFile ours(out / "adapter_model.safetensors"), theirs(dir / "adapter" / "adapter_model.safetensors");
    std::set<std::string> our_keys, their_keys;
    for (const auto& t : ours.tensors()) our_keys.insert(t.name + " " + c10::str(c10::IntArrayRef(t.shape)));
    for (const auto& t : theirs.tensors()) their_keys.insert(t.name + " " + c10::str(c10::IntArrayRef(t.shape)));
    CHECK(our_keys == their_keys);
    const auto back = io::read_peft_adapter(out);
    CHECK(back.config.target_list().size() == m->adapter().target_list().size());
    for (const auto& [name, p] : trained) CHECK(at::equal(back.tensors.at(name), p.detach()));
    compat::remove_all(out);
    MESSAGE(dir.filename().string(), ": logits rel err ", e_logits, ", loss rel err ", e_loss, ", max adapter grad rel err ",
            e_grad, ", after 3 AdamW steps ", e_after, " over ", trained.size(), " tensors");
    CHECK(e_logits < 1e-4);
    CHECK(e_loss < 1e-4);
    CHECK(e_grad < 1e-4);
    CHECK(e_after < 1e-4);
    CHECK(static_cast<int64_t>(trained.size()) == static_cast<int64_t>(their_keys.size()));
  }
  CHECK(variants >= 3);
}
