// The memory planner against a count made by hand (torch-free: the planner is arithmetic on the config).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <shardlm/policy/dispatch.hpp>
#include <shardlm/train/memory_plan.hpp>

#include <cmath>

using namespace shardlm;

namespace {
// V 1000, H 64, I 128, 2 layers, 4 heads of 16, 2 KV heads, untied; RMSNorm, SwiGLU and RoPE as the ATen ops keep
// their tensors (the hand counts below; the block kernels' own case counts theirs).
model::ModelConfig small() {
  model::ModelConfig m;
  m.vocab_size = 1000, m.hidden_size = 64, m.intermediate_size = 128, m.num_layers = 2;
  m.num_heads = 4, m.num_kv_heads = 2, m.head_dim = 16;
  m.block_kernels = model::BlockKernels::aten;
  return m;
}
double item(const std::vector<plan::PlanItem>& items, const std::string& name) {
  for (const auto& i : items)
    if (i.name == name) return i.bytes;
  FAIL("no item ", name);
  return 0;
}
constexpr double workspace = 2 * 32.0 * (1 << 20);
}  // namespace

TEST_CASE("planner: FullShard mixed-bf16 on 2 GPUs, counted by hand") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 2, in.gpus_per_node = 2;
  in.micro_batch = 2, in.seq_len = 8;  // 16 tokens
  const auto p = plan::plan_memory(in);
  // Units: embedding 64000; block q 4096 + k 2048 + v 2048 + o 4096 + MLP 24576 + norms 128 = 36992;
  // head 64 + 64000 = 64064. Shards of 2: 32000 + 18496 + 18496 + 32032 = 101024 elements.
  CHECK(p.shard_group == 2);
  CHECK(p.params == 64000 + 2 * 36992 + 64064);
  // State: master 4 + grad 4 + two moments 8 = 16 bytes per shard element.
  CHECK(item(p.gpu, "sharded state") == 101024.0 * 16);
  // Per block per token (bf16): input 128, norm 1 (fp32 input 256 + output 128), projections' input 128,
  // q k v out 2 (64 + 32 + 32 + 64) = 384, lse 16, attention output re-laid 128, norm 2 384, MLP input 128,
  // MLP 4 x 2 x 128 = 1024: 2704 bytes, x 16 tokens = 43264 per block.
  // The peak: the head's gradient reduction. Live: head (64064 x 2) and block 1 (36992 x 2) gathered;
  // both blocks' activations; head gradients 64064 x 2 (bf16) + flat 64064 x 4 (one micro-batch: the
  // reduce-scatter writes the gradient shard itself, no slice of its own).
  CHECK(p.peak_at == "the head's gradient reduction");
  CHECK(item(p.gpu, "gathered parameters") == 64064.0 * 2 + 36992.0 * 2);
  CHECK(item(p.gpu, "activations") == 2 * 43264.0);
  CHECK(item(p.gpu, "logits and loss") == 0);
  CHECK(item(p.gpu, "gradients in flight") == 64064.0 * 2 + 64064.0 * 4);
  CHECK(item(p.gpu, "workspace") == workspace);
  CHECK(p.gpu_peak() == 101024.0 * 16 + 202112 + 86528 + 384384 + workspace);
  CHECK(p.host.empty());
  // With accumulation, later micro-batches reduce-scatter into a slice (32032 x 4) that is then added to the shard.
  in.grad_accum = 2;
  const auto accum = plan::plan_memory(in);
  CHECK(accum.peak_at == "the head's gradient reduction");
  CHECK(item(accum.gpu, "gradients in flight") == 64064.0 * 2 + 64064.0 * 4 + 32032.0 * 4);
}

TEST_CASE("planner: on one rank the first micro-batch casts the gradients straight into the shard") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 1, in.gpus_per_node = 1;
  in.micro_batch = 1, in.seq_len = 2;  // 2 tokens: the gradient reductions outweigh the loss
  const auto p = plan::plan_memory(in);
  CHECK(p.shard_group == 1);
  // The head's bf16 gradients only: no flat buffer, no slice.
  CHECK(p.peak_at == "the head's gradient reduction");
  CHECK(item(p.gpu, "gradients in flight") == 64064.0 * 2);
  // With accumulation, later micro-batches cast into a flat buffer (64064 x 4) added to the shard.
  in.grad_accum = 2;
  const auto accum = plan::plan_memory(in);
  CHECK(accum.peak_at == "the head's gradient reduction");
  CHECK(item(accum.gpu, "gradients in flight") == 64064.0 * 2 + 64064.0 * 4);
  // Offloaded, the flat buffer is what is copied to the host (bf16 here: one rank, one micro-batch).
  in.grad_accum = 1, in.recipe.offload = offload_named("cpu");
  const auto off = plan::plan_memory(in);
  CHECK(off.peak_at == "the head's gradient reduction");
  CHECK(item(off.gpu, "gradients in flight") == 64064.0 * 2 + 64064.0 * 2);
}

TEST_CASE("planner: the block kernels keep each norm's input and rstd, and SwiGLU no silu(gate), in bf16 only") {
  plan::PlanInput in;
  in.model = small();
  in.model.block_kernels = model::BlockKernels::fused;
  in.loss_chunk = 0;
  in.model.vocab_size = 100000;
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 8, in.gpus_per_node = 8;
  in.micro_batch = 4, in.seq_len = 512;  // 2048 tokens
  const auto p = plan::plan_memory(in);
  // A block per token (bf16, H 64, I 128, Hq 64, Hkv 32): input 128, RMSNorm 1's rstd 4, the projections' input 128,
  // attention 2 (128 + 64) + 4 x 4 = 400, the re-laid-out output 128, RMSNorm 2's input and rstd 128 + 4, the MLP's
  // input 128 and gate, up and product 3 x 256: 1816 (the ATen ops': 2704). The head: rstd 4 and the projection's
  // input 128 (the ATen ops': 512).
  CHECK(item(p.gpu, "activations") == (2 * 1816.0 + 132) * 2048);
  CHECK(plan::detail::block_activation_bytes_per_token(in.model, 2, checkpointing::None::rules) == 1816);
  // Selective keeps no norm output either way; fp32 compute runs the ATen ops.
  CHECK(plan::detail::block_activation_bytes_per_token(in.model, 2, checkpointing::Selective::rules) ==
        plan::detail::block_activation_bytes_per_token(small(), 2, checkpointing::Selective::rules));
  CHECK(plan::detail::block_activation_bytes_per_token(in.model, 4, checkpointing::None::rules) ==
        plan::detail::block_activation_bytes_per_token(small(), 4, checkpointing::None::rules));
}

TEST_CASE("planner: the loss is the peak when the vocabulary dominates") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.model.vocab_size = 100000;
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 8, in.gpus_per_node = 8;
  in.micro_batch = 4, in.seq_len = 512;  // 2048 tokens
  const auto p = plan::plan_memory(in);
  CHECK(p.peak_at == "the loss in backward");
  // The loss keeps the fp32 log-softmax (4 V per token); its backward adds the gradient it gets and the one it
  // makes (8 V): 12 V bytes per token. The logits themselves are gone.
  CHECK(item(p.gpu, "logits and loss") == 12.0 * 100000 * 2048);
  // Kept: 2 blocks (2704 per token) and the head's norm and projection input (256 + 128 + 128).
  CHECK(item(p.gpu, "activations") == (2 * 2704.0 + 512) * 2048);
  // Gathered: the head and, prefetched, the last block.
  CHECK(item(p.gpu, "gathered parameters") == (64.0 + 6400000) * 2 + 36992.0 * 2);
}

TEST_CASE("planner: the fused head and loss holds one chunk's logits, counted by hand") {
  plan::PlanInput in;
  in.model = small();
  in.model.vocab_size = 100000;
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 8, in.gpus_per_node = 8;
  in.micro_batch = 4, in.seq_len = 512;  // 2048 tokens
  in.loss_chunk = 1024;
  const auto p = plan::plan_memory(in);
  CHECK(p.peak_at == "the loss in forward");
  // One chunk of 1024 tokens: its bf16 logits, over which their gradient is written (2 V).
  CHECK(item(p.gpu, "logits and loss") == 2.0 * 100000 * 1024);
  // Kept: 2 blocks (2704 per token), the head's norm (256 + 128) and the hidden states' bf16 gradient (128) per
  // token, and the head weight's bf16 gradient (2 V H), all made in the forward.
  CHECK(item(p.gpu, "activations") == (2 * 2704.0 + 512) * 2048 + 2.0 * 100000 * 64);
  // Gathered: the head (the last block released after its forward).
  CHECK(item(p.gpu, "gathered parameters") == (64.0 + 6400000) * 2);
  // The plain loss: 12 V bytes per token of the whole micro-batch at its backward.
  const auto plain = [&] {
    auto q = in;
    q.loss_chunk = 0;
    return plan::plan_memory(q);
  }();
  CHECK(plain.peak_at == "the loss in backward");
  CHECK(plain.gpu_peak() > 5 * p.gpu_peak());
  // A smaller chunk holds less.
  in.loss_chunk = 256;
  CHECK(item(plan::plan_memory(in).gpu, "logits and loss") == 2.0 * 100000 * 256);
}

TEST_CASE("planner: checkpointing keeps block inputs and recomputes one block at a time; selective keeps matmul outputs") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.model.num_layers = 4;
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("pure-bf16"), in.world_size = 2, in.gpus_per_node = 2;
  in.micro_batch = 2, in.seq_len = 8;
  in.recipe.checkpointing = checkpointing_named("every-block");
  const auto every = plan::plan_memory(in);
  in.recipe.checkpointing = checkpointing_named("none");
  const auto none = plan::plan_memory(in);
  in.recipe.checkpointing = checkpointing_named("every-2");
  const auto half = plan::plan_memory(in);
  // every-block at the head's reduction (the head's own saved tensors freed by then): 4 block inputs
  // (64 x 2 x 16 = 2048 each).
  CHECK(every.peak_at == "the head's gradient reduction");
  CHECK(item(every.gpu, "activations") == 4 * 2048.0);
  CHECK(item(none.gpu, "activations") == 4 * 43264.0);
  // every-2 recomputes blocks 0 and 2: two inputs and two full blocks.
  CHECK(item(half.gpu, "activations") == 2 * 2048.0 + 2 * 43264.0);
  // selective keeps per token (c 2, H 64, Hq 64, Hkv 32, I 128, 4 heads): input x 128, rotated q, k, v and SDPA's
  // output 2 (2 x 64 + 2 x 32) = 384, the fp32 log-sum-exp 16, the attention residual h 128, gate and up
  // 2 x 2 x 128 = 512: 1168 bytes, 16 tokens: 18688 per block.
  in.recipe.checkpointing = checkpointing_named("selective");
  CHECK(item(plan::plan_memory(in).gpu, "activations") == 4 * 18688.0);
  // Selective with an adapter is refused as shardlm_train refuses it.
  in.recipe.adapter = adapter::LoRA::rules;
  CHECK_THROWS_WITH_AS(plan::plan_memory(in), doctest::Contains("--checkpointing selective with --adapter lora"),
                       ConfigError);
  CHECK_THROWS_WITH_AS(recipe_named("full", "fp32", "selective", "none", "lora"),
                       doctest::Contains("checkpointing::Selective fuses each RMSNorm"), ConfigError);
  // pure-bf16 state: 2 + 2 + 2 + 2 bytes per element.
  CHECK(item(every.gpu, "sharded state") == (32000.0 + 4 * 18496 + 32032) * 8);
}

TEST_CASE("planner: offload leaves the compute-dtype shard on the GPU and the state on the host") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.recipe.sharding = sharding_named("hybrid"), in.recipe.precision = precision_named("mixed-bf16"), in.recipe.offload = offload_named("cpu"), in.world_size = 4, in.gpus_per_node = 2;
  in.micro_batch = 2, in.seq_len = 8, in.grad_accum = 2;
  const auto p = plan::plan_memory(in);
  CHECK(p.shard_group == 2);  // hybrid: one node
  CHECK(item(p.gpu, "sharded state") == 101024.0 * 2);
  // Per host, 2 GPUs: pinned master + gradient (4 + 4), moments (8), staging for accumulation (4).
  CHECK(item(p.host, "master weights and gradients (pinned)") == 2 * 101024.0 * 8);
  CHECK(item(p.host, "AdamW moments") == 2 * 101024.0 * 8);
  CHECK(item(p.host, "gradient staging (pinned)") == 2 * 101024.0 * 4);
}

TEST_CASE("planner: offloaded on one GPU with one micro-batch, gradients stay in bf16") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.recipe.offload = offload_named("cpu"), in.world_size = 1, in.gpus_per_node = 1;
  in.micro_batch = 2, in.seq_len = 8;
  auto p = plan::plan_memory(in);
  // One shard of 202048 elements (64000 + 2 x 36992 + 64064): pinned master 4 + bf16 gradient 2, moments 8.
  CHECK(item(p.host, "master weights and gradients (pinned)") == 202048.0 * 6);
  CHECK(item(p.host, "AdamW moments") == 202048.0 * 8);
  // The speculative host step (counted unless another is named) writes a second copy of masters and moments.
  CHECK(item(p.host, "speculative step's second state (when it fits)") == 202048.0 * 12);
  CHECK(p.host.size() == 3);
  in.host_step = engine::HostStep::overlapped;  // exact and without a second copy
  CHECK(plan::plan_memory(in).host.size() == 2);
  in.host_step = engine::HostStep::speculative;
  CHECK(item(plan::plan_memory(in).host, "speculative step's second state") == 202048.0 * 12);
  // With accumulation the gradients are summed in fp32.
  in.grad_accum = 2;
  p = plan::plan_memory(in);
  CHECK(item(p.host, "master weights and gradients (pinned)") == 202048.0 * 8);
  CHECK(item(p.host, "gradient staging (pinned)") == 202048.0 * 4);
}

TEST_CASE("planner: --reduce-dtype bf16 halves the flat buffers and slices; the gradient shards stay fp32") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 2, in.gpus_per_node = 2;
  in.recipe.precision = with_reduce_dtype(in.recipe.precision, reduce_dtype_named("bf16"));
  in.micro_batch = 2, in.seq_len = 8;
  const auto p = plan::plan_memory(in);
  // The state as with fp32 reduction (the first case): master 4 + fp32 gradient 4 + moments 8.
  CHECK(item(p.gpu, "sharded state") == 101024.0 * 16);
  // The head's bf16 gradients, its flat buffer in bf16 (64064 x 2, not x 4) and, since the fp32 shard cannot take a
  // bf16 reduce-scatter, a bf16 slice of its own (32032 x 2) that is cast into the shard.
  CHECK(p.peak_at == "the head's gradient reduction");
  CHECK(item(p.gpu, "gradients in flight") == 64064.0 * 2 + 64064.0 * 2 + 32032.0 * 2);
  in.grad_accum = 2;
  CHECK(item(plan::plan_memory(in).gpu, "gradients in flight") == 64064.0 * 2 + 64064.0 * 2 + 32032.0 * 2);
  // Offloaded over 2 hosts of 2: one micro-batch keeps the reduced gradients in bf16 on the host; accumulation sums
  // them in fp32 (pinned gradients and staging of 4 bytes).
  in.recipe.sharding = sharding_named("hybrid"), in.recipe.offload = offload_named("cpu"), in.world_size = 4;
  in.grad_accum = 1;
  auto off = plan::plan_memory(in);
  CHECK(item(off.host, "master weights and gradients (pinned)") == 2 * 101024.0 * 6);
  in.grad_accum = 2;
  off = plan::plan_memory(in);
  CHECK(item(off.host, "master weights and gradients (pinned)") == 2 * 101024.0 * 8);
  CHECK(item(off.host, "gradient staging (pinned)") == 2 * 101024.0 * 4);
  // On one rank nothing is reduced: the plan is fp32 reduction's (the second case).
  plan::PlanInput one;
  one.model = small(), one.loss_chunk = 0, one.micro_batch = 1, one.seq_len = 2, one.grad_accum = 2;
  one.recipe.sharding = sharding_named("full"), one.recipe.precision = precision_named("mixed-bf16");
  const auto fp32_one = plan::plan_memory(one);
  one.recipe.precision = with_reduce_dtype(one.recipe.precision, ReduceDtype::bf16);
  CHECK(item(plan::plan_memory(one).gpu, "gradients in flight") == item(fp32_one.gpu, "gradients in flight"));
  CHECK(item(fp32_one.gpu, "gradients in flight") == 64064.0 * 2 + 64064.0 * 4);
}

TEST_CASE("--reduce-dtype: pure-bf16 sums in fp32 into bf16 shards; bf16 under fp32 and unknown names are refused") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;
  in.recipe.sharding = sharding_named("full"), in.world_size = 2, in.gpus_per_node = 2, in.micro_batch = 2, in.seq_len = 8;
  in.recipe.precision = with_reduce_dtype(precision_named("pure-bf16"), ReduceDtype::fp32);
  CHECK(in.recipe.precision.reduce_overridden());
  CHECK(in.recipe.describe() == "full / none / none / pure-bf16 (reduce fp32)");
  const auto p = plan::plan_memory(in);
  // master 2 + bf16 gradient 2 + moments 4; the head's bf16 gradients, an fp32 flat buffer and slice.
  CHECK(item(p.gpu, "sharded state") == 101024.0 * 8);
  CHECK(item(p.gpu, "gradients in flight") == 64064.0 * 2 + 64064.0 * 4 + 32032.0 * 4);
  // The policy's own dtype is the policy.
  CHECK(!with_reduce_dtype(precision_named("mixed-bf16"), ReduceDtype::fp32).reduce_overridden());
  CHECK(!with_reduce_dtype(precision_named("pure-bf16"), ReduceDtype::bf16).reduce_overridden());
  CHECK(!with_reduce_dtype(precision_named("fp32"), ReduceDtype::fp32).reduce_overridden());
  CHECK_THROWS_WITH_AS(with_reduce_dtype(precision_named("fp32"), ReduceDtype::bf16),
                       doctest::Contains("--reduce-dtype bf16 with precision fp32"), ConfigError);
  CHECK_THROWS_WITH_AS(reduce_dtype_named("fp16"), doctest::Contains("--reduce-dtype 'fp16': use policy"), ConfigError);
}

TEST_CASE("planner: NoShard keeps every unit gathered; errors name the flag") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.recipe.sharding = sharding_named("none"), in.recipe.precision = precision_named("fp32"), in.world_size = 2, in.gpus_per_node = 2;
  const auto p = plan::plan_memory(in);
  CHECK(p.shard_group == 1);
  CHECK(item(p.gpu, "gathered parameters") == (64000.0 + 2 * 36992 + 64064) * 4);
  in.recipe.offload = offload_named("cpu");
  CHECK_THROWS_WITH_AS(plan::plan_memory(in), doctest::Contains("--offload cpu with --sharding none"), ConfigError);
  in.recipe.offload = offload_named("none");
  CHECK_THROWS_WITH_AS(checkpointing_named("every-0"), doctest::Contains("--checkpointing 'every-0'"), ConfigError);
  in.recipe.sharding = sharding_named("hybrid"), in.shard_group_size = 3;
  CHECK_THROWS_WITH_AS(plan::plan_memory(in), doctest::Contains("not divisible by the shard group size 3"), ConfigError);
}

TEST_CASE("planner: LoRA keeps the adapters' state and the frozen base in the compute dtype, counted by hand") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 2, in.gpus_per_node = 2;
  in.micro_batch = 2, in.seq_len = 8;
  in.recipe.adapter = adapter_named("lora"), in.lora_rank = 4, in.lora_targets = {"q", "v"};
  const auto p = plan::plan_memory(in);
  // per block: q 4 (64 + 64) + v 4 (64 + 32) = 896 adapter parameters; 448 per rank, fp32 master, grad, 2 moments
  CHECK(item(p.gpu, "sharded state") == 2 * 448 * 16.0);
  const double bp = static_cast<double>(in.model.block_params());
  const double frozen = 1000 * 64 / 2 + 2 * std::ceil(bp / 2) + (64 + 1000 * 64) / 2;  // elements per rank
  CHECK(item(p.gpu, "frozen base (sharded)") == frozen * 2);
  // Saved per token and block (bf16): x A^T for q and v (4 values each); DoRA adds their base and adapter outputs.
  CHECK(plan::detail::block_adapter_activation_bytes_per_token(in, 2) == 2 * (4 + 4));
  in.recipe.adapter = adapter_named("dora");
  CHECK(plan::detail::block_adapter_activation_bytes_per_token(in, 2) == 2 * (4 + 4) + 2 * 2 * (64 + 32));
  CHECK(item(plan::plan_memory(in).gpu, "sharded state") == 2 * 496 * 16.0);  // + m of q and v: (64 + 32) / 2 per rank
  in.recipe.offload = offload_named("cpu");
  const auto off = plan::plan_memory(in);
  CHECK(item(off.gpu, "frozen base (sharded)") == 0);
  CHECK(item(off.host, "frozen base (pinned)") == 2 * frozen * 2);
  CHECK_THROWS_WITH_AS(adapter_named("qlora"), doctest::Contains("--adapter 'qlora'"), ConfigError);
}

TEST_CASE("planner: a quantized base stores the blocks' projections in the policy's row bytes, counted by hand") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 2, in.gpus_per_node = 2;
  in.micro_batch = 2, in.seq_len = 8;
  in.recipe.adapter = adapter_named("lora"), in.lora_rank = 4, in.lora_targets = {"q", "v"};
  // Rows of 64 and 128 values: int4 48 and 80 bytes (codes, bf16 grid ends, padded to 16), fp8 80 and 144.
  // Projections: q [64, 64], k and v [32, 64], o [64, 64], gate and up [128, 64], down [64, 128]; norms 2 x 64 bf16.
  const double embedding = 1000 * 64 * 2 / 2.0, head = (64 + 1000 * 64) * 2 / 2.0;  // bf16 bytes per rank
  in.recipe.quant = quant::rules_named("int4");
  const double int4_block = (64 * 48 + 2 * 32 * 48 + 64 * 48 + 2 * 128 * 48 + 64 * 80) + 2 * 64 * 2;
  CHECK(item(plan::plan_memory(in).gpu, "frozen base (sharded)") == embedding + 2 * int4_block / 2 + head);
  in.recipe.quant = quant::rules_named("fp8");
  const double fp8_block = (64 * 80 + 2 * 32 * 80 + 64 * 80 + 2 * 128 * 80 + 64 * 144) + 2 * 64 * 2;
  CHECK(item(plan::plan_memory(in).gpu, "frozen base (sharded)") == embedding + 2 * fp8_block / 2 + head);
  CHECK_THROWS_WITH_AS(quant::rules_named("int3"), doctest::Contains("--quant 'int3' is not a quantization policy"), ConfigError);
  in.recipe.quant = quant::rules_named("int4"), in.recipe.adapter = adapter_named("none");
  CHECK_THROWS_WITH_AS(plan::plan_memory(in), doctest::Contains("--quant int4 stores the frozen base quantized"), ConfigError);
}

TEST_CASE("planner: a Mixtral block counts every expert's parameters and the k picks' activations") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;  // the plain loss on whole logits (the fused head and loss: its own case)
  in.model.model_type = "mixtral", in.model.num_experts = 4, in.model.num_experts_per_tok = 2;
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 2, in.gpus_per_node = 2;
  in.micro_batch = 2, in.seq_len = 8;  // 16 tokens
  const auto p = plan::plan_memory(in);
  // Block: attention 12288 + 4 experts x 24576 + router 4 x 64 + norms 128 = 110976; active: 2 experts, 61824.
  CHECK(in.model.block_params() == 110976);
  CHECK(in.model.active_block_params() == 61824);
  CHECK(p.params == 64000 + 2 * 110976 + 64064);
  // Per token (bf16): the dense block's 2704 less its MLP (input 128 + 4 x 2 x 128 = 1152), plus the MoE's input
  // 128, per pick (x 2) the sorted input and expert output 256 and the intermediates 1024, router logits and fp32
  // probabilities (2 + 8) x 4 = 40: 2704 - 1152 + 128 + 2560 + 40 = 4280 bytes, x 16 tokens per block.
  // The experts make the blocks the largest units: the peak is block 1's gradient reduction, with block 1
  // and (prefetched) block 0 gathered and block 0's activations still kept.
  CHECK(p.peak_at == "gradient reduction of block 1");
  CHECK(item(p.gpu, "gathered parameters") == 2 * 110976.0 * 2);
  CHECK(item(p.gpu, "activations") == 4280.0 * 16);
  // FLOPs count the active parameters: 6 x (2 x 61824 + head 64064) + attention 12 x 2 x 4 x 16 x T.
  CHECK(in.model.flops_per_token(8) == 6.0 * (2 * 61824 + 64064) + 12.0 * 2 * 4 * 16 * 8);
}

TEST_CASE("planner: a MoE block's backward peaks at its experts' first projection, counted by hand") {
  plan::PlanInput in;
  in.model = small();
  in.model.model_type = "mixtral", in.model.num_experts = 4, in.model.num_experts_per_tok = 2;
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 1, in.gpus_per_node = 1;
  in.micro_batch = 1, in.seq_len = 8;  // 8 tokens, the fused head and loss
  const auto p = plan::plan_memory(in);
  // Block 1's backward at the experts' first projection: both blocks gathered (block 0 prefetched) and both
  // blocks' activations kept (4280 per token, as above), less the experts' intermediates and outputs already freed
  // (k (3I + C) = 2 x 448 values per token), plus every expert weight gradient (3 E C I = 98304 values) and the
  // projection's output and input gradients (k (2I + C) = 2 x 320 per token), all bf16.
  CHECK(p.peak_at == "expert gradients of block 1");
  CHECK(item(p.gpu, "gathered parameters") == 2 * 110976.0 * 2);
  CHECK(item(p.gpu, "activations") == 4280.0 * 8 * 2);
  CHECK(item(p.gpu, "gradients in flight") == 2 * (98304.0 + 8 * 2 * (320 - 448)));
  // At block 1's gradient reduction its activations are gone and all its bf16 gradients (110976 values, cast into
  // the shard on one rank) are there: 4280 x 8 + 221952 = 256192 bytes beside the same gathered units, less than
  // the 68480 + 192512 = 260992 here.
}

TEST_CASE("planner: precision fp8 adds one projection's float8 operands to mixed-bf16's plan, counted by hand") {
  plan::PlanInput in;
  in.model = small();
  in.model.vocab_size = 16;  // the blocks, not the loss, make the peak
  in.loss_chunk = 0;
  in.recipe.sharding = sharding_named("full"), in.world_size = 2, in.gpus_per_node = 2;
  in.micro_batch = 2, in.seq_len = 256;  // 512 tokens
  in.recipe.precision = precision_named("mixed-bf16");
  const auto bf16 = plan::plan_memory(in);
  in.recipe.precision = precision_named("fp8");
  const auto fp8 = plan::plan_memory(in);
  // The largest (c + 1) a or a + (c + 1) b, plus 4 bytes a row, over the projections (c = 2, 512 tokens), K -> N:
  // forward x [512, K], W [N, K]: down (128 -> 64): 3 * 512*128 + 4 * (512 + 64) = 198912, the largest (up/gate:
  // 3 * 512*64 + 4 * (512 + 128) = 100864). Backward dy [512, N], W^T [K, N]: up/gate (64 -> 128): 3 * 512*128 +
  // 4 * (512 + 64) = 198912 (down: 100864). The peak is a block's backward, whose activations are mixed-bf16's.
  CHECK(fp8.table().find("float8 operands") != std::string::npos);
  CHECK(fp8.peak_at == "backward of block 1");
  CHECK(item(fp8.gpu, "float8 operands") == 198912);
  CHECK(item(fp8.gpu, "activations") == item(bf16.gpu, "activations"));
  CHECK(item(fp8.gpu, "sharded state") == item(bf16.gpu, "sharded state"));
  CHECK(fp8.gpu_peak() - bf16.gpu_peak() <= 198912);
  in.recipe.checkpointing = checkpointing_named("selective");
  CHECK_THROWS_WITH_AS(plan::plan_memory(in), doctest::Contains("--checkpointing selective with --precision fp8"), ConfigError);
  // A Mixtral block: only the attention's projections are float8 (its experts multiply in bf16), even where the
  // experts' intermediate size equals the hidden size. Forward, q or o (64 -> 64): 3 * 512*64 + 4 * (512 + 64) = 100608.
  auto moe = small();
  moe.model_type = "mixtral", moe.num_experts = 4, moe.num_experts_per_tok = 2, moe.intermediate_size = 64;
  CHECK(plan::detail::fp8_operand_bytes(moe, 2, 512, false) == 100608);
  moe.intermediate_size = 128;
  CHECK(plan::detail::fp8_operand_bytes(moe, 2, 512, false) == 100608);
}

TEST_CASE("planner: expert parallelism keeps this rank's experts, sharded over the ranks holding the same, counted by hand") {
  plan::PlanInput in;
  in.model = small();
  in.model.model_type = "mixtral", in.model.num_experts = 4, in.model.num_experts_per_tok = 2;
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 4, in.gpus_per_node = 4;
  in.micro_batch = 2, in.seq_len = 8;  // 16 tokens
  const auto whole = plan::plan_memory(in);
  in.expert_parallel = 2;
  const auto p = plan::plan_memory(in);
  CHECK(p.params == whole.params);
  // Block: 110976 parameters, of which the experts 4 x 24576 = 98304: the dense 12672 over the 4 ranks (3168 each),
  // this rank's 2 experts (49152) over the 2 ranks holding them (24576 each). Embedding 16000, head 16016 per rank.
  // 16 bytes per element (fp32 master, gradient, moments).
  CHECK(item(p.gpu, "sharded state") == (16000 + 2 * 3168 + 16016 + 2 * 24576.0) * 16);
  CHECK(item(whole.gpu, "sharded state") == (16000 + 2 * 27744 + 16016) * 16.0);
  // A gathered block holds its dense part and this rank's experts: 12672 + 49152 = 61824 bf16 values; at the peak, the
  // head's gradient reduction, the head (64064) and block 1 are gathered.
  CHECK(p.peak_at == "the head's gradient reduction");
  CHECK(item(p.gpu, "gathered parameters") == (64064 + 61824.0) * 2);
  // One layer's exchange: the rows received and their copy by expert, 2 picks x 64 x 16 tokens in bf16, twice.
  CHECK(item(p.gpu, "all-to-all buffers") <= 2 * 2.0 * 2 * 64 * 16);
  // Without sharding the experts are replicated over the ranks holding them: 49152 each, the dense part whole.
  in.recipe.sharding = sharding_named("none");
  CHECK(item(plan::plan_memory(in).gpu, "sharded state") == (64000 + 2 * 12672 + 64064 + 2 * 49152.0) * 16);
  // Errors name the flag and the factors.
  in.expert_parallel = 3;
  CHECK_THROWS_WITH_AS(plan::plan_memory(in), doctest::Contains("--expert-parallel 3 must divide the number of experts (4)"),
                       ConfigError);
  in.expert_parallel = 2, in.model = small();
  CHECK_THROWS_WITH_AS(plan::plan_memory(in), doctest::Contains("--expert-parallel 2: this model (model_type 'llama') has no experts"),
                       ConfigError);
}

TEST_CASE("planner: LoRA on a Mixtral counts each expert's factors and stores the fused experts as rows, by hand") {
  plan::PlanInput in;
  in.model = small();
  in.loss_chunk = 0;
  in.model.model_type = "mixtral", in.model.num_experts = 4, in.model.num_experts_per_tok = 2;
  in.recipe.sharding = sharding_named("full"), in.recipe.precision = precision_named("mixed-bf16"), in.world_size = 2, in.gpus_per_node = 2;
  in.micro_batch = 2, in.seq_len = 8;
  in.recipe.adapter = adapter_named("lora"), in.lora_rank = 4, in.lora_targets = {"q", "gate_up", "down", "router"};
  // per block: q 4 (64 + 64) = 512, gate_up 4 experts x 4 (64 + 256) = 5120, down 4 x 4 (128 + 64) = 3072, router
  // 4 (64 + 4) = 272: 8976 adapter parameters; 4488 per rank, fp32 master, grad, 2 moments
  CHECK(item(plan::plan_memory(in).gpu, "sharded state") == 2 * 4488 * 16.0);
  // Saved per token and block (bf16): x A^T, r = 4 values, for q and the router, and per pick (k = 2) for each expert
  // projection.
  CHECK(plan::detail::block_adapter_activation_bytes_per_token(in, 2) == 2 * (4 + 4 + 2 * 4 + 2 * 4));
  // int4: the attention's rows and the experts' E x 2I rows of 64 (48 bytes) and E x C rows of 128 (80 bytes); the
  // router (4 x 64) and the norms in bf16.
  in.recipe.quant = quant::rules_named("int4");
  const double embedding = 1000 * 64 * 2 / 2.0, head = (64 + 1000 * 64) * 2 / 2.0;
  const double block = (64 * 48 + 2 * 32 * 48 + 64 * 48 + 4 * 256 * 48 + 4 * 64 * 80) + (4 * 64 + 2 * 64) * 2;
  CHECK(item(plan::plan_memory(in).gpu, "frozen base (sharded)") == embedding + 2 * block / 2 + head);
  in.lora_targets = {"all"};
  CHECK(plan::detail::plan_adapter(in).target_list() == "q,k,v,o,gate_up,down");
  in.recipe.adapter = adapter_named("dora");
  CHECK_THROWS_WITH_AS(plan::plan_memory(in), doctest::Contains("DoRA on a mixture of experts' experts or router"), ConfigError);
}
