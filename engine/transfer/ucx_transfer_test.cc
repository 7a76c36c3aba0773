#include "engine/transfer/ucx_transfer.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "engine/common/hex.h"
#include "engine/spawn_test_util.h"

namespace helix::transfer {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// One length-prefixed string from `fd`; "" when the writer closed or failed, or nothing came
// within `patience` (a child that hangs before writing must not hang the test).
std::string ReadAll(int fd, milliseconds patience = milliseconds(30000)) {
  const auto deadline = Clock::now() + patience;
  auto read_fully = [&](char* p, size_t n) {
    for (size_t got = 0; got < n;) {
      const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
      pollfd pf{fd, POLLIN, 0};
      const int ready = left > 0 ? poll(&pf, 1, static_cast<int>(left)) : 0;
      if (ready < 0 && errno == EINTR) continue;
      if (ready <= 0) return false;
      const ssize_t r = read(fd, p + got, n - got);
      if (r <= 0) return false;
      got += r;
    }
    return true;
  };
  uint64_t n = 0;
  if (!read_fully(reinterpret_cast<char*>(&n), sizeof(n)) || n > (1u << 20)) return {};
  std::string s(n, '\0');
  return read_fully(s.data(), n) ? s : std::string();
}

class UcxTransferTest : public ::testing::Test {
 protected:
  // TCP on loopback: a stopped peer must stall (shared-memory transports read it anyway).
  void SetUp() override {
    setenv("UCX_NET_DEVICES", "lo", 0);
    setenv("UCX_TLS", "tcp,self", 0);
  }
  // An exporter of `src` (listening on loopback) and a puller, both in this process.
  void Connect(std::vector<uint8_t>& src) {
    auto e = UcxTransfer::Create("ctx", src.data(), src.size(), "127.0.0.1");
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    exporter_ = std::move(*e);
    ASSERT_GT(exporter_->listener_port(), 0);
    auto p = UcxTransfer::Create("gen");
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    puller_ = std::move(*p);
  }
  // A job on the exporter (through its listener) with no segments yet.
  PullJob Job(milliseconds timeout) const {
    PullJob job;
    job.peer_key = "ctx";
    job.worker_address = exporter_->address();
    job.listener_address = "127.0.0.1:" + std::to_string(exporter_->listener_port());
    job.rkey = exporter_->rkey();
    job.deadline = Clock::now() + timeout;
    return job;
  }
  std::unique_ptr<UcxTransfer> exporter_, puller_;
};

TEST_F(UcxTransferTest, PullsSegmentsAcrossTwoWorkers) {
  std::vector<uint8_t> src(1 << 20);
  std::iota(src.begin(), src.end(), 0);
  ASSERT_NO_FATAL_FAILURE(Connect(src));
  std::vector<uint8_t> dst(src.size() / 2, 0xee);
  PullJob job = Job(milliseconds(10000));
  // Every other 4 KiB piece of src, packed.
  for (size_t i = 0; i < dst.size() / 4096; ++i) {
    job.segments.push_back(
        {reinterpret_cast<uint64_t>(src.data() + 2 * i * 4096), dst.data() + i * 4096, 4096});
  }
  const uint64_t id = puller_->StartPull(job);
  ASSERT_EQ(puller_->Wait(id, milliseconds(10000)), JobState::kDone);
  for (size_t i = 0; i < dst.size(); ++i) {
    const size_t piece = i / 4096, off = i % 4096;
    ASSERT_EQ(dst[i], src[2 * piece * 4096 + off]) << i;
  }
  EXPECT_EQ(puller_->stats().bytes_pulled, dst.size());
  // The endpoint is cached: a second job on the same peer works too.
  std::fill(dst.begin(), dst.end(), 0);
  const uint64_t id2 = puller_->StartPull(job);
  ASSERT_EQ(puller_->Wait(id2, milliseconds(10000)), JobState::kDone);
  EXPECT_EQ(dst[4096], src[2 * 4096]);
  // A job without the listener connects to the worker address (another peer key: another
  // endpoint).
  std::fill(dst.begin(), dst.end(), 0);
  job.peer_key = "ctx by worker address";
  job.listener_address.clear();
  const uint64_t id3 = puller_->StartPull(job);
  ASSERT_EQ(puller_->Wait(id3, milliseconds(10000)), JobState::kDone);
  EXPECT_EQ(dst[4096], src[2 * 4096]);
  EXPECT_EQ(exporter_->stats().peers_accepted, 1u);  // the listener's one connection
  puller_->Forget(id);
  puller_->Forget(id2);
  puller_->Forget(id3);
}

TEST_F(UcxTransferTest, BadListenerAddressesAreErrors) {
  std::vector<uint8_t> src(1 << 16);
  ASSERT_NO_FATAL_FAILURE(Connect(src));
  std::vector<uint8_t> dst(4096);
  for (const char* bad : {"127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "[::1", "::1:80",
                          "no-such-host.invalid:80", ":80"}) {
    PullJob job = Job(milliseconds(5000));
    job.peer_key = bad;
    job.listener_address = bad;
    job.segments.push_back({reinterpret_cast<uint64_t>(src.data()), dst.data(), 4096});
    const uint64_t id = puller_->StartPull(job);
    std::string error;
    EXPECT_EQ(puller_->Wait(id, milliseconds(5000)), JobState::kFailed) << bad;
    puller_->State(id, &error);
    EXPECT_NE(error.find("listener"), std::string::npos) << bad << ": " << error;
  }
  auto taken = UcxTransfer::Create("second", src.data(), src.size(), "127.0.0.1",
                                   exporter_->listener_port());
  ASSERT_FALSE(taken.ok()) << "two listeners on one port";
  EXPECT_NE(taken.status().message().find("cannot listen"), std::string::npos)
      << taken.status().ToString();
  auto bad_port = UcxTransfer::Create("third", src.data(), src.size(), "127.0.0.1", 70000);
  ASSERT_FALSE(bad_port.ok());
  EXPECT_NE(bad_port.status().message().find("70000"), std::string::npos)
      << bad_port.status().ToString();
  // What handles name: a numeric address of the listener's family.
  const std::string port = std::to_string(exporter_->listener_port());
  auto named = exporter_->ListenerAddressFor("localhost");
  ASSERT_TRUE(named.ok()) << named.status().ToString();
  EXPECT_EQ(*named, "127.0.0.1:" + port);
  auto v6 = exporter_->ListenerAddressFor("::1");
  ASSERT_FALSE(v6.ok()) << *v6;
  EXPECT_NE(v6.status().message().find("no IPv4 address"), std::string::npos)
      << v6.status().ToString();
}

// Groups of segments are reported once each, and only after their bytes have landed: the
// caller may copy a reported group out while the rest of the job is in flight.
TEST_F(UcxTransferTest, ReportsEachGroupOnceItsBytesHaveLanded) {
  std::vector<uint8_t> src(4 << 20);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 131 + (i >> 12));
  ASSERT_NO_FATAL_FAILURE(Connect(src));
  constexpr size_t kPiece = 4096, kPerGroup = 3;
  const size_t pieces = src.size() / kPiece;  // 1024: 341 groups of 3 and one of 1
  std::vector<uint8_t> dst(src.size(), 0);
  PullJob job = Job(milliseconds(20000));
  job.segments_per_group = kPerGroup;
  for (size_t i = 0; i < pieces; ++i) {  // reversed pieces, so a group is not a prefix
    job.segments.push_back({reinterpret_cast<uint64_t>(src.data() + (pieces - 1 - i) * kPiece),
                            dst.data() + i * kPiece, kPiece});
  }
  const size_t groups = (pieces + kPerGroup - 1) / kPerGroup;
  std::vector<int> seen(groups, 0);
  auto check = [&](const std::vector<uint32_t>& done) {
    for (uint32_t g : done) {
      ASSERT_LT(g, groups);
      ++seen[g];
      for (size_t i = g * kPerGroup; i < std::min(pieces, g * kPerGroup + kPerGroup); ++i) {
        ASSERT_EQ(
            std::memcmp(dst.data() + i * kPiece, src.data() + (pieces - 1 - i) * kPiece, kPiece), 0)
            << "group " << g << " reported before piece " << i << " landed";
      }
    }
  };
  const uint64_t id = puller_->StartPull(job);
  size_t polls_in_flight = 0;
  while (puller_->State(id) == JobState::kInProgress) {
    check(puller_->TakeDoneGroups(id));
    ++polls_in_flight;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  ASSERT_EQ(puller_->State(id), JobState::kDone);
  check(puller_->TakeDoneGroups(id));
  for (size_t g = 0; g < groups; ++g) EXPECT_EQ(seen[g], 1) << "group " << g;
  EXPECT_TRUE(puller_->TakeDoneGroups(id).empty());
  EXPECT_GT(polls_in_flight, 0u);
  puller_->Forget(id);
}

// With a window, a group is fetched only after the group `window` places before it was handed
// back: the destination can be a ring of `window` slots, each group checked in its slot before
// the slot is released (late, so that a transfer running ahead would overwrite it first).
TEST_F(UcxTransferTest, WindowKeepsGroupsInARing) {
  std::vector<uint8_t> src(2 << 20);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 7 + (i >> 10));
  ASSERT_NO_FATAL_FAILURE(Connect(src));
  constexpr size_t kPiece = 4096, kPerGroup = 2, kWindow = 3;
  constexpr size_t kGroupBytes = kPiece * kPerGroup;
  const size_t groups = src.size() / kGroupBytes;  // 256
  std::vector<uint8_t> ring(kWindow * kGroupBytes, 0);
  PullJob job = Job(milliseconds(20000));
  job.segments_per_group = kPerGroup;
  job.window_groups = kWindow;
  for (size_t g = 0; g < groups; ++g) {
    for (size_t p = 0; p < kPerGroup; ++p) {
      job.segments.push_back({reinterpret_cast<uint64_t>(src.data() + g * kGroupBytes + p * kPiece),
                              ring.data() + (g % kWindow) * kGroupBytes + p * kPiece, kPiece});
    }
  }
  const uint64_t id = puller_->StartPull(job);
  std::vector<int> seen(groups, 0);
  size_t held_max = 0;
  std::vector<uint32_t> held;  // reported, not yet released
  while (true) {
    const JobState st = puller_->State(id);
    for (uint32_t g : puller_->TakeDoneGroups(id)) {
      ASSERT_LT(g, groups);
      ++seen[g];
      ASSERT_EQ(std::memcmp(ring.data() + (g % kWindow) * kGroupBytes, src.data() + g * kGroupBytes,
                            kGroupBytes),
                0)
          << "group " << g << "'s slot was overwritten before it was released";
      held.push_back(g);
    }
    held_max = std::max(held_max, held.size());
    if (st != JobState::kInProgress) break;
    std::this_thread::sleep_for(std::chrono::microseconds(500));
    puller_->ReleaseGroups(id, held);
    held.clear();
  }
  ASSERT_EQ(puller_->State(id), JobState::kDone);
  for (size_t g = 0; g < groups; ++g) EXPECT_EQ(seen[g], 1) << "group " << g;
  EXPECT_LE(held_max, kWindow);
  puller_->Forget(id);
}

// The exporter runs in a child that publishes its address, rkey and listener port through a
// pipe (jobs connect to the listener), then is stopped (SIGSTOP: the job must time out) or
// killed (the job must fail). UCX's global state (its async thread) does not survive fork(), so
// the child re-executes this binary, which becomes the exporter in a static initialiser before
// gtest runs.
struct Child {
  pid_t pid = -1;
  std::string address, rkey;
  uint64_t base = 0;
  int port = 0;  // its UCX listener's
  ~Child() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
};

// A job that passes its deadline while its peer is busy serving another job fails alone: the
// peer is not closed under the other job (only a peer that has gone silent is).
TEST_F(UcxTransferTest, LateJobFromABusyPeerFailsAlone) {
  std::vector<uint8_t> src(8 << 20, 9);
  Connect(src);
  std::vector<uint8_t> late_dst(src.size()), other_dst(src.size());
  auto fill = [&](PullJob* job, std::vector<uint8_t>* dst, size_t n) {
    const size_t seg = 65536, per = src.size() / seg;
    for (size_t i = 0; i < n; ++i) {
      job->segments.push_back({reinterpret_cast<uint64_t>(src.data()) + (i % per) * seg,
                               dst->data() + (i % per) * seg, seg});
    }
  };
  PullJob warm = Job(milliseconds(10000));
  fill(&warm, &other_dst, 4);
  ASSERT_EQ(puller_->Wait(puller_->StartPull(std::move(warm)), milliseconds(10000)),
            JobState::kDone);
  std::fill(other_dst.begin(), other_dst.end(), 0);
  PullJob late = Job(milliseconds(300));
  fill(&late, &late_dst, 32768);  // 2 GiB: far from done after 300 ms
  PullJob other = Job(milliseconds(60000));
  fill(&other, &other_dst, 16384);  // 1 GiB, still in flight when the first one is late
  const uint64_t late_id = puller_->StartPull(std::move(late));
  const uint64_t other_id = puller_->StartPull(std::move(other));
  EXPECT_EQ(puller_->Wait(late_id, milliseconds(10000)), JobState::kFailed);
  std::string error;
  puller_->State(late_id, &error);
  EXPECT_NE(error.find("timed out"), std::string::npos) << error;
  const JobState s = puller_->Wait(other_id, milliseconds(60000));
  puller_->State(other_id, &error);
  EXPECT_EQ(s, JobState::kDone) << JobStateName(s) << ": " << error;
  EXPECT_EQ(std::count(other_dst.begin(), other_dst.end(), 9),
            static_cast<std::ptrdiff_t>(other_dst.size()));
}

// SIGSTOPs `pid` and waits until it is stopped (kill returns before the signal takes effect, and
// a get posted meanwhile could still be served).
void Stop(pid_t pid) {
  kill(pid, SIGSTOP);
  const auto until = Clock::now() + milliseconds(5000);
  while (Clock::now() < until) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const size_t close = stat.rfind(')');  // the state follows the command name
    if (close != std::string::npos && close + 2 < stat.size() &&
        (stat[close + 2] == 'T' || stat[close + 2] == 't')) {
      return;
    }
    std::this_thread::sleep_for(milliseconds(1));
  }
  ADD_FAILURE() << "process " << pid << " did not stop";
}

constexpr const char* kExporterEnv = "HELIX_UCX_TEST_EXPORTER_FD";

[[maybe_unused]] const bool kIsExporter = [] {
  const char* fd_env = std::getenv(kExporterEnv);
  if (fd_env == nullptr) return false;
  const int fd = std::atoi(fd_env);
  std::vector<uint8_t> mem(size_t{8} << 20, 7);
  auto t = UcxTransfer::Create("child", mem.data(), mem.size(), "127.0.0.1");
  if (!t.ok()) _exit(2);
  auto put = [&](const std::string& s) {
    const uint64_t n = s.size();
    if (write(fd, &n, sizeof(n)) != sizeof(n) || write(fd, s.data(), n) != (ssize_t)n) _exit(3);
  };
  put((*t)->address());
  put((*t)->rkey());
  put(std::to_string(reinterpret_cast<uint64_t>(mem.data())));
  put(std::to_string((*t)->listener_port()));
  for (;;) pause();
}();

// A puller that dies during its first handshake: it connects to the exporter named by
// HELIX_UCX_TEST_PULLER ("listener-or-address-hex rkey-hex base microseconds"), posts one get
// and exits (no goodbye) after the given time.
constexpr const char* kPullerEnv = "HELIX_UCX_TEST_PULLER";

[[maybe_unused]] const bool kIsPuller = [] {
  const char* spec = std::getenv(kPullerEnv);
  if (spec == nullptr) return false;
  std::istringstream in(spec);
  std::string target, rkey;
  uint64_t base = 0;
  int us = 0;
  if (!(in >> target >> rkey >> base >> us)) _exit(2);
  auto t = UcxTransfer::Create("dying puller");
  if (!t.ok()) _exit(2);
  static std::vector<uint8_t> dst(4096);
  PullJob job;
  job.peer_key = "exporter";
  if (target.find(':') != std::string::npos) {
    job.listener_address = target;
  } else {
    job.worker_address = HexDecode(target);
  }
  job.rkey = HexDecode(rkey);
  job.segments.push_back({base, dst.data(), dst.size()});
  job.deadline = Clock::now() + milliseconds(10000);
  (*t)->StartPull(job);
  std::this_thread::sleep_for(std::chrono::microseconds(us));
  _exit(0);
}();

void StartExporter(Child* c) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  // Spawned, not forked: by now this process runs UCX's threads and the puller's, and a forked
  // child allocates (setenv) before its exec. The exporter starts in this binary's static
  // initialisation (kIsExporter) and never reaches the gtest filter.
  const pid_t pid = testing::SpawnSelf("UcxTransferTest.Exporter",
                                       {std::string(kExporterEnv) + "=" + std::to_string(fds[1])});
  close(fds[1]);
  if (pid < 0) close(fds[0]);
  ASSERT_GT(pid, 0) << "cannot start the exporter";
  c->pid = pid;
  c->address = ReadAll(fds[0]);
  c->rkey = ReadAll(fds[0]);
  const std::string base = ReadAll(fds[0]);
  const std::string port = ReadAll(fds[0]);
  close(fds[0]);
  ASSERT_FALSE(port.empty()) << "the exporter did not start";
  c->base = std::stoull(base);
  c->port = std::stoi(port);
}

PullJob JobFrom(const Child& c, std::vector<uint8_t>* dst, milliseconds deadline,
                size_t seg = 65536, size_t max_segs = SIZE_MAX) {
  PullJob job;
  job.peer_key = "child" + std::to_string(c.pid);
  job.worker_address = c.address;
  job.listener_address = "127.0.0.1:" + std::to_string(c.port);
  job.rkey = c.rkey;
  for (size_t i = 0; i < dst->size() / seg && i < max_segs; ++i) {
    job.segments.push_back({c.base + i * seg, dst->data() + i * seg, seg});
  }
  job.deadline = Clock::now() + deadline;
  return job;
}

TEST_F(UcxTransferTest, StalledPeerTimesOutAndKilledPeerFails) {
  auto created = UcxTransfer::Create("gen");
  ASSERT_TRUE(created.ok());
  puller_ = std::move(*created);
  std::vector<uint8_t> dst(8 << 20);
  {
    Child c;
    StartExporter(&c);
    ASSERT_FALSE(c.address.empty());
    const uint64_t ok = puller_->StartPull(JobFrom(c, &dst, milliseconds(10000)));
    ASSERT_EQ(puller_->Wait(ok, milliseconds(10000)), JobState::kDone);
    EXPECT_EQ(dst[12345], 7);
    Stop(c.pid);
    const auto t0 = Clock::now();
    const uint64_t id = puller_->StartPull(JobFrom(c, &dst, milliseconds(1000)));
    std::string error;
    ASSERT_EQ(puller_->Wait(id, milliseconds(15000)), JobState::kFailed);
    puller_->State(id, &error);
    EXPECT_NE(error.find("timed out"), std::string::npos) << error;
    EXPECT_LT(Clock::now() - t0, milliseconds(8000));
  }
  {
    // Stopped before the first connection: the job times out while the endpoint is still
    // connecting, and once the exporter runs again a new job connects and completes.
    Child c;
    StartExporter(&c);
    Stop(c.pid);
    const auto t0 = Clock::now();
    const uint64_t id = puller_->StartPull(JobFrom(c, &dst, milliseconds(500)));
    std::string error;
    ASSERT_EQ(puller_->Wait(id, milliseconds(15000)), JobState::kFailed);
    puller_->State(id, &error);
    EXPECT_NE(error.find("timed out"), std::string::npos) << error;
    EXPECT_LT(Clock::now() - t0, milliseconds(8000));
    kill(c.pid, SIGCONT);
    std::fill(dst.begin(), dst.end(), 0);
    const uint64_t ok = puller_->StartPull(JobFrom(c, &dst, milliseconds(10000)));
    ASSERT_EQ(puller_->Wait(ok, milliseconds(15000)), JobState::kDone);
    EXPECT_EQ(dst[12345], 7);
  }
  {
    Child c;
    StartExporter(&c);
    kill(c.pid, SIGKILL);
    waitpid(c.pid, nullptr, 0);
    c.pid = -1;
    const auto t0 = Clock::now();
    const uint64_t id = puller_->StartPull(JobFrom(c, &dst, milliseconds(5000)));
    EXPECT_EQ(puller_->Wait(id, milliseconds(15000)), JobState::kFailed);
    EXPECT_LT(Clock::now() - t0, milliseconds(8000));
  }
}

// Killed while its gets are in flight: the job fails (never "done" with data that did not come).
TEST_F(UcxTransferTest, PeerKilledMidTransferFailsTheJob) {
  auto created = UcxTransfer::Create("gen");
  ASSERT_TRUE(created.ok());
  puller_ = std::move(*created);
  std::vector<uint8_t> dst(8 << 20, 0);
  for (int round = 0; round < 3; ++round) {
    Child c;
    StartExporter(&c);
    const uint64_t first = puller_->StartPull(JobFrom(c, &dst, milliseconds(10000)));
    ASSERT_EQ(puller_->Wait(first, milliseconds(10000)), JobState::kDone);
    Stop(c.pid);
    std::fill(dst.begin(), dst.end(), 0);
    // Few small gets (as a short prompt's blocks) and many large ones.
    const uint64_t id =
        puller_->StartPull(round == 0 ? JobFrom(c, &dst, milliseconds(5000), 5120, 8)
                                      : JobFrom(c, &dst, milliseconds(5000)));
    std::this_thread::sleep_for(milliseconds(200));
    kill(c.pid, SIGKILL);
    waitpid(c.pid, nullptr, 0);
    c.pid = -1;
    const JobState s = puller_->Wait(id, milliseconds(10000));
    EXPECT_EQ(s, JobState::kFailed)
        << JobStateName(s) << " with " << std::count(dst.begin(), dst.end(), 7) << " bytes of data";
  }
}

// Pullers that die during their first handshake leave the exporter serving (with UCX 1.13.1, a
// worker-address endpoint's death can abort the exporter: docs/architecture.md, Known problems),
// and the exporter closes each dead puller's endpoint.
TEST_F(UcxTransferTest, PullersDyingInTheirHandshakeLeaveTheExporterServing) {
  std::vector<uint8_t> src(1 << 20, 5);
  ASSERT_NO_FATAL_FAILURE(Connect(src));
  const std::string target = "127.0.0.1:" + std::to_string(exporter_->listener_port());
  std::mt19937 rng(7);
  constexpr int kPullers = 40;
  for (int i = 0; i < kPullers; ++i) {
    const int us = std::uniform_int_distribution<int>(0, 3000)(rng);
    const pid_t pid = testing::SpawnSelf(
        "UcxTransferTest.Puller",
        {std::string(kPullerEnv) + "=" + target + " " + HexEncode(exporter_->rkey()) + " " +
         std::to_string(reinterpret_cast<uint64_t>(src.data())) + " " + std::to_string(us)});
    ASSERT_GT(pid, 0);
    const std::vector<int> codes = testing::Reap({pid}, milliseconds(20000));
    ASSERT_EQ(codes[0], 0) << "puller " << i;
  }
  // Every connection the exporter accepted is closed once its puller is gone.
  const auto until = Clock::now() + milliseconds(20000);
  TransferStats st = exporter_->stats();
  while (st.peers_closed < st.peers_accepted && Clock::now() < until) {
    std::this_thread::sleep_for(milliseconds(10));
    st = exporter_->stats();
  }
  EXPECT_GT(st.peers_accepted, 0u);
  EXPECT_EQ(st.peers_closed, st.peers_accepted);
  // And it still serves.
  std::vector<uint8_t> dst(src.size(), 0);
  PullJob job = Job(milliseconds(10000));
  job.segments.push_back({reinterpret_cast<uint64_t>(src.data()), dst.data(), dst.size()});
  ASSERT_EQ(puller_->Wait(puller_->StartPull(job), milliseconds(10000)), JobState::kDone);
  EXPECT_EQ(dst, src);
}

TEST_F(UcxTransferTest, CancelEndsTheJob) {
  auto created = UcxTransfer::Create("gen");
  ASSERT_TRUE(created.ok());
  puller_ = std::move(*created);
  std::vector<uint8_t> dst(8 << 20);
  Child c;
  StartExporter(&c);
  const uint64_t first = puller_->StartPull(JobFrom(c, &dst, milliseconds(10000)));
  ASSERT_EQ(puller_->Wait(first, milliseconds(10000)), JobState::kDone);
  // Stalled: the gets in flight can only end by the deadline closing the endpoint, and the
  // cancelled job must not report an end before that.
  Stop(c.pid);
  const auto t0 = Clock::now();
  const uint64_t posted = puller_->stats().gets_posted;
  const uint64_t id = puller_->StartPull(JobFrom(c, &dst, milliseconds(1500)));
  // Cancelled once its gets are in flight (a cancel that came with the start would end it
  // before any get, at once).
  while (puller_->stats().gets_posted == posted && Clock::now() - t0 < milliseconds(1000)) {
    std::this_thread::sleep_for(milliseconds(1));
  }
  ASSERT_GT(puller_->stats().gets_posted, posted) << "no get was posted";
  puller_->Cancel(id);
  const JobState s = puller_->Wait(id, milliseconds(10000));
  EXPECT_TRUE(s == JobState::kCancelled) << JobStateName(s);
  EXPECT_GT(Clock::now() - t0, milliseconds(1000));
}

}  // namespace
}  // namespace helix::transfer
