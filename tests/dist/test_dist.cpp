// dist/ and engine/ pieces in one process: the launch environment and its errors, the flat layout of a unit
// (padding, shards, weight-decay runs), and Gloo's collectives among three threads of this process.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#include <sys/socket.h>
#include <netinet/in.h>

#include <shardlm/shardlm.hpp>

#include <map>
#include <thread>

using namespace shardlm;

namespace {

/// Sets environment variables for one scope, restoring a clean slate after.
struct Env {
  explicit Env(std::map<std::string, std::string> vars) : vars_(std::move(vars)) {
    clear();
    for (const auto& [k, v] : vars_) ::setenv(k.c_str(), v.c_str(), 1);
  }
  ~Env() { clear(); }
  static void clear() {
    for (const char* k : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                          "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NODELIST"})
      ::unsetenv(k);
  }
  std::map<std::string, std::string> vars_;
};

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t n = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &n);
  ::close(fd);
  return ntohs(a.sin_port);
}

/// Rank r's client (rank 0: also the server) of a TCPStore of W ranks on localhost:port.
c10::intrusive_ptr<c10d::Store> store_of(int port, int r, int W) {
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(port);
  so.isServer = r == 0;
  so.numWorkers = W;
  so.timeout = std::chrono::seconds(60);
  return c10::make_intrusive<c10d::TCPStore>("127.0.0.1", so);
}

}  // namespace

TEST_CASE("launch environment: torchrun variables, Slurm variables, a single process") {
  {
    Env e({});
    const auto env = dist::LaunchEnv::from_environment();
    CHECK(env.world_size == 1);
    CHECK(!env.distributed());
  }
  {
    Env e({{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "4"},
           {"MASTER_ADDR", "node0"}, {"MASTER_PORT", "1234"}});
    const auto env = dist::LaunchEnv::from_environment();
    CHECK(env.rank == 5);
    CHECK(env.local_rank == 1);
    CHECK(env.node() == 1);
    CHECK(env.num_nodes() == 2);
    CHECK(env.master_addr == "node0");
    CHECK(env.master_port == 1234);
  }
  {
    Env e({{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "1"}, {"SLURM_NTASKS_PER_NODE", "2(x2)"},
           {"SLURM_JOB_NODELIST", "gpu[07-08,12],cpu1"}});
    const auto env = dist::LaunchEnv::from_environment();
    CHECK(env.rank == 3);
    CHECK(env.local_world_size == 2);
    CHECK(env.master_addr == "gpu07");
    CHECK(env.master_port == 29500);
    CHECK(env.source == "Slurm");
  }
}

TEST_CASE("launch environment errors name the variable") {
  {
    Env e({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "1234"}});
    CHECK_THROWS_WITH_AS(dist::LaunchEnv::from_environment(), doctest::Contains("MASTER_ADDR is not set"), ConfigError);
  }
  {
    Env e({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "x"}});
    CHECK_THROWS_WITH_AS(dist::LaunchEnv::from_environment(), doctest::Contains("MASTER_PORT is not set"), ConfigError);
  }
  {
    Env e({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "x"}, {"MASTER_PORT", "1"}});
    CHECK_THROWS_WITH_AS(dist::LaunchEnv::from_environment(), doctest::Contains("RANK=2 must lie in [0, 1]"), ConfigError);
  }
  {
    Env e({{"RANK", "0"}, {"WORLD_SIZE", "two"}});
    CHECK_THROWS_WITH_AS(dist::LaunchEnv::from_environment(), doctest::Contains("WORLD_SIZE='two' is not an integer"), ConfigError);
  }
  {
    Env e({{"RANK", "0"}, {"WORLD_SIZE", "6"}, {"LOCAL_WORLD_SIZE", "4"}, {"MASTER_ADDR", "x"}, {"MASTER_PORT", "1"}});
    CHECK_THROWS_WITH_AS(dist::LaunchEnv::from_environment(), doctest::Contains("not a multiple of the ranks per node (4)"), ConfigError);
  }
  {
    Env e({{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "1"}});
    const auto env = dist::LaunchEnv::from_environment();
    CHECK_THROWS_WITH_AS(dist::ProcessGroups(env, 3, at::kCPU, std::chrono::seconds(1)),
                         doctest::Contains("world size 4 (WORLD_SIZE) is not divisible by the shard group size 3"), ConfigError);
  }
}

TEST_CASE("a rank whose peers never join gets a timeout error, not a hang") {
  Env e({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", std::to_string(free_port())}});
  const auto env = dist::LaunchEnv::from_environment();
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(dist::ProcessGroups(env, 2, at::kCPU, std::chrono::seconds(2)),
                       doctest::Contains("not every rank joined"), Error);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(30));
}

TEST_CASE("flat unit layout: padding to the group size, contiguous shards, weight-decay runs") {
  // 3 ranks; parameters of 2x3, 4 (no decay), 1x5: 15 elements padded to 15, shards of 5.
  engine::NamedTensors params = {{"a", at::zeros({2, 3})}, {"norm", at::zeros({4})}, {"b", at::zeros({1, 5})}};
  engine::FlatUnit r0("u", params, 3, 0), r1("u", params, 3, 1), r2("u", params, 3, 2);
  CHECK(r0.numel() == 15);
  CHECK(r0.padded() == 15);
  CHECK(r0.shard_numel() == 5);
  using Runs = std::vector<std::pair<int64_t, int64_t>>;
  CHECK(r0.decay_runs() == Runs{{0, 5}});           // a[0:5]
  CHECK(r1.decay_runs() == Runs{{0, 1}});           // a[5], then the norm [6, 10)
  CHECK(r2.decay_runs() == Runs{{0, 5}});           // b
  engine::FlatUnit q("u", params, 4, 3);            // 15 -> 16 with one padding element
  CHECK(q.padded() == 16);
  CHECK(q.shard_numel() == 4);
  CHECK(q.decay_runs() == Runs{{0, 3}});            // b[2:5], then padding
}

TEST_CASE("Gloo collectives among three ranks: gather, reduce-scatter, all-reduce, broadcast; device errors") {
  const int W = 3, port = free_port();
  std::vector<std::string> errors(W);
  std::vector<at::Tensor> gathered(W), scattered(W), reduced(W), maxed(W), broadcast(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto store = store_of(port, r, W);
        dist::GlooCommunicator c(store, "test", r, W, "127.0.0.1", std::chrono::seconds(30));
        gathered[r] = at::empty({6});
        c.all_gather(gathered[r], at::full({2}, double(r)).to(at::kFloat));
        scattered[r] = at::empty({2});
        c.reduce_scatter(scattered[r], at::arange(6, at::kFloat) * (r + 1), dist::Reduce::Sum);
        reduced[r] = at::full({3}, double(r + 1), at::kBFloat16);
        c.all_reduce(reduced[r], dist::Reduce::Sum);
        maxed[r] = at::full({1}, double(r));
        c.all_reduce(maxed[r], dist::Reduce::Max);
        broadcast[r] = at::full({2}, double(r * 10));
        c.broadcast(broadcast[r], 2);
        try {
          c.all_reduce(at::zeros({2}, at::TensorOptions().device(at::kMeta)), dist::Reduce::Sum);
        } catch (const ConfigError& e) {
          errors[r] = e.what();
        }
        c.barrier();
      } catch (const std::exception& e) {
        errors[r] = std::string("unexpected: ") + e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    CAPTURE(r);
    CHECK(at::equal(gathered[r], at::tensor({0.f, 0.f, 1.f, 1.f, 2.f, 2.f})));
    // sum over ranks of arange(6) * (rank + 1) = arange(6) * 6; rank r keeps elements [2r, 2r + 2)
    CHECK(at::equal(scattered[r], (at::arange(6, at::kFloat) * 6).narrow(0, 2 * r, 2)));
    CHECK(at::equal(reduced[r], at::full({3}, 6.0, at::kBFloat16)));
    CHECK(maxed[r].item<float>() == 2.f);
    CHECK(at::equal(broadcast[r], at::full({2}, 20.0)));
    CHECK(errors[r].find("the all-reduce tensor is on meta but this communicator moves cpu tensors") != std::string::npos);
  }
}

TEST_CASE("two ranks reducing in another dtype than the shards': the planner replays the engine; shards in the master dtype") {
  // FullShard over two threads (Gloo), two micro-batches: the first goes through a slice (a reduce dtype the shards
  // cannot take straight), the second is added to it; offloaded, the host shards. The engine's events against the
  // planner's replay, and the gradient shards' dtype.
  auto config = model::preset("llama3-debug", 2);
  const auto ids = at::randint(config.vocab_size, {2, 8}, at::kLong);  // [B, T]
  struct Case {
    const char *precision, *reduce, *offload;
    int64_t accum;
    at::ScalarType shard;
  };
  for (const auto& k : {Case{"mixed-bf16", "bf16", "none", 2, at::kFloat}, Case{"mixed-bf16", "bf16", "cpu", 2, at::kFloat},
                        Case{"mixed-bf16", "bf16", "cpu", 1, at::kBFloat16}, Case{"pure-bf16", "fp32", "none", 2, at::kBFloat16}}) {
    auto rules = recipe_named("full", k.precision, "none", k.offload);
    rules.precision = with_reduce_dtype(rules.precision, reduce_dtype_named(k.reduce));
    CAPTURE(rules.describe());
    CAPTURE(k.accum);
    const int W = 2, port = free_port();
    std::vector<engine::Trace> traces(W);
    std::vector<std::string> errors(W);
    std::vector<at::ScalarType> shard_dtypes(W, at::kDouble);
    std::vector<std::thread> threads;
    for (int r = 0; r < W; ++r) {
      threads.emplace_back([&, r] {
        try {
          dist::LaunchEnv env;
          env.rank = r, env.world_size = W, env.local_rank = r, env.local_world_size = W, env.master_port = port;
          dist::ProcessGroups groups(env, W, at::Device(at::kCPU), std::chrono::seconds(60));
          model::Llama3 m(config, at::TensorOptions().dtype(rules.precision.master));
          engine::UnitModelOf units(*m);
          engine::Engine e(units, groups, at::Device(at::kCPU), rules,
                           engine::UnitInit([&](size_t u, engine::NamedTensors& params) {
                             model::init_parameters(params, config.initializer_range, u + 1);
                           }),
                           engine::EngineOptions().micro_batches(k.accum).trace(&traces[r]).host_step(engine::HostStep::sync));
          e.begin_step(1e-3);
          for (int64_t a = 0; a < k.accum; ++a)
            e.backward(model::ops::next_token_loss_sum(e.forward(ids), ids), a + 1 == k.accum);
          shard_dtypes[r] = e.unit(1).grad().scalar_type();
          if (!std::isfinite(e.clip_grad_norm(1.0))) errors[r] = "a non-finite gradient norm";
          e.optimizer_step();
        } catch (const std::exception& ex) {
          errors[r] = ex.what();
        }
      });
    }
    for (auto& t : threads) t.join();
    plan::PlanInput in;
    in.model = config, in.recipe = rules, in.world_size = W, in.gpus_per_node = W, in.grad_accum = k.accum;
    in.micro_batch = 2, in.seq_len = 8;
    std::string planner_side;
    for (const auto& event : plan::plan_memory(in).trace) planner_side += event.str() + ", ";
    for (int r = 0; r < W; ++r) {
      CAPTURE(r);
      CHECK(errors[r] == "");
      std::string engine_side;
      for (const auto& event : traces[r]) engine_side += event.str() + ", ";
      CHECK(engine_side == planner_side);
      CHECK(std::string(c10::toString(shard_dtypes[r])) == c10::toString(k.shard));
    }
  }
}

TEST_CASE("a Gloo collective that times out names itself, its label and the ranks that did not arrive") {
  // Ranks 0 and 1 enter all-gather #2 ("block 7"); rank 2 does not. Rank 0's error must name the collective and
  // rank 2: silent (it reports nothing) or behind (it reports being stuck at #1).
  for (const bool behind : {false, true}) {
    CAPTURE(behind);
    const int W = 3, port = free_port();
    std::vector<std::string> errors(W);
    std::vector<c10::intrusive_ptr<c10d::Store>> stores(W);  // outlive every thread's use of rank 0's server
    std::vector<std::thread> threads;
    for (int r = 0; r < W; ++r) {
      threads.emplace_back([&, r] {
        try {
          stores[r] = store_of(port, r, W);
          dist::GlooCommunicator c(stores[r], "test", r, W, "127.0.0.1", std::chrono::seconds(2));
          c.all_reduce(at::ones({2}), dist::Reduce::Sum, "first");
          if (r < 2) {
            auto out = at::empty({6});
            c.all_gather(out, at::ones({2}), "block 7");
          } else {
            if (behind) dist::hang_report(*stores[r], "test", c, c.last_collective(), std::chrono::milliseconds(0));
            std::this_thread::sleep_for(std::chrono::seconds(7));  // past the others' timeout and wait
          }
        } catch (const std::exception& e) {
          errors[r] = e.what();
        }
      });
    }
    for (auto& t : threads) t.join();
    CHECK(errors[2].empty());
    for (int r = 0; r < 2; ++r) {
      CAPTURE(errors[r]);
      CHECK(errors[r].find("gloo group 'test' (3 ranks), rank " + std::to_string(r) +
                           ": all-gather #2 of block 7 did not complete within 2 s (--dist-timeout)") != std::string::npos);
      CHECK(errors[r].find(behind ? "rank 2 (at all-reduce #1 of first) did not arrive (behind"
                                  : "rank 2 did not arrive (silent: no report within 2 s") != std::string::npos);
      CHECK(errors[r].find("rank " + std::to_string(1 - r) + " waited in it too") != std::string::npos);
    }
  }
}

#if SHARDLM_WITH_NCCL
TEST_CASE("NCCL among two GPUs: gather, reduce-scatter, all-reduce, broadcast, all-to-all; CPU tensors refused; a missing rank times out") {
  if (!torch::cuda::is_available() || torch::cuda::device_count() < 2) {
    MESSAGE("skipped: needs 2 CUDA devices (this machine has ", torch::cuda::is_available() ? torch::cuda::device_count() : 0, ")");
    return;
  }
  const int W = 2, port = free_port();
  std::vector<std::string> errors(W), unexpected(W);
  std::vector<at::Tensor> gathered(W), scattered(W), reduced(W), broadcast(W), exchanged(W);
  // all-to-all rows: rank 0 keeps none and sends 3 to rank 1; rank 1 sends 2 to rank 0 and keeps 1 (row = sender)
  const std::vector<std::vector<int64_t>> send = {{0, 3}, {2, 1}};
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      try {
        c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(r));
        auto store = store_of(port, r, W);
        dist::NcclCommunicator c(store, "test", r, W, r, std::chrono::seconds(60));
        const auto opts = at::TensorOptions().device(at::kCUDA, r).dtype(at::kFloat);
        gathered[r] = at::empty({4}, opts.dtype(at::kBFloat16));
        c.all_gather(gathered[r], at::full({2}, double(r + 1), opts.dtype(at::kBFloat16)));
        scattered[r] = at::empty({2}, opts);
        c.reduce_scatter(scattered[r], at::arange(4, opts.dtype(at::kFloat)) * (r + 1), dist::Reduce::Sum);
        reduced[r] = at::full({3}, double(r), opts);
        c.all_reduce(reduced[r], dist::Reduce::Max);
        broadcast[r] = at::full({2}, double(r * 10), opts);
        c.broadcast(broadcast[r], 1);
        const std::vector<int64_t> recv = {send[0][r], send[1][r]};
        exchanged[r] = at::empty({recv[0] + recv[1], 2}, opts);
        c.all_to_all(exchanged[r], at::full({send[r][0] + send[r][1], 2}, double(r), opts), recv, send[r]);
        c.barrier();
        try {
          c.all_reduce(at::zeros({2}), dist::Reduce::Sum);
        } catch (const ConfigError& e) {
          errors[r] = e.what();
        }
      } catch (const std::exception& e) {
        unexpected[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    CAPTURE(r);
    CHECK(unexpected[r] == "");
    CHECK(at::equal(gathered[r].cpu(), at::tensor({1.f, 1.f, 2.f, 2.f}).to(at::kBFloat16)));
    CHECK(at::equal(scattered[r].cpu(), (at::arange(4, at::kFloat) * 3).narrow(0, 2 * r, 2)));
    CHECK(at::equal(reduced[r].cpu(), at::full({3}, 1.0)));
    CHECK(at::equal(broadcast[r].cpu(), at::full({2}, 10.0)));
    CHECK(at::equal(exchanged[r].cpu(), r == 0 ? at::full({2, 2}, 1.0) : at::cat({at::zeros({3, 2}), at::ones({1, 2})})));
    CHECK(errors[r].find("the all-reduce tensor is on cpu but this communicator moves cuda tensors") != std::string::npos);
  }
  // Rank 0 of a group of two whose rank 1 never comes: an error after the deadline, not a hang.
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(free_port());
  so.isServer = true;
  so.numWorkers = 1;
  auto store = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", so);
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(dist::NcclCommunicator(store, "lonely", 0, 2, 0, std::chrono::seconds(3)),
                       doctest::Contains("timed out waiting to connect"), Error);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(60));
}
#endif

TEST_CASE("expert parallelism: rows reach their experts' ranks and come back; outputs and gradients equal one rank's") {
  // A MoE layer's experts split over W ranks (Gloo, threads of this process), each rank routing its own tokens with a
  // routing handed in (the router's seam: ops::Routing), against the same tokens on one rank with every expert.
  // Cases: random picks; every pick on experts 0 and 1 (the other ranks receive no row, rank 0 every row); each rank's
  // tokens only to other ranks' experts; rank 0 with no token at all. Both CPU kernels (loop, padded).
  const int64_t C = 8, I = 6, E = 4, k = 2;
  at::manual_seed(11);
  const auto gate_up = at::randn({E, 2 * I, C}), down = at::randn({E, C, I});  // every expert's weights
  enum class Picks { random, first_two, elsewhere, rank0_empty };
  for (const int W : {2, 4}) {
    const int64_t El = E / W;
    for (const auto picks : {Picks::random, Picks::first_two, Picks::elsewhere, Picks::rank0_empty}) {
      for (const auto kernel : {model::ExpertKernel::loop, model::ExpertKernel::padded}) {
        const int case_picks = static_cast<int>(picks), case_kernel = static_cast<int>(kernel);
        CAPTURE(W);
        CAPTURE(case_picks);
        CAPTURE(case_kernel);
        std::vector<at::Tensor> xs(W), experts(W), weights(W), gys(W);
        for (int r = 0; r < W; ++r) {
          const int64_t N = picks == Picks::rank0_empty && r == 0 ? 0 : 3 + r;
          xs[r] = at::randn({N, C});
          at::Tensor e = at::stack({at::randint(E, {N}), at::zeros({N}, at::kLong)}, 1);  // [N, k], made distinct below
          if (picks == Picks::first_two) e = at::tensor({int64_t{0}, int64_t{1}}).repeat({N, 1});
          if (picks == Picks::elsewhere) {  // the experts of rank (r + 1) % W
            const int64_t first = ((r + 1) % W) * El;
            e = at::stack({at::full({N}, first), at::full({N}, first + El - 1)}, 1);
            if (El == 1) e.select(1, 1).fill_((first + El) % E);  // one expert per rank: the second pick elsewhere too
          }
          if (picks == Picks::random || picks == Picks::rank0_empty) e.select(1, 1).copy_((e.select(1, 0) + 1 + at::randint(E - 1, {N})) % E);
          experts[r] = e;
          weights[r] = at::softmax(at::randn({N, k}), -1);
          gys[r] = at::randn({N, C});
        }
        // One rank, every expert.
        auto x = at::cat(xs).requires_grad_(true), w = at::cat(weights).requires_grad_(true);
        auto gu = gate_up.clone().requires_grad_(true), dn = down.clone().requires_grad_(true);
        const auto y = model::ops::moe_experts(x, gu, dn, {at::Tensor(), w, at::cat(experts)}, kernel);
        (y * at::cat(gys)).sum().backward();
        // W ranks, E / W experts each.
        const int port = free_port();
        std::vector<at::Tensor> ys(W), gxs(W), gws(W), ggu(W), gdn(W);
        std::vector<std::string> errors(W);
        // The stores and communicators outlive the threads: no rank tears its connections (or rank 0 the store it
        // serves) down while another still uses them.
        std::vector<c10::intrusive_ptr<c10d::Store>> stores(W);
        std::vector<std::unique_ptr<dist::GlooCommunicator>> comms(W);
        std::vector<std::thread> threads;
        for (int r = 0; r < W; ++r) {
          threads.emplace_back([&, r] {
            try {
              stores[r] = store_of(port, r, W);
              comms[r] = std::make_unique<dist::GlooCommunicator>(stores[r], "ep", r, W, "127.0.0.1",
                                                                  std::chrono::seconds(30));
              auto& c = *comms[r];
              const model::ExpertShard shard{c10::make_intrusive<train::CommunicatorExchange>(c), r * El, El};
              auto xr = xs[r].clone().requires_grad_(true), wr = weights[r].clone().requires_grad_(true);
              auto gur = gate_up.narrow(0, r * El, El).clone().requires_grad_(true);
              auto dnr = down.narrow(0, r * El, El).clone().requires_grad_(true);
              ys[r] = model::ops::moe_experts(xr, gur, dnr, {at::Tensor(), wr, experts[r]}, kernel, shard);
              (ys[r] * gys[r]).sum().backward();
              gxs[r] = xr.grad(), gws[r] = wr.grad(), ggu[r] = gur.grad(), gdn[r] = dnr.grad();
              c.barrier("end of the case");
            } catch (const std::exception& e) {
              errors[r] = e.what();
            }
          });
        }
        for (auto& t : threads) t.join();
        const auto close = [](const at::Tensor& a, const at::Tensor& b) {
          const auto got = a.defined() ? a : at::zeros_like(b);  // an expert that got no row has no gradient
          return got.sizes() == b.sizes() && at::allclose(got, b, 1e-5, 1e-6);
        };
        for (int r = 0, row = 0; r < W; row += static_cast<int>(xs[r].size(0)), ++r) {
          CAPTURE(r);
          CHECK(errors[r] == "");
          if (!errors[r].empty()) continue;
          const int64_t N = xs[r].size(0);
          CHECK(close(ys[r], y.narrow(0, row, N)));
          CHECK(close(gws[r], w.grad().narrow(0, row, N)));
          if (N > 0) CHECK(close(gxs[r], x.grad().narrow(0, row, N)));
          CHECK(close(ggu[r], gu.grad().narrow(0, r * El, El)));
          CHECK(close(gdn[r], dn.grad().narrow(0, r * El, El)));
        }
      }
    }
  }
}

TEST_CASE("all-to-all of variable counts (Gloo, three ranks): zero rows from some ranks, every row to one") {
  const int W = 3, port = free_port();
  // send[r][p]: rows rank r sends to rank p; each row holds (sender, receiver, index) so the receiver can check it.
  const std::vector<std::vector<int64_t>> send = {{0, 4, 0}, {1, 0, 2}, {0, 0, 0}};
  std::vector<at::Tensor> got(W);
  std::vector<std::string> errors(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto store = store_of(port, r, W);
        dist::GlooCommunicator c(store, "a2a", r, W, "127.0.0.1", std::chrono::seconds(30));
        std::vector<at::Tensor> rows;
        std::vector<int64_t> recv;
        for (int p = 0; p < W; ++p) {
          for (int64_t i = 0; i < send[r][p]; ++i) rows.push_back(at::tensor({float(r), float(p), float(i)}));
          recv.push_back(send[p][r]);
        }
        const auto in = rows.empty() ? at::empty({0, 3}) : at::stack(rows);
        int64_t total = 0;
        for (auto n : recv) total += n;
        got[r] = at::empty({total, 3});
        c.all_to_all(got[r], in, recv, send[r], "test");
        // Counts that do not fit the buffers are our bug, named.
        try {
          c.all_to_all(at::empty({1, 3}), in, {0, 0, 0}, send[r]);
          errors[r] = "no error";
        } catch (const InternalError& e) {
          errors[r] = e.what();
        }
      } catch (const std::exception& e) {
        errors[r] = std::string("unexpected: ") + e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    CAPTURE(r);
    CHECK(errors[r].find("all-to-all receive counts (3 ranks, 0 rows) do not fit a group of 3 and a buffer of 1 rows") != std::string::npos);
    std::vector<at::Tensor> want;
    for (int p = 0; p < W; ++p)
      for (int64_t i = 0; i < send[p][r]; ++i) want.push_back(at::tensor({float(p), float(r), float(i)}));
    CHECK(at::equal(got[r], want.empty() ? at::empty({0, 3}) : at::stack(want)));
  }
  dist::SelfCommunicator self;
  auto out = at::empty({2, 3});
  self.all_to_all(out, at::ones({2, 3}), {2}, {2});
  CHECK(at::equal(out, at::ones({2, 3})));
}
