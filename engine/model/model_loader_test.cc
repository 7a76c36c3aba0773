// Loader tests over the tiny models tests/models/make_test_models.py writes (random weights,
// fixed seed) in every format: each must give the float64 reference logits, the same weights
// in different files must give identical logits, gguf-py's dequantisation is matched bit for
// bit, and broken files give clear errors.
#include "engine/model/model_loader.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "engine/backend/cpu/cpu_backend.h"
#include "engine/common/json_nesting.h"
#include "engine/model/gguf/dequant.h"
#include "engine/model/gguf/gguf_file.h"
#include "engine/model/llama_model.h"

namespace helix {
namespace {

namespace fs = std::filesystem;

std::string Dir() {
  const char* d = std::getenv("HELIX_TEST_MODELS_DIR");
  return d == nullptr ? "" : d;
}

std::string Path(const std::string& name) { return Dir() + "/" + name; }

std::string StoriesTokenizer() {
  const char* s = std::getenv("HELIX_SHARED_DIR");
  return std::string(s == nullptr ? "" : s) + "/models/stories260K/tok512.bin";
}

template <typename T>
std::vector<T> ReadRaw(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << path;
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<T> v(bytes.size() / sizeof(T));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(T));
  return v;
}

// A temporary directory, removed with its contents at the end of the scope.
class TempDir {
 public:
  explicit TempDir(const std::string& name)
      : path_(fs::temp_directory_path() / ("helix_" + name + "_" + std::to_string(getpid()))) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  const fs::path& path() const { return path_; }
  // Writes `head`, then `tail` after `hole` bytes left as a hole (no disk space; zeros to
  // read), then zeros up to `size` bytes in all, also a hole.
  std::string Write(const std::string& name, const std::string& head, uint64_t hole = 0,
                    const std::string& tail = "", uint64_t size = 0) const {
    const std::string p = (path_ / name).string();
    {
      std::ofstream out(p, std::ios::binary | std::ios::trunc);
      out << head;
      if (!tail.empty()) {
        out.seekp(static_cast<std::streamoff>(head.size() + hole));
        out << tail;
      }
    }
    const uint64_t written = head.size() + (tail.empty() ? 0 : hole + tail.size());
    if (size > written) fs::resize_file(p, size);
    return p;
  }

 private:
  fs::path path_;
};

std::string U32(uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); }
std::string U64(uint64_t v) { return std::string(reinterpret_cast<const char*>(&v), 8); }
std::string GgufHeader(uint64_t tensors, uint64_t kvs) {
  return "GGUF" + U32(3) + U64(tensors) + U64(kvs);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A copy of a Hugging Face model directory (its files linked) whose config.json has `key`'s
// value replaced by `value` (the text after "key":, up to the next , or }).
void CopyHfModelWith(const fs::path& src, const fs::path& dir, const std::string& key,
                     const std::string& value) {
  for (const auto& e : fs::directory_iterator(src)) {
    if (e.path().filename() != "config.json") {
      fs::create_symlink(e.path(), dir / e.path().filename());
    }
  }
  std::string config = ReadFile((src / "config.json").string());
  const size_t at = config.find("\"" + key + "\"");
  ASSERT_NE(at, std::string::npos) << key;
  const size_t colon = config.find(':', at);
  const size_t end = config.find_first_of(",}", colon);
  config.replace(colon + 1, end - colon - 1, " " + value);
  std::ofstream((dir / "config.json").string()) << config;
}

std::vector<int32_t> Prompt() {
  std::ifstream in(Path("prompt.txt"));
  std::vector<int32_t> ids;
  int32_t x;
  while (in >> x) ids.push_back(x);
  return ids;
}

class ModelLoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (Dir().empty() || !fs::exists(Path("prompt.txt"))) {
      GTEST_FAIL() << "HELIX_TEST_MODELS_DIR does not hold the test models; ctest runs "
                      "tests/models/make_test_models.py first (fixture test_models)";
    }
  }

  // Logits of every prompt position: [T][vocab], from one prefill pass.
  // `weights`: the matrices' dtype in memory (nullopt: as loaded, float32).
  static std::vector<float> Logits(const std::string& model, const std::string& tokenizer = "",
                                   std::optional<kernels::DType> weights = std::nullopt) {
    auto bundle = LoadModelBundle(model, tokenizer);
    EXPECT_TRUE(bundle.ok()) << bundle.status().ToString();
    if (!bundle.ok()) return {};
    if (weights) bundle->model->weights.ConvertMatricesTo(*weights);
    const ModelConfig c = bundle->model->config;
    const std::vector<int32_t> prompt = Prompt();
    const int64_t T = static_cast<int64_t>(prompt.size()), tpb = 8;
    const int64_t blocks = (T + tpb - 1) / tpb;
    kernels::KvPoolView kv{};
    kv.dtype = kernels::DType::kF32;
    kv.num_layers = c.n_layers;
    kv.num_kv_heads = c.n_kv_heads;
    kv.tokens_per_block = tpb;
    kv.head_dim = c.head_dim;
    std::vector<float> pool(static_cast<size_t>(blocks * kv.block_elems()));
    kv.base = pool.data();
    CpuBackend backend(2);
    LlamaModel m(std::move(bundle->model), &backend, kv);
    ForwardBatch b;
    b.tokens = prompt;
    b.num_seqs = 1;
    b.max_blocks = blocks;
    for (int64_t t = 0; t < T; ++t) {
      b.positions.push_back(static_cast<int32_t>(t));
      b.token_seq.push_back(0);
      b.kv_block.push_back(static_cast<int32_t>(t / tpb));
      b.kv_slot.push_back(static_cast<int32_t>(t % tpb));
      b.logits_rows.push_back(static_cast<int32_t>(t));
    }
    for (int64_t j = 0; j < blocks; ++j) {
      b.block_tables.push_back(static_cast<int32_t>(j));
      b.block_first_pos.push_back(static_cast<int32_t>(j * tpb));
    }
    b.kv_lens.push_back(static_cast<int32_t>(T));
    std::vector<float> logits;
    EXPECT_TRUE(m.Forward(b, &logits).ok());
    return logits;
  }

  // Largest |ours - ref| over the largest |ref|.
  static double RelError(const std::vector<float>& ours, const std::vector<double>& ref) {
    EXPECT_EQ(ours.size(), ref.size());
    double err = 0, scale = 0;
    for (size_t i = 0; i < std::min(ours.size(), ref.size()); ++i) {
      err = std::max(err, std::abs(static_cast<double>(ours[i]) - ref[i]));
      scale = std::max(scale, std::abs(ref[i]));
    }
    return ours.size() == ref.size() ? err / scale : 1e9;
  }
};

TEST_F(ModelLoaderTest, EveryLlamaFormatGivesTheReferenceLogits) {
  const std::vector<double> ref = ReadRaw<double>(Path("llama_logits.f64"));
  ASSERT_FALSE(ref.empty());
  const std::vector<float> bin = Logits(Path("llama.bin"), StoriesTokenizer());
  EXPECT_LT(RelError(bin, ref), 1e-5) << "llama2.c";
  // Same fp32 values, same interleaved layout: bit-identical to the llama2.c checkpoint.
  for (const char* f : {"llama_F32.gguf", "llama_F16.gguf", "llama_BF16.gguf"}) {
    EXPECT_EQ(Logits(Path(f)), bin) << f;
  }
  // Hugging Face keeps q/k in rotate-half order: same model, dot products summed in another
  // order, so close rather than identical to llama2.c; identical across HF variants.
  const std::vector<float> hf = Logits(Path("llama_hf"), StoriesTokenizer());
  EXPECT_LT(RelError(hf, ref), 1e-5) << "llama_hf";
  for (const char* d : {"llama_hf_sharded", "llama_hf_f16", "llama_hf_bf16"}) {
    EXPECT_EQ(Logits(Path(d), StoriesTokenizer()), hf) << d;
  }
}

TEST_F(ModelLoaderTest, QuantisedGgufStaysCloseToTheReference) {
  const std::vector<double> ref = ReadRaw<double>(Path("llama_logits.f64"));
  const std::vector<float> q8 = Logits(Path("llama_Q8_0.gguf"));
  const double err = RelError(q8, ref);
  EXPECT_GT(err, 0.0);  // it really is quantised
  EXPECT_LT(err, 0.05);
}

TEST_F(ModelLoaderTest, SixteenBitWeightsInMemory) {
  const std::vector<double> ref = ReadRaw<double>(Path("llama_logits.f64"));
  const std::vector<float> f32 = Logits(Path("llama_F32.gguf"));
  // The test weights are exactly representable in both 16-bit types: converting them changes
  // nothing, so the 16-bit GEMM path must give the float32 logits bit for bit.
  EXPECT_EQ(Logits(Path("llama_F32.gguf"), "", kernels::DType::kF16), f32);
  EXPECT_EQ(Logits(Path("llama_hf"), StoriesTokenizer(), kernels::DType::kBF16),
            Logits(Path("llama_hf"), StoriesTokenizer()));
  // Real rounding: the Q8_0 model's dequantised weights rounded to bf16 stay close.
  const double err = RelError(Logits(Path("llama_Q8_0.gguf"), "", kernels::DType::kBF16), ref);
  EXPECT_GT(err, 0.0);
  EXPECT_LT(err, 0.05);
  // What dtype "auto" keeps: the checkpoint's precision.
  const std::vector<std::pair<std::string, kernels::DType>> stored = {
      {"llama_F32.gguf", kernels::DType::kF32},   {"llama_F16.gguf", kernels::DType::kF16},
      {"llama_BF16.gguf", kernels::DType::kBF16}, {"llama_Q8_0.gguf", kernels::DType::kBF16},
      {"llama_hf", kernels::DType::kF32},         {"llama_hf_f16", kernels::DType::kF16},
      {"llama_hf_bf16", kernels::DType::kBF16},   {"llama.bin", kernels::DType::kF32}};
  for (const auto& [name, want] : stored) {
    auto b = LoadModelBundle(Path(name), StoriesTokenizer());
    ASSERT_TRUE(b.ok()) << name << ": " << b.status().ToString();
    EXPECT_EQ(b->model->stored_dtype, want) << name;
  }
}

TEST_F(ModelLoaderTest, Qwen2GgufAndHfGiveTheReferenceLogits) {
  const std::vector<double> ref = ReadRaw<double>(Path("qwen2_logits.f64"));
  const std::vector<float> gguf = Logits(Path("qwen2_F32.gguf"), StoriesTokenizer());
  EXPECT_LT(RelError(gguf, ref), 1e-5);
  // Neither format permutes Qwen2's q/k: the same numbers in the same order.
  EXPECT_EQ(Logits(Path("qwen2_hf"), StoriesTokenizer()), gguf);
}

TEST_F(ModelLoaderTest, DequantisationMatchesGgufPyBitForBit) {
  for (const char* type : {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}) {
    SCOPED_TRACE(type);
    auto file = gguf::GgufFile::Open(Path(std::string("quant_") + type + ".gguf"));
    ASSERT_TRUE(file.ok()) << file.status().ToString();
    const gguf::GgufTensorInfo* t = (*file)->FindTensor("w");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(gguf::GgmlTypeName(t->type), type);
    std::vector<float> ours(static_cast<size_t>(t->num_elements));
    ASSERT_TRUE(
        gguf::Dequantize(t->type, (*file)->TensorData(*t), t->num_elements, ours.data(), "w").ok());
    const std::vector<float> ref = ReadRaw<float>(Path(std::string("quant_") + type + ".f32"));
    ASSERT_EQ(ours.size(), ref.size());
    size_t mismatches = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      if (std::memcmp(&ours[i], &ref[i], sizeof(float)) != 0) ++mismatches;
    }
    EXPECT_EQ(mismatches, 0u);
  }
}

TEST_F(ModelLoaderTest, GgufEmbeddedSentencePieceVocabEncodesLikeLlama2c) {
  auto gguf = LoadModelBundle(Path("llama_F32.gguf"), "");
  ASSERT_TRUE(gguf.ok()) << gguf.status().ToString();
  EXPECT_EQ(gguf->format, ModelFormat::kGguf);
  auto l2c = LoadModelBundle(Path("llama.bin"), StoriesTokenizer());
  ASSERT_TRUE(l2c.ok()) << l2c.status().ToString();
  const Tokenizer& a = *gguf->tokenizer;
  const Tokenizer& b = *l2c->tokenizer;
  EXPECT_EQ(a.bos_id(), 1);
  EXPECT_EQ(a.eos_id(), 2);
  EXPECT_FALSE(a.chat_template().empty());
  for (const char* text :
       {"Once upon a time, there was a little girl named Lily.", "The cat sat.\nThen it ran!",
        "  two  spaces", "caf\xC3\xA9 \xE2\x82\xAC"}) {
    SCOPED_TRACE(text);
    const std::vector<int32_t> ids = a.Encode(text, true);
    EXPECT_EQ(ids, b.Encode(text, true));
    EXPECT_EQ(a.Decode(ids), b.Decode(ids));
    EXPECT_EQ(a.Decode(ids), text);
  }
}

TEST_F(ModelLoaderTest, FormatsAreDetected) {
  EXPECT_EQ(*DetectModelFormat(Path("llama.bin")), ModelFormat::kLlama2c);
  EXPECT_EQ(*DetectModelFormat(Path("llama_F32.gguf")), ModelFormat::kGguf);
  EXPECT_EQ(*DetectModelFormat(Path("llama_hf")), ModelFormat::kHuggingFace);
  EXPECT_EQ(DetectModelFormat(Path("nothing-here")).status().code(), StatusCode::kNotFound);
}

// Files damaged in ways a size check does not see: a tensor moved onto another one's bytes, a
// tensor whose type was changed under its data, a FIFO (opening it would wait forever).
TEST_F(ModelLoaderTest, TensorsThatDoNotFollowEachOtherAndNonFilesAreRefused) {
  std::ifstream in(Path("llama_F32.gguf"), std::ios::binary);
  const std::string good((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_FALSE(good.empty());
  // The tensor info after a tensor's name: u32 dims, u64 each, u32 type, u64 offset.
  const std::string name = "blk.0.attn_q.weight";
  const size_t at = good.find(name);
  ASSERT_NE(at, std::string::npos);
  uint32_t dims = 0;
  std::memcpy(&dims, good.data() + at + name.size(), 4);
  const size_t type_at = at + name.size() + 4 + 8 * dims;
  const size_t offset_at = type_at + 4;
  const fs::path dir = fs::temp_directory_path() / ("helix_gguf_" + std::to_string(getpid()));
  fs::create_directories(dir);
  auto write = [&](const std::string& file, const std::string& bytes) {
    std::ofstream((dir / file).string(), std::ios::binary) << bytes;
    return (dir / file).string();
  };
  std::string moved = good;
  std::memset(moved.data() + offset_at, 0, 8);  // onto the first tensor's bytes
  std::string retyped = good;
  const uint32_t q8_0 = 8;
  std::memcpy(retyped.data() + type_at, &q8_0, 4);
  for (const auto& [file, bytes] :
       {std::pair{"moved.gguf", moved}, std::pair{"retyped.gguf", retyped}}) {
    SCOPED_TRACE(file);
    auto b = LoadModelBundle(write(file, bytes), "");
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), StatusCode::kInvalidArgument) << b.status().ToString();
    EXPECT_NE(b.status().message().find("GGUF tensors follow each other"), std::string::npos)
        << b.status().ToString();
  }
  const std::string fifo = (dir / "model.fifo").string();
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  auto f = LoadModelBundle(fifo, StoriesTokenizer());
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(f.status().message().find("not a regular file"), std::string::npos);
  fs::remove_all(dir);
}

// A llama2.c header that describes less than the file holds (a damaged n_layers) loaded as a
// smaller, wrong model.
TEST_F(ModelLoaderTest, Llama2cHeaderMustDescribeTheWholeFile) {
  std::ifstream in(Path("llama.bin"), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 28u);
  int32_t layers = 0;
  std::memcpy(&layers, bytes.data() + 8, 4);
  ASSERT_GT(layers, 1);
  const int32_t one = 1;
  std::memcpy(bytes.data() + 8, &one, 4);
  const std::string path =
      (fs::temp_directory_path() / ("helix_l2c_" + std::to_string(getpid()) + ".bin")).string();
  std::ofstream(path, std::ios::binary) << bytes;
  auto b = LoadModelBundle(path, StoriesTokenizer());
  fs::remove(path);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), StatusCode::kInvalidArgument) << b.status().ToString();
  EXPECT_NE(b.status().message().find("header describes"), std::string::npos)
      << b.status().ToString();
}

// The router's tokenizer, read without the weights, is the one the full load gives.
TEST_F(ModelLoaderTest, TokenizerAloneMatchesTheFullLoad) {
  const std::string text = "Once upon a time, Lily saw 42 cats. \xc3\xa9t\xc3\xa9!";
  struct Case {
    std::string model, tokenizer;
  };
  std::vector<Case> cases = {{"llama.bin", StoriesTokenizer()},
                             {"llama_F32.gguf", ""},
                             {"qwen2_F32.gguf", StoriesTokenizer()},
                             {"llama_Q8_0.gguf", StoriesTokenizer()},
                             {"llama_hf", StoriesTokenizer()}};
  for (const char* hf : {"deepseek_v3_tiny"}) {
    if (fs::exists(Path(hf))) cases.push_back({hf, StoriesTokenizer()});
  }
  for (const Case& c : cases) {
    SCOPED_TRACE(c.model);
    auto full = LoadModelBundle(Path(c.model), c.tokenizer);
    ASSERT_TRUE(full.ok()) << full.status().ToString();
    auto alone = LoadModelTokenizer(Path(c.model), c.tokenizer);
    ASSERT_TRUE(alone.ok()) << alone.status().ToString();
    EXPECT_EQ((*alone)->vocab_size(), full->tokenizer->vocab_size());
    EXPECT_EQ((*alone)->Encode(text, true), full->tokenizer->Encode(text, true));
    EXPECT_EQ((*alone)->chat_template(), full->tokenizer->chat_template());
  }
  EXPECT_EQ(LoadModelTokenizer(Path("llama.bin"), "").status().code(),
            StatusCode::kInvalidArgument);
}

// Header values that pass as doubles but not as the floats they are stored in.
TEST_F(ModelLoaderTest, RopeThetaAndNormEpsMustBeFinitePositiveFloats) {
  auto b = LoadModelBundle(Path("llama.bin"), StoriesTokenizer());
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  ModelConfig c = b->model->config;
  ASSERT_TRUE(c.Validate().ok());
  c.rope_theta = static_cast<float>(1e300);  // inf
  EXPECT_NE(c.Validate().message().find("rope_theta"), std::string::npos);
  c = b->model->config;
  c.norm_eps = static_cast<float>(1e-50);  // 0
  EXPECT_NE(c.Validate().message().find("norm_eps"), std::string::npos);
}

// A DeepSeek config.json promising far more experts than its checkpoint holds is refused before
// the loader lists the tensors it wants (4096 layers of 4096 experts asked for gigabytes).
TEST_F(ModelLoaderTest, ConfigWithMoreExpertsThanTheCheckpointIsRefused) {
  const fs::path src = Path("deepseek_v2_tiny");
  if (!fs::exists(src / "config.json")) GTEST_SKIP() << "no " << src;
  const fs::path dir = fs::temp_directory_path() / ("helix_moe_" + std::to_string(getpid()));
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(src)) {
    if (e.path().filename() != "config.json")
      fs::create_symlink(e.path(), dir / e.path().filename());
  }
  std::ifstream in(src / "config.json");
  std::string config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto set = [&](const std::string& key, const std::string& value) {
    const size_t at = config.find("\"" + key + "\"");
    ASSERT_NE(at, std::string::npos) << key;
    const size_t colon = config.find(':', at);
    const size_t end = config.find_first_of(",}", colon);
    config.replace(colon + 1, end - colon - 1, " " + value);
  };
  set("num_hidden_layers", "4096");
  set("n_routed_experts", "4096");
  set("first_k_dense_replace", "0");
  set("n_group", "1");
  set("topk_group", "1");
  std::ofstream((dir / "config.json").string()) << config;
  auto b = LoadModelBundle(dir.string(), StoriesTokenizer());
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), StatusCode::kInvalidArgument) << b.status().ToString();
  EXPECT_NE(b.status().message().find("expert tensors"), std::string::npos)
      << b.status().ToString();
  fs::remove_all(dir);
}

// A model larger than the machine's memory is refused before anything is allocated, naming
// what it needs and what there is (it aborted on std::bad_alloc, or was OOM-killed).
TEST(HostMemoryTest, ModelsLargerThanTheMachineAreRefused) {
  EXPECT_TRUE(CheckHostMemoryFor(1 << 20, "m", 2 << 20).ok());
  const Status s = CheckHostMemoryFor(uint64_t{3} << 30, "model 'big.gguf'", uint64_t{1} << 30);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("model 'big.gguf' needs 3 GiB"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("only 1 GiB is available"), std::string::npos) << s.ToString();
  // This machine: nothing holds 2^60 bytes; the tests' models fit.
  EXPECT_EQ(CheckHostMemoryFor(uint64_t{1} << 60, "m").code(), StatusCode::kResourceExhausted);
  EXPECT_TRUE(CheckHostMemoryFor(1 << 20, "m").ok());
}

// Counts in a GGUF header drove allocations before anything checked them: a table of millions
// of all-zero metadata entries (a sparse file) took seconds and gigabytes before "appears
// twice", a tensor count reserved its entries up front, and each aborted on std::bad_alloc when
// large enough. Counts past any real file are refused at once; duplicates at their second entry.
TEST_F(ModelLoaderTest, GgufCountsAreBoundedBeforeAllocating) {
  TempDir dir("gguf_counts");
  const uint64_t kMax = uint64_t{1} << 20;
  struct Case {
    std::string name;
    uint64_t tensors, kvs, size;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"kvs.gguf", 0, kMax + 1, 24 + 13 * (kMax + 1),
       "metadata key/value count 1048577 is implausible (at most 1048576 are supported)"},
      {"tensors.gguf", kMax + 1, 0, 24 + 32 * (kMax + 1),
       "tensor count 1048577 is implausible (at most 1048576 are supported)"},
      // A million all-zero entries (empty key, UINT8 0): found at the second.
      {"zero_kvs.gguf", 0, kMax, 24 + 13 * kMax,
       "metadata key '' appears twice (metadata entry 1 and metadata entry 0)"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = dir.Write(c.name, GgufHeader(c.tensors, c.kvs), 0, "", c.size);
    for (int router = 0; router < 2; ++router) {
      const Status s =
          router ? LoadModelTokenizer(path, "").status() : LoadModelBundle(path, "").status();
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
      EXPECT_NE(s.message().find(c.says), std::string::npos) << s.ToString();
      EXPECT_NE(s.message().find(path), std::string::npos) << s.ToString();
    }
  }
  // A key's bytes are quoted with control characters escaped.
  const std::string entry = U64(3) + std::string("a\0b", 3) + U32(0) + std::string(1, '\0');
  const Status dup =
      LoadModelBundle(dir.Write("dup.gguf", GgufHeader(0, 2) + entry + entry), "").status();
  EXPECT_EQ(dup.code(), StatusCode::kInvalidArgument) << dup.ToString();
  EXPECT_NE(dup.message().find("metadata key 'a\\x00b' appears twice (metadata entry 1"),
            std::string::npos)
      << dup.ToString();
}

// The process's peak resident memory (VmHWM) is reset to its current size; false where the
// kernel does not allow it.
bool ResetPeakMemory() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  f.flush();
  return f.good();
}
// A field of /proc/self/status in kB (VmRSS, VmHWM), 0 when absent.
uint64_t ProcStatusKb(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoull(line.substr(field.size() + 1));
  }
  return 0;
}

// The vocabulary's arrays were materialised from counts in the file: a UINT8 token_type array
// claiming 4e9 elements (a sparse file) allocated 32 GB of int64 before its count was compared
// with the token count. Arrays past any vocabulary are refused when the file is opened, and a
// per-token array's count is compared before it is read.
TEST_F(ModelLoaderTest, GgufVocabArraysAreCheckedBeforeTheyAreRead) {
  const std::string good = ReadFile(Path("llama_F32.gguf"));
  const std::string key = "tokenizer.ggml.token_type";
  const size_t at = good.find(key);
  ASSERT_NE(at, std::string::npos);
  // After the key: u32 ARRAY, u32 element type, u64 count, the elements.
  const size_t header = at + key.size() + 4;
  uint32_t elem = 0;
  uint64_t n = 0;
  std::memcpy(&elem, good.data() + header, 4);
  std::memcpy(&n, good.data() + header + 4, 8);
  ASSERT_EQ(elem, 5u);  // INT32
  ASSERT_EQ(n, 512u);
  TempDir dir("gguf_vocab");
  // `claimed` UINT8 elements (a hole) in place of the n INT32 ones. The header grows by a
  // multiple of the alignment (32), so the tensors after it stay where their offsets say.
  auto with_token_types = [&](const std::string& name, uint64_t claimed) {
    EXPECT_EQ((claimed - 4 * n) % 32, 0u);
    const std::string path = dir.Write(name, good.substr(0, header) + U32(0) + U64(claimed),
                                       claimed, good.substr(header + 12 + 4 * n));
    struct stat st {};
    EXPECT_EQ(stat(path.c_str(), &st), 0);
    return static_cast<uint64_t>(st.st_blocks) * 512 > (uint64_t{64} << 20) ? "" : path;
  };
  const std::string huge = with_token_types("huge.gguf", 4 * n + 4'000'000'000ull);
  if (huge.empty()) GTEST_SKIP() << "the temporary directory's file system does not keep holes";
  const std::string big = with_token_types("big.gguf", uint64_t{1} << 24);
  const std::pair<std::string, std::string> cases[] = {
      {huge,
       "metadata value of 'tokenizer.ggml.token_type' holds 4000002048 elements (at most "
       "16777216 are supported)"},
      {big,
       "GGUF key 'tokenizer.ggml.token_type' has 16777216 entries but tokenizer.ggml.tokens "
       "has 512"}};
  for (const auto& [path, says] : cases) {
    SCOPED_TRACE(path);
    const bool measure = ResetPeakMemory();
    const uint64_t before_kb = ProcStatusKb("VmRSS");
    const Status full = LoadModelBundle(path, "").status();
    EXPECT_EQ(full.code(), StatusCode::kInvalidArgument) << full.ToString();
    EXPECT_NE(full.message().find(says), std::string::npos) << full.ToString();
    const Status alone = LoadModelTokenizer(path, "").status();
    EXPECT_EQ(alone.code(), StatusCode::kInvalidArgument) << alone.ToString();
    EXPECT_NE(alone.message().find(says), std::string::npos) << alone.ToString();
    // Read as int64, the 2^24 elements took 128 MiB.
    if (measure) {
      EXPECT_LT(ProcStatusKb("VmHWM"), before_kb + (64 << 10));
    }
  }

  auto file = gguf::GgufFile::Open(Path("llama_F32.gguf"));
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  EXPECT_EQ((*file)->GetIntArray(key, 512).status().code(), StatusCode::kOk);
  const Status bounded = (*file)->GetIntArray(key, 511).status();
  EXPECT_EQ(bounded.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bounded.message().find("'tokenizer.ggml.token_type' holds 512 elements, more than "
                                   "the 511 expected"),
            std::string::npos)
      << bounded.ToString();
  EXPECT_EQ((*file)->GetStringArray("tokenizer.ggml.tokens", 100).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ((*file)->GetFloatArray("tokenizer.ggml.scores", 100).status().code(),
            StatusCode::kInvalidArgument);
}

// nlohmann::json spends about 22 bytes of memory per byte of "[],[],..." and aborts when an
// allocation fails inside the parser: the number of values is bounded before parsing.
TEST_F(ModelLoaderTest, JsonWithTooManyValuesIsRefusedBeforeParsing) {
  TempDir dir("json_values");
  std::string many = "[";
  many.reserve(3 * (kMaxJsonFileValues + 1));
  for (uint64_t i = 0; i < kMaxJsonFileValues; ++i) many += "[],";
  many += "[]]";  // kMaxJsonFileValues + 1 arrays in the outer one
  const std::string says = "JSON holds more than 8388608 values";
  // A safetensors header (the format allows 100 MB).
  const fs::path model = dir.path() / "model";
  fs::create_directories(model);
  fs::copy(Path("llama_hf/config.json"), model / "config.json");
  const std::string header = R"({"__metadata__": )" + many + "}";
  std::ofstream((model / "model.safetensors").string(), std::ios::binary)
      << U64(header.size()) << header;
  const Status st = LoadModelBundle(model.string(), StoriesTokenizer()).status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString().substr(0, 500);
  EXPECT_NE(st.message().find("model.safetensors: safetensors header: " + says), std::string::npos)
      << st.ToString().substr(0, 500);
  // A tokenizer.json.
  const std::string tok = dir.Write(
      "tokenizer.json", R"({"model": {"type": "BPE", "vocab": {}, "merges": )" + many + "}}");
  const Status tj = LoadModelBundle(Path("llama_F32.gguf"), tok).status();
  EXPECT_EQ(tj.code(), StatusCode::kInvalidArgument) << tj.ToString().substr(0, 500);
  EXPECT_NE(tj.message().find(tok + ": " + says), std::string::npos)
      << tj.ToString().substr(0, 500);
  // A config.json.
  fs::remove(model / "config.json");
  std::ofstream((model / "config.json").string()) << many;
  const Status cj = LoadModelBundle(model.string(), StoriesTokenizer()).status();
  EXPECT_EQ(cj.code(), StatusCode::kInvalidArgument) << cj.ToString().substr(0, 500);
  EXPECT_NE(cj.message().find("config.json: " + says), std::string::npos)
      << cj.ToString().substr(0, 500);
}

// A RoPE base of 1 divided by log(1) = 0 in DeepSeek's yarn correction: NaN tables, and every
// request failed later with "every logit is NaN". Overflowing yarn parameters did the same.
TEST_F(ModelLoaderTest, RopeBaseOfOneAndOverflowingYarnAreRefused) {
  const fs::path src = Path("deepseek_v2_tiny");
  if (!fs::exists(src / "config.json")) GTEST_SKIP() << "no " << src;
  struct Case {
    std::string key, value, says;
  };
  const std::vector<Case> cases = {
      {"rope_theta", "1", "field 'rope_theta' = 1: expected a finite value above 1"},
      {"rope_theta", "0.5", "field 'rope_theta' = 0.5: expected a finite value above 1"},
      {"mscale", "1e300", "yarn: mscale = 1e+300: expected a value from 0 to 65536"},
      {"mscale_all_dim", "1e300",
       "yarn: mscale_all_dim = 1e+300: expected a value from 0 to 65536"},
      {"factor", "1e300", "yarn: factor = 1e+300: expected a value from 0 to 65536"},
      {"beta_fast", "1e300", "yarn: beta_fast = 1e+300"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.key + " " + c.value);
    TempDir dir("yarn");
    CopyHfModelWith(src, dir.path(), c.key, c.value);
    const Status s = LoadModelBundle(dir.path().string(), StoriesTokenizer()).status();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find(c.says), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("config.json"), std::string::npos) << s.ToString();
  }
  // The config itself, for every loader: a base of 1 or less, and tables that overflow.
  auto b = LoadModelBundle(src.string(), StoriesTokenizer());
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  const ModelConfig good = b->model->config;
  ASSERT_TRUE(good.yarn.enabled);
  ASSERT_TRUE(good.Validate().ok());
  for (float theta : {1.0f, 0.5f, -2.0f}) {
    ModelConfig c = good;
    c.rope_theta = theta;
    EXPECT_NE(c.Validate().message().find("rope_theta"), std::string::npos) << theta;
  }
  ModelConfig nan = good;
  nan.yarn.mscale = std::nan("");
  EXPECT_NE(nan.Validate().message().find("mscale = nan"), std::string::npos)
      << nan.Validate().ToString();
  // Each in range, together overflowing: the tables themselves are checked.
  ModelConfig c = good;
  c.yarn.beta_fast = 1e-310;  // positive; max_pos / (beta_fast * 2 pi) is inf
  EXPECT_NE(c.Validate().message().find("RoPE tables are not finite"), std::string::npos)
      << c.Validate().ToString();
}

// Messages name the file the problem is in and the value it holds.
TEST_F(ModelLoaderTest, ErrorsNameTheFileAndTheValue) {
  TempDir dir("messages");
  // The vocabulary's own errors (CreateTokenizer) through --tokenizer: whose vocabulary.
  const std::string tok = dir.Write("tokenizer.json", R"({
    "pre_tokenizer": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["ab"]}})");
  const Status t = LoadModelBundle(Path("llama_F32.gguf"), tok).status();
  EXPECT_EQ(t.code(), StatusCode::kInvalidArgument) << t.ToString();
  EXPECT_NE(t.message().find("tokenizer '" + tok + "': VocabData.merges[0] \"ab\""),
            std::string::npos)
      << t.ToString();
  // An unsigned value past INT64_MAX is reported as itself, not as -1.
  {
    const fs::path hf = dir.path() / "hf";
    fs::create_directories(hf);
    CopyHfModelWith(Path("llama_hf"), hf, "hidden_size", "18446744073709551615");
    const Status s = LoadModelBundle(hf.string(), StoriesTokenizer()).status();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find("field 'hidden_size' = 18446744073709551615 is out of range"),
              std::string::npos)
        << s.ToString();
  }
  // A llama2.c dim that n_heads does not divide is named as such (was "head_dim = 0").
  {
    std::string bytes = ReadFile(Path("llama.bin"));
    int32_t heads = 0;
    std::memcpy(&heads, bytes.data() + 12, 4);
    ASSERT_GT(heads, 1);
    const int32_t dim = heads - 1;
    std::memcpy(bytes.data(), &dim, 4);
    const Status s =
        LoadModelBundle(dir.Write("small_dim.bin", bytes), StoriesTokenizer()).status();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find("dim " + std::to_string(dim) + " is not a multiple of n_heads " +
                               std::to_string(heads)),
              std::string::npos)
        << s.ToString();
  }
}

TEST_F(ModelLoaderTest, BrokenOrUnsupportedFilesGiveClearErrors) {
  struct Case {
    std::string model, tokenizer;
    StatusCode code;
    std::string says;  // a piece the message must contain
  };
  const std::vector<Case> cases = {
      {"truncated.gguf", "", StatusCode::kDataLoss, "truncated.gguf"},
      {"header_only.gguf", "", StatusCode::kInvalidArgument, "for a file of 40 bytes"},
      {"unsupported_type.gguf", "", StatusCode::kUnimplemented, "Q5_0"},
      {"unsupported_arch.gguf", "", StatusCode::kUnimplemented, "gptneox"},
      {"hf_truncated", StoriesTokenizer(), StatusCode::kDataLoss, "model.safetensors"},
      {"hf_bad_arch", StoriesTokenizer(), StatusCode::kUnimplemented, "GPTNeoXForCausalLM"},
      {"llama.bin", "", StatusCode::kInvalidArgument, "needs a tokenizer"},
      {"llama_hf", "", StatusCode::kInvalidArgument, "carries no tokenizer"},
      {"llama_F32.gguf", Path("no-such-tokenizer.json"), StatusCode::kNotFound,
       "no-such-tokenizer.json"},
      {"prompt.txt", StoriesTokenizer(), StatusCode::kInvalidArgument, "prompt.txt"},
      // Headers that describe less than the file: a tensor count one short used to read every
      // tensor 32 bytes early; a layer count one short dropped the last layer; a config that
      // unties the output projection without its tensor loaded it tied.
      {"short_count.gguf", "", StatusCode::kInvalidArgument, "tensor count"},
      {"fewer_layers.gguf", "", StatusCode::kInvalidArgument, "llama.block_count is 1"},
      {"hf_fewer_layers", StoriesTokenizer(), StatusCode::kInvalidArgument,
       "'model.layers.1.input_layernorm.weight' belongs to layer 1"},
      {"hf_no_lm_head", StoriesTokenizer(), StatusCode::kInvalidArgument,
       "'lm_head.weight' is missing"},
      // The embedded vocabulary's errors say whose vocabulary it is.
      {"bad_bos.gguf", "", StatusCode::kInvalidArgument,
       "bad_bos.gguf': its tokenizer (the GGUF tokenizer.ggml.* keys): VocabData.bos_id is "
       "100000"},
      // Files given by mistake are named as what they are, not read as llama2.c checkpoints.
      {"llama_hf/model.safetensors", StoriesTokenizer(), StatusCode::kInvalidArgument,
       "is a safetensors file"},
      {"llama_hf/config.json", StoriesTokenizer(), StatusCode::kInvalidArgument, "is a JSON file"},
      {"llama.bin", Path("llama_F32.gguf"), StatusCode::kInvalidArgument, "is a GGUF model file"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.model);
    auto b = LoadModelBundle(Path(c.model), c.tokenizer);
    if (b.ok()) {
      ADD_FAILURE() << "loaded";
      continue;
    }
    EXPECT_EQ(b.status().code(), c.code) << b.status().ToString();
    EXPECT_NE(b.status().message().find(c.says), std::string::npos) << b.status().ToString();
  }
}

}  // namespace
}  // namespace helix
