// Rendezvous key-value store over TCP: the leader runs a TcpStoreServer, every rank (the
// leader too) talks to it through a TcpStore client, which implements Gloo's
// rendezvous::Store (this Gloo has no TCP store of its own). Keys are write-once by
// convention; values are small (addresses, sizes).
// Every connection opens with a handshake: the client sends a magic word and its group token,
// the server answers with a different magic word when the token is its own. A client retries
// (until its timeout) whatever else answers: another instance's store (token differs), another
// program on the port, or its own socket (a connect to a port nobody listens on yet can pick
// that very port as its source: a TCP self-connection, which echoes the request back).
// A client never waits past its caller's time: connecting (a firewall that drops the SYNs), the
// handshake and every request are bounded, so a leader that does not answer is an error naming
// its address and the timeout, not a hang.
// Thread-safety: the server is internally synchronised; a TcpStore client serialises its own
// calls with a mutex.
#pragma once

#include <netinet/in.h>

#include <atomic>
#include <chrono>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gloo/rendezvous/store.h>

#include "engine/common/status.h"

namespace helix::parallel {

class TcpStoreServer {
 public:
  // Listens on host:port (port 0 = any free port; see port()). Only clients that present
  // `group_token` are served ("" = the clients that present none).
  static StatusOr<std::unique_ptr<TcpStoreServer>> Start(const std::string& host, int port,
                                                         std::string group_token = "");
  ~TcpStoreServer();
  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;

  int port() const { return port_; }
  // Connections it holds a thread for (open ones, and ended ones not yet reaped: the accept
  // loop reaps those within ~200 ms).
  size_t connections();

 private:
  struct Client {
    int fd = -1;
    std::thread thread;
  };
  TcpStoreServer() = default;
  void AcceptLoop();
  void Serve(Client* client);
  // Joins and drops the clients whose Serve has ended. REQUIRES mu_.
  void ReapFinished();

  int listen_fd_ = -1;
  int port_ = 0;
  std::string group_token_;
  std::atomic<bool> stop_{false};
  std::thread accept_thread_;
  std::mutex mu_;
  std::map<std::string, std::vector<char>> data_;  // GUARDED_BY(mu_)
  // One thread per connection; fd becomes -1 when its Serve ends, and the accept loop joins
  // and drops such entries (a refused client retries many times: they must not pile up).
  std::list<Client> clients_;  // GUARDED_BY(mu_)
};

class TcpStore final : public gloo::rendezvous::Store {
 public:
  // Connects to the server, retrying until `timeout` (the leader may start after a worker)
  // and until a store of `group_token` answers the handshake. `timeout` also bounds every
  // later set, and every wait for a key that is given no timeout of its own.
  static StatusOr<std::unique_ptr<TcpStore>> Connect(const std::string& host, int port,
                                                     std::chrono::milliseconds timeout,
                                                     const std::string& group_token = "");
  ~TcpStore() override;

  // Status-returning forms for Helix's own use. A request the store does not answer in time is
  // DeadlineExceeded naming the store's address and the timeout.
  Status Set(const std::string& key, const std::string& value);
  // Waits up to the store's timeout for `key`; DeadlineExceeded names the key.
  StatusOr<std::string> Get(const std::string& key);
  StatusOr<std::string> Get(const std::string& key, std::chrono::milliseconds timeout);

  // gloo::rendezvous::Store (throws gloo::IoException on failure, as Gloo expects). A wait for
  // several keys has one deadline for them all.
  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;

 private:
  using Clock = std::chrono::steady_clock;
  TcpStore(int fd, const sockaddr_in& addr, std::string address, std::string group_token,
           std::chrono::milliseconds timeout)
      : fd_(fd),
        addr_(addr),
        address_(std::move(address)),
        group_token_(std::move(group_token)),
        timeout_(timeout) {}
  // One request/response by `deadline` (`timeout` is its length, for messages): op 'S' (set),
  // 'G' (get: found flag + value).
  StatusOr<std::pair<bool, std::string>> Call(char op, const std::string& key,
                                              const std::string& value, Clock::time_point deadline,
                                              std::chrono::milliseconds timeout);
  StatusOr<std::string> GetBy(const std::string& key, Clock::time_point deadline,
                              std::chrono::milliseconds timeout);

  std::mutex mu_;
  // -1 after a request ran out of time: what was left of that exchange would answer the next
  // one, so the connection is dropped and the next request dials again.
  int fd_;            // GUARDED_BY(mu_)
  std::string lost_;  // GUARDED_BY(mu_); why the connection is gone for good ("" = it is not)
  const sockaddr_in addr_;
  const std::string address_;  // host:port, for messages
  const std::string group_token_;
  const std::chrono::milliseconds timeout_;
};

}  // namespace helix::parallel
