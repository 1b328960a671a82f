// I/O tests: safetensors round trip and every malformed-file class, config.json in the v4 and v5 forms,
// and loading errors from Hugging Face directories.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <shardlm/shardlm.hpp>

#include <fstream>

#include "../test_util.hpp"

using namespace shardlm;
namespace fs = std::filesystem;

namespace {
/// Writes a raw safetensors file: the header text as given (its length prefixed) and `data` bytes.
fs::path raw_file(const fs::path& dir, const std::string& header, size_t data_bytes, const char* name = "x.safetensors") {
  const auto path = dir / name;
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xff));
  out << header << std::string(data_bytes, '\0');
  return path;
}
void write_text(const fs::path& path, const std::string& text) { std::ofstream(path) << text; }
std::string error_of(const fs::path& path) {
  try {
    io::SafetensorsFile f(path);
  } catch (const IoError& e) {
    return e.what();
  }
  return "no error";
}
}  // namespace

TEST_CASE("safetensors round trip keeps names, dtypes, shapes, bytes and metadata") {
  const auto dir = test::temp_dir("st");
  at::manual_seed(0);
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"a", at::randn({3, 4})}, {"b", at::randn({5}).to(at::kBFloat16)}, {"c", at::arange(6, at::kLong).view({2, 3})},
      {"scalar", at::tensor(2.5f).view({})}, {"empty", at::empty({0, 7})}, {"h", at::randn({2, 2}).to(at::kHalf)}};
  io::save_safetensors(dir / "t.safetensors", tensors, {{"note", "hi"}});
  io::SafetensorsFile f(dir / "t.safetensors");
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "hi");
  CHECK(f.tensors().size() == tensors.size());
  CHECK(f.data_start() % 8 == 0);
  for (const auto& [name, t] : tensors) {
    CAPTURE(name);
    const auto r = f.read(name);
    CHECK((r.scalar_type() == t.scalar_type()));
    CHECK((r.sizes() == t.sizes()));
    CHECK(at::equal(r, t));
  }
  CHECK_THROWS_WITH_AS(f.read("nope"), doctest::Contains("no tensor named 'nope'"), IoError);
  compat::remove_all(dir);
}

TEST_CASE("malformed safetensors files give an error naming the file and the problem") {
  const auto dir = test::temp_dir("bad");
  const std::string ok_entry = R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  struct Case {
    const char* what;
    std::string header;
    size_t data;
    const char* expect;
  };
  const Case cases[] = {
      {"non-JSON header", "{not json", 0, "not valid JSON"},
      {"non-object header", "[1,2]", 0, "must be a JSON object"},
      {"unknown dtype", R"({"w":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", 8, "unknown dtype 'F33'"},
      {"missing dtype", R"({"w":{"shape":[2],"data_offsets":[0,8]}})", 8, "missing string field 'dtype'"},
      {"negative shape", R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "non-negative integers"},
      {"reversed offsets", R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8, "reversed"},
      {"offsets past the data", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8, "past the data"},
      {"size not shape x dtype", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, "needs 12"},
      {"shape overflow", R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", 8, "overflows"},
      {"overlap", "{" + ok_entry + R"(,"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12, "overlaps"},
      {"hole", R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12, "hole of 4 bytes"},
      {"trailing bytes", "{" + ok_entry + "}", 12, "4 bytes after the last tensor"},
      {"duplicate names", "{" + ok_entry + "," + ok_entry + "}", 8, "appears twice"},
      {"bad metadata", R"({"__metadata__":{"a":1}})", 0, "is not a string"},
      {"bad data_offsets", R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8, "data_offsets must be"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    const auto path = raw_file(dir, c.header, c.data);
    const auto err = error_of(path);
    CHECK(err.find(path.string()) != std::string::npos);
    CHECK(err.find(c.expect) != std::string::npos);
    if (err.find(c.expect) == std::string::npos) MESSAGE(err);
  }
  SUBCASE("too small for the length") {
    write_text(dir / "tiny.safetensors", "abc");
    CHECK(error_of(dir / "tiny.safetensors").find("too small") != std::string::npos);
  }
  SUBCASE("header length past the end of the file (truncated)") {
    const auto path = raw_file(dir, "{" + ok_entry + "}", 8);
    REQUIRE(::truncate(path.c_str(), 20) == 0);
    CHECK(error_of(path).find("runs past the end of the file") != std::string::npos);
  }
  SUBCASE("truncated data") {
    const auto path = raw_file(dir, "{" + ok_entry + "}", 4);
    CHECK(error_of(path).find("past the data") != std::string::npos);
  }
  SUBCASE("missing file") { CHECK(error_of(dir / "absent.safetensors").find("cannot open") != std::string::npos); }
  compat::remove_all(dir);
}

namespace {
const char* v5_config = R"({"model_type":"llama","vocab_size":100,"hidden_size":32,"intermediate_size":48,
  "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,"max_position_embeddings":64,
  "tie_word_embeddings":false,"rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
  "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":16}})";
const char* v4_config = R"({"model_type":"llama","vocab_size":100,"hidden_size":32,"intermediate_size":48,
  "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,"max_position_embeddings":64,
  "tie_word_embeddings":false,"rope_theta":500000.0,"rope_scaling":{"type":"llama3","factor":8.0,
  "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":16}})";
model::ModelConfig parse(const std::string& text) { return model::config_from_json(nlohmann::json::parse(text), "config.json"); }
}  // namespace

TEST_CASE("config.json: the v4 and v5 forms give the same config") {
  const auto a = parse(v5_config), b = parse(v4_config);
  CHECK(a.rope.type == "llama3");
  CHECK(b.rope.type == "llama3");
  CHECK(a.rope.theta == b.rope.theta);
  CHECK(a.rope.factor == b.rope.factor);
  CHECK(a.rope.original_max_position_embeddings == 16);
  CHECK(b.rope.original_max_position_embeddings == 16);
  CHECK(a.head_dim == 8);
  CHECK(a.num_kv_heads == 2);
  SUBCASE("plain v4 with no rope_scaling") {
    auto j = nlohmann::json::parse(v4_config);
    j["rope_scaling"] = nullptr;
    j["rope_theta"] = 10000.0;
    const auto c = model::config_from_json(j, "config.json");
    CHECK(c.rope.type == "default");
    CHECK(c.rope.theta == 10000.0);
  }
}

TEST_CASE("config.json errors name the field") {
  auto with = [](const char* key, nlohmann::json value) {
    auto j = nlohmann::json::parse(v5_config);
    if (value.is_null()) j.erase(key); else j[key] = value;
    return j;
  };
  auto err = [](const nlohmann::json& j) {
    try {
      model::config_from_json(j, "dir/config.json");
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(err(with("hidden_size", nullptr)).find("missing field 'hidden_size'") != std::string::npos);
  CHECK(err(with("hidden_size", "big")).find("'hidden_size' has the wrong type") != std::string::npos);
  CHECK(err(with("model_type", "gpt2")).find("model_type 'gpt2'") != std::string::npos);
  CHECK(err(with("num_key_value_heads", 3)).find("not a multiple of num_key_value_heads(3)") != std::string::npos);
  auto j = nlohmann::json::parse(v5_config);
  j["rope_parameters"]["rope_type"] = "yarn";
  CHECK(err(j).find("rope type 'yarn' is not supported") != std::string::npos);
  j = nlohmann::json::parse(v5_config);
  j["rope_parameters"].erase("rope_theta");
  CHECK(err(j).find("missing field 'rope_theta'") != std::string::npos);
  CHECK(err(j).find("dir/config.json") != std::string::npos);
}

TEST_CASE("loading a Hugging Face directory: errors name the file, tensor and expectation") {
  const auto dir = test::temp_dir("hf");
  auto c = parse(v5_config);
  model::Llama3 m(c);
  model::init_weights(*m, 0.02, 0);
  std::vector<std::pair<std::string, at::Tensor>> all;
  for (const auto& item : m->named_parameters()) all.emplace_back(io::hf_name(item.key()), item.value());
  write_text(dir / "config.json", v5_config);
  auto load_err = [&] {
    try {
      io::load_hf_model<model::Llama3>(dir, at::kCPU);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  SUBCASE("complete: loads the same weights") {
    io::save_safetensors(dir / "model.safetensors", all);
    auto loaded = io::load_hf_model<model::Llama3>(dir, at::kCPU);
    const auto ids = at::randint(c.vocab_size, {1, 5}, at::kLong);
    at::NoGradGuard g;
    CHECK(at::equal(loaded->forward(ids), m->forward(ids)));
  }
  SUBCASE("no weights") { CHECK(load_err().find("no model.safetensors or model.safetensors.index.json") != std::string::npos); }
  SUBCASE("missing tensor") {
    auto some = all;
    some.erase(some.begin() + 3);
    io::save_safetensors(dir / "model.safetensors", some);
    CHECK(load_err().find("no tensor '" + all[3].first + "'") != std::string::npos);
  }
  SUBCASE("shape mismatch") {
    auto bad = all;
    bad[1].second = at::zeros({7, 7});
    io::save_safetensors(dir / "model.safetensors", bad);
    const auto e = load_err();
    CHECK(e.find("tensor '" + all[1].first + "' has shape [7, 7]") != std::string::npos);
    CHECK(e.find("model.safetensors") != std::string::npos);
  }
  SUBCASE("integer dtype") {
    auto bad = all;
    bad[0].second = at::zeros(all[0].second.sizes(), at::kInt);
    io::save_safetensors(dir / "model.safetensors", bad);
    CHECK(load_err().find("integer dtype I32") != std::string::npos);
  }
  SUBCASE("missing config.json") {
    fs::remove(dir / "config.json");
    CHECK(load_err().find("needs a config.json") != std::string::npos);
  }
  SUBCASE("index naming a file that does not hold the tensor") {
    io::save_safetensors(dir / "part.safetensors", {all[0]});
    nlohmann::json index;
    for (const auto& [name, t] : all) index["weight_map"][name] = "part.safetensors";
    write_text(dir / "model.safetensors.index.json", index.dump());
    CHECK(load_err().find("the index lists tensor") != std::string::npos);
  }
  compat::remove_all(dir);
}
