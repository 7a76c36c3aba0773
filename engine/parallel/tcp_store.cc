#include "engine/parallel/tcp_store.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <gloo/common/error.h>

namespace helix::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// Whole-buffer I/O; false on EOF or error.
bool WriteAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool ReadAll(int fd, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool WriteString(int fd, const std::string& s) {
  const uint32_t n = static_cast<uint32_t>(s.size());
  return WriteAll(fd, &n, 4) && WriteAll(fd, s.data(), s.size());
}

// Strings longer than this are refused: store values are addresses and sizes.
constexpr uint32_t kMaxString = 64u << 20;
constexpr uint32_t kMaxToken = 256;  // group tokens

bool ReadString(int fd, std::string* s, uint32_t max_bytes = kMaxString) {
  uint32_t n = 0;
  if (!ReadAll(fd, &n, 4) || n > max_bytes) return false;
  s->resize(n);
  return ReadAll(fd, s->data(), n);
}

// The handshake (see tcp_store.h): client hello, then the server's answers. Distinct words,
// so that a self-connected client, which reads its own hello back, never takes it for a yes.
constexpr char kHello[8] = {'H', 'L', 'X', 'S', 'T', 'O', 'R', '?'};
constexpr char kWelcome[8] = {'H', 'L', 'X', 'S', 'T', 'O', 'R', '!'};
constexpr char kOtherGroup[8] = {'H', 'L', 'X', 'S', 'T', 'O', 'R', 'x'};

// Bounds blocking send/recv on `fd` (0 = no bound).
void SetIoTimeout(int fd, std::chrono::milliseconds t) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(t.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((t.count() % 1000) * 1000);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

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
    const int fd = ready ? ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC) : -1;
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
  // so that a peer which never speaks does not hold this thread.
  char hello[sizeof(kHello)];
  std::string token;
  SetIoTimeout(fd, std::chrono::milliseconds(10000));
  bool ours = ReadAll(fd, hello, sizeof(hello)) && std::memcmp(hello, kHello, sizeof(hello)) == 0 &&
              ReadString(fd, &token, kMaxToken);
  if (ours) {
    ours = token == group_token_;
    WriteAll(fd, ours ? kWelcome : kOtherGroup, sizeof(kWelcome));
  }
  SetIoTimeout(fd, std::chrono::milliseconds(0));
  for (; ours;) {
    char op = 0;
    std::string key, value;
    if (!ReadAll(fd, &op, 1) || !ReadString(fd, &key) || !ReadString(fd, &value)) break;
    bool ok = true;
    if (op == 'S') {
      std::lock_guard<std::mutex> lock(mu_);
      data_[key].assign(value.begin(), value.end());
      const char found = 1;
      ok = WriteAll(fd, &found, 1) && WriteString(fd, "");
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
      ok = WriteAll(fd, &found, 1) && WriteString(fd, out);
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
  const auto deadline = Clock::now() + timeout;
  std::string last;
  for (;;) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return Internal(std::string("socket: ") + std::strerror(errno));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      const int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      SetIoTimeout(
          fd, std::clamp(left, std::chrono::milliseconds(100), std::chrono::milliseconds(5000)));
      char answer[sizeof(kWelcome)] = {};
      const bool answered = WriteAll(fd, kHello, sizeof(kHello)) && WriteString(fd, group_token) &&
                            ReadAll(fd, answer, sizeof(answer));
      if (answered && std::memcmp(answer, kWelcome, sizeof(answer)) == 0) {
        SetIoTimeout(fd, std::chrono::milliseconds(0));
        return std::unique_ptr<TcpStore>(new TcpStore(fd, timeout));
      }
      last = answered && std::memcmp(answer, kOtherGroup, sizeof(answer)) == 0
                 ? "the store there belongs to another Helix instance (its group token differs)"
                 : "what answers there is not a Helix rendezvous store";
    } else {
      last = std::strerror(errno);
    }
    ::close(fd);
    if (Clock::now() >= deadline) {
      return DeadlineExceeded("cannot reach the leader's rendezvous store at " + host + ":" +
                              std::to_string(port) + " within " + std::to_string(timeout.count()) +
                              " ms: " + last);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

TcpStore::~TcpStore() { ::close(fd_); }

StatusOr<std::pair<bool, std::string>> TcpStore::Call(char op, const std::string& key,
                                                      const std::string& value) {
  std::lock_guard<std::mutex> lock(mu_);
  char found = 0;
  std::string out;
  if (!WriteAll(fd_, &op, 1) || !WriteString(fd_, key) || !WriteString(fd_, value) ||
      !ReadAll(fd_, &found, 1) || !ReadString(fd_, &out)) {
    return Unavailable("rendezvous store: connection to the leader lost (key '" + key + "')");
  }
  return std::make_pair(found != 0, std::move(out));
}

Status TcpStore::Set(const std::string& key, const std::string& value) {
  return Call('S', key, value).status();
}

StatusOr<std::string> TcpStore::Get(const std::string& key) { return Get(key, timeout_); }

StatusOr<std::string> TcpStore::Get(const std::string& key, std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  auto delay = std::chrono::milliseconds(1);
  for (;;) {
    ASSIGN_OR_RETURN(auto r, Call('G', key, ""));
    if (r.first) return std::move(r.second);
    if (Clock::now() >= deadline) {
      return DeadlineExceeded("rendezvous: key '" + key + "' did not appear within " +
                              std::to_string(timeout.count()) + " ms");
    }
    std::this_thread::sleep_for(delay);
    delay = std::min(delay * 2, std::chrono::milliseconds(50));
  }
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
  for (const std::string& k : keys) {
    StatusOr<std::string> v = Get(k, timeout);
    if (!v.ok()) throw gloo::IoException(v.status().ToString());
  }
}

}  // namespace helix::parallel
