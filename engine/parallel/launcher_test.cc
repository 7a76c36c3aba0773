// Rank assignment from flags and launcher environments, leader-address parsing, test ports.
#include "engine/parallel/launcher.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

#include "engine/parallel/tcp_store.h"

namespace helix::parallel {
namespace {

class AssignRankTest : public ::testing::Test {
 protected:
  void SetUp() override { Clear(); }
  void TearDown() override { Clear(); }
  static void Clear() {
    for (const char* v :
         {"HELIX_RANK", "HELIX_WORLD_SIZE", "HELIX_LEADER_ADDR", "OMPI_COMM_WORLD_RANK",
          "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "HELIX_GROUP_TOKEN"}) {
      unsetenv(v);
    }
  }
};

TEST_F(AssignRankTest, NoRankMeansTheLocalLeaderSpawnsTheOthers) {
  auto a = AssignRank(4, std::nullopt, std::nullopt, "");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->rank, 0);
  EXPECT_TRUE(a->spawn_local);
  auto one = AssignRank(1, std::nullopt, std::nullopt, "");
  ASSERT_TRUE(one.ok());
  EXPECT_FALSE(one->spawn_local);
}

// A spawning leader makes a fresh group token for its instance (its ranks inherit it through
// HELIX_GROUP_TOKEN); every other rank takes the environment's, or none.
TEST_F(AssignRankTest, GroupTokenIsFreshPerLocalInstanceOrFromTheEnvironment) {
  auto a = AssignRank(2, std::nullopt, std::nullopt, "");
  auto b = AssignRank(2, std::nullopt, std::nullopt, "");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->group_token.size(), 32u);
  EXPECT_NE(a->group_token, b->group_token);
  auto worker = AssignRank(2, 1, 2, "h:1");
  ASSERT_TRUE(worker.ok());
  EXPECT_EQ(worker->group_token, "");
  setenv("HELIX_GROUP_TOKEN", "tok", 1);
  auto t = AssignRank(2, 1, std::nullopt, "h:1");  // a rank started by a launcher
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->group_token, "tok");
  setenv("HELIX_RANK", "0", 1);  // its leader
  auto l = AssignRank(2, std::nullopt, std::nullopt, "h:1");
  ASSERT_TRUE(l.ok());
  EXPECT_FALSE(l->spawn_local);
  EXPECT_EQ(l->group_token, "tok");
  unsetenv("HELIX_RANK");
  auto own = AssignRank(2, std::nullopt, std::nullopt, "");  // spawns: its own, not the export
  ASSERT_TRUE(own.ok());
  EXPECT_TRUE(own->spawn_local);
  EXPECT_EQ(own->group_token.size(), 32u);
}

TEST_F(AssignRankTest, FlagsThenOpenMpiThenSlurm) {
  auto f = AssignRank(4, 2, 4, "10.1.2.3:29500");
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->rank, 2);
  EXPECT_FALSE(f->spawn_local);
  EXPECT_EQ(f->leader_host, "10.1.2.3");
  EXPECT_EQ(f->leader_port, 29500);

  setenv("OMPI_COMM_WORLD_RANK", "3", 1);
  setenv("OMPI_COMM_WORLD_SIZE", "4", 1);
  setenv("SLURM_PROCID", "1", 1);
  setenv("SLURM_NTASKS", "4", 1);
  setenv("HELIX_LEADER_ADDR", "node0:7000", 1);
  auto m = AssignRank(4, std::nullopt, std::nullopt, "");
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->rank, 3);  // Open MPI before Slurm
  EXPECT_EQ(m->leader_host, "node0");
  unsetenv("OMPI_COMM_WORLD_RANK");
  auto s = AssignRank(4, std::nullopt, std::nullopt, "");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->rank, 1);
}

// One task of a launcher (sbatch's SLURM_NTASKS=1, mpirun -n 1) runs like a process started
// alone: one rank needs no leader address, and a larger instance spawns its own ranks.
TEST_F(AssignRankTest, ALaunchersSingleTaskIsALocalLeader) {
  for (auto [r, n] : {std::pair{"SLURM_PROCID", "SLURM_NTASKS"},
                      std::pair{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"}}) {
    SCOPED_TRACE(r);
    setenv(r, "0", 1);
    setenv(n, "1", 1);
    auto one = AssignRank(1, std::nullopt, std::nullopt, "");
    ASSERT_TRUE(one.ok()) << one.status().ToString();
    EXPECT_EQ(one->rank, 0);
    EXPECT_FALSE(one->spawn_local);
    auto two = AssignRank(2, std::nullopt, std::nullopt, "");
    ASSERT_TRUE(two.ok()) << two.status().ToString();
    EXPECT_EQ(two->rank, 0);
    EXPECT_TRUE(two->spawn_local);
    Clear();
  }
}

// Rank 0 of an instance of one rank needs no leader's address, however it learnt its rank:
// in a Slurm step (SLURM_PROCID set for every task, with any SLURM_NTASKS), with HELIX_RANK=0,
// or with --rank 0 (each refused with "rank 0 of 1 needs the leader's address").
TEST_F(AssignRankTest, RankZeroOfOneRankIsALeader) {
  auto flag = AssignRank(1, 0, std::nullopt, "");
  ASSERT_TRUE(flag.ok()) << flag.status().ToString();
  EXPECT_EQ(flag->rank, 0);
  EXPECT_FALSE(flag->spawn_local);
  for (const char* var : {"SLURM_PROCID", "HELIX_RANK"}) {
    SCOPED_TRACE(var);
    setenv(var, "0", 1);
    auto env = AssignRank(1, std::nullopt, std::nullopt, "");
    ASSERT_TRUE(env.ok()) << env.status().ToString();
    EXPECT_EQ(env->rank, 0);
    EXPECT_FALSE(env->spawn_local);
    Clear();
  }
}

TEST_F(AssignRankTest, InconsistentInputsAreRefusedWithReasons) {
  // A leader given a world size its layout does not have (its spawned ranks failed, and it
  // waited out the collective timeout for them).
  auto leader = AssignRank(2, std::nullopt, 3, "");
  EXPECT_NE(leader.status().message().find("differs"), std::string::npos)
      << leader.status().ToString();
  auto size = AssignRank(4, 1, 8, "h:1");
  EXPECT_NE(size.status().message().find("differs"), std::string::npos);
  auto range = AssignRank(4, 4, std::nullopt, "h:1");
  EXPECT_NE(range.status().message().find("outside"), std::string::npos);
  auto no_leader = AssignRank(4, 1, std::nullopt, "");
  EXPECT_NE(no_leader.status().message().find("leader"), std::string::npos);
  setenv("SLURM_PROCID", "0", 1);
  setenv("SLURM_NTASKS", "2", 1);
  auto slurm = AssignRank(4, std::nullopt, std::nullopt, "h:1");
  EXPECT_NE(slurm.status().message().find("Slurm"), std::string::npos);
}

// A launcher variable that is set but not a whole number is refused, naming it and its value:
// taken as unset, HELIX_RANK=1x made the process a leader that spawned an instance of its own.
// Every one is checked, not only those of the launcher that is used.
TEST_F(AssignRankTest, MalformedLauncherVariablesAreRefused) {
  setenv("HELIX_RANK", "1x", 1);
  setenv("HELIX_WORLD_SIZE", "2", 1);
  setenv("HELIX_LEADER_ADDR", "h:1", 1);
  auto a = AssignRank(2, std::nullopt, std::nullopt, "");
  ASSERT_FALSE(a.ok()) << "rank " << a->rank << ", spawn_local " << a->spawn_local;
  EXPECT_EQ(a.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(a.status().message().find("HELIX_RANK='1x'"), std::string::npos)
      << a.status().ToString();
  Clear();

  const char* kVars[] = {"HELIX_RANK",           "HELIX_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                         "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID",     "SLURM_NTASKS"};
  for (const char* bad_var : kVars) {
    for (const char* bad : {"1x", " 1", "1 ", "+", "0x1", "99999999999"}) {
      SCOPED_TRACE(std::string(bad_var) + "=" + bad);
      for (const char* v : kVars) {  // a consistent rank 1 of 2 from every launcher
        const bool is_rank = std::strstr(v, "RANK") != nullptr || std::strstr(v, "PROCID");
        setenv(v, is_rank ? "1" : "2", 1);
      }
      setenv("HELIX_LEADER_ADDR", "h:1", 1);
      setenv(bad_var, bad, 1);
      auto r = AssignRank(2, std::nullopt, std::nullopt, "");
      ASSERT_FALSE(r.ok()) << "rank " << r->rank << ", spawn_local " << r->spawn_local;
      EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
      EXPECT_NE(r.status().message().find(std::string(bad_var) + "='" + bad + "'"),
                std::string::npos)
          << r.status().ToString();
      Clear();
    }
  }

  // Empty is unset (as before); flags win over the environment, which is then not read.
  setenv("HELIX_RANK", "", 1);
  auto empty = AssignRank(2, std::nullopt, std::nullopt, "");
  ASSERT_TRUE(empty.ok()) << empty.status().ToString();
  EXPECT_TRUE(empty->spawn_local);
  setenv("HELIX_RANK", "1x", 1);
  auto flags = AssignRank(2, 1, 2, "h:1");
  ASSERT_TRUE(flags.ok()) << flags.status().ToString();
  EXPECT_EQ(flags->rank, 1);
}

TEST(ParseHostPortTest, GoodAndBad) {
  auto ok = ParseHostPort("127.0.0.1:80");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->first, "127.0.0.1");
  EXPECT_EQ(ok->second, 80);
  for (const char* bad : {"nohost", ":80", "h:", "h:0", "h:70000", "h:8x"}) {
    EXPECT_FALSE(ParseHostPort(bad).ok()) << bad;
  }
}

// Test servers' ports: free (a listener binds it), below the ephemeral range where the kernel
// leaves room, and not the same one each call; a bad host is refused.
TEST(PickFreePortTest, FreeAndOutsideTheEphemeralRange) {
  int lo = 32768;
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    ASSERT_EQ(std::fscanf(f, "%d", &lo), 1);
    std::fclose(f);
  }
  std::set<int> seen;
  for (int i = 0; i < 8; ++i) {
    auto port = PickFreePort("127.0.0.1");
    ASSERT_TRUE(port.ok()) << port.status().ToString();
    if (std::min(lo, 20000) - 10000 >= 1000) {
      EXPECT_GE(*port, 10000);
      EXPECT_LT(*port, std::min(lo, 20000));
    }
    auto server = TcpStoreServer::Start("127.0.0.1", *port);
    EXPECT_TRUE(server.ok()) << *port << ": " << server.status().ToString();
    seen.insert(*port);
  }
  EXPECT_GT(seen.size(), 1u);
  EXPECT_FALSE(PickFreePort("not-an-address").ok());
}

}  // namespace
}  // namespace helix::parallel
