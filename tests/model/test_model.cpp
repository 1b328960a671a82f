// Model tests: each op against a direct formula in fp64, presets, and parity with transformers on the
// golden fixtures (tests/golden/make_llama_fixtures.py and make_mixtral_fixtures.py; directory in
// SHARDLM_GOLDEN_DIR). Mixtral: the expert kernels against a dense formula, the router loss, parity.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <c10/core/CPUAllocator.h>
#include <shardlm/shardlm.hpp>

#include <chrono>
#include <cmath>
#include <numbers>

#include "../test_util.hpp"

using namespace shardlm;
using model::ops::Rope;
using test::rel_err;

TEST_CASE("init_parameters: large tensors are drawn in chunks on several threads, the same at any thread count") {
  const int threads = at::get_num_threads();
  auto draw = [](int n) {
    at::set_num_threads(n);
    // A parameter (requires grad) over two chunks and a bit: the chunks run on threads of their own, which must see
    // the caller's no-grad mode to write into it.
    std::vector<std::pair<std::string, at::Tensor>> params{
        {"w", at::empty({2 * model::init_chunk + 5}, at::kFloat).requires_grad_()}, {"norm.weight", at::empty({3})}};
    model::init_parameters(params, 0.02, 11);
    return params;
  };
  const auto one = draw(1), three = draw(3);
  at::set_num_threads(threads);
  CHECK(at::equal(one[0].second, three[0].second));
  CHECK(std::abs(one[0].second.std().item<double>() - 0.02) < 1e-4);
  CHECK(one[1].second.eq(1).all().item<bool>());
}

TEST_CASE("init_parameter_rows: any rows of any parameter as init_parameters draws them") {
  // In registration order: a bias (zeros), a chunked matrix (cols not dividing the chunk: rows straddle chunks),
  // a one-draw matrix (its draw moves the generator: the next chunked matrix's base depends on it), a norm, another
  // chunked matrix.
  const int64_t cols = 3000, rows = (2 * model::init_chunk + 777) / cols + 1;
  std::vector<std::pair<std::string, at::Tensor>> params{{"a.bias", at::empty({7})},
                                                         {"q.weight", at::empty({rows, cols})},
                                                         {"k.weight", at::empty({64, 48})},
                                                         {"input_layernorm.weight", at::empty({48})},
                                                         {"up.weight", at::empty({rows, cols})}};
  model::init_parameters(params, 0.02, 5);
  const int64_t per_chunk = model::init_chunk / cols;  // rows of a chunk, about
  const std::vector<model::RowSpan> spans{{1, per_chunk - 3, 7},         {4, 0, 1},  {4, rows - 2, 2},
                                          {2, 10, 5},                    {0, 0, 1},  {3, 0, 1},
                                          {1, 0, rows},                  {4, 2 * per_chunk - 1, 3}, {1, 5, 0}};
  const auto got = model::init_parameter_rows(params, 0.02, 5, spans);
  REQUIRE(got.size() == spans.size());
  for (size_t s = 0; s < spans.size(); ++s) {
    const auto& p = params[spans[s].param].second;
    const auto want = p.reshape({-1, p.size(-1)}).narrow(0, spans[s].row0, spans[s].rows);
    INFO("span ", s, ": ", params[spans[s].param].first, " rows ", spans[s].row0, "+", spans[s].rows);
    CHECK(got[s].sizes() == want.sizes());
    CHECK(at::equal(got[s], want));
  }
}

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

TEST_CASE("the fused head and loss equals the plain loss on whole logits, and so do its gradients") {
  // Against next_token_loss_sum of h W^T: every chunk size from one row to more than all, ignored targets (the last
  // position of each sequence, and some masked ones), a frozen head (no gradient for W) and no gradient at all.
  at::manual_seed(13);
  const int64_t B = 2, T = 9, C = 12, V = 37;
  const auto h0 = at::randn({B, T, C}, at::kDouble), w0 = at::randn({V, C}, at::kDouble) * 0.5;
  auto targets = model::ops::shift_labels(at::randint(V, {B, T}, at::kLong));
  targets.index_put_({0, 3}, -100), targets.index_put_({1, 0}, -100);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const auto h = h0.to(dtype).requires_grad_(), w = w0.to(dtype).requires_grad_();
    const auto ref = model::ops::next_token_loss_sum(at::matmul(h, w.t()), targets);
    const auto ref_grads = torch::autograd::grad({ref * 0.3}, {h, w});
    const double tol = dtype == at::kDouble ? 1e-6 : 1e-5;  // the plain loss takes its log-softmax in fp32 either way
    for (int64_t chunk : {1, 4, 7, 18, 100}) {
      CAPTURE(chunk);
      const auto hc = h.detach().requires_grad_(), wc = w.detach().requires_grad_();
      // The gradient backward brings (0.3) given as the hint for odd chunk sizes, not given (1) for even ones.
      const auto loss = model::ops::linear_cross_entropy_sum(hc, wc, targets, chunk, chunk % 2 ? 0.3 : 1.0);
      CHECK((loss.scalar_type() == at::kFloat));
      CHECK(std::abs(loss.item<double>() - ref.item<double>()) < tol * std::abs(ref.item<double>()));
      const auto grads = torch::autograd::grad({loss * 0.3}, {hc, wc});
      CHECK((grads[0].scalar_type() == dtype));
      CHECK(rel_err(grads[0], ref_grads[0]) < tol);
      CHECK(rel_err(grads[1], ref_grads[1]) < tol);
    }
    // A frozen head: the hidden states' gradient only; an ignored row's hidden state gets none.
    const auto hc = h.detach().requires_grad_();
    const auto g = torch::autograd::grad({model::ops::linear_cross_entropy_sum(hc, w.detach(), targets, 5)}, {hc})[0];
    CHECK(g[0][3].abs().max().item<double>() == 0);
    CHECK(g[1][T - 1].abs().max().item<double>() == 0);
    const auto ref_h = torch::autograd::grad({model::ops::next_token_loss_sum(at::matmul(h, w.detach().t()), targets)}, {h})[0];
    CHECK(rel_err(g, ref_h) < tol);
    at::NoGradGuard no_grad;
    CHECK(std::abs(model::ops::linear_cross_entropy_sum(h, w, targets, 3).item<double>() - ref.item<double>()) <
          tol * std::abs(ref.item<double>()));
  }
  // Every target ignored: loss 0 and zero gradients (the plain sum is 0 too).
  const auto h = h0.to(at::kFloat).requires_grad_(), w = w0.to(at::kFloat).requires_grad_();
  const auto none = at::full({B, T}, -100, at::kLong);
  const auto loss = model::ops::linear_cross_entropy_sum(h, w, none, 4);
  CHECK(loss.item<double>() == 0);
  const auto grads = torch::autograd::grad({loss}, {h, w});
  CHECK(grads[0].abs().max().item<double>() == 0);
  CHECK(grads[1].abs().max().item<double>() == 0);
}

TEST_CASE("the fused head and loss in bf16: the plain path's rounding (compute-dtype logits, fp32 softmax)") {
  at::manual_seed(17);
  const int64_t N = 40, C = 64, V = 300;
  const auto h = at::randn({N, C}).to(at::kBFloat16).requires_grad_();
  const auto w = (at::randn({V, C}) * 0.2).to(at::kBFloat16).requires_grad_();
  const auto targets = at::randint(V, {N}, at::kLong);
  const auto ref = model::ops::next_token_loss_sum(at::matmul(h, w.t()), targets);
  const auto ref_grads = torch::autograd::grad({ref / N}, {h, w});
  const auto hc = h.detach().requires_grad_(), wc = w.detach().requires_grad_();
  const auto loss = model::ops::linear_cross_entropy_sum(hc, wc, targets, 16, 1.0 / N);
  CHECK(std::abs(loss.item<double>() - ref.item<double>()) < 1e-5 * std::abs(ref.item<double>()));
  const auto grads = torch::autograd::grad({loss / N}, {hc, wc});
  CHECK((grads[0].scalar_type() == at::kBFloat16));
  CHECK(rel_err(grads[0].to(at::kDouble), ref_grads[0].to(at::kDouble)) < 1e-2);
  CHECK(rel_err(grads[1].to(at::kDouble), ref_grads[1].to(at::kDouble)) < 1e-2);
}

TEST_CASE("CUDA: the fused loss's softmax kernel gives the ATen ops' losses and gradients") {
  if (!torch::cuda::is_available()) {
    MESSAGE("no CUDA device: skipped (scripts/gpu.sh runs it)");
    return;
  }
  at::manual_seed(19);
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  for (int64_t V : {37, 32000, 128256}) {  // 37: the scalar path; multiples of 8: 16-byte loads
    CAPTURE(V);
    const int64_t c = 67;
    const auto logits = (at::randn({c, V}, cuda) * 3).to(at::kBFloat16);
    auto targets = at::randint(V, {c}, cuda.dtype(at::kLong));
    targets.index_put_({at::arange(0, c, 5, cuda.dtype(at::kLong))}, -100);
    const auto [ref_rows, ref_grad] = model::ops::detail::softmax_xent_aten(logits.clone(), targets, -100, true, 0.25);
    auto work = logits.clone();
    const auto rows = model::ops::detail::softmax_xent_kernel(work, targets, -100, true, 0.25);
    REQUIRE(rows.has_value());
    CHECK(rel_err(*rows, ref_rows) < 1e-5);
    CHECK(rel_err(work.to(at::kFloat), ref_grad.to(at::kFloat)) < 8e-3);  // each within a bf16 rounding
    CHECK(work.to(at::kFloat).index({at::arange(0, c, 5, cuda.dtype(at::kLong))}).abs().max().item<double>() == 0);
    auto untouched = logits.clone();
    const auto loss_only = model::ops::detail::softmax_xent_kernel(untouched, targets, -100, false);
    CHECK(rel_err(*loss_only, ref_rows) < 1e-5);
    CHECK(at::equal(untouched, logits));
  }
  // The whole fused head and loss on the GPU against the plain loss on whole logits.
  const int64_t N = 300, C = 128, V = 5000;
  const auto h = at::randn({N, C}, cuda).to(at::kBFloat16).requires_grad_();
  const auto w = (at::randn({V, C}, cuda) * 0.1).to(at::kBFloat16).requires_grad_();
  const auto targets = at::randint(V, {N}, cuda.dtype(at::kLong));
  const auto ref = model::ops::next_token_loss_sum(at::matmul(h, w.t()), targets);
  const auto ref_grads = torch::autograd::grad({ref / N}, {h, w});
  const auto hc = h.detach().requires_grad_(), wc = w.detach().requires_grad_();
  const auto loss = model::ops::linear_cross_entropy_sum(hc, wc, targets, 128, 1.0 / N);
  CHECK(std::abs(loss.item<double>() - ref.item<double>()) < 1e-4 * std::abs(ref.item<double>()));
  const auto grads = torch::autograd::grad({loss / N}, {hc, wc});
  CHECK(rel_err(grads[0], ref_grads[0]) < 1e-2);
  CHECK(rel_err(grads[1], ref_grads[1]) < 1e-2);
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
/// The largest relative error of a model's parameter gradients against the reference's `grad.<HF name>` tensors,
/// and how many there were.
std::pair<double, int64_t> max_grad_err(torch::nn::Module& m, io::SafetensorsFile& ref) {
  double worst = 0;
  int64_t count = 0;
  for (const auto& item : m.named_parameters()) {
    const auto name = "grad." + io::hf_name(item.key());
    REQUIRE_MESSAGE(ref.find(name), "reference has no ", name);
    worst = std::max(worst, rel_err(item.value().grad(), ref.read(name)));
    ++count;
  }
  return {worst, count};
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
    const auto [e_grad, grads] = max_grad_err(*m, ref);
    MESSAGE(dir.filename().string(), ": logits rel err ", e_logits, ", loss err ", e_loss, ", max grad rel err ", e_grad,
            " over ", grads, " tensors");
    CHECK(e_logits < 1e-4);
    CHECK(e_loss < 1e-5);
    CHECK(e_grad < 1e-4);
    CHECK(grads == static_cast<int64_t>(ref.tensors().size()) - 2);  // every parameter's gradient is compared
  }
}

// --- Mixtral ---------------------------------------------------------------------------------------------

namespace {
/// The MoE feed-forward written densely: every expert on every token, weighted by the renormalized top-k
/// router probabilities (zero for experts not picked). x [N, C] -> [N, C].
at::Tensor dense_moe(const at::Tensor& x, const at::Tensor& w_router, const at::Tensor& gate_up, const at::Tensor& down,
                     int64_t k) {
  const int64_t E = gate_up.size(0), I = down.size(2);
  const auto probs = at::softmax(at::linear(x, w_router), -1);                 // [N, E]
  const auto [top, idx] = at::topk(probs, k, -1);                              // [N, k]
  const auto weights = at::zeros_like(probs).scatter(1, idx, top / top.sum(-1, true));  // [N, E]
  auto y = at::zeros_like(x);
  for (int64_t e = 0; e < E; ++e) {
    const auto h = at::linear(x, gate_up[e]);
    y = y + weights.narrow(1, e, 1) * at::linear(at::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I), down[e]);
  }
  return y;
}
}  // namespace

TEST_CASE("MoE experts: loop, padded and grouped kernels equal the dense formula, with empty and overloaded experts") {
  auto c = model::preset("mixtral-debug", 1);
  c.hidden_size = 16, c.intermediate_size = 24, c.num_experts = 4;
  for (int64_t k : {1, 2}) {
    c.num_experts_per_tok = k;
    for (const std::string routing : {"random", "expert 3 never", "all to expert 0"}) {
      CAPTURE(k);
      CAPTURE(routing);
      model::SparseMoe moe(c, at::TensorOptions());
      model::init_weights(*moe, 0.2, 5);
      const auto x = at::randn({2, 7, c.hidden_size}).abs();  // positive: a row of +1s in the router wins everywhere
      {
        at::NoGradGuard no_grad;
        if (routing == "expert 3 never") moe->gate->weight[3].fill_(-1.0);
        if (routing == "all to expert 0") moe->gate->weight[0].fill_(1.0);
      }
      const auto flat = x.reshape({-1, c.hidden_size});
      const auto r = model::ops::route(flat, moe->gate->weight, k);
      const auto counts = at::bincount(r.experts.reshape({-1}), {}, 4);
      if (routing == "expert 3 never") CHECK(counts[3].item<int64_t>() == 0);
      if (routing == "all to expert 0") CHECK(counts[0].item<int64_t>() == flat.size(0));
      auto params = moe->parameters();
      const auto grads_of = [&](const at::Tensor& y) {
        for (auto& p : params) p.mutable_grad() = at::Tensor();
        (y * at::linspace(-1, 1, y.numel()).view(y.sizes())).sum().backward();
        std::vector<at::Tensor> g;
        for (auto& p : params) g.push_back(p.grad().clone());
        return g;
      };
      const auto y_ref = dense_moe(flat, moe->gate->weight, moe->experts->gate_up_proj, moe->experts->down_proj, k);
      const auto g_ref = grads_of(y_ref);
      // With k = 1 the router's gradient is zero up to rounding (each token's renormalized weight is 1): each
      // gradient's error is taken relative to at least 1e-2 of the largest one.
      double scale = 0;
      for (const auto& g : g_ref) scale = std::max(scale, g.abs().max().item<double>());
      const auto grad_err = [&](const at::Tensor& g, const at::Tensor& ref) {
        return (g - ref).abs().max().item<double>() / std::max(ref.abs().max().item<double>(), 1e-2 * scale);
      };
      // at::_grouped_mm on the CPU needs 16-byte row strides: the sizes here (16, 24, 48 fp32) have them.
      for (auto kernel : {model::ExpertKernel::loop, model::ExpertKernel::padded, model::ExpertKernel::grouped}) {
        moe->kernel = kernel;
        const auto y = moe->forward(x).reshape({-1, c.hidden_size});
        CHECK(moe->take_router_stats().defined());
        const auto g = grads_of(y);
        double e_grad = 0;
        for (size_t i = 0; i < g.size(); ++i) e_grad = std::max(e_grad, grad_err(g[i], g_ref[i]));
        MESSAGE("kernel ", static_cast<int>(kernel), ": output rel err ", rel_err(y, y_ref), ", grad rel err ", e_grad);
        CHECK(rel_err(y, y_ref) < 1e-5);
        CHECK(e_grad < 1e-5);
      }
    }
  }
}

TEST_CASE("MoE autograd nodes (gather, SwiGLU, combine) equal autograd's own formulas in fp32 and bf16") {
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    for (int64_t k : {1, 2, 3}) {
      CAPTURE(dtype);
      CAPTURE(k);
      const int64_t N = 9, C = 8, E = 4, I = 6;
      const auto opts = at::TensorOptions().dtype(dtype);
      const auto experts = std::get<1>(at::rand({N, E}).topk(k, -1));                     // [N, k] distinct per token
      const auto s = model::ops::sort_picks(experts, E);
      CHECK(at::equal(s.order.index_select(0, s.back), at::arange(N * k)));               // back inverts order
      CHECK(at::equal(s.counts, at::bincount(experts.reshape({-1}), {}, E)));
      const auto x = at::randn({N, C}, opts).requires_grad_(true);
      const auto h = at::randn({N * k, 2 * I}, opts).requires_grad_(true);
      const auto ys = at::randn({N * k, C}, opts).requires_grad_(true);
      const auto w = at::rand({N, k}).requires_grad_(true);
      const auto gy = at::randn({N, C}, opts), gh = at::randn({N * k, I}, opts), gxs = at::randn({N * k, C}, opts);
      const auto grads = [&](const at::Tensor& xs, const at::Tensor& act, const at::Tensor& y) {
        for (auto t : {x, h, ys, w}) t.mutable_grad() = at::Tensor();
        torch::autograd::backward({xs, act, y}, {gxs, gh, gy});
        return std::vector<at::Tensor>{x.grad(), h.grad(), ys.grad(), w.grad()};
      };
      // autograd's own: index_select, narrow/silu/mul, and the fp32 weighting summed in pick order
      const auto xs_ref = x.index_select(0, s.token);
      const auto act_ref = at::silu(h.narrow(-1, 0, I)) * h.narrow(-1, I, I);
      const auto w_sorted = w.reshape({-1}).index_select(0, s.order).unsqueeze(-1);
      const auto y_ref = (ys * w_sorted).index_select(0, s.back).view({N, k, C}).sum(1).to(dtype);
      const auto g_ref = grads(xs_ref, act_ref, y_ref);
      const auto xs = model::ops::GatherPicks::apply(x, s.token, s.back, k);
      const auto act = model::ops::SwiGLU::apply(h);
      const auto y = model::ops::CombinePicks::apply(ys, w, s.order, s.token, s.back);
      CHECK(at::equal(xs, xs_ref));
      CHECK(at::equal(act, act_ref));
      CHECK(at::equal(y, y_ref));
      const auto g = grads(xs, act, y);
      // x: the k rows summed in fp32 and cast once (index_add rounds after each add, so bf16 with k = 3 differs)
      CHECK(rel_err(g[0], g_ref[0]) < (dtype == at::kBFloat16 && k == 3 ? 1e-2 : 1e-6));
      CHECK(at::equal(g[1], g_ref[1]));
      CHECK(at::equal(g[2], g_ref[2]));
      CHECK(rel_err(g[3], g_ref[3]) < 1e-6);
    }
  }
}

TEST_CASE("every NVRTC program of the project compiles for sm_90 (NVRTC alone, no GPU needed)") {
#if SHARDLM_HAVE_CUDA
  try {  // a source that does not compile is refused with NVRTC's log, naming the program
    (void)nvrtc::compile_for_arch({"broken.cu", "extern \"C\" __global__ void f() { undeclared(); }"}, 90);
    FAIL("a broken source compiled");
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()).find("could not be opened") != std::string::npos) {
      MESSAGE("NVRTC not found: skipped (", e.what(), ")");
      return;
    }
    CHECK(std::string(e.what()).find("broken.cu") != std::string::npos);
    CHECK(std::string(e.what()).find("undeclared") != std::string::npos);
  }
  for (const auto* program : {&model::ops::detail::moe_program, &model::ops::detail::xent_program,
                              &optim::detail::adamw_program, &quant::kernels::program}) {
    const std::string name = program->name;
    CAPTURE(name);
    std::string cubin;
    CHECK_NOTHROW(cubin = nvrtc::compile_for_arch(*program, 90));
    CHECK(cubin.size() > 1000);
  }
#else
  MESSAGE("LibTorch without CUDA: skipped");
#endif
}

namespace {
/// Whether every token's first pick goes to expert 0.
enum class Skew { none, all_to_expert0 };
/// Routed picks [N, k] (distinct per token) over E experts, of which `unused` get none.
at::Tensor random_picks(int64_t N, int64_t k, int64_t E, const std::vector<int64_t>& unused, Skew skew,
                        const at::TensorOptions& opts) {
  auto scores = at::rand({N, E}, opts.dtype(at::kFloat));
  for (auto e : unused) scores.select(1, e).fill_(-1.0);
  if (skew == Skew::all_to_expert0) scores.select(1, 0).fill_(2.0);
  return std::get<1>(scores.topk(k, -1));
}
/// t's values in a tensor whose data starts one element past an allocation (not 16-byte aligned): the kernels'
/// one-element path even where C allows 16-byte accesses.
at::Tensor misaligned(const at::Tensor& t) {
  auto flat = at::empty({t.numel() + 1}, t.options()).narrow(0, 1, t.numel());
  flat.copy_(t.reshape({-1}));
  return flat.view(t.sizes());
}
}  // namespace

TEST_CASE("CUDA: the MoE sort, gather backward and combine kernels give the ATen ops' results") {
  if (!torch::cuda::is_available()) {
    MESSAGE("no CUDA device: skipped (scripts/gpu.sh moe1 runs it)");
    return;
  }
  using namespace model::ops;
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  at::manual_seed(29);
  SUBCASE("sort: the order of a stable sort, counts as bincount, over many blocks, unused experts, one expert") {
    struct Case {
      int64_t N, k, E;
      std::vector<int64_t> unused;
      Skew skew;
    };
    const auto none = Skew::none, skewed = Skew::all_to_expert0;
    for (const auto& c : std::vector<Case>{{1, 1, 1, {}, none},      {7, 2, 4, {3}, none},  {4096, 2, 8, {}, none},
                                           {5000, 2, 8, {2, 5}, skewed}, {3001, 3, 8, {}, none}, {2048, 8, 64, {0, 63}, none},
                                           {1500, 1, 1024, {}, none},   {20000, 2, 300, {}, skewed}, {0, 2, 8, {}, none}}) {
      CAPTURE(c.N);
      CAPTURE(c.k);
      CAPTURE(c.E);
      const auto experts = random_picks(c.N, c.k, c.E, c.unused, c.skew, cuda);
      const auto ref = moe_aten::sort_picks(experts, c.E);
      const auto got = moe_cuda::sort_picks(experts, c.E);
      REQUIRE(got.has_value());
      CHECK(got->k == c.k);
      CHECK(at::equal(got->order, ref.order));
      CHECK(at::equal(got->token, ref.token));
      CHECK(at::equal(got->back, ref.back));
      CHECK(at::equal(got->counts, ref.counts));
      CHECK(at::equal(expert_counts(experts.reshape({-1}), c.E), ref.counts));
      for (auto e : c.unused) CHECK(got->counts[e].item<int64_t>() == 0);
    }
    CHECK_FALSE(moe_cuda::sort_picks(at::zeros({4, 2}, cuda.dtype(at::kLong)), 1025).has_value());  // too many experts
  }
  SUBCASE("gather backward and combine, forward and backward: fp32 and bf16, k = 1, 2, 3, odd C, misaligned rows") {
    for (const auto dtype : {at::kFloat, at::kBFloat16}) {
      for (const int64_t k : {1, 2, 3}) {
        for (const int64_t C : {int64_t{4096}, int64_t{37}, int64_t{64}}) {
          for (const bool aligned : {true, false}) {
            CAPTURE(dtype);
            CAPTURE(k);
            CAPTURE(C);
            CAPTURE(aligned);
            const int64_t N = C == 4096 ? 1000 : 333, E = 8;
            const auto s = sort_picks(random_picks(N, k, E, {6}, k == 2 ? Skew::all_to_expert0 : Skew::none, cuda), E);
            const auto opts = cuda.dtype(dtype);
            const auto place = [&](const at::Tensor& t) { return aligned ? t : misaligned(t); };
            const auto g = place(at::randn({N * k, C}, opts)), ys = place(at::randn({N * k, C}, opts));
            const auto gy = place(at::randn({N, C}, opts));
            const auto w = at::rand({N, k}, cuda);
            // the sums over k picks: one addition for k <= 2 (any order is the same), so bit for bit; k = 3 may
            // add in another order than ATen's reduction: one fp32 rounding, at most one rounding of the dtype
            const auto same = [&](const at::Tensor& a, const at::Tensor& b) {
              if (k <= 2) return at::equal(a, b);
              return rel_err(a, b) < (dtype == at::kBFloat16 ? 1e-2 : 1e-6);
            };
            const auto gx = moe_cuda::gather_backward(g, s.back, k);
            REQUIRE(gx.has_value());
            CHECK(same(*gx, moe_aten::gather_backward(g, s.back, k)));
            const auto y = moe_cuda::combine_forward(ys, w, s.back);
            REQUIRE(y.has_value());
            CHECK(same(*y, moe_aten::combine_forward(ys, w, s.back)));
            const auto got = moe_cuda::combine_backward(gy, ys, w, s.back);
            REQUIRE(got.has_value());
            const auto [g_ys, g_w] = moe_aten::combine_backward(gy, ys, w, s.order, s.token, s.back);
            CHECK(at::equal(got->first, g_ys));  // elementwise: bit for bit for every k
            // g_w: a dot product over C in another order than ATen's: within 1e-5 of the sum of |terms|
            const auto terms = (ys.index_select(0, s.back).view({N, k, C}).to(at::kFloat).abs() *
                                gy.to(at::kFloat).abs().unsqueeze(1)).sum(-1);  // [N, k]
            const double worst = ((got->second - g_w).abs() / (terms + 1e-30)).max().item<double>();
            CHECK(worst < 1e-5);
            CHECK(got->second.dtype() == at::kFloat);
            const auto again = moe_cuda::combine_backward(gy, ys, w, s.back);
            CHECK(at::equal(again->second, got->second));  // deterministic
          }
        }
      }
    }
  }
  SUBCASE("no tokens; an unsupported dtype is left to ATen") {
    const auto s = sort_picks(at::zeros({0, 2}, cuda.dtype(at::kLong)), 4);
    const auto ys = at::zeros({0, 16}, cuda.dtype(at::kBFloat16)), w = at::zeros({0, 2}, cuda);
    CHECK(moe_cuda::combine_forward(ys, w, s.back)->size(0) == 0);
    CHECK(moe_cuda::gather_backward(ys, s.back, 2)->size(0) == 0);
    CHECK(moe_cuda::combine_backward(at::zeros({0, 16}, ys.options()), ys, w, s.back)->second.size(0) == 0);
    CHECK_FALSE(moe_cuda::combine_forward(at::zeros({4, 16}, cuda.dtype(at::kHalf)), at::zeros({2, 2}, cuda),
                                          at::zeros({4}, cuda.dtype(at::kLong))).has_value());
  }
  SUBCASE("the autograd nodes on the GPU: the ATen composition's outputs and gradients (k = 2, bf16)") {
    const int64_t N = 257, k = 2, C = 96, E = 4;
    const auto s = sort_picks(random_picks(N, k, E, {1}, Skew::none, cuda), E);
    const auto x = at::randn({N, C}, cuda.dtype(at::kBFloat16)).requires_grad_(true);
    const auto ys = at::randn({N * k, C}, cuda.dtype(at::kBFloat16)).requires_grad_(true);
    const auto w = at::rand({N, k}, cuda).requires_grad_(true);
    const auto gxs = at::randn({N * k, C}, x.options().requires_grad(false)), gy = at::randn({N, C}, gxs.options());
    const auto xs = GatherPicks::apply(x, s.token, s.back, k);
    const auto y = CombinePicks::apply(ys, w, s.order, s.token, s.back);
    CHECK(at::equal(xs, x.index_select(0, s.token)));
    CHECK(at::equal(y, moe_aten::combine_forward(ys.detach(), w.detach(), s.back)));
    torch::autograd::backward({xs, y}, {gxs, gy});
    CHECK(at::equal(x.grad(), moe_aten::gather_backward(gxs, s.back, k)));
    const auto [g_ys, g_w] = moe_aten::combine_backward(gy, ys.detach(), w.detach(), s.order, s.token, s.back);
    CHECK(at::equal(ys.grad(), g_ys));
    CHECK(rel_err(w.grad(), g_w) < 1e-5);
  }
}

// Figures only (gpu.sh moe1 prints them): a timing is a measurement, not a test, so nothing here is asserted.
TEST_CASE("CUDA: the MoE kernels' time against the ATen ops at Mixtral-8x7B's size (N 4096, k 2, C 4096, bf16)") {
  if (!torch::cuda::is_available()) {
    MESSAGE("no CUDA device: skipped (scripts/gpu.sh moe1 runs it)");
    return;
  }
  using namespace model::ops;
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  at::manual_seed(31);
  const int64_t N = 4096, k = 2, C = 4096, E = 8;
  const auto experts = random_picks(N, k, E, {}, Skew::none, cuda);
  const auto s = sort_picks(experts, E);
  const auto bf = cuda.dtype(at::kBFloat16);
  const auto ys = at::randn({N * k, C}, bf), g = at::randn({N * k, C}, bf), gy = at::randn({N, C}, bf);
  const auto w = at::rand({N, k}, cuda);
  const auto ms = [&](const auto& f) {  // mean of 20 runs after 3 warm-up runs, in ms
    for (int i = 0; i < 3; ++i) f();
    torch::cuda::synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 20; ++i) f();
    torch::cuda::synchronize();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 20;
  };
  struct Row {
    const char* what;
    double aten, kernel;
  };
  const std::vector<Row> rows = {
      {"sort (order, token, back, counts)", ms([&] { moe_aten::sort_picks(experts, E); }),
       ms([&] { moe_cuda::sort_picks(experts, E); })},
      {"gather backward", ms([&] { moe_aten::gather_backward(g, s.back, k); }),
       ms([&] { moe_cuda::gather_backward(g, s.back, k); })},
      {"combine forward", ms([&] { moe_aten::combine_forward(ys, w, s.back); }),
       ms([&] { moe_cuda::combine_forward(ys, w, s.back); })},
      {"combine backward", ms([&] { moe_aten::combine_backward(gy, ys, w, s.order, s.token, s.back); }),
       ms([&] { moe_cuda::combine_backward(gy, ys, w, s.back); })},
  };
  for (const auto& r : rows) {
    MESSAGE(r.what, ": ATen ", r.aten, " ms, kernel ", r.kernel, " ms (", r.aten / r.kernel, "x)");
  }
}

TEST_CASE("router loss: transformers' load-balancing formula pooled over layers, and the z-loss") {
  auto c = model::preset("mixtral-debug", 1);
  c.num_experts = 4, c.num_experts_per_tok = 2, c.router_aux_loss_coef = 0.5, c.router_z_loss_coef = 0.25;
  std::vector<at::Tensor> logits{at::randn({6, 4}, at::kDouble).to(at::kFloat), at::randn({6, 4}).mul(3)};
  std::vector<at::Tensor> stats{model::ops::router_stats(logits[0], 2), at::Tensor(),
                                model::ops::router_stats(logits[1], 2)};
  const auto loss = model::router_loss(stats, c);
  // load_balancing_loss_func: the layers' logits concatenated
  const auto all = at::cat(logits);                                             // [12, 4]
  const auto probs = at::softmax(all, -1);
  const auto picked = at::zeros_like(probs).scatter(1, std::get<1>(at::topk(probs, 2, -1)), 1.0);
  const double aux = 4 * (picked.mean(0) * probs.mean(0)).sum().item<double>();
  const double z = at::logsumexp(all, {-1}).square().mean().item<double>();
  CHECK(loss.aux.item<double>() == doctest::Approx(aux).epsilon(1e-6));
  CHECK(loss.z.item<double>() == doctest::Approx(z).epsilon(1e-6));
  CHECK(loss.total.item<double>() == doctest::Approx(0.5 * aux + 0.25 * z).epsilon(1e-6));
  c.output_router_logits = false;  // as in transformers, the aux term then stays out of the loss
  CHECK(model::router_loss(stats, c).total.item<double>() == doctest::Approx(0.25 * z).epsilon(1e-6));
  CHECK_FALSE(model::router_loss({at::Tensor()}, c).total.defined());
}

TEST_CASE("Mixtral presets and config.json: parameter counts, active parameters, errors that name the field") {
  const auto c = model::preset("mixtral-8x7b");
  CHECK(c.num_params() == 46702792704);  // Mixtral-8x7B's published 46.7B
  CHECK(c.num_params() - c.num_layers * (c.block_params() - c.active_block_params()) == 12879925248);  // 12.9B active
  model::Mixtral m(c, at::TensorOptions().device(at::kMeta));
  int64_t n = 0;
  for (const auto& p : m->parameters()) n += p.numel();
  CHECK(n == c.num_params());
  CHECK(model::preset("mixtral-8x22b").num_params() == 140630071296);
  const auto j = model::config_to_json(model::preset("mixtral-debug"), "float32");
  const auto back = model::config_from_json(nlohmann::json::parse(j.dump()), "roundtrip");
  CHECK(back.num_experts == 4);
  CHECK(back.num_experts_per_tok == 2);
  CHECK(back.output_router_logits);
  CHECK(back.router_aux_loss_coef == 0.02);
  auto bad = nlohmann::json::parse(j.dump());
  bad["num_experts_per_tok"] = 5;
  CHECK_THROWS_WITH_AS(model::config_from_json(bad, "cfg"), doctest::Contains("num_experts_per_tok(5) exceeds"), ConfigError);
  bad = nlohmann::json::parse(j.dump());
  bad.erase("num_local_experts");
  CHECK_THROWS_WITH_AS(model::config_from_json(bad, "cfg"), doctest::Contains("missing field 'num_local_experts'"), ConfigError);
  bad = nlohmann::json::parse(j.dump());
  bad["sliding_window"] = 4;
  auto sw = model::config_from_json(bad, "cfg");
  sw.num_layers = 1;
  model::Mixtral small(sw);
  model::init_weights(*small, 0.02, 1);
  CHECK(small->forward(at::zeros({1, 4}, at::kLong)).size(1) == 4);  // within the window: plain causal attention
  CHECK_THROWS_WITH_AS(small->forward(at::zeros({1, 5}, at::kLong)), doctest::Contains("exceeds the config's sliding_window(4)"),
                       ConfigError);
}

TEST_CASE("Mixtral parity with transformers in fp32: logits, loss, aux loss, gradients (both weight layouts)") {
  const char* root = std::getenv("SHARDLM_GOLDEN_DIR");
  if (!root) {
    MESSAGE("SHARDLM_GOLDEN_DIR is unset: run tests/golden/make_mixtral_fixtures.py (CTest does)");
    return;
  }
  std::vector<std::filesystem::path> dirs;
  for (const auto& e : std::filesystem::directory_iterator(std::filesystem::path(root) / "mixtral"))
    if (std::filesystem::exists(e.path() / "reference.safetensors")) dirs.push_back(e.path());
  std::sort(dirs.begin(), dirs.end());
  REQUIRE(dirs.size() >= 3);
  for (const auto& dir : dirs) {
    CAPTURE(dir.filename().string());
    auto m = io::load_hf_model<model::Mixtral>(dir, at::kCPU, at::kFloat);
    const auto& c = m->config();
    io::SafetensorsFile ref(dir / "reference.safetensors");
    const auto ids = io::SafetensorsFile(dir / "input.safetensors").read("input_ids");
    std::vector<at::Tensor> stats;
    const auto logits = m->forward(ids, &stats);
    const auto router = model::router_loss(stats, c);
    const auto loss = model::ops::next_token_loss(logits, ids) + router.total;  // z-loss coefficient 0 here
    const double e_logits = rel_err(logits, ref.read("logits"));
    const double e_loss = std::abs(loss.item<double>() - ref.read("loss").item<double>());
    const double e_aux = std::abs(router.aux.item<double>() - ref.read("aux_loss").item<double>());
    loss.backward();
    const auto [e_grad, grads] = max_grad_err(*m, ref);
    MESSAGE(dir.filename().string(), ": logits rel err ", e_logits, ", loss err ", e_loss, ", aux err ", e_aux,
            ", max grad rel err ", e_grad, " over ", grads, " tensors");
    CHECK(e_logits < 1e-4);
    CHECK(e_loss < 1e-5);
    CHECK(e_aux < 1e-5);
    CHECK(e_grad < 1e-4);
    CHECK(grads == static_cast<int64_t>(ref.tensors().size()) - 3);
  }
}

// --- LoRA and DoRA: parity with PEFT (tests/golden/make_peft_fixtures.py; directory in SHARDLM_PEFT_GOLDEN_DIR) ---

TEST_CASE("adapters: LoRA adds s B A x; rsLoRA scales by alpha / sqrt(r); DoRA at m = ||W + s B A|| equals LoRA") {
  auto c = model::preset("llama3-debug", 1);
  model::AdapterConfig a;
  a.kind = adapter::LoRA::rules, a.rank = 4, a.alpha = 8, a.targets = {"q"};
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
      const auto name = "grad." + io::peft_key(item.key(), adapter.config);
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

// --- selective activation checkpointing (model/selective.hpp) -------------------------------------------

namespace {
/// The gradients of `inputs` for outputs `ys` with incoming gradients `gs` (each input's .grad cleared first).
std::vector<at::Tensor> grads_of(const std::vector<at::Tensor>& ys, const std::vector<at::Tensor>& gs,
                                 const std::vector<at::Tensor>& inputs) {
  for (auto t : inputs) t.mutable_grad() = at::Tensor();
  torch::autograd::backward(ys, gs);
  std::vector<at::Tensor> out;
  for (const auto& t : inputs) out.push_back(t.grad().clone());
  return out;
}
}  // namespace

TEST_CASE("selective nodes equal autograd over the plain ops bit for bit, forward and gradients, fp32 and bf16") {
  // The same ATen ops in the same dtypes, the projections' input gradients summed in the engine's order, the norm's
  // input gradient autograd's own over the recomputed norm.
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    CAPTURE(dtype);
    const int64_t B = 2, T = 5, C = 16, O1 = 24, O2 = 8, I = 12, H = 2, D = 8;
    const auto opts = at::TensorOptions().dtype(dtype);
    const double eps = 1e-5;
    SUBCASE("rms_norm_linear: norm(x) W_i^T for several W_i, keeping x") {
      const auto x = (3 * at::randn({B, T, C}, opts)).requires_grad_(true);
      const auto nw = (1 + 0.1 * at::randn({C}, opts)).requires_grad_(true);
      const auto w1 = (0.2 * at::randn({O1, C}, opts)).requires_grad_(true);
      const auto w2 = (0.2 * at::randn({O2, C}, opts)).requires_grad_(true);
      const auto g1 = at::randn({B, T, O1}, opts), g2 = at::randn({B, T, O2}, opts);
      // two projections (gate, up), whose input gradients add in either order; three (q, k, v): the block test below
      const auto h = model::ops::rms_norm(x, nw, eps);
      const std::vector<at::Tensor> ref{at::linear(h, w1), at::linear(h, w2)};
      const auto ref_g = grads_of(ref, {g1, g2}, {x, nw, w1, w2});
      const auto ys = model::ops::rms_norm_linear(x, nw, eps, {w1, w2});
      for (size_t i = 0; i < ys.size(); ++i) CHECK(at::equal(ys[i], ref[i]));
      const auto got = grads_of(ys, {g1, g2}, {x, nw, w1, w2});
      for (size_t i = 0; i < got.size(); ++i) {
        CAPTURE(i);
        CHECK(at::equal(got[i], ref_g[i]));
      }
      // a frozen weight gets no gradient and costs none
      w2.requires_grad_(false);
      w2.mutable_grad() = at::Tensor();
      const auto ys2 = model::ops::rms_norm_linear(x, nw, eps, {w1, w2});
      torch::autograd::backward({ys2[0]}, {g1});
      CHECK_FALSE(w2.grad().defined());
      w2.requires_grad_(true);
    }
    SUBCASE("rms_norm_saving_input: the norm alone") {
      const auto x = (3 * at::randn({B, T, C}, opts)).requires_grad_(true);
      const auto nw = (1 + 0.1 * at::randn({C}, opts)).requires_grad_(true);
      const auto g = at::randn({B, T, C}, opts);
      const auto ref = model::ops::rms_norm(x, nw, eps);
      const auto ref_g = grads_of({ref}, {g}, {x, nw});
      const auto y = model::ops::rms_norm_saving_input(x, nw, eps);
      CHECK(at::equal(y, ref));
      const auto got = grads_of({y}, {g}, {x, nw});
      CHECK(at::equal(got[0], ref_g[0]));
      CHECK(at::equal(got[1], ref_g[1]));
    }
    SUBCASE("swiglu_down: silu(gate) * up times W_down^T, keeping gate and up") {
      const auto gate = at::randn({B, T, I}, opts).requires_grad_(true), up = at::randn({B, T, I}, opts).requires_grad_(true);
      const auto wd = (0.3 * at::randn({C, I}, opts)).requires_grad_(true);
      const auto g = at::randn({B, T, C}, opts);
      const auto ref = at::linear(at::silu(gate) * up, wd);
      const auto ref_g = grads_of({ref}, {g}, {gate, up, wd});
      const auto y = model::ops::swiglu_down(gate, up, wd);
      CHECK(at::equal(y, ref));
      const auto got = grads_of({y}, {g}, {gate, up, wd});
      for (size_t i = 0; i < got.size(); ++i) {
        CAPTURE(i);
        CHECK(at::equal(got[i], ref_g[i]));
      }
    }
    SUBCASE("heads_linear and rope: the output projection of SDPA's heads, RoPE keeping nothing") {
      const auto q = at::randn({B, H, T, D}, opts).requires_grad_(true);
      const auto wo = (0.3 * at::randn({C, H * D}, opts)).requires_grad_(true);
      const auto rope = model::ops::rope_tables(model::ops::rope_inv_freq(model::RopeConfig{}, D), T, dtype);
      const auto g = at::randn({B, T, C}, opts);
      const auto rotated = model::ops::apply_rope(q, rope);
      const auto ref = at::linear(rotated.transpose(1, 2).reshape({B, T, H * D}), wo);
      const auto ref_g = grads_of({ref}, {g}, {q, wo});
      const auto y = model::ops::heads_linear(model::ops::apply_rope_saving_nothing(q, rope), wo);
      CHECK(at::equal(y, ref));
      const auto got = grads_of({y}, {g}, {q, wo});
      CHECK(at::equal(got[0], ref_g[0]));
      CHECK(at::equal(got[1], ref_g[1]));
    }
  }
}

namespace {
/// Counts the bytes of live CPU allocations while installed (c10::SetCPUAllocator): what a forward leaves alive.
struct CountingCpuAllocator final : c10::Allocator {
  struct Block {
    c10::DataPtr inner;
    size_t bytes;
    CountingCpuAllocator* owner;
  };
  c10::Allocator* base = c10::GetCPUAllocator();
  std::atomic<int64_t> live{0};
  static void free_block(void* p) {
    auto* b = static_cast<Block*>(p);
    b->owner->live -= static_cast<int64_t>(b->bytes);
    delete b;
  }
  c10::DataPtr allocate(size_t n) override {
    auto inner = base->allocate(n);
    void* data = inner.get();
    const auto device = inner.device();
    live += static_cast<int64_t>(n);
    return {data, new Block{std::move(inner), n, this}, &free_block, device};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

/// Bytes a block's forward leaves alive with its graph (its output and what autograd saves), under `rules`: None and
/// Selective keep the graph, EveryBlock runs it without (the engine recomputes it in backward).
int64_t block_forward_bytes(model::Llama3& m, const checkpointing::Rules& rules, const at::Tensor& x) {
  static CountingCpuAllocator counting;
  m->set_checkpointing(rules);
  const auto& rope = m->rope(x.size(1), x.device(), x.scalar_type());  // cached before counting
  c10::SetCPUAllocator(&counting, /*priority=*/100);
  const int64_t before = counting.live;
  at::Tensor y;
  {
    std::optional<at::NoGradGuard> no_grad;
    if (rules.recomputes(0)) no_grad.emplace();
    y = m->block(0, x, rope);
  }
  const int64_t bytes = counting.live - before;
  c10::SetCPUAllocator(counting.base, /*priority=*/100);
  return bytes;
}
}  // namespace

TEST_CASE("selective: a Llama block's saved bytes, measured on the CPU, against the planner's per-policy count") {
  // One llama3-debug block (C 128, I 384, 4 heads of 32, 2 KV heads), fp32, B 2 x T 64. What its forward leaves
  // alive is counted by a CPU allocator that tracks live bytes; the planner counts CUDA's kernels (flash attention),
  // so the attention part differs on the CPU, but None and Selective differ only in what the nodes drop: the planner's
  // difference, plus the two RMSNorms' fp32 rstd that the plain path keeps and the planner leaves out, less the
  // output projection's re-laid-out input where SDPA returns its output laid out as [B, T, H, D] already (then the
  // plain path's reshape is a view: the LibTorch 2.11 CPU kernel does).
  const auto c = model::preset("llama3-debug", 1);
  model::Llama3 m(c);
  model::init_weights(*m, 0.02, 1);
  const int64_t B = 2, T = 64, tokens = B * T;
  const auto x = at::randn({B, T, c.hidden_size}).requires_grad_(true);
  const auto none = block_forward_bytes(m, checkpointing::None::rules, x);
  const auto selective = block_forward_bytes(m, checkpointing::Selective::rules, x);
  const auto every = block_forward_bytes(m, checkpointing::EveryBlock::rules, x);
  const double planned_none = plan::detail::block_activation_bytes_per_token(c, 4, checkpointing::None::rules);
  const double planned_sel = plan::detail::block_activation_bytes_per_token(c, 4, checkpointing::Selective::rules);
  MESSAGE("llama3-debug block, fp32, ", tokens, " tokens: bytes per token left alive by the forward: none ",
          none / tokens, ", selective ", selective / tokens, ", every-block ", every / tokens, " (the output alone: ",
          4 * c.hidden_size, "); planner (CUDA kernels, with the input): none ", planned_none, ", selective ", planned_sel);
  CHECK(every == tokens * 4 * c.hidden_size);
  CHECK(selective < none);
  // the heads as the model makes them: views [B, H, T, D] of the projections' [B, T, H, D]
  const auto q = at::randn({B, T, c.num_heads, c.head_dim}).requires_grad_(true).transpose(1, 2);
  const auto kv = at::randn({B, T, c.num_kv_heads, c.head_dim}).requires_grad_(true).transpose(1, 2);
  const bool relaid_view = compat::causal_attention(q, kv, kv).transpose(1, 2).is_contiguous();
  MESSAGE("SDPA's output laid out as [B, T, H, D] (the re-layout a view): ", relaid_view);
  const int64_t relaid = relaid_view ? 4 * c.num_heads * c.head_dim : 0;
  CHECK((none - selective) / tokens == static_cast<int64_t>(planned_none - planned_sel) + 2 * 4 - relaid);
}

TEST_CASE("selective: Llama and Mixtral give the loss and gradients of None, bit for bit in bf16, and refuse adapters") {
  // bf16: the same ops in the same order. fp32 on the CPU: the plain path adds a norm's input gradients (the residual's
  // and the composite RMSNorm's two uses of x) in one buffer, the node the norm's two first: fp32 rounding.
  for (const auto dtype : {at::kFloat, at::kBFloat16})
  for (const std::string preset : {"llama3-debug", "mixtral-debug"}) {
    CAPTURE(preset);
    CAPTURE(dtype);
    const auto c = model::preset(preset, 2);
    const auto ids = at::randint(0, c.vocab_size, {2, 16});
    auto run = [&](const checkpointing::Rules& rules) {
      at::manual_seed(0);
      auto m = train::model_factory_for(c)(c, at::TensorOptions().dtype(dtype));
      model::init_weights(m->module(), 0.02, 3);
      m->set_checkpointing(rules);
      std::vector<at::Tensor> sides;
      at::Tensor x = ids;
      for (size_t u = 0; u < m->num_units(); ++u) x = m->forward_unit(u, x), sides.push_back(m->take_side(u));
      auto loss = model::ops::next_token_loss(x, ids);
      loss.backward();
      std::vector<at::Tensor> grads;
      for (const auto& p : m->module().parameters()) grads.push_back(p.grad());
      return std::pair{loss.item<double>(), grads};
    };
    const auto [loss_none, g_none] = run(checkpointing::None::rules);
    const auto [loss_sel, g_sel] = run(checkpointing::Selective::rules);
    CHECK(loss_sel == loss_none);
    REQUIRE(g_sel.size() == g_none.size());
    double worst = 0;
    for (size_t i = 0; i < g_sel.size(); ++i) worst = std::max(worst, rel_err(g_sel[i], g_none[i]));
    MESSAGE(preset, " ", dtype, ": loss ", loss_none, " vs ", loss_sel, ", worst gradient rel err ", worst);
    CHECK(worst <= (dtype == at::kFloat ? 2e-6 : 0.0));
  }
  auto c = model::preset("llama3-debug", 1);
  model::Llama3 m(c);
  model::AdapterConfig lora;
  lora.kind = adapter::LoRA::rules;
  m->add_adapters(lora);
  CHECK_THROWS_WITH_AS(m->set_checkpointing(checkpointing::Selective::rules),
                       doctest::Contains("checkpointing::Selective fuses each RMSNorm"), ConfigError);
}

// precision::FP8's linears (model/fp8_linear.hpp) against a reference that quantizes every value itself, from the
// e4m3 format's definition, in fp64.
namespace {
/// v (|v| <= 448) rounded to e4m3fn: 3 mantissa bits, normals from 2^-6, subnormals in steps of 2^-9, ties to even.
double e4m3_round(double v) {
  const double a = std::fabs(v);
  if (a == 0) return 0;
  int e = 0;
  std::frexp(a, &e);  // a = f 2^e, f in [0.5, 1): the leading bit is 2^(e - 1)
  const double step = std::ldexp(1.0, std::max(e - 1, -6) - 3);
  return std::copysign(std::nearbyint(a / step) * step, v);
}
/// The smallest power of two s >= 2^-126 with amax / s <= 448; 1 for an all-zero group.
double reference_scale(double amax) {
  if (amax == 0) return 1;
  double s = std::ldexp(1.0, -126);
  while (amax / s > 448) s *= 2;
  return s;
}
/// x [R, C] quantized per row by the reference: the values code x scale, fp64 [R, C], and the scales [R].
std::pair<at::Tensor, at::Tensor> reference_rows(const at::Tensor& x) {
  const auto d = x.to(at::kDouble).contiguous();
  auto values = at::empty_like(d), scales = at::empty({d.size(0)}, d.options());
  const auto in = d.accessor<double, 2>();
  auto out = values.accessor<double, 2>();
  for (int64_t r = 0; r < d.size(0); ++r) {
    double amax = 0;
    for (int64_t c = 0; c < d.size(1); ++c) amax = std::max(amax, std::fabs(in[r][c]));
    const double s = reference_scale(amax);
    scales[r] = s;
    for (int64_t c = 0; c < d.size(1); ++c) out[r][c] = e4m3_round(in[r][c] / s) * s;
  }
  return {values, scales};
}
/// |got - want| within one rounding to bf16 of want (fp32 accumulation besides): the products of the dequantized
/// operands are exact, only their sum and the final rounding differ from fp64.
void check_within_bf16(const at::Tensor& got, const at::Tensor& want) {
  const auto g = got.to(at::kDouble), w = want.to(at::kDouble);
  const double worst = ((g - w).abs() - w.abs() * std::ldexp(1.0, -8) - 1e-30).max().item<double>();
  CHECK(worst <= 0);
}
}  // namespace

TEST_CASE("fp8 linear: codes and scales are the reference's bit for bit; zero rows, huge and tiny values") {
  at::manual_seed(11);
  // rows of magnitudes 1e-3 .. 1e3, an all-zero row, one huge value, a row of bf16 subnormals
  auto x = (at::randn({6, 48}) * at::pow(10.0, at::arange(-3, 3).to(at::kFloat)).unsqueeze(1)).to(at::kBFloat16);
  x[1].zero_();
  x[2][5] = 1e30;
  x[3] = at::full({48}, 3e-39, at::kFloat).to(at::kBFloat16) * at::randn({48}).sign().to(at::kBFloat16);
  const auto q = model::fp8::quantize_rows(x);
  CHECK((q.codes.scalar_type() == at::kFloat8_e4m3fn));
  const auto [values, scales] = reference_rows(x);
  CHECK(at::equal(q.scale.squeeze(1).to(at::kDouble), scales));
  CHECK(at::equal((q.codes.to(at::kDouble) * q.scale.to(at::kDouble)), values));
  CHECK(q.scale[1].item<float>() == 1.0f);
  CHECK(q.codes[1].to(at::kFloat).abs().max().item<float>() == 0.0f);
  CHECK(q.codes.to(at::kFloat).isfinite().all().item<bool>());
  CHECK(q.codes.to(at::kFloat).abs().amax(1).min().item<float>() >= 0);  // no NaN codes
  CHECK(q.codes[3].to(at::kFloat).abs().min().item<float>() > 0);        // subnormal inputs keep their values
  // the huge value owns its row's scale; it leaves the other rows alone
  const auto rest = model::fp8::quantize_rows(at::cat({x.narrow(0, 0, 2), x.narrow(0, 3, 3)}));
  CHECK(at::equal(rest.codes.to(at::kFloat), at::cat({q.codes.narrow(0, 0, 2), q.codes.narrow(0, 3, 3)}).to(at::kFloat)));
}

TEST_CASE("fp8 linear: forward and backward against the reference's quantization; the weight gradient in bf16") {
  at::manual_seed(12);
  const int64_t B = 2, T = 5, K = 64, N = 32;
  auto x = at::randn({B, T, K}).to(at::kBFloat16);
  x[0][1].zero_();         // an all-zero token
  x[1][2][7] = 3e4;        // an outlier in one token
  auto w = (at::randn({N, K}) * 0.05).to(at::kBFloat16);
  const auto xr = x.detach().requires_grad_(), wr = w.detach().requires_grad_();
  const auto y = model::fp8::linear(xr, wr);  // [B, T, N]
  REQUIRE((y.sizes() == at::IntArrayRef({B, T, N})));
  CHECK((y.scalar_type() == at::kBFloat16));
  const auto x2 = x.reshape({-1, K});
  const auto [xq, xs] = reference_rows(x2);
  const auto [wq, ws] = reference_rows(w);
  check_within_bf16(y.reshape({-1, N}), xq.mm(wq.t()));
  CHECK(y[0][1].abs().max().item<float>() == 0.0f);
  // the plain bf16 product is close (e4m3 keeps 4 significant bits: a few percent)
  const double vs_plain = rel_err(y, at::linear(x, w));
  MESSAGE("fp8 vs bf16 forward: rel err ", vs_plain);
  CHECK(vs_plain < 0.08);

  const auto dy = at::randn({B, T, N}).to(at::kBFloat16);
  y.backward(dy);
  const auto dy2 = dy.reshape({-1, N});
  const auto [dyq, dys] = reference_rows(dy2);
  const auto [wtq, wts] = reference_rows(w.t());  // W per column: its transpose per row
  check_within_bf16(xr.grad().reshape({-1, K}), dyq.mm(wtq.t()));
  CHECK(at::equal(wr.grad(), dy2.t().mm(x2)));  // grad_weight: bf16, the plain path's product
  // a frozen weight (an adapter's base) gets no gradient, the input still does
  const auto xf = x.detach().requires_grad_();
  model::fp8::linear(xf, w).backward(dy);
  CHECK(at::equal(xf.grad(), xr.grad()));
}

TEST_CASE("fp8 linear: the decoder sets exactly the blocks' projections; odd sizes and Selective are refused") {
  auto c = model::preset("llama3-debug", 2);
  model::Llama3 m(c, at::TensorOptions().dtype(at::kBFloat16));
  model::init_weights(*m, 0.02, 5);
  m->set_precision(precision::FP8::rules);
  int fp8 = 0;
  for (const auto& item : m->named_modules("", false))
    if (auto* l = dynamic_cast<model::LinearImpl*>(item.value().get()))
      fp8 += l->compute() == precision::LinearCompute::fp8_rowwise;
  CHECK(fp8 == 2 * 7);
  CHECK((m->lm_head->compute() == precision::LinearCompute::plain));
  // the forward goes through float8: different from the plain model's, close to it
  const auto ids = at::randint(c.vocab_size, {2, 16}, at::kLong);
  const auto logits = m->forward(ids);
  m->set_precision(precision::MixedBF16::rules);
  const auto plain = m->forward(ids);
  CHECK(!at::equal(logits, plain));
  CHECK(rel_err(logits, plain) < 0.1);
  // a Linear with an adapter keeps its adapter's layers plain
  model::AdapterConfig lora;
  lora.kind = adapter::LoRA::rules;
  m->add_adapters(lora);
  m->set_precision(precision::FP8::rules);
  CHECK((m->layers[0]->attn->q_proj->compute() == precision::LinearCompute::fp8_rowwise));
  CHECK((m->layers[0]->attn->q_proj->lora_A->compute() == precision::LinearCompute::plain));

  auto odd = model::preset("llama3-debug", 1);
  odd.intermediate_size = 100;
  model::Llama3 o(odd);
  CHECK_THROWS_WITH_AS(o->set_precision(precision::FP8::rules),
                       doctest::Contains("--precision fp8: layers.0.mlp.gate_proj maps 128 to 100 features; float8 matmuls "
                                         "(at::_scaled_mm) need both multiples of 16"),
                       ConfigError);
  model::Llama3 s(model::preset("llama3-debug", 1));
  s->set_checkpointing(checkpointing::Selective::rules);
  CHECK_THROWS_WITH_AS(s->set_precision(precision::FP8::rules),
                       doctest::Contains("--precision fp8 with --checkpointing selective: precision::FP8 computes"), ConfigError);
  model::Llama3 f(model::preset("llama3-debug", 1));
  f->set_precision(precision::FP8::rules);
  CHECK_THROWS_WITH_AS(f->set_checkpointing(checkpointing::Selective::rules),
                       doctest::Contains("--checkpointing selective with --precision fp8"), ConfigError);
  CHECK_THROWS_WITH_AS(recipe_named("full", "fp8", "selective", "none"),
                       doctest::Contains("--checkpointing selective with --precision fp8: precision::FP8 computes"), ConfigError);
  // Mixtral: the attention's projections in float8, the router and the experts not
  model::Mixtral x(model::preset("mixtral-debug", 1));
  x->set_precision(precision::FP8::rules);
  CHECK((x->layers[0]->attn->o_proj->compute() == precision::LinearCompute::fp8_rowwise));
  CHECK((x->layers[0]->ffn->gate->compute() == precision::LinearCompute::plain));
}
