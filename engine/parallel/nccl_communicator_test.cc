// NcclCommunicator on the GPU (label gpu; skips when no CUDA device is visible): every
// collective on device buffers in a group of one, a peer that never joins (a timeout), and two
// ranks in two processes (spawned, as
// CUDA cannot be used in a child forked after the parent touched it). With two or more GPUs the
// two ranks check every collective's result; on one GPU NCCL refuses two ranks on the same
// device, and the test checks that the refusal is a clear error and never a hang.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "engine/parallel/nccl_communicator.h"
#include "engine/parallel/tcp_store.h"
#include "engine/spawn_test_util.h"

namespace helix::parallel {
namespace {

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

// Runs every collective of a group of `size` (this is `rank`) and returns "" when each result
// is right, else what was wrong. The model's collectives only queue on the stream: each result
// is read after a wait on it, then Check() says whether the collective succeeded.
std::string CheckCollectives(Communicator* c, int rank, int size, cudaStream_t stream) {
  const size_t n = 1000;
  std::vector<float> h(n * size);
  float* d = nullptr;
  float* e = nullptr;
  if (cudaMalloc(&d, n * size * sizeof(float)) != cudaSuccess ||
      cudaMalloc(&e, n * size * sizeof(float)) != cudaSuccess) {
    return "cudaMalloc failed";
  }
  const auto put = [&] {
    cudaMemcpyAsync(d, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice, stream);
  };
  const auto get = [&](float* src) {
    cudaMemcpyAsync(h.data(), src, h.size() * sizeof(float), cudaMemcpyDeviceToHost, stream);
    cudaStreamSynchronize(stream);
  };
  std::string err;
  // All-reduce: rank r contributes (r + 1) * i; the sum is i * size * (size + 1) / 2.
  for (size_t i = 0; i < n; ++i) h[i] = static_cast<float>((rank + 1) * i);
  put();
  if (Status s = c->AllReduceSum(d, n); !s.ok()) return s.ToString();
  get(d);
  if (Status s = c->Check(); !s.ok()) return s.ToString();
  for (size_t i = 0; i < n && err.empty(); ++i) {
    if (h[i] != static_cast<float>(i * size * (size + 1) / 2))
      err = "all-reduce at " + std::to_string(i);
  }
  // All-gather: chunk r of the output is rank r's n floats (value r * 10000 + i).
  for (size_t i = 0; i < n; ++i) h[i] = static_cast<float>(rank * 10000 + i);
  put();
  if (Status s = c->AllGather(d, e, n * sizeof(float)); !s.ok()) return s.ToString();
  get(e);
  if (Status s = c->Check(); !s.ok()) return s.ToString();
  for (int r = 0; r < size && err.empty(); ++r) {
    for (size_t i = 0; i < n; ++i) {
      if (h[r * n + i] != static_cast<float>(r * 10000 + i)) {
        err = "all-gather chunk " + std::to_string(r);
        break;
      }
    }
  }
  // All-to-all: rank r sends chunk j = r * 100 + j; it receives chunk i = i * 100 + r.
  for (int j = 0; j < size; ++j) {
    for (size_t i = 0; i < n; ++i) h[j * n + i] = static_cast<float>(rank * 100 + j);
  }
  put();
  if (Status s = c->AllToAll(d, e, n * sizeof(float)); !s.ok()) return s.ToString();
  get(e);
  if (Status s = c->Check(); !s.ok()) return s.ToString();
  for (int i = 0; i < size && err.empty(); ++i) {
    if (h[i * n] != static_cast<float>(i * 100 + rank))
      err = "all-to-all chunk " + std::to_string(i);
  }
  // Broadcast from the last rank.
  for (size_t i = 0; i < n; ++i) h[i] = static_cast<float>(rank == size - 1 ? 7 * i : -1);
  put();
  if (Status s = c->Broadcast(d, n * sizeof(float), size - 1); !s.ok()) return s.ToString();
  get(d);
  if (Status s = c->Check(); !s.ok()) return s.ToString();
  for (size_t i = 0; i < n && err.empty(); ++i) {
    if (h[i] != static_cast<float>(7 * i)) err = "broadcast at " + std::to_string(i);
  }
  if (Status s = c->Barrier(); !s.ok()) return s.ToString();
  cudaFree(d);
  cudaFree(e);
  return err;
}

class NcclCommunicatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::getenv("HELIX_NCCL_TEST_RANK") != nullptr) GTEST_SKIP() << "a spawned rank";
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  // A rendezvous store served by this process, a client of it and a stream for communicators
  // of this process (store_, stream_).
  void StartStore() {
    auto server = TcpStoreServer::Start("127.0.0.1", 0);
    ASSERT_TRUE(server.ok()) << server.status().ToString();
    server_ = std::move(*server);
    auto store = TcpStore::Connect("127.0.0.1", server_->port(), std::chrono::seconds(10));
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    store_ = std::move(*store);
    ASSERT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
  }
  std::unique_ptr<TcpStoreServer> server_;
  std::unique_ptr<TcpStore> store_;
  cudaStream_t stream_ = nullptr;
};

TEST_F(NcclCommunicatorTest, GroupOfOne) {
  ASSERT_NO_FATAL_FAILURE(StartStore());
  NcclOptions o;
  o.timeout = std::chrono::seconds(20);
  o.stream = stream_;
  auto c = CreateNcclCommunicator(store_.get(), "one", 0, 1, o);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_TRUE((*c)->device_memory());
  EXPECT_EQ(CheckCollectives(c->get(), 0, 1, stream_), "");
}

TEST_F(NcclCommunicatorTest, TwoRanksWorkOrFailClearly) {
  auto server = TcpStoreServer::Start("127.0.0.1", 0);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  const int devices = DeviceCount();
  std::vector<pid_t> pids;
  for (int r = 0; r < 2; ++r) {
    const pid_t pid = testing::SpawnSelf(
        "NcclRank.Run", {"HELIX_NCCL_TEST_RANK=" + std::to_string(r),
                         "HELIX_NCCL_TEST_PORT=" + std::to_string((*server)->port()),
                         "HELIX_NCCL_TEST_DEVICES=" + std::to_string(devices)});
    ASSERT_GT(pid, 0) << "cannot spawn rank " << r;
    pids.push_back(pid);
  }
  // Both ranks end (their NCCL timeout is 20 s) with exit 0: results right, or (one GPU) a
  // clear refusal. A hang is killed after 60 s (exit 137) and fails the test.
  for (int code : testing::Reap(pids, std::chrono::seconds(60))) {
    EXPECT_EQ(code, 0) << "rank process exit code (137: hung and killed)";
  }
}

// A group whose other rank never comes: NCCL's non-blocking init is bounded by the timeout and
// ends in DEADLINE_EXCEEDED naming the group (rank 0: the peer never connects; rank 1: the unique
// id never arrives in the store), never a hang. One process and one GPU suffice.
TEST_F(NcclCommunicatorTest, PeerThatNeverJoinsIsATimeout) {
  ASSERT_NO_FATAL_FAILURE(StartStore());
  NcclOptions o;
  o.timeout = std::chrono::seconds(3);
  o.stream = stream_;
  for (int rank : {0, 1}) {
    const std::string group = "alone" + std::to_string(rank);
    const auto t0 = std::chrono::steady_clock::now();
    auto c = CreateNcclCommunicator(store_.get(), group, rank, 2, o);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ASSERT_FALSE(c.ok()) << "rank " << rank << " of 2 joined alone";
    EXPECT_EQ(c.status().code(), StatusCode::kDeadlineExceeded) << c.status().ToString();
    EXPECT_NE(c.status().message().find(group), std::string::npos) << c.status().ToString();
    EXPECT_GE(s, 2.5) << "rank " << rank << ": gave up before its timeout";
    EXPECT_LT(s, 20.0) << "rank " << rank << ": took far longer than its 3 s timeout";
  }
}

// One rank of TwoRanksWorkOrFailClearly (runs only when spawned by it).
TEST(NcclRank, Run) {
  const char* rank_s = std::getenv("HELIX_NCCL_TEST_RANK");
  if (rank_s == nullptr) GTEST_SKIP() << "only as a rank spawned by TwoRanksWorkOrFailClearly";
  const int rank = std::atoi(rank_s);
  const int port = std::atoi(std::getenv("HELIX_NCCL_TEST_PORT"));
  const int devices = std::atoi(std::getenv("HELIX_NCCL_TEST_DEVICES"));
  const auto done = [](int code) {
    std::fflush(stdout);
    std::fflush(stderr);
    _exit(code);
  };
  auto store = TcpStore::Connect("127.0.0.1", port, std::chrono::seconds(10));
  if (!store.ok()) done(2);
  cudaSetDevice(rank % devices);
  cudaStream_t stream = nullptr;
  cudaStreamCreate(&stream);
  NcclOptions o;
  o.timeout = std::chrono::seconds(20);
  o.stream = stream;
  auto c = CreateNcclCommunicator(store->get(), "two", rank, 2, o);
  if (!c.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", rank, c.status().ToString().c_str());
    // Expected only when both ranks share the one GPU, and the message must say NCCL.
    done(devices == 1 && c.status().message().find("NCCL") != std::string::npos ? 0 : 3);
  }
  const std::string err = CheckCollectives(c->get(), rank, 2, stream);
  std::fprintf(stderr, "rank %d: collectives %s\n", rank, err.empty() ? "right" : err.c_str());
  done(err.empty() || (devices == 1 && err.find("NCCL") != std::string::npos) ? 0 : 4);
}

}  // namespace
}  // namespace helix::parallel
