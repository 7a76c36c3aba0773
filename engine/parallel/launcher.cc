#include "engine/parallel/launcher.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <random>
#include <thread>

namespace helix::parallel {
namespace {

// Reads environment variable `name` into `*out`: nullopt when it is unset or empty. Anything
// but a whole number is InvalidArgument naming the variable and its value (taken as unset, a
// malformed rank made a process the leader of an instance of its own).
Status EnvInt(const char* name, std::optional<int>* out) {
  out->reset();
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return Status::Ok();
  const char* end = v + std::strlen(v);
  int x = 0;
  const auto [stop, ec] = std::from_chars(v, end, x);
  if (ec != std::errc() || stop != end) {
    return InvalidArgument(std::string(name) + "='" + v + "': expected a whole number");
  }
  *out = x;
  return Status::Ok();
}

// What the first launcher that set a rank says (rank unset: none did). Every launcher's
// variables are checked, those of the launchers behind that one too.
struct LauncherRank {
  std::optional<int> rank, world_size;
  std::string source;
};

StatusOr<LauncherRank> RankFromEnvironment() {
  LauncherRank found;
  for (auto [r, n, what] : {std::tuple{"HELIX_RANK", "HELIX_WORLD_SIZE", "HELIX_*"},
                            std::tuple{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI"},
                            std::tuple{"SLURM_PROCID", "SLURM_NTASKS", "Slurm"}}) {
    std::optional<int> rank, size;
    RETURN_IF_ERROR(EnvInt(r, &rank));
    RETURN_IF_ERROR(EnvInt(n, &size));
    if (!found.rank && rank) found = {rank, size, what};
  }
  return found;
}

// 128 random bits, hex (from the clock and the pid where no random device can be opened).
std::string RandomToken() {
  uint32_t words[4];
  try {
    std::random_device rd;
    for (uint32_t& w : words) w = rd();
  } catch (const std::exception&) {
    std::seed_seq seq{
        static_cast<uint32_t>(std::chrono::steady_clock::now().time_since_epoch().count()),
        static_cast<uint32_t>(std::chrono::system_clock::now().time_since_epoch().count()),
        static_cast<uint32_t>(::getpid())};
    std::mt19937 gen(seq);
    for (uint32_t& w : words) w = gen();
  }
  static const char kHex[] = "0123456789abcdef";
  std::string t;
  for (uint32_t x : words) {
    for (int j = 0; j < 8; ++j, x >>= 4) t.push_back(kHex[x & 15]);
  }
  return t;
}

}  // namespace

StatusOr<std::pair<std::string, int>> ParseHostPort(const std::string& addr) {
  const size_t colon = addr.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return InvalidArgument("leader address '" + addr + "': expected HOST:PORT");
  }
  char* end = nullptr;
  const long port = std::strtol(addr.c_str() + colon + 1, &end, 10);
  if (*end != '\0' || port < 1 || port > 65535) {
    return InvalidArgument("leader address '" + addr + "': the port must be 1..65535");
  }
  return std::make_pair(addr.substr(0, colon), static_cast<int>(port));
}

StatusOr<RankAssignment> AssignRank(int world, std::optional<int> flag_rank,
                                    std::optional<int> flag_world_size,
                                    const std::string& leader_addr) {
  RankAssignment a;
  a.world_size = world;
  std::optional<int> rank = flag_rank;
  int size = flag_world_size.value_or(world);  // the launch's world size; the layout's if unsaid
  std::string source = "flags";
  if (!rank) {
    ASSIGN_OR_RETURN(LauncherRank env, RankFromEnvironment());
    if (env.rank) {
      rank = env.rank;
      size = env.world_size.value_or(world);
      source = env.source;
    }
  }
  // A launcher's single task (sbatch, mpirun -n 1) is a leader like a process started alone;
  // so is rank 0 of an instance of one rank, however it was told its rank (a Slurm step sets
  // SLURM_PROCID for every task).
  if (rank && *rank == 0 && (world == 1 || (source != "flags" && size == 1))) {
    rank.reset();
    size = world;
  }
  std::string addr = leader_addr;
  if (addr.empty() && std::getenv("HELIX_LEADER_ADDR") != nullptr) {
    addr = std::getenv("HELIX_LEADER_ADDR");
  }
  if (const char* t = std::getenv("HELIX_GROUP_TOKEN"); t != nullptr) a.group_token = t;
  // Leader or not: a launch of another size than the layout's cannot make its group.
  if (size != world) {
    return InvalidArgument(
        "world size " + std::to_string(size) + " (from " + source +
        ") differs from tensor_parallel_size x context_parallel_size = " + std::to_string(world));
  }
  if (!rank) {
    a.rank = 0;
    a.spawn_local = world > 1;
    // A leader that spawns its ranks makes its own token (an exported one could be shared by
    // two such instances).
    if (a.spawn_local) a.group_token = RandomToken();
    if (!addr.empty()) {
      ASSIGN_OR_RETURN(auto hp, ParseHostPort(addr));
      std::tie(a.leader_host, a.leader_port) = hp;
    }
    return a;
  }
  a.rank = *rank;
  if (a.rank < 0 || a.rank >= world) {
    return InvalidArgument("rank " + std::to_string(a.rank) + " (from " + source +
                           ") is outside 0.." + std::to_string(world - 1));
  }
  if (addr.empty()) {
    return InvalidArgument("rank " + std::to_string(a.rank) + " of " + std::to_string(world) +
                           " needs the leader's address (--leader-addr HOST:PORT or "
                           "HELIX_LEADER_ADDR)");
  }
  ASSIGN_OR_RETURN(auto hp, ParseHostPort(addr));
  std::tie(a.leader_host, a.leader_port) = hp;
  return a;
}

namespace {

// The lowest of the kernel's ephemeral ports (what bind(0) and outgoing connections take).
int LowestEphemeralPort() {
  int lo = 32768;
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    int a = 0;
    if (std::fscanf(f, "%d", &a) == 1 && a > 0) lo = a;
    std::fclose(f);
  }
  return lo;
}

// Binds a TCP socket to host:port (0: the kernel's pick) and returns the port bound, or -1.
int BindPort(const sockaddr_in& at) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr = at;
  int port = -1;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    socklen_t len = sizeof(addr);
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
      port = ntohs(addr.sin_port);
    }
  }
  ::close(fd);
  return port;
}

}  // namespace

StatusOr<int> PickFreePort(const std::string& host) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    return InvalidArgument("'" + host + "' is not an IPv4 address");
  }
  // Preferably a random port below the ephemeral range: one inside it may be taken, before its
  // user binds it, by any outgoing connection on the machine (the kernel hands those out).
  // 10000-19999: tests/router/router_test.py picks its ports from 20000-31999 (and restarts
  // servers on theirs), so that the two never take each other's.
  constexpr int kLowest = 10000;
  const int highest = std::min(LowestEphemeralPort(), 20000) - 1;
  if (highest - kLowest >= 1000) {
    std::random_device rd;
    std::mt19937 rng(rd());
    std::uniform_int_distribution<int> pick(kLowest, highest);
    for (int attempt = 0; attempt < 64; ++attempt) {
      addr.sin_port = htons(static_cast<uint16_t>(pick(rng)));
      const int port = BindPort(addr);
      if (port > 0) return port;
    }
  }
  addr.sin_port = 0;
  const int port = BindPort(addr);
  if (port <= 0) return Unavailable("cannot bind " + host + ": " + std::strerror(errno));
  return port;
}

StatusOr<std::unique_ptr<LocalRanks>> LocalRanks::Spawn(const std::vector<std::string>& argv,
                                                        int world, const std::string& host,
                                                        int port, const std::string& group_token) {
  std::unique_ptr<LocalRanks> lr(new LocalRanks());
  const pid_t leader = ::getpid();
  // The children's environment, built before fork (the leader may have threads by now: its
  // rendezvous store's, so the child calls nothing that allocates before exec).
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, "HELIX_GROUP_TOKEN=", 18) != 0) env_strings.emplace_back(*e);
  }
  env_strings.push_back("HELIX_GROUP_TOKEN=" + group_token);
  std::vector<char*> envp;
  for (std::string& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  // The leader's own --rank / --leader-addr (e.g. `serve --leader-addr` naming where it
  // listens) give way to each child's: a flag given twice is an error.
  std::vector<std::string> base;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (a == "--rank" || a == "--leader-addr") {
      ++i;  // and its value
      continue;
    }
    if (a.rfind("--rank=", 0) == 0 || a.rfind("--leader-addr=", 0) == 0) continue;
    base.push_back(a);
  }
  for (int r = 1; r < world; ++r) {
    std::vector<std::string> args = base;
    args.insert(args.end(),
                {"--rank", std::to_string(r), "--leader-addr", host + ":" + std::to_string(port)});
    std::vector<char*> cargs;
    for (std::string& s : args) cargs.push_back(s.data());
    cargs.push_back(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) return Internal(std::string("fork: ") + std::strerror(errno));
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      sigset_t all;  // a rank starts with no signal blocked, whatever its leader blocked
      sigemptyset(&all);
      ::sigprocmask(SIG_SETMASK, &all, nullptr);
      if (::getppid() != leader) _exit(111);  // the leader is already gone
      ::execve("/proc/self/exe", cargs.data(), envp.data());
      _exit(127);
    }
    lr->pids_.push_back(pid);
    lr->ranks_.push_back(r);
  }
  return lr;
}

Status LocalRanks::Wait(std::chrono::milliseconds grace) {
  const auto deadline = std::chrono::steady_clock::now() + grace;
  Status first;
  for (size_t i = 0; i < pids_.size(); ++i) {
    if (pids_[i] <= 0) continue;
    int st = 0;
    for (;;) {
      const pid_t w = ::waitpid(pids_[i], &st, WNOHANG);
      if (w == pids_[i]) break;
      if (w < 0) {
        st = 0;
        break;
      }
      if (std::chrono::steady_clock::now() >= deadline) {
        ::kill(pids_[i], SIGKILL);
        ::waitpid(pids_[i], &st, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pids_[i] = -1;
    const bool ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
    if (!ok && first.ok()) {
      first =
          Unavailable("rank " + std::to_string(ranks_[i]) +
                      (WIFEXITED(st) ? " exited with code " + std::to_string(WEXITSTATUS(st))
                                     : " was killed by signal " + std::to_string(WTERMSIG(st))));
    }
  }
  return first;
}

Status LocalRanks::ReapExited() {
  for (size_t i = 0; i < pids_.size(); ++i) {
    if (pids_[i] <= 0) continue;
    int st = 0;
    if (::waitpid(pids_[i], &st, WNOHANG) != pids_[i]) continue;
    pids_[i] = -1;
    return Unavailable("rank " + std::to_string(ranks_[i]) +
                       (WIFEXITED(st) ? " exited with code " + std::to_string(WEXITSTATUS(st))
                                      : " was killed by signal " + std::to_string(WTERMSIG(st))));
  }
  return Status::Ok();
}

LocalRanks::~LocalRanks() {
  Status ignored = Wait(std::chrono::milliseconds(5000));  // the leader reported any failure
  (void)ignored;
}

}  // namespace helix::parallel
