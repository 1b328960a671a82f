#pragma once
// Expert parallelism (the Megatron / DeepSpeed-MoE way): each of P ranks of an expert group holds E/P of a MoE layer's
// experts, [rank x E/P, (rank + 1) x E/P). A rank routes its own tokens, sorts its picks by expert (sort_picks), and
// sends each expert's rows to the rank holding it; the experts compute on the rows they got from every rank; the
// results travel back by the reverse exchange and are combined per token as without expert parallelism. Shapes:
// N = this rank's tokens, k = picks per token, C = hidden size, E = experts, P = ranks of the expert group,
// El = E / P local experts, R = rows this rank's experts receive.
//
//   picks sorted by expert   xs [N k, C]        rows of expert e: counts[e]; to rank p: the experts of p
//   counts exchanged         got [P, El]        rows rank p sends for local expert j (an all-to-all of E counts)
//   rows exchanged           xr [R, C]          from rank 0 (its rows for local experts 0..El-1), rank 1, ...
//   grouped by expert        xe [R, C]          local expert 0's rows from every rank, then expert 1's ... (a permutation)
//   experts                  ye [R, C]          the same kernels as one rank's (experts_on_sorted, model/moe.hpp)
//   back                     ys [N k, C]        the reverse permutation and exchange: row i of xs's result
//
// The exchanges are autograd functions whose backward is the reverse exchange: every rank of the expert group runs
// the same number of them in the same order in forward, recompute and backward (one pair per MoE layer), so the
// collectives match. The model stays single-device: the exchange itself is handed in (ExpertExchange), implemented
// over a communicator by the trainer (train/expert_parallel.hpp).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/core/ivalue.h>

#include <numeric>
#include <utility>
#include <vector>

#include "shardlm/core/errors.hpp"

namespace shardlm::model {

/// Moves rows between the ranks of an expert group (an all-to-all of variable counts), for the model.
class ExpertExchange : public torch::CustomClassHolder {
 public:
  virtual int size() const = 0;
  virtual int rank() const = 0;
  /// send[p] rows of `rows` (in rank order) go to rank p; returns the recv[p] rows from each rank p, in rank order.
  virtual at::Tensor exchange(const at::Tensor& rows, const std::vector<int64_t>& recv, const std::vector<int64_t>& send) = 0;
};

/// A MoE layer's place in expert parallelism: the group and this rank's experts [first, first + count).
struct ExpertShard {
  c10::intrusive_ptr<ExpertExchange> exchange;
  int64_t first = 0, count = 0;
  bool active() const { return exchange.defined() && exchange->size() > 1; }
};

namespace ops {

/// rows -> the rows of the exchange (ExpertExchange::exchange); the backward sends the gradients back the other way.
struct ExchangeRows : torch::autograd::Function<ExchangeRows> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& rows,
                            const c10::intrusive_ptr<ExpertExchange>& ex, std::vector<int64_t> recv,
                            std::vector<int64_t> send) {
    auto out = ex->exchange(rows.contiguous(), recv, send);
    ctx->saved_data["exchange"] = c10::IValue::make_capsule(ex);
    ctx->saved_data["recv"] = std::move(recv);
    ctx->saved_data["send"] = std::move(send);
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    auto ex = c10::static_intrusive_pointer_cast<ExpertExchange>(ctx->saved_data["exchange"].toCapsule());
    const auto recv = ctx->saved_data["recv"].toIntVector(), send = ctx->saved_data["send"].toIntVector();
    return {ex->exchange(g[0].contiguous(), send, recv), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

/// The routing of the sorted picks of one rank between the ranks of its expert group.
struct ExpertRoutes {
  std::vector<int64_t> send, recv;  ///< rows to and from each rank [P]
  at::Tensor by_expert;             ///< [R] int64: the received row each row of the by-expert order is
  at::Tensor counts;                ///< [El] int64 on the rows' device: the rows of each local expert
};

/// Exchanges the counts (E per rank, in expert order) and derives the routes: `counts` [E] are this rank's rows per
/// expert (sort_picks); `exchange` the group; every local expert's rows from every rank, grouped by expert.
inline ExpertRoutes expert_routes(const at::Tensor& counts, ExpertExchange& exchange) {
  const int64_t P = exchange.size(), E = counts.size(0), El = E / P;
  SHARDLM_ASSERT(E % P == 0, E, " experts over an expert group of ", P);
  const std::vector<int64_t> per_rank(static_cast<size_t>(P), El);
  const auto mine = counts.to(at::kLong).contiguous();                                    // [E]
  const auto got = exchange.exchange(mine, per_rank, per_rank).cpu().view({P, El});      // [P, El]
  const auto sent = mine.cpu().view({P, El}).sum(1);                                      // [P]
  ExpertRoutes r;
  const auto* g = got.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {
    r.send.push_back(sent[p].item<int64_t>());
    r.recv.push_back(std::accumulate(g + p * El, g + (p + 1) * El, int64_t{0}));
  }
  // Received row of (rank p, local expert j)'s first row: rows arrive rank by rank, each rank's in expert order.
  std::vector<int64_t> start(static_cast<size_t>(P * El));
  for (int64_t i = 0, at = 0; i < P * El; at += g[i], ++i) start[static_cast<size_t>(i)] = at;
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(std::accumulate(g, g + P * El, int64_t{0})));
  for (int64_t j = 0; j < El; ++j)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t i = 0; i < g[p * El + j]; ++i) order.push_back(start[static_cast<size_t>(p * El + j)] + i);
  r.by_expert = at::tensor(order, at::kLong).to(counts.device());
  r.counts = got.sum(0).to(counts.device());
  return r;
}

}  // namespace ops
}  // namespace shardlm::model
