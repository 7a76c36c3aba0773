// The router's view of an HTTP client's connection, for a handler that httplib (0.11) gives no
// socket: which descriptor it came on, and whether the client has left (so that a non-streaming
// request whose client is gone can be cancelled instead of generating for no one).
#pragma once

#include <string>

namespace helix::router {

// ConnectionFd: no connection of this process has the two ends, but one accepted on local_port
// has lost its peer (a reset: getpeername fails with ENOTCONN). A client that reset its
// connection before the lookup leaves its socket so; a live client's is always found.
inline constexpr int kConnectionGone = -2;

// The descriptor of the accepted connection whose ends are (local port local_port, remote
// remote_addr:remote_port), found among the process's descriptors (/proc/self/fd); else
// kConnectionGone (see there) or -1 (not found, e.g. /proc unreadable). The connection's thread
// is the one running its handler, so the descriptor stays this connection's until the handler
// returns.
int ConnectionFd(const std::string& remote_addr, int remote_port, int local_port);

// Whether the peer has closed (or reset) its end of the connection fd. A request is one
// exchange (httplib reads the next one only after this response), so an end of stream now
// means the client left.
bool PeerClosed(int fd);

}  // namespace helix::router
