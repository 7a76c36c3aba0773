// The rendezvous store client against leaders that do not answer: a connect whose SYNs are
// dropped, a listener that never answers the handshake, a store that goes silent after it.
// Every operation ends within its timeout with an error naming the address and the timeout.
#include "engine/parallel/tcp_store.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gloo/common/error.h>

namespace helix::parallel {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// Runs `f` on a thread of its own and waits up to `limit` for its result. A call that hangs
// fails the test instead of stalling it: its thread is left behind, owning what it uses.
template <typename T>
std::optional<T> ReturnsWithin(milliseconds limit, std::function<T()> f) {
  auto done = std::make_shared<std::promise<T>>();
  std::future<T> result = done->get_future();
  std::thread([done, f = std::move(f)] { done->set_value(f()); }).detach();
  if (result.wait_for(limit) != std::future_status::ready) return std::nullopt;
  return result.get();
}

// A loopback listening socket; `accept_queue` as listen()'s backlog.
int Listen(int accept_queue, int* port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  EXPECT_EQ(listen(fd, accept_queue), 0);
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  *port = ntohs(a.sin_port);
  return fd;
}

// A listener that never accepts, its accept queue filled by connections of its own: the kernel
// drops every further SYN, as a firewall in front of a leader does.
class DropsSyns {
 public:
  DropsSyns() {
    fd_ = Listen(0, &port_);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port_));
    for (int i = 0; i < 16 && !full_; ++i) {
      const int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      fillers_.push_back(c);
      if (connect(c, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) continue;
      pollfd p{c, POLLOUT, 0};
      full_ = errno == EINPROGRESS && poll(&p, 1, 300) == 0;  // no SYN-ACK came back
    }
  }
  ~DropsSyns() {
    for (int c : fillers_) close(c);
    close(fd_);
  }
  int port() const { return port_; }
  bool full() const { return full_; }

 private:
  int fd_ = -1;
  int port_ = 0;
  bool full_ = false;
  std::vector<int> fillers_;
};

// Accepts connections and reads what they send; answers the store handshake with the store's
// welcome when `welcome`, and otherwise never says a word.
class SilentPeer {
 public:
  explicit SilentPeer(bool welcome) : welcome_(welcome) {
    fd_ = Listen(16, &port_);
    thread_ = std::thread([this] { Run(); });
  }
  ~SilentPeer() {
    stop_ = true;
    thread_.join();
    for (int c : conns_) close(c);  // a client still waiting reads EOF
    close(fd_);
  }
  int port() const { return port_; }
  int connections() const { return connections_; }

 private:
  void Run() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 20) <= 0) continue;
      const int c = accept(fd_, nullptr, nullptr);
      if (c < 0) continue;
      conns_.push_back(c);
      ++connections_;
      if (!welcome_) continue;
      timeval tv{2, 0};  // a client that never sends its hello does not hold this thread
      setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
      // The hello (8 bytes) and the token (4-byte length, then bytes; "" here), then welcome.
      char hello[12];
      size_t got = 0;
      while (got < sizeof(hello)) {
        const ssize_t n = recv(c, hello + got, sizeof(hello) - got, 0);
        if (n <= 0) break;
        got += static_cast<size_t>(n);
      }
      if (got == sizeof(hello)) send(c, "HLXSTOR!", 8, MSG_NOSIGNAL);
    }
  }

  bool welcome_;
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::vector<int> conns_;  // owned by the thread until it is joined
  std::thread thread_;
};

// The error names where and how long: the leader's address and the timeout.
void ExpectNamesAddressAndTimeout(const Status& s, int port, int timeout_ms) {
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_NE(s.message().find("127.0.0.1:" + std::to_string(port)), std::string::npos)
      << s.ToString();
  EXPECT_NE(s.message().find(std::to_string(timeout_ms) + " ms"), std::string::npos)
      << s.ToString();
}

// A blocking connect waits out the kernel's SYN retries (over two minutes); the client's own
// timeout must bound it.
TEST(TcpStoreTimeoutTest, ConnectWhoseSynsAreDroppedEndsAtTheTimeout) {
  DropsSyns leader;
  if (!leader.full()) GTEST_SKIP() << "this kernel answered every SYN of a full accept queue";
  const int port = leader.port();
  const auto t0 = Clock::now();
  auto r = ReturnsWithin<Status>(milliseconds(5000), [port] {
    return TcpStore::Connect("127.0.0.1", port, milliseconds(1000)).status();
  });
  ASSERT_TRUE(r.has_value()) << "Connect with a 1000 ms timeout still runs after 5 s";
  EXPECT_GE(Clock::now() - t0, milliseconds(900));
  ExpectNamesAddressAndTimeout(*r, port, 1000);
}

TEST(TcpStoreTimeoutTest, AListenerThatNeverAnswersTheHandshakeIsRetriedUntilTheTimeout) {
  SilentPeer peer(/*welcome=*/false);
  const int port = peer.port();
  auto r = ReturnsWithin<Status>(milliseconds(5000), [port] {
    return TcpStore::Connect("127.0.0.1", port, milliseconds(1000)).status();
  });
  ASSERT_TRUE(r.has_value()) << "Connect with a 1000 ms timeout still runs after 5 s";
  ExpectNamesAddressAndTimeout(*r, port, 1000);
  EXPECT_NE(r->message().find("no answer"), std::string::npos) << r->ToString();
}

// A store that answers the handshake and then nothing: set, get and Gloo's wait each end at
// their timeout (the store's own for set, the caller's for get and wait).
TEST(TcpStoreTimeoutTest, AStoreThatFallsSilentAfterTheHandshakeFailsEveryCall) {
  SilentPeer peer(/*welcome=*/true);
  const int port = peer.port();
  auto c = TcpStore::Connect("127.0.0.1", port, milliseconds(1000));
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  std::shared_ptr<TcpStore> store = std::move(*c);

  const auto t0 = Clock::now();
  auto set = ReturnsWithin<Status>(milliseconds(4000), [store] { return store->Set("k", "v"); });
  ASSERT_TRUE(set.has_value()) << "Set with a 1000 ms store timeout still runs after 4 s";
  EXPECT_GE(Clock::now() - t0, milliseconds(900));
  ExpectNamesAddressAndTimeout(*set, port, 1000);

  auto get = ReturnsWithin<Status>(milliseconds(4000),
                                   [store] { return store->Get("k", milliseconds(500)).status(); });
  ASSERT_TRUE(get.has_value()) << "Get with a 500 ms timeout still runs after 4 s";
  ExpectNamesAddressAndTimeout(*get, port, 500);
  EXPECT_NE(get->message().find("'k'"), std::string::npos) << get->ToString();

  auto wait = ReturnsWithin<std::string>(milliseconds(4000), [store] {
    try {
      store->wait({"a", "b"}, milliseconds(300));
    } catch (const gloo::IoException& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  });
  ASSERT_TRUE(wait.has_value()) << "wait with a 300 ms timeout still runs after 4 s";
  EXPECT_NE(wait->find("300 ms"), std::string::npos) << *wait;
}

// A healthy store: a get that runs out leaves the client usable, and a wait for several keys
// has one deadline for them all.
TEST(TcpStoreTimeoutTest, TimeoutsAgainstAHealthyStore) {
  auto server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  auto store = TcpStore::Connect("127.0.0.1", (*server)->port(), milliseconds(2000));
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  for (int ms : {0, 1, 30}) {
    auto missing = (*store)->Get("absent", milliseconds(ms));
    EXPECT_EQ(missing.status().code(), StatusCode::kDeadlineExceeded) << ms;
    EXPECT_NE(missing.status().message().find("absent"), std::string::npos)
        << missing.status().ToString();
  }
  ASSERT_TRUE((*store)->Set("k", "v").ok());
  auto v = (*store)->Get("k");
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, "v");

  EXPECT_NO_THROW((*store)->wait({"k"}, milliseconds(300)));

  // Keys that appear one by one, the last after the wait's timeout: each within a timeout of
  // the one before it, which a timeout per key would accept.
  std::thread setter([port = (*server)->port()] {
    auto other = TcpStore::Connect("127.0.0.1", port, milliseconds(2000));
    if (!other.ok()) return;
    for (const char* key : {"a", "b", "c"}) {
      std::this_thread::sleep_for(milliseconds(250));
      (void)(*other)->Set(key, "x");
    }
  });
  const auto t0 = Clock::now();
  EXPECT_THROW((*store)->wait({"a", "b", "c"}, milliseconds(400)), gloo::IoException);
  EXPECT_LT(Clock::now() - t0, milliseconds(2000));  // bounded (the throw shows the shared timeout)
  setter.join();
}

}  // namespace
}  // namespace helix::parallel
