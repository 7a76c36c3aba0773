// Helpers shared by the server tests (serve_test, disagg_serve_test).
#ifndef HELIX_TESTS_PORT_UTIL_H_
#define HELIX_TESTS_PORT_UTIL_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>

namespace helix::testing {

// Whether something accepts TCP connections on 127.0.0.1:port now.
inline bool PortOpen(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  close(fd);
  return ok;
}

}  // namespace helix::testing

#endif  // HELIX_TESTS_PORT_UTIL_H_
