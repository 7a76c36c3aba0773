// Does a puller that dies during its first UCX handshake abort the exporter? Measures the crash
// that docs/architecture.md ("Known problems") describes, for the two ways a puller can reach an
// exporter:
//   address   the exporter's worker address (what the KV hand-off used before 2026-11-28);
//   listener  a ucp_listener on the exporter (client-server endpoints; the hand-off now).
// One exporter process maps 1 MiB and serves; N puller processes each create an endpoint, post
// one 4 KiB get and exit after a random 0-3 ms of progress (as if killed). Every exporter that
// dies is counted (its first log line printed) and a new one started.
//   ucx_peer_death [--mode address|listener] [--pullers N]
// Prints "mode M: K exporter aborts in N pullers". Set UCX_TLS=tcp,self UCX_NET_DEVICES=lo for
// the loopback setting of the tests (the default here when unset).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "engine/common/hex.h"

extern char** environ;

namespace {

ucp_context_h g_ctx = nullptr;
ucp_worker_h g_worker = nullptr;

bool InitUcx() {
  ucp_params_t p{};
  p.field_mask = UCP_PARAM_FIELD_FEATURES;
  p.features = UCP_FEATURE_RMA;
  if (ucp_init(&p, nullptr, &g_ctx) != UCS_OK) return false;
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  return ucp_worker_create(g_ctx, &wp, &g_worker) == UCS_OK;
}

void IgnorePeerError(void*, ucp_ep_h, ucs_status_t) {}

void Accept(ucp_conn_request_h req, void*) {
  ucp_ep_params_t e{};
  e.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                 UCP_EP_PARAM_FIELD_ERR_HANDLER;
  e.conn_request = req;
  e.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  e.err_handler.cb = &IgnorePeerError;
  ucp_ep_h ep;
  (void)ucp_ep_create(g_worker, &e, &ep);  // kept (a few hundred at most in a run)
}

// Writes "address-hex rkey-hex base listener-port" to `info` (renamed into place), then serves.
int Exporter(const std::string& info) {
  if (!InitUcx()) return 2;
  static std::vector<char> mem(1 << 20, 7);
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  mp.address = mem.data();
  mp.length = mem.size();
  ucp_mem_h memh;
  if (ucp_mem_map(g_ctx, &mp, &memh) != UCS_OK) return 3;
  void* rkey;
  size_t rkey_len;
  if (ucp_rkey_pack(g_ctx, memh, &rkey, &rkey_len) != UCS_OK) return 3;
  ucp_address_t* addr;
  size_t addr_len;
  if (ucp_worker_get_address(g_worker, &addr, &addr_len) != UCS_OK) return 3;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
  lp.sockaddr.addrlen = sizeof(sa);
  lp.conn_handler.cb = &Accept;
  ucp_listener_h listener;
  if (ucp_listener_create(g_worker, &lp, &listener) != UCS_OK) return 4;
  ucp_listener_attr_t la{};
  la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  if (ucp_listener_query(listener, &la) != UCS_OK) return 4;
  const int port = ntohs(reinterpret_cast<const sockaddr_in*>(&la.sockaddr)->sin_port);
  {
    std::ofstream f(info + ".tmp");
    f << helix::HexEncode(addr, addr_len) << "\n"
      << helix::HexEncode(rkey, rkey_len) << "\n"
      << reinterpret_cast<uintptr_t>(mem.data()) << "\n"
      << port << "\n";
  }
  if (std::rename((info + ".tmp").c_str(), info.c_str()) != 0) return 5;
  for (;;) ucp_worker_progress(g_worker);
}

// Connects, posts one get, progresses for `us` microseconds and exits without any goodbye.
int Puller(const std::string& mode, const std::string& info, int us) {
  std::ifstream f(info);
  std::string addr_hex, rkey_hex;
  uintptr_t base = 0;
  int port = 0;
  if (!(f >> addr_hex >> rkey_hex >> base >> port)) return 2;
  const std::string addr = helix::HexDecode(addr_hex), rkey_bytes = helix::HexDecode(rkey_hex);
  if (!InitUcx()) return 2;
  ucp_ep_params_t e{};
  e.field_mask = UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  e.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  e.err_handler.cb = &IgnorePeerError;
  sockaddr_in sa{};
  if (mode == "address") {
    e.field_mask |= UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
    e.address = reinterpret_cast<const ucp_address_t*>(addr.data());
  } else {
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = htons(static_cast<uint16_t>(port));
    e.field_mask |= UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_FLAGS;
    e.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    e.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
    e.sockaddr.addrlen = sizeof(sa);
  }
  ucp_ep_h ep;
  if (ucp_ep_create(g_worker, &e, &ep) != UCS_OK) return 3;
  ucp_rkey_h rkey;
  if (ucp_ep_rkey_unpack(ep, rkey_bytes.data(), &rkey) != UCS_OK) return 4;
  static char buf[4096];
  ucp_request_param_t prm{};
  (void)ucp_get_nbx(ep, buf, sizeof(buf), base, rkey, &prm);
  const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  while (std::chrono::steady_clock::now() < end) ucp_worker_progress(g_worker);
  _exit(0);
}

pid_t Spawn(std::vector<std::string> args, const std::string& log) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  if (posix_spawn(&pid, "/proc/self/exe", &fa, nullptr, argv.data(), environ) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

pid_t StartExporter(const std::string& info, const std::string& log) {
  std::remove(info.c_str());
  const pid_t pid = Spawn({"ucx_peer_death", "exporter", info}, log);
  for (int i = 0; i < 1000 && pid > 0; ++i) {  // up to 10 s for the info file
    if (std::ifstream(info).good()) return pid;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (pid > 0) kill(pid, SIGKILL);
  return -1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "exporter") return Exporter(argv[2]);
  if (argc >= 5 && std::string(argv[1]) == "puller") {
    return Puller(argv[2], argv[3], std::atoi(argv[4]));
  }
  std::string mode = "address";
  int pullers = 200;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--mode") mode = argv[i + 1];
    if (a == "--pullers") pullers = std::atoi(argv[i + 1]);
  }
  if (mode != "address" && mode != "listener") {
    std::fprintf(stderr, "ucx_peer_death: --mode is address or listener, not '%s'\n", mode.c_str());
    return 2;
  }
  setenv("UCX_TLS", "tcp,self", 0);
  setenv("UCX_NET_DEVICES", "lo", 0);
  const std::string dir = "/tmp/ucx_peer_death_" + std::to_string(getpid());
  const std::string info = dir + ".info", log = dir + ".exporter.log";
  pid_t exporter = StartExporter(info, log);
  if (exporter < 0) {
    std::fprintf(stderr, "ucx_peer_death: the exporter did not start (%s)\n", log.c_str());
    return 1;
  }
  std::mt19937 rng(1);
  int aborts = 0;
  for (int i = 0; i < pullers; ++i) {
    const pid_t p = Spawn({"ucx_peer_death", "puller", mode, info,
                           std::to_string(std::uniform_int_distribution<int>(0, 2999)(rng))},
                          "/dev/null");
    if (p > 0) waitpid(p, nullptr, 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the exporter notices
    int st = 0;
    if (waitpid(exporter, &st, WNOHANG) == exporter) {
      ++aborts;
      std::ifstream f(log);
      std::string line;
      while (std::getline(f, line) && line.find("Assertion") == std::string::npos) {
      }
      std::printf("exporter died (%s): %s\n", WIFSIGNALED(st) ? strsignal(WTERMSIG(st)) : "exit",
                  line.substr(0, 160).c_str());
      exporter = StartExporter(info, log);
      if (exporter < 0) return 1;
    }
  }
  kill(exporter, SIGKILL);
  waitpid(exporter, nullptr, 0);
  std::remove(info.c_str());
  std::remove(log.c_str());
  std::printf("mode %s: %d exporter aborts in %d pullers\n", mode.c_str(), aborts, pullers);
  return 0;
}
