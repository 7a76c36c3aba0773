// ConnectionFd and PeerClosed on real loopback connections: a live client's socket is found by
// its two ends; a closed or reset one is seen gone; a client that reset its connection before
// the lookup (the race a handler started late loses) is reported as kConnectionGone, not as
// "not found" (which left its request generating to the end).
#include "server/router/client_socket.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

namespace helix::router {
namespace {

struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

int Port(int fd, bool peer) {
  sockaddr_in a{};
  socklen_t len = sizeof(a);
  const int r = peer ? getpeername(fd, reinterpret_cast<sockaddr*>(&a), &len)
                     : getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  return r == 0 ? ntohs(a.sin_port) : -1;
}

// A listening socket on 127.0.0.1 (a free port).
int Listen() {
  const int s = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(s, 8) != 0) return -1;
  return s;
}

int Connect(int port) {
  const int c = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return connect(c, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 ? c : -1;
}

void Reset(Fd* c) {  // close with SO_LINGER 0: an RST instead of a FIN
  linger l{1, 0};
  setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close(c->fd);
  c->fd = -1;
}

// Polls `done` for up to 5 s (the loopback delivers at once; this only bounds a slow machine).
template <typename F>
bool Within5s(F done) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

TEST(ClientSocketTest, FindsLiveConnectionsAndSeesClientsLeave) {
  Fd server(Listen());
  ASSERT_GE(server.fd, 0);
  const int port = Port(server.fd, false);
  // Nothing connected: no descriptor, and the listening socket (no peer) is not taken for a
  // client that reset.
  EXPECT_EQ(ConnectionFd("127.0.0.1", 40000, port), -1);

  Fd a(Connect(port)), b(Connect(port));
  ASSERT_GE(a.fd, 0);
  ASSERT_GE(b.fd, 0);
  Fd sa(accept(server.fd, nullptr, nullptr)), sb(accept(server.fd, nullptr, nullptr));
  ASSERT_GE(sa.fd, 0);
  ASSERT_GE(sb.fd, 0);
  EXPECT_EQ(ConnectionFd("127.0.0.1", Port(a.fd, false), port), sa.fd);
  EXPECT_EQ(ConnectionFd("127.0.0.1", Port(b.fd, false), port), sb.fd);
  EXPECT_EQ(ConnectionFd("127.0.0.2", Port(a.fd, false), port), -1);  // another address
  EXPECT_FALSE(PeerClosed(sa.fd));
  EXPECT_FALSE(PeerClosed(sb.fd));

  // A client that closes (FIN) keeps its peer address: found, and seen gone.
  const int a_port = Port(a.fd, false);
  close(a.fd);
  a.fd = -1;
  EXPECT_TRUE(Within5s([&] { return PeerClosed(sa.fd); }));
  EXPECT_EQ(ConnectionFd("127.0.0.1", a_port, port), sa.fd);
  EXPECT_FALSE(PeerClosed(sb.fd));

  // A client that resets after the lookup: its descriptor was found before, and is seen gone.
  const int b_port = Port(b.fd, false);
  Reset(&b);
  EXPECT_TRUE(Within5s([&] { return PeerClosed(sb.fd); }));
  // Looked up only now (the race): the reset socket has no peer address any more, so it cannot
  // be matched, but it is not "not found" either.
  EXPECT_TRUE(Within5s([&] { return Port(sb.fd, true) < 0; }));
  EXPECT_EQ(ConnectionFd("127.0.0.1", b_port, port), kConnectionGone);
  // A live client is still found beside it.
  Fd c(Connect(port));
  ASSERT_GE(c.fd, 0);
  Fd sc(accept(server.fd, nullptr, nullptr));
  EXPECT_EQ(ConnectionFd("127.0.0.1", Port(c.fd, false), port), sc.fd);
}

}  // namespace
}  // namespace helix::router
