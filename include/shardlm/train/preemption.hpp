#pragma once
// Preemption: SIGTERM or SIGUSR1 (Slurm's warning signal, spot instances) asks the run to stop after the current
// step; the trainer agrees on it across ranks (the flag rides on the loss all-reduce), saves a checkpoint and
// exits 0. The handler resets itself, so a second signal takes the default action: the process ends at once.
#include <csignal>

namespace shardlm::train {

class StopSignals {
 public:
  /// Installs the handlers for SIGTERM and SIGUSR1 (idempotent).
  static void install() {
    struct sigaction sa {};
    sa.sa_handler = [](int sig) { received_ = sig; };
    sa.sa_flags = SA_RESETHAND | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGTERM, &sa, nullptr);
    ::sigaction(SIGUSR1, &sa, nullptr);
  }
  /// The signal received since install(), or 0.
  static int received() { return received_; }

 private:
  static inline volatile std::sig_atomic_t received_ = 0;
};

}  // namespace shardlm::train
