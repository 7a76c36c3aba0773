#include "server/router/client_socket.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdlib>

namespace helix::router {
namespace {

std::string SockAddr(const sockaddr_storage& a, int* port) {
  char buf[INET6_ADDRSTRLEN] = {};
  if (a.ss_family == AF_INET) {
    const auto* v4 = reinterpret_cast<const sockaddr_in*>(&a);
    *port = ntohs(v4->sin_port);
    inet_ntop(AF_INET, &v4->sin_addr, buf, sizeof(buf));
  } else if (a.ss_family == AF_INET6) {
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&a);
    *port = ntohs(v6->sin6_port);
    inet_ntop(AF_INET6, &v6->sin6_addr, buf, sizeof(buf));
  } else {
    *port = -1;
  }
  return buf;
}

}  // namespace

int ConnectionFd(const std::string& remote_addr, int remote_port, int local_port) {
  if (remote_port <= 0 || local_port <= 0) return -1;
  DIR* d = opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  int found = -1;
  bool peerless = false;  // an accepted socket on local_port without a peer any more
  while (dirent* ent = readdir(d)) {
    char* end = nullptr;
    const long fd = std::strtol(ent->d_name, &end, 10);
    if (end == ent->d_name || *end != '\0' || fd == dirfd(d)) continue;
    const int s = static_cast<int>(fd);
    struct stat st;
    if (fstat(s, &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockaddr_storage local{}, peer{};
    socklen_t ll = sizeof(local), pl = sizeof(peer);
    if (getsockname(s, reinterpret_cast<sockaddr*>(&local), &ll) != 0) continue;
    int lport = -1, pport = -1;
    SockAddr(local, &lport);
    if (lport != local_port) continue;
    if (getpeername(s, reinterpret_cast<sockaddr*>(&peer), &pl) != 0) {
      int listening = 0;
      socklen_t len = sizeof(listening);
      if (errno == ENOTCONN &&
          !(getsockopt(s, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && listening)) {
        peerless = true;
      }
      continue;
    }
    const std::string paddr = SockAddr(peer, &pport);
    if (pport == remote_port && paddr == remote_addr) {
      found = s;
      break;
    }
  }
  closedir(d);
  return found >= 0 ? found : peerless ? kConnectionGone : -1;
}

bool PeerClosed(int fd) {
  pollfd pf{fd, POLLIN | POLLRDHUP, 0};
  if (poll(&pf, 1, 0) <= 0) return false;
  if (pf.revents & (POLLHUP | POLLERR | POLLRDHUP | POLLNVAL)) return true;
  char c;
  return recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

}  // namespace helix::router
