// StoreProcess: a TCP rendezvous store served by a child process, for tests and benchmarks that
// fork ranks without exec. Forking from a process that runs the store's threads could hand a
// child a lock one of them held (see testing::ThreadsOnceSettled); with the store in its own
// child, the forking process keeps a single thread. For tests and benchmarks only.
#pragma once

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/parallel/tcp_store.h"
#include "engine/spawn_test_util.h"

namespace helix::parallel {

// Forked (only while this process has no other thread) on construction, killed by pid on
// destruction. port() is -1 when it did not start.
class StoreProcess {
 public:
  StoreProcess() {
    int fds[2];
    if (testing::ThreadsOnceSettled() != 1 || pipe(fds) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      close(fds[0]);
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlives its parent
      auto server = TcpStoreServer::Start("127.0.0.1", 0);
      const int port = server.ok() ? (*server)->port() : -1;
      if (write(fds[1], &port, sizeof(port)) != sizeof(port) || port < 0) _exit(1);
      close(fds[1]);
      for (;;) pause();  // serves from its own threads until killed
    }
    close(fds[1]);
    int port = -1;
    if (pid_ > 0 && read(fds[0], &port, sizeof(port)) == sizeof(port)) port_ = port;
    close(fds[0]);
  }
  ~StoreProcess() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  StoreProcess(const StoreProcess&) = delete;
  StoreProcess& operator=(const StoreProcess&) = delete;
  int port() const { return port_; }

 private:
  pid_t pid_ = -1;
  int port_ = -1;
};

}  // namespace helix::parallel
