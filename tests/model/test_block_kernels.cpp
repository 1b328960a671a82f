// The block kernels (model/block_kernels.hpp): every NVRTC source of the project compiles (without a GPU: the check CI
// runs), and on a GPU (scripts/gpu.sh fused) each kernel against the ATen path it replaces, forward and gradients, at
// odd sizes, aligned and not; then whole bf16 models with the kernels and without.
#include <doctest/doctest.h>
#include <shardlm/shardlm.hpp>

#include <cmath>
#include <vector>

#include "../test_util.hpp"

using namespace shardlm;
using model::BlockKernels;
using test::rel_err;

TEST_CASE("the project's CUDA kernel sources compile with NVRTC for sm_90, without a GPU") {
#if SHARDLM_HAVE_CUDA
  // The block kernels' programs (test_model compiles the other programs of the project).
  const std::vector<const nvrtc::Program*> programs{&model::fused::detail::norm_rope_program,
                                                    &model::fused::detail::swiglu_program};
  for (const auto* p : programs) {
    CAPTURE(p->name);
    std::string cubin;
    CHECK_NOTHROW(cubin = nvrtc::compile_for_arch(*p, 90));
    CHECK(cubin.size() > 1000);
  }
  // An error comes back with NVRTC's log, naming the program.
  const nvrtc::Program broken{"shardlm_broken.cu", "extern \"C\" __global__ void f() { int x = ; }"};
  CHECK_THROWS_WITH(nvrtc::compile_for_arch(broken, 90), doctest::Contains("shardlm_broken.cu"));
#else
  MESSAGE("LibTorch without CUDA: no NVRTC (skipped)");
#endif
}

TEST_CASE("the block kernels serve bf16 GPU tensors under BlockKernels::fused only; the rest takes the ATen ops") {
  const auto x = at::randn({2, 3, 8}).to(at::kBFloat16), w = at::ones({8}, at::kBFloat16);
  CHECK_FALSE(model::fused::serve(BlockKernels::fused, x));  // CPU tensors
  CHECK_FALSE(model::fused::serve_rms_norm(BlockKernels::fused, x, w));
  CHECK(model::block_kernels_named("fused") == BlockKernels::fused);
  CHECK(model::block_kernels_named("aten") == BlockKernels::aten);
  CHECK_THROWS_WITH_AS(model::block_kernels_named("triton"), doctest::Contains("--block-kernels 'triton': use fused or aten"),
                       ConfigError);
  // On the CPU the fused choice is the ATen path itself.
  const auto y = model::ops::rms_norm(x, w, 1e-5, BlockKernels::fused);
  CHECK(at::equal(y, model::ops::rms_norm(x, w, 1e-5)));
  if (!torch::cuda::is_available()) return;
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  CHECK(model::fused::serve(BlockKernels::fused, x.to(at::kCUDA)));
  CHECK_FALSE(model::fused::serve(BlockKernels::aten, x.to(at::kCUDA)));
  CHECK_FALSE(model::fused::serve(BlockKernels::fused, at::randn({2, 8}, cuda)));  // fp32
  CHECK_FALSE(model::fused::serve_rms_norm(BlockKernels::fused, at::randn({2, 16392}, cuda.dtype(at::kBFloat16)),
                                           at::ones({16392}, cuda.dtype(at::kBFloat16))));  // rows past 16384
  CHECK_FALSE(model::fused::serve_rms_norm(BlockKernels::fused, x.to(at::kCUDA), at::ones({8}, cuda)));  // fp32 weight
}

namespace {
bool skip_without_cuda() {
  if (torch::cuda::is_available()) return false;
  MESSAGE("no CUDA device: skipped (scripts/gpu.sh fused runs it)");
  return true;
}

/// v in a fresh buffer at `offset` elements past its start (1: off every 16-byte boundary, the kernels' scalar path).
at::Tensor placed(const at::Tensor& v, int64_t offset) {
  auto buffer = at::empty({v.numel() + offset}, v.options());
  auto t = buffer.narrow(0, offset, v.numel()).view(v.sizes());
  t.copy_(v);
  return t;
}

/// The largest distance between bf16 tensors in units in the last place (bit patterns ordered through zero).
int64_t max_ulps(const at::Tensor& a, const at::Tensor& b) {
  const auto ordered = [](const at::Tensor& t) {
    const auto i = t.detach().contiguous().view(at::kShort).to(at::kInt);
    return at::where(i < 0, -i.bitwise_and(0x7fff), i);
  };
  return (ordered(a) - ordered(b)).abs().max().item<int64_t>();
}
double equal_fraction(const at::Tensor& a, const at::Tensor& b) { return a.eq(b).to(at::kDouble).mean().item<double>(); }

/// Whether every element of a lies within one bf16 rounding of b's, plus `slack` (absolute, broadcast): how fp32 sums
/// taken in another order may move a result that is rounded to bf16.
bool within_rounding(const at::Tensor& a, const at::Tensor& b, const at::Tensor& slack) {
  const auto x = a.detach().to(at::kDouble), y = b.detach().to(at::kDouble);
  const auto ulp = at::pow(2.0, at::floor(at::log2(y.abs().clamp_min(1e-30))) - 7);  // bf16: 8 significant bits
  return ((x - y).abs() <= ulp + slack.to(x.device(), at::kDouble)).all().item<bool>();
}

/// A fresh leaf copy of a value, for one path's gradients, placed at `offset` as placed() places it.
struct Leaf {
  at::Tensor t;
  explicit Leaf(const at::Tensor& v, int64_t offset = 0) : t(placed(v.detach(), offset).requires_grad_()) {}
};
}  // namespace

TEST_CASE("CUDA: the RMSNorm kernels against the ATen path: forward and gradients within a rounding, deterministic") {
  if (skip_without_cuda()) return;
  at::manual_seed(23);
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const double eps = 1e-5;
  struct Shape {
    int64_t N, C;
  };
  int64_t worst_n = 0, worst_y = 0, worst_dx = 0, worst_dw = 0;
  // C: 13 and 1000, 2049 (not multiples of 8: the scalar path), 8 .. 16384 (K = 1, 2, 4, 8 chunks a thread); N 1030:
  // more rows than backward blocks.
  for (const auto [N, C] : {Shape{1, 8}, Shape{67, 13}, Shape{1030, 64}, Shape{37, 1000}, Shape{5, 2049},
                            Shape{600, 4096}, Shape{3, 5120}, Shape{9, 16384}})
    for (const int64_t offset : {0, 1, 2}) {  // 0: all 16-byte aligned; 1: none; 2: only the weight not (a flat view)
      CAPTURE(N);
      CAPTURE(C);
      CAPTURE(offset);
      const auto bf16 = cuda.dtype(at::kBFloat16);
      const auto x = placed((at::randn({N, C}, cuda) * 3).to(at::kBFloat16), offset == 1 ? 1 : 0);
      const auto w = placed((1 + 0.1 * at::randn({C}, cuda)).to(at::kBFloat16), offset == 0 ? 0 : 1);
      const auto dy = placed(at::randn({N, C}, bf16), offset == 1 ? 1 : 0);
      REQUIRE(model::fused::serve_rms_norm(BlockKernels::fused, x, w));
      // The normalized x alone (weight 1): bf16(x rstd) within one rounding (rstd's sum is ordered otherwise).
      const auto ones = at::ones({C}, bf16);
      const auto n_ref = model::ops::rms_norm(x, ones, eps, BlockKernels::aten);
      const auto n = model::ops::rms_norm(x, ones, eps, BlockKernels::fused);
      worst_n = std::max(worst_n, max_ulps(n, n_ref));
      CHECK(max_ulps(n, n_ref) <= 1);
      const auto x64 = x.to(at::kDouble);
      const auto out = model::fused::rms_norm_forward(x, w, eps);
      CHECK(rel_err(out.rstd, (x64.pow(2).mean(-1) + eps).rsqrt()) < 1e-6);
      // Forward and gradients through autograd, as the model runs them.
      Leaf xa(x), wa(w), xf(x, offset == 1 ? 1 : 0), wf(w, offset == 0 ? 0 : 1);
      const auto ya = model::ops::rms_norm(xa.t, wa.t, eps, BlockKernels::aten);
      const auto yf = model::ops::rms_norm(xf.t, wf.t, eps, BlockKernels::fused);
      ya.backward(dy);
      yf.backward(dy);
      CHECK(at::equal(yf, out.y));
      CHECK(at::equal(yf, w * n));  // the weight's product rounded as ATen's bf16 mul rounds it
      worst_y = std::max(worst_y, max_ulps(yf, ya));
      // w times an n one rounding apart: up to 2.8 units of y's last place where w n falls a binade below n, rounded
      CHECK(max_ulps(yf, ya) <= 3);
      const auto dxa = xa.t.grad(), dxf = xf.t.grad(), dwa = wa.t.grad(), dwf = wf.t.grad();
      worst_dx = std::max(worst_dx, max_ulps(dxf, dxa));
      worst_dw = std::max(worst_dw, max_ulps(dwf, dwa));
      // x's gradient: one rounding, plus fp32 noise where g - n mean(g n) cancels.
      CHECK(within_rounding(dxf, dxa, at::scalar_tensor(std::ldexp(dxa.abs().max().item<double>(), -17))));
      // The weight's: the same bf16 products (dy * n) summed in fp32 in another order: one rounding plus the fp32 sum's
      // error bound over the column's terms.
      const auto terms = (dy.to(at::kDouble) * n_ref.to(at::kDouble)).abs().sum(0);  // [C]
      CHECK(within_rounding(dwf, dwa, terms * std::ldexp(1.0, -16)));
      // Deterministic: the same bits again.
      const auto again = model::fused::rms_norm_backward(dy, x, w, out.rstd);
      CHECK(at::equal(again.dx, dxf));
      CHECK(at::equal(again.dw, dwf));
      if (offset == 0)
        MESSAGE("N ", N, " C ", C, ": equal to the ATen path: n ", equal_fraction(n, n_ref), ", y ", equal_fraction(yf, ya),
                ", dx ", equal_fraction(dxf, dxa), ", dw ", equal_fraction(dwf, dwa));
    }
  MESSAGE("RMSNorm kernels vs the ATen path, max ulps (bf16): normalized ", worst_n, ", output ", worst_y, ", dx ",
          worst_dx, ", dw ", worst_dw);
}

TEST_CASE("CUDA: the SwiGLU kernels give the ATen ops' bf16 results bit for bit, forward and gradients") {
  if (skip_without_cuda()) return;
  at::manual_seed(29);
  const auto cuda = at::TensorOptions().device(at::kCUDA), bf16 = cuda.dtype(at::kBFloat16);
  for (const auto& shape : {std::vector<int64_t>{1, 7, 13}, std::vector<int64_t>{2, 33, 1000},
                            std::vector<int64_t>{3, 5, 14336}})
    for (const int64_t offset : {0, 1}) {
      CAPTURE(shape);
      CAPTURE(offset);
      auto g0 = (at::randn(shape, cuda) * 3).to(at::kBFloat16);
      // silu's tails and zeros: exp overflowing to inf, -0
      const auto tails = at::tensor({-100.0, -20.0, -0.0, 0.0, 20.0, 100.0, -88.5, 89.0}, at::kDouble).to(bf16);
      g0.view(-1).narrow(0, 0, 8).copy_(tails);
      const auto gate = placed(g0, offset), up = placed(at::randn(shape, bf16), offset);
      const auto dy = placed(at::randn(shape, bf16), offset);
      Leaf ga(gate), ua(up), gf(gate, offset), uf(up, offset);
      const auto ya = at::silu(ga.t) * ua.t;
      const auto yf = model::ops::swiglu_product(gf.t, uf.t, BlockKernels::fused);
      CHECK(at::equal(yf, ya));
      ya.backward(dy);
      yf.backward(dy);
      CHECK(at::equal(gf.t.grad(), ga.t.grad()));
      CHECK(at::equal(uf.t.grad(), ua.t.grad()));
      // The selective node (SwiGLU and the down projection): its gradients and the recomputed product's.
      const int64_t I = shape.back(), C = 24;
      const auto wd = (0.3 * at::randn({C, I}, cuda)).to(at::kBFloat16);
      const auto dz = at::randn({shape[0], shape[1], C}, bf16);
      Leaf ga2(gate), ua2(up), wa(wd), gf2(gate, offset), uf2(up, offset), wf(wd);
      const auto za = model::ops::swiglu_down(ga2.t, ua2.t, wa.t, BlockKernels::aten);
      const auto zf = model::ops::swiglu_down(gf2.t, uf2.t, wf.t, BlockKernels::fused);
      CHECK(at::equal(zf, za));
      za.backward(dz);
      zf.backward(dz);
      CHECK(at::equal(gf2.t.grad(), ga2.t.grad()));
      CHECK(at::equal(uf2.t.grad(), ua2.t.grad()));
      CHECK(at::equal(wf.t.grad(), wa.t.grad()));
    }
}

TEST_CASE("CUDA: the RoPE kernel gives apply_rope's bf16 results bit for bit on q and k, forward and gradients") {
  if (skip_without_cuda()) return;
  at::manual_seed(31);
  const auto cuda = at::TensorOptions().device(at::kCUDA), bf16 = cuda.dtype(at::kBFloat16);
  struct Dims {
    int64_t B, T, H, Hk, D;
  };
  for (const auto d : {Dims{2, 37, 4, 2, 128}, Dims{1, 5, 3, 3, 6}, Dims{3, 1, 2, 1, 64}}) {
    CAPTURE(d.T);
    CAPTURE(d.D);
    model::RopeConfig rc;
    rc.type = "llama3", rc.theta = 500000, rc.factor = 8;
    const auto rope = model::ops::rope_tables(model::ops::rope_inv_freq(rc, d.D).to(at::kCUDA), d.T, at::kBFloat16);
    for (const bool projected : {true, false}) {  // the model's [B, T, heads * D] views, or contiguous [B, heads, T, D]
      CAPTURE(projected);
      const auto q0 = projected ? at::randn({d.B, d.T, d.H * d.D}, bf16) : at::randn({d.B, d.H, d.T, d.D}, bf16);
      const auto k0 = projected ? at::randn({d.B, d.T, d.Hk * d.D}, bf16) : at::randn({d.B, d.Hk, d.T, d.D}, bf16);
      const auto heads = [&](const at::Tensor& t, int64_t h) {
        return projected ? t.view({d.B, d.T, h, d.D}).transpose(1, 2) : t;
      };
      const auto dq = at::randn({d.B, d.H, d.T, d.D}, bf16), dk = at::randn({d.B, d.T, d.Hk, d.D}, bf16).transpose(1, 2);
      Leaf qa(q0), ka(k0), qf(q0), kf(k0);
      const auto ra = model::ops::rope_qk(heads(qa.t, d.H), heads(ka.t, d.Hk), rope, BlockKernels::aten);
      const auto rf = model::ops::rope_qk(heads(qf.t, d.H), heads(kf.t, d.Hk), rope, BlockKernels::fused);
      CHECK(at::equal(rf.first, ra.first));
      CHECK(at::equal(rf.second, ra.second));
      torch::autograd::backward({ra.first, ra.second}, {dq, dk});
      torch::autograd::backward({rf.first, rf.second}, {dq, dk});
      CHECK(at::equal(qf.t.grad(), qa.t.grad()));
      CHECK(at::equal(kf.t.grad(), ka.t.grad()));
      // Only the query read back: the key gets no gradient from it, the query the same one.
      Leaf q1(q0), k1(k0);
      const auto r1 = model::ops::rope_qk(heads(q1.t, d.H), heads(k1.t, d.Hk), rope, BlockKernels::fused);
      r1.first.backward(dq);
      CHECK(at::equal(q1.t.grad(), qf.t.grad()));
      CHECK(k1.t.grad().abs().max().item<double>() == 0);
    }
  }
}

TEST_CASE("CUDA: bf16 Llama and Mixtral with the block kernels: the ATen path's loss and gradients within bf16 noise; "
          "selective recompute gives none's loss bit for bit") {
  // Selective's gradients: the same kernels, but the q, k and v projections' input gradients are summed in bf16 in
  // the node's order, the plain path's in the autograd engine's, which the one RoPE node of q and k may change: within
  // bf16 rounding, stated.
  if (skip_without_cuda()) return;
  for (const std::string preset : {"llama3-debug", "mixtral-debug"}) {
    CAPTURE(preset);
    auto c = model::preset(preset, 2);
    const auto ids = at::randint(0, c.vocab_size, {2, 24}).to(at::kCUDA);
    auto run = [&](BlockKernels kernels, const checkpointing::Rules& rules) {
      c.block_kernels = kernels;
      at::manual_seed(0);
      auto m = train::model_factory_for(c)(c, at::TensorOptions().dtype(at::kBFloat16));
      model::init_weights(m->module(), 0.02, 3);
      m->module().to(at::kCUDA);
      m->set_checkpointing(rules);
      at::Tensor x = ids;
      for (size_t u = 0; u < m->num_units(); ++u) x = m->forward_unit(u, x), (void)m->take_side(u);
      auto loss = model::ops::next_token_loss(x, ids);
      loss.backward();
      std::vector<at::Tensor> grads;
      for (const auto& p : m->module().parameters()) grads.push_back(p.grad().clone());
      return std::pair{loss.item<double>(), grads};
    };
    const auto [loss_aten, g_aten] = run(BlockKernels::aten, checkpointing::None::rules);
    const auto [loss_fused, g_fused] = run(BlockKernels::fused, checkpointing::None::rules);
    const auto [loss_sel, g_sel] = run(BlockKernels::fused, checkpointing::Selective::rules);
    REQUIRE(g_fused.size() == g_aten.size());
    REQUIRE(g_sel.size() == g_fused.size());
    double worst = 0, worst_sel = 0;
    for (size_t i = 0; i < g_fused.size(); ++i) {
      worst = std::max(worst, rel_err(g_fused[i], g_aten[i]));
      worst_sel = std::max(worst_sel, rel_err(g_sel[i], g_fused[i]));
    }
    MESSAGE(preset, ": loss aten ", loss_aten, ", fused ", loss_fused, ", fused + selective ", loss_sel,
            "; worst gradient rel err fused vs aten ", worst, ", selective vs none (fused) ", worst_sel);
    CHECK(std::abs(loss_fused - loss_aten) < 1e-2 * std::abs(loss_aten));
    // Mixtral's router may pick another expert for a token whose top-k logits tie within a rounding: its gradients
    // are stated, not bounded.
    if (preset == "llama3-debug") CHECK(worst < 5e-2);
    CHECK(loss_sel == loss_fused);
    CHECK(worst_sel < 2e-2);
  }
}
