#include "engine/parallel/tcp_store.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>

#include <gloo/common/error.h>

namespace helix::parallel {
namespace {

using Clock = std::chrono::steady_clock;
constexpr Clock::time_point kNoDeadline = Clock::time_point::max();

// `timeout` from now; one too large to add is no deadline (rather than an overflow).
Clock::time_point DeadlineAfter(std::chrono::milliseconds timeout) {
  const auto now = Clock::now();
  if (timeout >= std::chrono::duration_cast<std::chrono::milliseconds>(kNoDeadline - now)) {
    return kNoDeadline;
  }
  return now + timeout;
}

// How a deadline-bounded transfer ended. kClosed: EOF, an error, or a malformed message.
enum class Io { kOk, kClosed, kTimedOut };

// Waits until `fd` is ready for `events` (or has an error to report) or `deadline` passes
// (past it, still one look without waiting).
Io WaitFor(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    int ms = -1;
    if (deadline != kNoDeadline) {
      const auto left = deadline - Clock::now();
      // Rounded up: a poll that wakes before the deadline would spin.
      ms = left <= Clock::duration::zero()
               ? 0
               : static_cast<int>(std::min<int64_t>(
                     std::chrono::ceil<std::chrono::milliseconds>(left).count(), INT_MAX));
    }
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, ms);
    if (r > 0) return Io::kOk;
    if (r < 0 && errno != EINTR) return Io::kClosed;
    if (r == 0 && ms == 0) return Io::kTimedOut;
  }
}

// Whole-buffer I/O on a non-blocking socket, bounded by `deadline` (kNoDeadline: none).
Io WriteAll(int fd, const void* data, size_t n, Clock::time_point deadline) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w > 0) {
      p += w;
      n -= static_cast<size_t>(w);
    } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (const Io io = WaitFor(fd, POLLOUT, deadline); io != Io::kOk) return io;
    } else if (!(w < 0 && errno == EINTR)) {
      return Io::kClosed;
    }
  }
  return Io::kOk;
}

Io ReadAll(int fd, void* data, size_t n, Clock::time_point deadline) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
    } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (const Io io = WaitFor(fd, POLLIN, deadline); io != Io::kOk) return io;
    } else if (!(r < 0 && errno == EINTR)) {
      return Io::kClosed;
    }
  }
  return Io::kOk;
}

Io WriteString(int fd, const std::string& s, Clock::time_point deadline) {
  const uint32_t n = static_cast<uint32_t>(s.size());
  const Io io = WriteAll(fd, &n, 4, deadline);
  return io == Io::kOk ? WriteAll(fd, s.data(), s.size(), deadline) : io;
}

// Strings longer than this are refused: store values are addresses and sizes.
constexpr uint32_t kMaxString = 64u << 20;
constexpr uint32_t kMaxToken = 256;  // group tokens

Io ReadString(int fd, std::string* s, Clock::time_point deadline, uint32_t max_bytes = kMaxString) {
  uint32_t n = 0;
  const Io io = ReadAll(fd, &n, 4, deadline);
  if (io != Io::kOk) return io;
  if (n > max_bytes) return Io::kClosed;
  s->resize(n);
  return ReadAll(fd, s->data(), n, deadline);
}

// The handshake (see tcp_store.h): client hello, then the server's answers. Distinct words,
// so that a self-connected client, which reads its own hello back, never takes it for a yes.
constexpr char kHello[8] = {'H', 'L', 'X', 'S', 'T', 'O', 'R', '?'};
constexpr char kWelcome[8] = {'H', 'L', 'X', 'S', 'T', 'O', 'R', '!'};
constexpr char kOtherGroup[8] = {'H', 'L', 'X', 'S', 'T', 'O', 'R', 'x'};

// How long the server waits for a client's handshake, and the longest one connection attempt
// of a client may take (then it dials again: something that accepted and never answers may
// give way to the store, e.g. a leader starting on a port another program just left).
constexpr std::chrono::milliseconds kHandshakeTimeout(10000);
constexpr std::chrono::milliseconds kAttemptTimeout(5000);

std::string Ms(std::chrono::milliseconds t) { return std::to_string(t.count()) + " ms"; }

StatusOr<sockaddr_in> Resolve(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || res == nullptr) {
    return InvalidArgument("cannot resolve host '" + host + "'");
  }
  sockaddr_in addr = *reinterpret_cast<sockaddr_in*>(res->ai_addr);
  freeaddrinfo(res);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  return addr;
}

// Connects `fd` (non-blocking) to a store and passes its handshake, by `deadline`. The reason
// when not: DeadlineExceeded when time ran out, Unavailable when something else answered.
Status ConnectAndGreet(int fd, const sockaddr_in& addr, const std::string& group_token,
                       Clock::time_point deadline) {
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (errno != EINPROGRESS && errno != EINTR) return Unavailable(std::strerror(errno));
    if (WaitFor(fd, POLLOUT, deadline) == Io::kTimedOut) {
      return DeadlineExceeded(
          "no answer to the connection request (a firewall that drops it, or a listener that "
          "accepts no more connections?)");
    }
    int err = 0;
    socklen_t len = sizeof(err);
    if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    if (err != 0) return Unavailable(std::strerror(err));
  }
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  char answer[sizeof(kWelcome)] = {};
  Io io = WriteAll(fd, kHello, sizeof(kHello), deadline);
  if (io == Io::kOk) io = WriteString(fd, group_token, deadline);
  if (io == Io::kOk) io = ReadAll(fd, answer, sizeof(answer), deadline);
  if (io == Io::kTimedOut) {
    return DeadlineExceeded("connected, but no answer to the store's handshake");
  }
  if (io == Io::kOk && std::memcmp(answer, kWelcome, sizeof(answer)) == 0) return Status::Ok();
  if (io == Io::kOk && std::memcmp(answer, kOtherGroup, sizeof(answer)) == 0) {
    return Unavailable(
        "the store there belongs to another Helix instance (its group token differs)");
  }
  return Unavailable("what answers there is not a Helix rendezvous store");
}

// One attempt at the store at `addr`: a connected, greeted non-blocking socket, or why not
// (see ConnectAndGreet; Internal when no socket could be made).
StatusOr<int> Dial(const sockaddr_in& addr, const std::string& group_token,
                   Clock::time_point deadline) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Internal(std::string("socket: ") + std::strerror(errno));
  Status s = ConnectAndGreet(fd, addr, group_token, deadline);
  if (s.ok()) return fd;
  ::close(fd);
  return s;
}

}  // namespace

StatusOr<std::unique_ptr<TcpStoreServer>> TcpStoreServer::Start(const std::string& host, int port,
                                                                std::string group_token) {
  if (group_token.size() > kMaxToken) {
    return InvalidArgument("rendezvous store: the group token is longer than " +
                           std::to_string(kMaxToken) + " bytes");
  }
  ASSIGN_OR_RETURN(sockaddr_in addr, Resolve(host, port));
  std::unique_ptr<TcpStoreServer> s(new TcpStoreServer());
  s->group_token_ = std::move(group_token);
  s->listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s->listen_fd_ < 0) return Internal(std::string("socket: ") + std::strerror(errno));
  const int one = 1;
  ::setsockopt(s->listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(s->listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return Unavailable("rendezvous store: cannot listen on " + host + ":" + std::to_string(port) +
                       ": " + std::strerror(errno));
  }
  if (::listen(s->listen_fd_, 256) != 0) {
    return Internal(std::string("listen: ") + std::strerror(errno));
  }
  socklen_t len = sizeof(addr);
  ::getsockname(s->listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  s->port_ = ntohs(addr.sin_port);
  s->accept_thread_ = std::thread([p = s.get()] { p->AcceptLoop(); });
  return s;
}

TcpStoreServer::~TcpStoreServer() {
  stop_ = true;
  if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
  if (accept_thread_.joinable()) accept_thread_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (Client& c : clients_) {
      if (c.fd >= 0) ::shutdown(c.fd, SHUT_RDWR);
    }
    for (Client& c : clients_) threads.push_back(std::move(c.thread));
  }
  for (std::thread& t : threads) t.join();
}

size_t TcpStoreServer::connections() {
  std::lock_guard<std::mutex> lock(mu_);
  return clients_.size();
}

void TcpStoreServer::ReapFinished() {
  for (auto it = clients_.begin(); it != clients_.end();) {
    if (it->fd < 0) {
      it->thread.join();  // its Serve has returned from its last locked section
      it = clients_.erase(it);
    } else {
      ++it;
    }
  }
}

void TcpStoreServer::AcceptLoop() {
  while (!stop_) {
    pollfd pfd{listen_fd_, POLLIN, 0};
    const bool ready = ::poll(&pfd, 1, 200) > 0;
    const int fd =
        ready ? ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC) : -1;
    std::lock_guard<std::mutex> lock(mu_);
    ReapFinished();
    if (fd < 0) continue;
    if (stop_) {
      ::close(fd);
      break;
    }
    Client& c = clients_.emplace_back();
    c.fd = fd;
    c.thread = std::thread([this, p = &c] { Serve(p); });
  }
}

void TcpStoreServer::Serve(Client* client) {
  const int fd = client->fd;  // written before this thread started
  // The handshake first; a client that is not one of this group's ranks is dropped. Bounded,
  // so that a peer which never speaks does not hold this thread; a rank may then stay idle
  // between requests as long as it likes.
  char hello[sizeof(kHello)];
  std::string token;
  const auto handshake = DeadlineAfter(kHandshakeTimeout);
  bool ours = ReadAll(fd, hello, sizeof(hello), handshake) == Io::kOk &&
              std::memcmp(hello, kHello, sizeof(hello)) == 0 &&
              ReadString(fd, &token, handshake, kMaxToken) == Io::kOk;
  if (ours) {
    ours = token == group_token_;
    (void)WriteAll(fd, ours ? kWelcome : kOtherGroup, sizeof(kWelcome), handshake);
  }
  for (; ours;) {
    char op = 0;
    std::string key, value;
    if (ReadAll(fd, &op, 1, kNoDeadline) != Io::kOk ||
        ReadString(fd, &key, kNoDeadline) != Io::kOk ||
        ReadString(fd, &value, kNoDeadline) != Io::kOk) {
      break;
    }
    bool ok = true;
    if (op == 'S') {
      std::lock_guard<std::mutex> lock(mu_);
      data_[key].assign(value.begin(), value.end());
      const char found = 1;
      ok = WriteAll(fd, &found, 1, kNoDeadline) == Io::kOk &&
           WriteString(fd, "", kNoDeadline) == Io::kOk;
    } else if (op == 'G') {
      std::string out;
      char found = 0;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = data_.find(key);
        if (it != data_.end()) {
          found = 1;
          out.assign(it->second.begin(), it->second.end());
        }
      }
      ok = WriteAll(fd, &found, 1, kNoDeadline) == Io::kOk &&
           WriteString(fd, out, kNoDeadline) == Io::kOk;
    } else {
      break;
    }
    if (!ok) break;
  }
  std::lock_guard<std::mutex> lock(mu_);
  ::close(fd);
  client->fd = -1;
}

StatusOr<std::unique_ptr<TcpStore>> TcpStore::Connect(const std::string& host, int port,
                                                      std::chrono::milliseconds timeout,
                                                      const std::string& group_token) {
  if (group_token.size() > kMaxToken) {
    return InvalidArgument("rendezvous store: the group token is longer than " +
                           std::to_string(kMaxToken) + " bytes");
  }
  ASSIGN_OR_RETURN(sockaddr_in addr, Resolve(host, port));
  const std::string address = host + ":" + std::to_string(port);
  const auto deadline = DeadlineAfter(timeout);
  std::string last;
  for (;;) {
    const auto attempt_deadline = std::min(deadline, DeadlineAfter(kAttemptTimeout));
    StatusOr<int> fd = Dial(addr, group_token, attempt_deadline);
    if (fd.ok()) {
      return std::unique_ptr<TcpStore>(new TcpStore(*fd, addr, address, group_token, timeout));
    }
    if (fd.status().code() == StatusCode::kInternal) return fd.status();
    // An attempt cut short by the deadline says less than an earlier one that was answered
    // (e.g. by another instance's store).
    const bool cut_short =
        fd.status().code() == StatusCode::kDeadlineExceeded && attempt_deadline == deadline;
    if (!cut_short || last.empty()) last = fd.status().message();
    const auto now = Clock::now();
    if (now >= deadline) {
      return DeadlineExceeded("cannot reach the leader's rendezvous store at " + address +
                              " within " + Ms(timeout) + ": " + last);
    }
    std::this_thread::sleep_for(
        std::min<Clock::duration>(std::chrono::milliseconds(50), deadline - now));
  }
}

TcpStore::~TcpStore() {
  if (fd_ >= 0) ::close(fd_);
}

StatusOr<std::pair<bool, std::string>> TcpStore::Call(char op, const std::string& key,
                                                      const std::string& value,
                                                      Clock::time_point deadline,
                                                      std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string which = " (key '" + key + "')";
  if (!lost_.empty()) return Unavailable(lost_ + which);
  if (fd_ < 0) {  // an earlier request ran out of time; the store may answer again
    StatusOr<int> fd = Dial(addr_, group_token_, deadline);
    if (!fd.ok()) {
      if (fd.status().code() == StatusCode::kDeadlineExceeded) {
        return DeadlineExceeded("rendezvous store at " + address_ + " did not answer within " +
                                Ms(timeout) + which + ", reconnecting: " + fd.status().message());
      }
      return Unavailable("rendezvous store at " + address_ + ": cannot reconnect" + which + ": " +
                         fd.status().message());
    }
    fd_ = *fd;
  }
  char found = 0;
  std::string out;
  Io io = WriteAll(fd_, &op, 1, deadline);
  if (io == Io::kOk) io = WriteString(fd_, key, deadline);
  if (io == Io::kOk) io = WriteString(fd_, value, deadline);
  if (io == Io::kOk) io = ReadAll(fd_, &found, 1, deadline);
  if (io == Io::kOk) io = ReadString(fd_, &out, deadline);
  if (io == Io::kOk) return std::make_pair(found != 0, std::move(out));
  ::close(fd_);
  fd_ = -1;
  if (io == Io::kTimedOut) {
    return DeadlineExceeded("rendezvous store at " + address_ + " did not answer within " +
                            Ms(timeout) + which);
  }
  lost_ = "rendezvous store: connection to the leader's store at " + address_ + " lost";
  return Unavailable(lost_ + which);
}

Status TcpStore::Set(const std::string& key, const std::string& value) {
  return Call('S', key, value, DeadlineAfter(timeout_), timeout_).status();
}

StatusOr<std::string> TcpStore::Get(const std::string& key) { return Get(key, timeout_); }

StatusOr<std::string> TcpStore::Get(const std::string& key, std::chrono::milliseconds timeout) {
  return GetBy(key, DeadlineAfter(timeout), timeout);
}

StatusOr<std::string> TcpStore::GetBy(const std::string& key, Clock::time_point deadline,
                                      std::chrono::milliseconds timeout) {
  auto delay = std::chrono::milliseconds(1);
  bool answered = false;  // then a request cut off by the deadline only says the key is missing
  for (;;) {
    StatusOr<std::pair<bool, std::string>> r = Call('G', key, "", deadline, timeout);
    if (!r.ok()) {
      if (answered && r.status().code() == StatusCode::kDeadlineExceeded) break;
      return r.status();
    }
    if (r->first) return std::move(r->second);
    answered = true;
    const auto now = Clock::now();
    if (now >= deadline) break;
    std::this_thread::sleep_for(std::min<Clock::duration>(delay, deadline - now));
    delay = std::min(delay * 2, std::chrono::milliseconds(50));
  }
  return DeadlineExceeded("rendezvous: key '" + key + "' did not appear within " + Ms(timeout) +
                          " (store at " + address_ + ")");
}

void TcpStore::set(const std::string& key, const std::vector<char>& data) {
  Status s = Set(key, std::string(data.begin(), data.end()));
  if (!s.ok()) throw gloo::IoException(s.ToString());
}

std::vector<char> TcpStore::get(const std::string& key) {
  StatusOr<std::string> v = Get(key);
  if (!v.ok()) throw gloo::IoException(v.status().ToString());
  return std::vector<char>(v->begin(), v->end());
}

void TcpStore::wait(const std::vector<std::string>& keys) { wait(keys, timeout_); }

void TcpStore::wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) {
  const auto deadline = DeadlineAfter(timeout);
  for (const std::string& k : keys) {
    StatusOr<std::string> v = GetBy(k, deadline, timeout);
    if (!v.ok()) throw gloo::IoException(v.status().ToString());
  }
}

}  // namespace helix::parallel
