#pragma once
// What to say when a collective does not complete: which collective (kind, sequence number on its communicator,
// label) and which ranks did not arrive. A rank whose collective failed publishes its own latest collective in
// the job's TCPStore under shardlm/hang/<group>/<group rank>, then waits a short time for the other ranks of the
// group to do the same: those that report a lower sequence number are behind (stuck in or before an earlier
// collective), those that report nothing are silent (hung outside the group's collectives, or dead). Ranks
// blocked in the same collective time out at about the same moment, so a short wait hears from them.
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <algorithm>
#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/dist/communicator.hpp"

namespace shardlm::dist {

/// "all-gather #57 of block 3": a collective as messages name it.
inline std::string describe_collective(const CollectiveState& s) {
  return detail::cat(s.kind, " #", s.seq, s.label ? detail::cat(" of ", s.label) : std::string());
}

namespace hang_detail {
inline std::string key(const std::string& group, int group_rank) { return detail::cat("shardlm/hang/", group, "/", group_rank); }
}  // namespace hang_detail

/// Publishes `mine` (this rank's failed collective on `comm`, the group named `group`) and describes the other ranks of
/// the group from their reports, waiting at most min(`timeout`, 10 s) for them: e.g. "rank 1 did not arrive
/// (silent: no report within 5 s: hung outside a collective of this group, or dead)". Never throws: a store that
/// cannot be reached (rank 0, which serves it, is gone) is said instead.
inline std::string hang_report(c10d::Store& store, const std::string& group, const Communicator& comm,
                               const CollectiveState& mine, std::chrono::milliseconds timeout) {
  const int rank = comm.rank(), size = comm.size();
  const auto wait = std::min<std::chrono::milliseconds>(timeout, std::chrono::seconds(10));
  try {
    // A report is "<seq> <the collective as messages name it>".
    const std::string value = detail::cat(mine.seq, " ", describe_collective(mine));
    store.set(hang_detail::key(group, rank), std::vector<uint8_t>(value.begin(), value.end()));
    const auto deadline = std::chrono::steady_clock::now() + wait;
    struct Report {
      int64_t seq;
      std::string what;
    };
    std::vector<std::optional<Report>> states(size);
    for (int missing = size - 1;;) {
      for (int r = 0; r < size; ++r) {
        if (r == rank || states[r] || !store.check({hang_detail::key(group, r)})) continue;
        const auto bytes = store.get(hang_detail::key(group, r));
        const std::string text(bytes.begin(), bytes.end());
        const auto space = text.find(' ');
        states[r] = Report{std::stoll(text.substr(0, space)), space == std::string::npos ? "" : text.substr(space + 1)};
        --missing;
      }
      if (missing == 0 || std::chrono::steady_clock::now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    std::vector<std::string> silent, behind, waiting, ahead;
    for (int r = 0; r < size; ++r) {
      if (r == rank) continue;
      const auto name = detail::cat("rank ", comm.member(r));
      if (!states[r]) {
        silent.push_back(name);
        continue;
      }
      const Report& s = *states[r];
      const auto where = detail::cat(name, " (at ", s.what, ")");
      if (s.seq < mine.seq) behind.push_back(where);
      else if (s.seq == mine.seq) waiting.push_back(name);
      else ahead.push_back(where);
    }
    const auto join = [](const std::vector<std::string>& v) {
      std::string out;
      for (const auto& x : v) out += (out.empty() ? "" : ", ") + x;
      return out;
    };
    std::string out;
    const auto add = [&](const std::string& part) { out += (out.empty() ? "" : "; ") + part; };
    if (!silent.empty())
      add(detail::cat(join(silent), " did not arrive (silent: no report within ", wait.count() / 1000.0,
                               " s: hung outside a collective of this group, or dead)"));
    if (!behind.empty()) add(detail::cat(join(behind), " did not arrive (behind: at an earlier collective)"));
    if (!ahead.empty()) add(detail::cat(join(ahead), " went past it (a mismatched collective sequence)"));
    if (!waiting.empty()) add(detail::cat(join(waiting), " waited in it too"));
    return out.empty() ? "every rank of the group reported the same collective" : out;
  } catch (const std::exception& e) {
    const std::string what = e.what();
    return "the other ranks' states are unknown: the TCPStore is unreachable (rank 0, which serves it, may be gone) [" +
           what.substr(0, what.find('\n')) + "]";
  }
}

}  // namespace shardlm::dist
