// shardlm_launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P] -- PROG ARGS...
// shardlm_launch --nproc-per-node N --hostfile FILE [--ssh-command CMD] -- PROG ARGS...
// Runs N local ranks of PROG with the torchrun environment, prints their output line by line prefixed with
// `[rank R] `, and stops every rank as soon as one fails. With --hostfile, starts itself on every host of the file
// over ssh (one node each, in file order) instead. Plain POSIX, no LibTorch (see docs/launch.md).
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <sstream>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "shardlm/core/errors.hpp"

namespace {

using shardlm::ConfigError;
using shardlm::fail;
using Clock = std::chrono::steady_clock;

constexpr const char* kProgram = "shardlm_launch";
// A line longer than this (e.g. a '\r' progress bar) is printed in pieces rather than buffered forever.
constexpr std::size_t kMaxPendingLine = std::size_t{1} << 16;
constexpr int kHandledSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGCHLD};

// Self-pipe: signal handlers only write the signal number here, so poll() wakes up and the loop acts.
int signal_pipe[2] = {-1, -1};

void on_signal(int sig) {
  const int saved = errno;
  const char byte = static_cast<char>(sig);
  [[maybe_unused]] const auto n = ::write(signal_pipe[1], &byte, 1);
  errno = saved;
}

void write_all(int fd, std::string_view text) {
  while (!text.empty()) {
    const ssize_t n = ::write(fd, text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // our own stdout is gone: nothing better to do with the text
    text.remove_prefix(static_cast<std::size_t>(n));
  }
}

struct Options {
  int nproc = 0, nnodes = 1, node_rank = 0, master_port = 0, grace_seconds = 5;
  std::string master_addr = "127.0.0.1";
  std::vector<char*> command;       // PROG ARGS..., null-terminated for execvp
  std::vector<std::string> hosts;   // --hostfile: one node per host
  std::vector<std::string> ssh;     // --ssh-command, split at spaces
};

// The hosts of a hostfile: one per line; blank lines and '#' comments are skipped.
std::vector<std::string> read_hostfile(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail<ConfigError>("--hostfile ", path, ": cannot open");
  std::vector<std::string> hosts;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    line = line.substr(0, line.find('#'));
    std::istringstream words(line);
    std::string host, extra;
    if (!(words >> host)) continue;
    if (words >> extra)
      fail<ConfigError>("--hostfile ", path, ":", n, ": '", extra, "' after the host name: one host per line (ranks per host: --nproc-per-node)");
    hosts.push_back(host);
  }
  if (hosts.empty()) fail<ConfigError>("--hostfile ", path, ": no hosts");
  return hosts;
}

// `text` quoted for a POSIX shell.
std::string shell_quoted(std::string_view text) {
  std::string out = "'";
  for (const char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

int int_flag(const cxxopts::ParseResult& args, const std::string& name, int lo, int hi) {
  const auto text = args[name].as<std::string>();
  int value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value < lo || value > hi)
    fail<ConfigError>("--", name, " '", text, "' must be an integer in [", lo, ", ", hi, "]");
  return value;
}

// The search execvp does, so that a typo is one clear line instead of N failing ranks.
bool program_exists(const std::string& prog) {
  const auto executable = [](const std::string& path) {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
  };
  if (prog.find('/') != std::string::npos) return executable(prog);
  const char* path = std::getenv("PATH");
  std::string_view dirs = path ? path : "/usr/local/bin:/usr/bin:/bin";
  for (auto colon = dirs.find(':');; colon = dirs.find(':')) {
    const std::string dir(dirs.substr(0, colon));
    if (executable((dir.empty() ? "." : dir) + "/" + prog)) return true;
    if (colon == std::string_view::npos) return false;
    dirs.remove_prefix(colon + 1);
  }
}

// Binds port 0 on loopback and returns what the kernel picked, so parallel runs do not collide.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  const bool ok = fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  const int error = errno;
  if (fd >= 0) ::close(fd);
  if (!ok) fail("cannot find a free TCP port on 127.0.0.1: ", std::strerror(error), " (pass --master-port)");
  return ntohs(addr.sin_port);
}

std::optional<Options> parse(int argc, char** argv) {
  int split = 1;
  while (split < argc && std::string_view(argv[split]) != "--") ++split;
  cxxopts::Options opts(kProgram, "Runs N local ranks of a program with the torchrun environment variables");
  opts.custom_help("--nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P] -- "
                   "PROG ARGS...");
  opts.add_options()("nproc-per-node", "ranks to start on this node", cxxopts::value<std::string>())(
      "nnodes", "number of nodes", cxxopts::value<std::string>()->default_value("1"))(
      "node-rank", "index of this node, in [0, nnodes)", cxxopts::value<std::string>()->default_value("0"))(
      "master-addr", "host of global rank 0 (default 127.0.0.1; required when nnodes > 1)",
      cxxopts::value<std::string>())(
      "master-port", "rendezvous port (default: a free one when nnodes == 1; required when nnodes > 1)",
      cxxopts::value<std::string>())(
      "grace-seconds", "seconds between SIGTERM and SIGKILL when stopping ranks",
      cxxopts::value<std::string>()->default_value("5"))(
      "hostfile", "start one node on each host of this file (one per line) over ssh, node ranks in file order",
      cxxopts::value<std::string>())(
      "ssh-command", "--hostfile: the command that runs a command on a host, as `CMD HOST COMMAND` "
      "(default: $SHARDLM_SSH, or ssh)", cxxopts::value<std::string>())("h,help", "this help");
  const auto args = opts.parse(split, argv);
  if (args.count("help")) {
    std::cout << opts.help() << '\n';
    return std::nullopt;
  }
  if (!args.unmatched().empty()) fail<ConfigError>("unexpected argument '", args.unmatched().front(), "' before '--'");
  if (split + 1 >= argc) fail<ConfigError>("missing '-- PROG ARGS...': the program each rank runs (see --help)");
  if (!args.count("nproc-per-node")) fail<ConfigError>("--nproc-per-node is required");

  Options o;
  o.nproc = int_flag(args, "nproc-per-node", 1, 4096);
  o.nnodes = int_flag(args, "nnodes", 1, 1 << 20);
  o.node_rank = int_flag(args, "node-rank", 0, 1 << 20);
  if (o.node_rank >= o.nnodes)
    fail<ConfigError>("--node-rank (", o.node_rank, ") must be less than --nnodes (", o.nnodes, ")");
  o.grace_seconds = int_flag(args, "grace-seconds", 0, 3600);
  if (args.count("hostfile")) {
    for (const char* local : {"nnodes", "node-rank"})
      if (args.count(local)) fail<ConfigError>("--", local, " comes from --hostfile (one node per host): leave it out");
    o.hosts = read_hostfile(args["hostfile"].as<std::string>());
    const char* env_ssh = std::getenv("SHARDLM_SSH");
    std::istringstream ssh(args.count("ssh-command") ? args["ssh-command"].as<std::string>()
                                                     : env_ssh && *env_ssh ? env_ssh : "ssh");
    for (std::string word; ssh >> word;) o.ssh.push_back(word);
    if (o.ssh.empty()) fail<ConfigError>("--ssh-command must not be empty");
    o.nnodes = static_cast<int>(o.hosts.size());
    o.master_addr = args.count("master-addr") ? args["master-addr"].as<std::string>() : o.hosts.front();
  } else if (args.count("ssh-command")) {
    fail<ConfigError>("--ssh-command needs --hostfile");
  }
  if (o.nnodes > 1 && o.hosts.empty())
    for (const char* required : {"master-addr", "master-port"})
      if (!args.count(required)) fail<ConfigError>("--", required, " is required when --nnodes > 1");
  if (args.count("master-addr")) o.master_addr = args["master-addr"].as<std::string>();
  if (o.master_addr.empty()) fail<ConfigError>("--master-addr must not be empty");
  o.master_port = args.count("master-port") ? int_flag(args, "master-port", 1, 65535) : free_port();
  if (!program_exists(argv[split + 1])) fail<ConfigError>("program '", argv[split + 1], "' not found or not executable");
  o.command.assign(argv + split + 1, argv + argc);
  o.command.push_back(nullptr);
  return o;
}

struct Stream {
  int fd = -1, out_fd = 1;  // the read end of a rank's pipe, and our stdout or stderr for its lines
  std::string pending;      // the start of a line not yet ended
};

struct Rank {
  int rank = 0;
  std::string label, prefix;  // "rank 3" and "[rank 3] " (a node over ssh: "node 1 (host b)", no prefix)
  pid_t pid = -1;
  bool running = false;
  Stream out, err;
};

// Prints every complete line with the rank prefix, one write() per line so lines never interleave.
void print_lines(const Rank& r, Stream& s, bool final) {
  const std::string& prefix = r.prefix;
  std::size_t start = 0;
  for (auto nl = s.pending.find('\n'); nl != std::string::npos; nl = s.pending.find('\n', start)) {
    write_all(s.out_fd, prefix + s.pending.substr(start, nl + 1 - start));
    start = nl + 1;
  }
  s.pending.erase(0, start);
  if (!s.pending.empty() && (final || s.pending.size() > kMaxPendingLine)) {
    write_all(s.out_fd, prefix + s.pending + '\n');
    s.pending.clear();
  }
}

// Reads once what poll() reported; with `final` (the rank has exited) reads to the end, prints the rest
// and closes. At end of file the rest is printed too, a last line without '\n' included.
void read_stream(const Rank& r, Stream& s, bool final) {
  char buffer[1 << 16];
  while (s.fd >= 0) {
    const ssize_t n = ::read(s.fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n > 0) s.pending.append(buffer, static_cast<std::size_t>(n));
    const bool again = n < 0 && errno == EAGAIN;
    const bool done = n == 0 || (n < 0 && !again) || (again && final);
    print_lines(r, s, done);
    if (done) {
      ::close(s.fd);
      s.fd = -1;
    }
    if (!final || again) return;  // one read per poll() round: a chatty rank cannot starve the others
  }
}

// Starts `command` (null-terminated) with `env` added, its output read through pipes.
void spawn(Rank& r, const std::vector<char*>& command, const std::vector<std::pair<std::string, std::string>>& env) {
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) fail("pipe: ", std::strerror(errno));
  const std::string exec_error = std::string(kProgram) + ": cannot run '" + command[0] + "': ";
  const pid_t launcher = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) fail("fork: ", std::strerror(errno));
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != launcher) ::_exit(128 + SIGKILL);  // the launcher died before prctl took effect
    for (const int sig : kHandledSignals) ::signal(sig, SIG_DFL);
    ::setsid();
    ::dup2(out[1], 1);
    ::dup2(err[1], 2);
    for (const auto& [name, value] : env) ::setenv(name.c_str(), value.c_str(), 1);
    ::execvp(command[0], command.data());
    write_all(2, exec_error + std::strerror(errno) + "\n");
    ::_exit(127);
  }
  ::close(out[1]);
  ::close(err[1]);
  for (const int fd : {out[0], err[0]}) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  r.pid = pid;
  r.running = true;
  r.out = {out[0], 1, {}};
  r.err = {err[0], 2, {}};
}

// The command that starts node `node` of a --hostfile job on its host: this launcher (same path on every host),
// in this directory, with the variables NCCL_*, GLOO_*, TORCH_*, SHARDLM_*, OMP_NUM_THREADS,
// CUDA_VISIBLE_DEVICES and LD_LIBRARY_PATH of this environment (ssh passes no environment).
std::vector<std::string> node_command(const Options& o, int node) {
  char self[4096] = {}, cwd[4096] = {};
  if (::readlink("/proc/self/exe", self, sizeof self - 1) < 0) fail("readlink /proc/self/exe: ", std::strerror(errno));
  if (!::getcwd(cwd, sizeof cwd)) fail("getcwd: ", std::strerror(errno));
  std::string remote = "cd " + shell_quoted(cwd) + " && exec env";
  for (char** e = environ; *e; ++e) {
    const std::string_view var = *e, name = var.substr(0, var.find('='));
    const bool pass = name.starts_with("NCCL_") || name.starts_with("GLOO_") || name.starts_with("TORCH_") ||
                      (name.starts_with("SHARDLM_") && name != "SHARDLM_SSH") || name == "OMP_NUM_THREADS" ||
                      name == "CUDA_VISIBLE_DEVICES" || name == "LD_LIBRARY_PATH";
    if (pass && name.size() < var.size()) remote += " " + std::string(name) + "=" + shell_quoted(var.substr(name.size() + 1));
  }
  remote += " " + shell_quoted(self) + " --nproc-per-node " + std::to_string(o.nproc) + " --nnodes " + std::to_string(o.nnodes) +
            " --node-rank " + std::to_string(node) + " --master-addr " + shell_quoted(o.master_addr) + " --master-port " +
            std::to_string(o.master_port) + " --grace-seconds " + std::to_string(o.grace_seconds) + " --";
  for (const char* arg : o.command)
    if (arg) remote += " " + shell_quoted(arg);
  std::vector<std::string> argv = o.ssh;
  argv.push_back(o.hosts[static_cast<std::size_t>(node)]);
  argv.push_back(remote);
  return argv;
}

int launch(const Options& o) {
  const auto set = [](const char* name, const std::string& value) { ::setenv(name, value.c_str(), 1); };
  set("WORLD_SIZE", std::to_string(o.nnodes * o.nproc));
  set("LOCAL_WORLD_SIZE", std::to_string(o.nproc));
  set("GROUP_RANK", std::to_string(o.node_rank));
  set("MASTER_ADDR", o.master_addr);
  set("MASTER_PORT", std::to_string(o.master_port));
  if (o.nproc > 1 && !std::getenv("OMP_NUM_THREADS")) {
    set("OMP_NUM_THREADS", "1");
    std::cerr << kProgram << ": note: setting OMP_NUM_THREADS=1 for each rank; set it yourself to change this\n";
  }

  if (::pipe2(signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) fail("pipe: ", std::strerror(errno));
  struct sigaction action {};
  action.sa_handler = on_signal;
  action.sa_flags = SA_NOCLDSTOP;
  ::sigemptyset(&action.sa_mask);
  for (const int sig : kHandledSignals) ::sigaction(sig, &action, nullptr);

  // Locally: one child per rank. With --hostfile: one per node, each the launcher on its host (over ssh), whose
  // lines already carry their ranks.
  std::vector<Rank> ranks(static_cast<std::size_t>(o.hosts.empty() ? o.nproc : o.nnodes));
  for (int i = 0; i < static_cast<int>(ranks.size()); ++i) {
    auto& r = ranks[static_cast<std::size_t>(i)];
    if (o.hosts.empty()) {
      r.rank = o.node_rank * o.nproc + i;
      r.label = "rank " + std::to_string(r.rank), r.prefix = "[" + r.label + "] ";
      spawn(r, o.command, {{"RANK", std::to_string(r.rank)}, {"LOCAL_RANK", std::to_string(i)}});
    } else {
      r.rank = i;
      r.label = "node " + std::to_string(i) + " (" + o.hosts[static_cast<std::size_t>(i)] + ")";
      auto words = node_command(o, i);
      std::vector<char*> argv;
      for (auto& w : words) argv.push_back(w.data());
      argv.push_back(nullptr);
      spawn(r, argv, {});
    }
  }

  std::size_t running = ranks.size();
  std::optional<int> exit_code;  // of the first rank that failed
  int interrupted = 0;           // the signal we were stopped with
  std::optional<Clock::time_point> kill_at;
  bool killed = false;
  // Each rank leads its own session, so signalling its group also stops what it started (even after the
  // rank itself exited); a child that has not called setsid() yet is signalled directly.
  const auto stop_all = [&](int sig) {
    for (const auto& r : ranks)
      if (::kill(-r.pid, sig) != 0 && r.running) ::kill(r.pid, sig);
    if (sig == SIGKILL) killed = true;
    else if (!kill_at) kill_at = Clock::now() + std::chrono::seconds(o.grace_seconds);
  };

  std::vector<pollfd> fds;
  std::vector<std::pair<Rank*, Stream*>> streams;  // streams[i] belongs to fds[i + 1]
  while (running > 0) {
    fds.assign(1, pollfd{signal_pipe[0], POLLIN, 0});
    streams.clear();
    for (auto& r : ranks)
      for (Stream* s : {&r.out, &r.err})
        if (s->fd >= 0) {
          fds.push_back({s->fd, POLLIN, 0});
          streams.emplace_back(&r, s);
        }
    int timeout_ms = -1;
    if (kill_at && !killed)
      timeout_ms = static_cast<int>(std::max<long long>(
          0, std::chrono::duration_cast<std::chrono::milliseconds>(*kill_at - Clock::now()).count() + 1));
    if (::poll(fds.data(), fds.size(), timeout_ms) < 0 && errno != EINTR) fail("poll: ", std::strerror(errno));

    char sig = 0;
    while (::read(signal_pipe[0], &sig, 1) == 1) {
      if (sig == SIGCHLD) continue;
      if (interrupted) {  // a second signal: no more grace
        stop_all(SIGKILL);
        continue;
      }
      interrupted = sig;
      std::cerr << kProgram << ": got signal " << int{sig} << " (" << ::strsignal(sig)
                << "); forwarding it to all ranks\n";
      stop_all(sig);
    }
    for (std::size_t i = 0; i < streams.size(); ++i)
      if (fds[i + 1].revents != 0) read_stream(*streams[i].first, *streams[i].second, false);

    int status = 0;
    for (pid_t pid; (pid = ::waitpid(-1, &status, WNOHANG)) > 0;) {
      const auto it = std::find_if(ranks.begin(), ranks.end(), [&](const Rank& r) { return r.pid == pid; });
      if (it == ranks.end()) continue;
      it->running = false;
      --running;
      read_stream(*it, it->out, true);  // all it wrote before exiting is in the pipe
      read_stream(*it, it->err, true);
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (ok || exit_code || interrupted || kill_at) continue;
      exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      std::cerr << kProgram << ": " << it->label << " (pid " << pid << ") ";
      if (WIFEXITED(status)) std::cerr << "exited with code " << WEXITSTATUS(status);
      else std::cerr << "was killed by signal " << WTERMSIG(status) << " (" << ::strsignal(WTERMSIG(status)) << ")";
      std::cerr << (running > 0 ? (o.hosts.empty() ? "; stopping the other ranks\n" : "; stopping the other nodes\n") : "\n");
      stop_all(SIGTERM);
    }
    if (running > 0 && kill_at && !killed && Clock::now() >= *kill_at) {
      std::cerr << kProgram << ": " << running << " rank(s) still running after " << o.grace_seconds
                << " s; sending SIGKILL\n";
      stop_all(SIGKILL);
    }
  }
  if (kill_at && !killed) stop_all(SIGKILL);  // leftovers the ranks started; the ranks had their grace
  if (exit_code) return *exit_code;
  return interrupted ? 128 + interrupted : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const auto options = parse(argc, argv);
    return options ? launch(*options) : 0;
  } catch (const ConfigError& e) {
    std::cerr << kProgram << ": error: " << e.what() << '\n';
    return 2;
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << kProgram << ": error: " << e.what() << " (see --help)\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << kProgram << ": error: " << e.what() << '\n';
  }
  return 1;
}
