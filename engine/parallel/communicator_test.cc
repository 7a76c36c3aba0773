// Gloo communicator and TCP rendezvous store across real processes (fork): every collective's
// result, a dead peer and a peer that never joins turn into errors within the timeout.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <functional>
#include <numeric>
#include <thread>
#include <vector>

#include "engine/parallel/communicator.h"
#include "engine/parallel/store_process.h"
#include "engine/parallel/tcp_store.h"
#include "engine/spawn_test_util.h"

namespace helix::parallel {
namespace {

using std::chrono::milliseconds;

// Runs body(rank) in `n` child processes; returns each child's exit code (0 = passed; 137 for
// one still running after `grace`, then killed). The children are forked from this process, so
// it must have no other thread (see testing::ThreadsOnceSettled): the store the ranks meet at
// is a StoreProcess, never a TcpStoreServer's threads in here.
std::vector<int> RunRanks(int n, const std::function<int(int)>& body,
                          milliseconds grace = milliseconds(20000)) {
  const int threads = testing::ThreadsOnceSettled();
  if (threads != 1) {
    ADD_FAILURE() << "the ranks would be forked from a process with " << threads << " threads";
    return std::vector<int>(n, -1);
  }
  std::vector<pid_t> pids;
  for (int r = 0; r < n; ++r) {
    const pid_t pid = fork();
    if (pid == 0) _exit(body(r));
    pids.push_back(pid);
  }
  return testing::Reap(pids, grace);
}

#define CHILD_CHECK(cond, code)                          \
  do {                                                   \
    if (!(cond)) {                                       \
      fprintf(stderr, "rank check failed: %s\n", #cond); \
      return code;                                       \
    }                                                    \
  } while (0)

TEST(TcpStoreTest, SetGetAndMissingKeyTimesOut) {
  auto server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  auto a = TcpStore::Connect("127.0.0.1", (*server)->port(), milliseconds(2000));
  auto b = TcpStore::Connect("127.0.0.1", (*server)->port(), milliseconds(2000));
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE((*a)->Set("k", std::string("v\0w", 3)).ok());
  auto v = (*b)->Get("k");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, std::string("v\0w", 3));
  const auto t0 = std::chrono::steady_clock::now();
  auto missing = (*b)->Get("nope", milliseconds(200));
  EXPECT_EQ(missing.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(missing.status().message().find("nope"), std::string::npos);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(2000));
}

TEST(TcpStoreTest, ConnectToNobodyFailsWithinTheTimeout) {
  int port = 0;
  {
    auto s = TcpStoreServer::Start("127.0.0.1", 0);  // a port that is then closed again
    ASSERT_TRUE(s.ok());
    port = (*s)->port();
  }
  auto c = TcpStore::Connect("127.0.0.1", port, milliseconds(300));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kDeadlineExceeded);
}

// A listener that answers every connection with `reply(bytes received)`, then closes it.
class FakeListener {
 public:
  explicit FakeListener(std::function<std::string(const std::string&)> reply)
      : reply_(std::move(reply)) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(listen(fd_, 16), 0);
    socklen_t len = sizeof(a);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] {
      for (;;) {
        const int c = accept(fd_, nullptr, nullptr);
        if (c < 0) return;
        ++connections_;
        char buf[256];
        timeval tv{2, 0};  // a client that never sends does not hold the listener
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        const ssize_t n = recv(c, buf, sizeof(buf), 0);
        const std::string out = reply_(std::string(buf, n > 0 ? static_cast<size_t>(n) : 0));
        if (!out.empty()) send(c, out.data(), out.size(), MSG_NOSIGNAL);
        close(c);
      }
    });
  }
  ~FakeListener() {
    shutdown(fd_, SHUT_RDWR);
    close(fd_);
    thread_.join();
  }
  int port() const { return port_; }
  int connections() const { return connections_; }

 private:
  std::function<std::string(const std::string&)> reply_;
  int fd_ = -1;
  int port_ = 0;
  std::atomic<int> connections_{0};
  std::thread thread_;
};

// The store is found only by its own handshake: a client never takes another program on the
// port, or its own echo (what a TCP self-connection to a not-yet-bound port reads back), for
// the store, and keeps retrying them until its timeout with a reason. (Timeouts with room for
// several attempts, 50 ms apart, on a loaded machine.)
TEST(TcpStoreTest, WhatIsNotTheStoreIsRetriedNotUsed) {
  FakeListener echo([](const std::string& in) { return in; });
  auto c = TcpStore::Connect("127.0.0.1", echo.port(), milliseconds(1500));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(c.status().message().find("not a Helix rendezvous store"), std::string::npos)
      << c.status().ToString();
  EXPECT_GT(echo.connections(), 1);  // retried

  FakeListener http([](const std::string&) { return std::string("HTTP/1.1 400 Bad\r\n\r\n"); });
  auto h = TcpStore::Connect("127.0.0.1", http.port(), milliseconds(1000));
  ASSERT_FALSE(h.ok());
  EXPECT_NE(h.status().message().find("not a Helix rendezvous store"), std::string::npos);
}

// Each instance's store serves only its own ranks (the group token of the launching leader):
// a rank that reaches another instance's store on a reused port is refused and told so.
TEST(TcpStoreTest, AnotherGroupsStoreRefusesTheClient) {
  auto server = TcpStoreServer::Start("127.0.0.1", 0, "group-a");
  ASSERT_TRUE(server.ok());
  const int port = (*server)->port();
  auto mine = TcpStore::Connect("127.0.0.1", port, milliseconds(2000), "group-a");
  ASSERT_TRUE(mine.ok()) << mine.status().ToString();
  ASSERT_TRUE((*mine)->Set("k", "v").ok());
  for (const char* other : {"group-b", ""}) {
    // Long enough for a handshake on a loaded machine: a timeout that cuts the first one short
    // ends with that instead of the refusal.
    auto theirs = TcpStore::Connect("127.0.0.1", port, milliseconds(1000), other);
    ASSERT_FALSE(theirs.ok()) << other;
    EXPECT_EQ(theirs.status().code(), StatusCode::kDeadlineExceeded);
    EXPECT_NE(theirs.status().message().find("another Helix instance"), std::string::npos)
        << theirs.status().ToString();
  }
  auto v = (*mine)->Get("k");  // the refused clients left the store serving its own
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, "v");
  // The refused attempts' threads are reaped: only `mine` is left.
  const auto deadline = std::chrono::steady_clock::now() + milliseconds(3000);
  while ((*server)->connections() > 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(20));
  }
  EXPECT_EQ((*server)->connections(), 1u);
  EXPECT_FALSE(TcpStoreServer::Start("127.0.0.1", 0, std::string(300, 't')).ok());
}

TEST(GlooCommunicatorTest, CollectivesAcrossProcesses) {
  StoreProcess store;
  const int port = store.port();
  ASSERT_GT(port, 0) << "the store process did not start";
  for (int n : {1, 2, 3}) {
    SCOPED_TRACE(n);
    const std::vector<int> codes = RunRanks(n, [&](int r) {
      auto store = TcpStore::Connect("127.0.0.1", port, milliseconds(5000));
      CHILD_CHECK(store.ok(), 2);
      auto comm = CreateGlooCommunicator(store->get(), std::string("t").append(std::to_string(n)),
                                         r, n, {});
      CHILD_CHECK(comm.ok(), 3);
      Communicator& c = **comm;
      CHILD_CHECK(c.rank() == r && c.size() == n, 4);
      std::vector<float> x = {1.0f + r, 10.0f * r, -1.0f};
      CHILD_CHECK(c.AllReduceSum(x.data(), x.size()).ok(), 5);
      const float s = n * (n + 1) / 2.0f;
      CHILD_CHECK(x[0] == s && x[1] == 10.0f * (s - n) && x[2] == -n, 6);
      int32_t mine[2] = {r, 100 + r};
      std::vector<int32_t> all(2 * n);
      CHILD_CHECK(c.AllGather(mine, all.data(), sizeof(mine)).ok(), 7);
      for (int i = 0; i < n; ++i) CHILD_CHECK(all[2 * i] == i && all[2 * i + 1] == 100 + i, 8);
      std::vector<int32_t> send(n), recv(n);
      for (int j = 0; j < n; ++j) send[j] = 1000 * r + j;  // chunk j goes to rank j
      CHILD_CHECK(c.AllToAll(send.data(), recv.data(), sizeof(int32_t)).ok(), 9);
      for (int i = 0; i < n; ++i) CHILD_CHECK(recv[i] == 1000 * i + r, 10);
      // Both all-reduce paths: small buffers (n x size floats up to 64K) as one exchange summed
      // in rank order on every rank, larger ones by Gloo's ring. Either way every rank holds the
      // same bits; the small one the rank-order sum exactly, the large one up to rounding.
      float none = 0;
      CHILD_CHECK(c.AllReduceSum(&none, 0).ok(), 18);  // nothing to sum: no exchange, no error
      for (size_t len : {size_t{1000}, size_t{50000}}) {
        const auto value = [](int q, size_t i) { return 1.0f / static_cast<float>(3 + i + q); };
        std::vector<float> y(len);
        for (size_t i = 0; i < len; ++i) y[i] = value(r, i);
        CHILD_CHECK(c.AllReduceSum(y.data(), len).ok(), 14);
        std::vector<float> every(len * n);
        CHILD_CHECK(c.AllGather(y.data(), every.data(), len * sizeof(float)).ok(), 15);
        for (int q = 0; q < n; ++q) {
          CHILD_CHECK(std::memcmp(every.data() + q * len, y.data(), len * sizeof(float)) == 0, 16);
        }
        for (size_t i = 0; i < len; ++i) {
          float want = 0;
          for (int q = 0; q < n; ++q) want += value(q, i);
          CHILD_CHECK(len > 1000 ? std::fabs(y[i] - want) <= 1e-5f * want : y[i] == want, 17);
        }
      }
      char msg[6] = {};
      if (r == n - 1) std::memcpy(msg, "hello", 6);
      CHILD_CHECK(c.Broadcast(msg, sizeof(msg), n - 1).ok(), 11);
      CHILD_CHECK(std::string(msg) == "hello", 12);
      CHILD_CHECK(c.Barrier().ok(), 13);
      return 0;
    });
    for (int code : codes) EXPECT_EQ(code, 0);
    if (HasFailure()) break;  // a hung round is not waited for again
  }
}

TEST(GlooCommunicatorTest, DeadPeerIsAnErrorNotAHang) {
  StoreProcess store;
  const int port = store.port();
  ASSERT_GT(port, 0) << "the store process did not start";
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int> codes = RunRanks(2, [&](int r) {
    auto store = TcpStore::Connect("127.0.0.1", port, milliseconds(5000));
    CHILD_CHECK(store.ok(), 2);
    GlooOptions o;
    o.timeout = milliseconds(3000);
    auto comm = CreateGlooCommunicator(store->get(), "dead", r, 2, o);
    CHILD_CHECK(comm.ok(), 3);
    float x = 1;
    CHILD_CHECK((*comm)->AllReduceSum(&x, 1).ok(), 4);
    if (r == 1) _exit(0);  // dies without a word
    Status s = (*comm)->AllReduceSum(&x, 1);
    CHILD_CHECK(!s.ok(), 5);
    CHILD_CHECK(s.message().find("all-reduce") != std::string::npos, 6);
    CHILD_CHECK(!(*comm)->Barrier().ok(), 7);  // stays broken
    return 0;
  });
  EXPECT_EQ(codes[0], 0);
  EXPECT_EQ(codes[1], 0);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(10000));
}

// Gloo's TCP transport writes with writev(), which raises SIGPIPE when the peer has reset the
// connection (a rank killed mid-step). Once a communicator exists, such a write must fail with
// EPIPE (which Gloo turns into an error) instead of killing the process. Checked on a socket
// pair in a child, since whether Gloo itself hits that write first is a race.
TEST(GlooCommunicatorTest, AWriteToAClosedSocketIsAnErrorNotSigpipe) {
  StoreProcess store;
  const int port = store.port();
  ASSERT_GT(port, 0) << "the store process did not start";
  const std::vector<int> codes = RunRanks(1, [&](int r) {
    signal(SIGPIPE, SIG_DFL);
    auto store = TcpStore::Connect("127.0.0.1", port, milliseconds(5000));
    CHILD_CHECK(store.ok(), 2);
    auto comm = CreateGlooCommunicator(store->get(), "pipe", r, 1, GlooOptions{});
    CHILD_CHECK(comm.ok(), 3);
    int sv[2];
    CHILD_CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, 4);
    close(sv[1]);
    char byte = 0;
    iovec iov{&byte, 1};
    CHILD_CHECK(writev(sv[0], &iov, 1) == -1 && errno == EPIPE, 5);
    return 0;
  });
  EXPECT_EQ(codes[0], 0) << "128 + 13 means the process died of SIGPIPE";
}

TEST(GlooCommunicatorTest, PeerThatNeverJoinsFailsStartUp) {
  auto server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok());
  auto store = TcpStore::Connect("127.0.0.1", (*server)->port(), milliseconds(500));
  ASSERT_TRUE(store.ok());
  GlooOptions o;
  o.timeout = milliseconds(500);
  const auto t0 = std::chrono::steady_clock::now();
  auto comm = CreateGlooCommunicator(store->get(), "lonely", 0, 2, o);
  ASSERT_FALSE(comm.ok());
  EXPECT_NE(comm.status().message().find("lonely"), std::string::npos) << comm.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(5000));
}

}  // namespace
}  // namespace helix::parallel
