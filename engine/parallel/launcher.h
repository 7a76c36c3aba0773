// Starting the ranks of one Helix instance. Single node: the leader re-executes its own
// binary once per other rank (same arguments plus --rank R --leader-addr HOST:PORT) and reaps
// them. Multi-node: an external launcher starts every rank and tells it rank / world size /
// leader address by flags or environment (OMPI_COMM_WORLD_RANK/SIZE, SLURM_PROCID/NTASKS,
// HELIX_RANK/HELIX_WORLD_SIZE/HELIX_LEADER_ADDR).
// Thread-safety: LocalRanks is owned by the leader's main thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/common/status.h"

namespace helix::parallel {

struct RankAssignment {
  int rank = 0;
  int world_size = 1;
  std::string leader_host = "127.0.0.1";
  int leader_port = 0;
  bool spawn_local = false;  // this process is the leader and starts the others itself
  // Proves membership to the leader's rendezvous store (tcp_store.h): a fresh random one when
  // this process spawns the others (they inherit it), else HELIX_GROUP_TOKEN; "" = none.
  std::string group_token;
};

// Decides this process's rank. Flags win over the environment; without either a multi-rank
// instance is started locally by this process (rank 0). `world` is TP x CP; a world size from
// flags or environment must equal it. `leader_addr` is "host:port" ("" = none given).
// Without a rank flag, a launcher variable that is set to anything but a whole number (empty
// counts as unset) is InvalidArgument naming it and its value.
StatusOr<RankAssignment> AssignRank(int world, std::optional<int> flag_rank,
                                    std::optional<int> flag_world_size,
                                    const std::string& leader_addr);

// "host:port" -> (host, port). InvalidArgument names the text.
StatusOr<std::pair<std::string, int>> ParseHostPort(const std::string& addr);

// A port on `host` that was free a moment ago (for tests that start servers): a random one in
// 10000-19999 (below the kernel's ephemeral range, whose ports are also handed to outgoing
// connections, and apart from router_test.py's) where there is room, else one the kernel picks.
StatusOr<int> PickFreePort(const std::string& host);

class LocalRanks {
 public:
  // Starts ranks 1..world-1 as `/proc/self/exe argv[1..] --rank R --leader-addr host:port`
  // with HELIX_GROUP_TOKEN=group_token in their environment. The leader's rendezvous store
  // should already listen on host:port (a port picked but not held can be taken meanwhile).
  // The children die with the leader (PR_SET_PDEATHSIG).
  static StatusOr<std::unique_ptr<LocalRanks>> Spawn(const std::vector<std::string>& argv,
                                                     int world, const std::string& host, int port,
                                                     const std::string& group_token);
  // Waits up to `grace` for every child to exit, then kills the rest (SIGKILL) and reaps them.
  ~LocalRanks();
  // Waits for the children; returns the first failure ("rank R exited with code C").
  Status Wait(std::chrono::milliseconds grace);
  // Without waiting: the first child that has exited since (reaped), as the error Wait would
  // give for it ("rank R exited with code C" / "was killed by signal S"); Ok when none has.
  // Not concurrently with Wait.
  Status ReapExited();
  const std::vector<pid_t>& pids() const { return pids_; }

 private:
  LocalRanks() = default;
  std::vector<pid_t> pids_;
  std::vector<int> ranks_;
};

}  // namespace helix::parallel
