// Test helpers for tests that run parts of themselves as other processes: SpawnSelf starts this
// test binary again (a new process, not a fork: CUDA and UCX state do not survive fork) on one
// gtest filter with extra environment variables; Reap waits for such processes within a grace
// period and kills what is left; ThreadsInThisProcess / ThreadsOnceSettled tell whether forking
// (without exec) is safe. For tests only.
#pragma once

#include <dirent.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <vector>

extern char** environ;

namespace helix::testing {

// Runs `/proc/self/exe --gtest_filter=<filter>` with this process's environment plus
// `extra_env` ("NAME=value" entries). Returns the child's pid, or -1 when it cannot start.
inline pid_t SpawnSelf(const std::string& filter, const std::vector<std::string>& extra_env) {
  std::vector<std::string> env_s;
  for (char** e = environ; *e != nullptr; ++e) env_s.push_back(*e);
  env_s.insert(env_s.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> envp;
  for (std::string& s : env_s) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string exe = "/proc/self/exe", flag = "--gtest_filter=" + filter;
  char* argv[] = {exe.data(), flag.data(), nullptr};
  pid_t pid = 0;
  return posix_spawn(&pid, exe.c_str(), nullptr, nullptr, argv, envp.data()) == 0 ? pid : -1;
}

// The number of threads of this process (its entries in /proc/self/task; -1 if unreadable).
// fork() copies only the calling thread: a lock another thread holds at that moment (the
// allocator's, under a sanitizer whose runtime does not take its locks around fork) stays held
// forever in the child. Tests that fork and then run code (not exec) check for 1 first.
inline int ThreadsInThisProcess() {
  DIR* d = opendir("/proc/self/task");
  if (d == nullptr) return -1;
  int n = 0;
  while (const dirent* e = readdir(d)) n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

// ThreadsInThisProcess, polled until it is 1 or `patience` has passed: a thread just joined can
// still be listed for a moment (pthread_join returns once the kernel clears the thread's id,
// before its task entry goes). What the fork checks call.
inline int ThreadsOnceSettled(
    std::chrono::milliseconds patience = std::chrono::milliseconds(2000)) {
  const auto deadline = std::chrono::steady_clock::now() + patience;
  int n = ThreadsInThisProcess();
  while (n > 1 && std::chrono::steady_clock::now() < deadline) {
    usleep(1000);
    n = ThreadsInThisProcess();
  }
  return n;
}

// Waits for the processes (up to `grace` in all, then kills them); returns their exit codes
// (128 + the signal for one that was killed or died by a signal).
inline std::vector<int> Reap(const std::vector<pid_t>& pids, std::chrono::milliseconds grace) {
  const auto deadline = std::chrono::steady_clock::now() + grace;
  std::vector<int> codes;
  for (pid_t pid : pids) {
    int st = 0;
    while (waitpid(pid, &st, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        break;
      }
      usleep(10000);
    }
    codes.push_back(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
  }
  return codes;
}

}  // namespace helix::testing
