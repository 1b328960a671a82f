// I/O tests: safetensors round trip and every malformed-file class, config.json in the v4 and v5 forms,
// and loading errors from Hugging Face directories.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <shardlm/shardlm.hpp>

#include <fstream>
#include <functional>
#include <sstream>

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
  CHECK(err(with("hidden_size", "big")).find("field 'hidden_size' must be an integer in 1..1048576, got \"big\"") != std::string::npos);
  CHECK(err(with("model_type", "gpt2")).find("model_type 'gpt2'") != std::string::npos);
  CHECK(err(with("num_key_value_heads", 3)).find("not a multiple of num_key_value_heads(3)") != std::string::npos);
  auto j = nlohmann::json::parse(v5_config);
  j["rope_parameters"]["rope_type"] = "yarn";
  CHECK(err(j).find("rope type 'yarn' is not supported") != std::string::npos);
  j = nlohmann::json::parse(v5_config);
  j["rope_parameters"].erase("rope_theta");
  CHECK(err(j).find("missing field 'rope_parameters.rope_theta'") != std::string::npos);
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

TEST_CASE("header length: over the cap, or past the end of the file") {
  unsigned char len[8] = {};
  const uint64_t over = io::max_safetensors_header_bytes + 8;
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>((over >> (8 * i)) & 0xff);
  CHECK_THROWS_WITH_AS(io::safetensors_header_length(len, over + 100, "f.safetensors"),
                       doctest::Contains("f.safetensors: header length 104857608 is over the limit"), IoError);
  CHECK_THROWS_WITH_AS(io::safetensors_header_length(len, 1000, "f.safetensors"),
                       doctest::Contains("runs past the end of the file (1000 bytes)"), IoError);
  // The in-memory form (what the fuzzer drives) refuses the same files.
  const std::string text = io::detail::header_length_bytes(4) + "{}  ";
  CHECK(io::parse_safetensors(text.data(), text.size(), "m").tensors.empty());
  CHECK_THROWS_WITH_AS(io::parse_safetensors(text.data(), 9, "m"), doctest::Contains("runs past the end"), IoError);
}

TEST_CASE("reading slices: byte ranges of tensors, converted to the destination dtype, on several threads") {
  const auto dir = test::temp_dir("slices");
  at::manual_seed(3);
  const auto a = at::randn({37, 29}).to(at::kBFloat16), b = at::randn({1000}), h = at::randn({5, 7}).to(at::kHalf);
  io::save_safetensors(dir / "model.safetensors", {{"model.a", a}, {"model.b", b}, {"model.h", h}});
  io::HfCheckpoint ckpt(dir);
  auto flat = [](const at::Tensor& t) { return t.reshape(-1); };
  struct Case {
    int threads;
    uint64_t chunk;
  };
  for (const auto c : {Case{1, 64ull << 20}, Case{3, 64}, Case{8, 6}, Case{2, 1}}) {
    CAPTURE(c.threads);
    CAPTURE(c.chunk);
    auto da = at::full({517}, -1.0f), db = at::full({400}, -1.0f), dh = at::full({35}, -1.0, at::kDouble);
    auto db_same = at::full({3}, -1.0f);  // file dtype on the host: read in place
    std::vector<io::TensorSlice> slices = {{"model.a", {37, 29}, 123, 517, da},
                                           {"model.b", {1000}, 600, 400, db},
                                           {"model.h", {5, 7}, 0, 35, dh},
                                           {"model.b", {1000}, 0, 3, db_same},
                                           {"model.a", {37, 29}, 5, 0, at::empty({0})}};
    std::ostringstream log;
    Progress progress("reading", io::check_slices(ckpt, slices), true, 0, &log);
    CHECK(io::check_slices(ckpt, slices) == 517 * 2 + 400 * 4 + 35 * 2 + 3 * 4);
    io::read_slices(ckpt, slices, {c.threads, c.chunk}, &progress);
    CHECK(progress.done() == io::check_slices(ckpt, slices));
    CHECK(at::equal(da, flat(a).narrow(0, 123, 517).to(at::kFloat)));
    CHECK(at::equal(db, flat(b).narrow(0, 600, 400)));
    CHECK(at::equal(dh, flat(h).to(at::kDouble)));
    CHECK(at::equal(db_same, flat(b).narrow(0, 0, 3)));
  }
  SUBCASE("errors name the file and tensor") {
    std::vector<io::TensorSlice> wrong_shape = {{"model.a", {29, 37}, 0, 1, at::empty({1})}};
    CHECK_THROWS_WITH_AS(io::read_slices(ckpt, wrong_shape),
                         doctest::Contains("model.safetensors: tensor 'model.a' has shape [37, 29] but the config needs [29, 37]"),
                         IoError);
    std::vector<io::TensorSlice> missing = {{"model.z", {1}, 0, 1, at::empty({1})}};
    CHECK_THROWS_WITH_AS(io::read_slices(ckpt, missing), doctest::Contains("has no tensor 'model.z'"), IoError);
  }
  SUBCASE("a file truncated after validation: the read error reaches the caller from a worker thread") {
    REQUIRE(::truncate((dir / "model.safetensors").c_str(), static_cast<off_t>(fs::file_size(dir / "model.safetensors") - 100)) == 0);
    auto dst = at::empty({35}, at::kHalf);
    std::vector<io::TensorSlice> tail = {{"model.h", {5, 7}, 0, 35, dst}};
    CHECK_THROWS_WITH_AS(io::read_slices(ckpt, tail, {4, 8}), doctest::Contains("truncated"), IoError);
  }
  compat::remove_all(dir);
}

TEST_CASE("progress: a line per 10% off a terminal, a bar on one") {
  std::ostringstream lines, bar;
  {
    Progress p("loading", 1000, true, 0, &lines);
    for (int i = 0; i < 40; ++i) p.add(25);
    p.finish();
  }
  const auto text = lines.str();
  for (int pct = 10; pct < 100; pct += 10) CHECK(text.find("loading: " + std::to_string(pct) + "% (") != std::string::npos);
  CHECK(std::count(text.begin(), text.end(), '\n') == 10);  // 10% .. 90%, then the summary
  CHECK(text.find("loading: 0.001 MB in") != std::string::npos);  // 1000 bytes
  CHECK(text.find("GB/s, ETA") != std::string::npos);
  Progress q("exporting", 100, true, 1, &bar);
  q.add(100);
  q.finish();
  CHECK(bar.str().find("\rshardlm: exporting [##############################] 0.00 of 0.00 MB, ") != std::string::npos);
  Progress big("loading", 3000000000, true, 1, &bar);
  big.add(1500000000);
  CHECK(bar.str().find("[###############...............] 1.50 of 3.00 GB, ") != std::string::npos);
  std::ostringstream quiet;
  Progress off("loading", 100, false, 0, &quiet);
  off.add(100);
  off.finish();
  CHECK(quiet.str().empty());
}

TEST_CASE("config_to_json: read back, it gives the config it was made from") {
  auto plain = nlohmann::json::parse(v4_config);  // default rope, biases, tied, another init scale
  plain["rope_scaling"] = nullptr, plain["attention_bias"] = true, plain["mlp_bias"] = true;
  plain["tie_word_embeddings"] = true, plain["initializer_range"] = 0.01;
  for (const auto& c : {model::preset("llama3-debug"), parse(v4_config), parse(v5_config), parse(plain.dump())}) {
    CAPTURE(c.rope.type);
    const auto j = model::config_to_json(c, "bfloat16");
    CHECK(j["dtype"] == "bfloat16");
    const auto back = model::config_from_json(nlohmann::json::parse(j.dump()), "config.json");
    CHECK(back.vocab_size == c.vocab_size);
    CHECK(back.hidden_size == c.hidden_size);
    CHECK(back.intermediate_size == c.intermediate_size);
    CHECK(back.num_layers == c.num_layers);
    CHECK(back.num_heads == c.num_heads);
    CHECK(back.num_kv_heads == c.num_kv_heads);
    CHECK(back.head_dim == c.head_dim);
    CHECK(back.max_position_embeddings == c.max_position_embeddings);
    CHECK(back.rms_norm_eps == c.rms_norm_eps);
    CHECK(back.initializer_range == c.initializer_range);
    CHECK(back.tie_word_embeddings == c.tie_word_embeddings);
    CHECK(back.attention_bias == c.attention_bias);
    CHECK(back.mlp_bias == c.mlp_bias);
    CHECK(back.rope.type == c.rope.type);
    CHECK(back.rope.theta == c.rope.theta);
    CHECK(back.rope.factor == c.rope.factor);
    CHECK(back.rope.low_freq_factor == c.rope.low_freq_factor);
    CHECK(back.rope.high_freq_factor == c.rope.high_freq_factor);
    CHECK(back.rope.original_max_position_embeddings == c.rope.original_max_position_embeddings);
  }
}

// ---- Hardening (docs/testing.md): the JSON layer every file read from disk goes through, config.json's bounds,
// adapter_config.json's fields.

TEST_CASE("JSON from disk: a regular file within the size and depth limits; fields checked, the file and key named") {
  const auto dir = test::temp_dir("json");
  fs::create_directories(dir / "d.json");
  CHECK_THROWS_WITH_AS(read_json(dir / "d.json"), ((dir / "d.json").string() + ": is a directory, expected a JSON file").c_str(), IoError);
  CHECK_THROWS_WITH_AS(read_json(dir / "none.json"), doctest::Contains("none.json: cannot open: No such file or directory"), IoError);
  write_text(dir / "big.json", R"({"a": "0123456789012345"})");
  CHECK_THROWS_WITH_AS(read_json(dir / "big.json", JsonLimits{16, 64}),
                       ((dir / "big.json").string() + ": 25 bytes is over the limit of 16 bytes for this file").c_str(), IoError);
  write_text(dir / "deep.json", std::string(65, '[') + std::string(65, ']'));
  CHECK_THROWS_WITH_AS(read_json(dir / "deep.json"),
                       ((dir / "deep.json").string() + ": JSON nested more than 64 levels deep (at byte 64)").c_str(), IoError);
  write_text(dir / "ok.json", "{\"a\": \"" + std::string(100, '[') + "\\\"]\", \"b\": " + std::string(63, '[') +
                                  std::string(63, ']') + "}");
  CHECK(read_json(dir / "ok.json")["a"].get<std::string>().size() == 102);  // brackets inside strings do not nest
  compat::remove_all(dir);

  const auto j = nlohmann::json::parse(R"({"i": 7, "f": 7.0, "big": 9223372036854775808, "s": "x", "b": true,
    "o": {"n": 1.5}, "l": [{"k": 1}, 3]})");
  const JsonFields<ConfigError> f(j, "c.json");
  CHECK(f.integer("i", 0, 10) == 7);
  CHECK_THROWS_WITH_AS(f.integer("i", 8, 10), "c.json: field 'i' must be an integer in 8..10, got 7", ConfigError);
  CHECK_THROWS_WITH_AS(f.integer("f", 0, 10), "c.json: field 'f' must be an integer in 0..10, got 7.0", ConfigError);
  CHECK_THROWS_WITH_AS(f.integer("big", 0, INT64_MAX), doctest::Contains("got 9223372036854775808"), ConfigError);
  CHECK_THROWS_WITH_AS(f.integer("s", 0, 10), "c.json: field 's' must be an integer in 0..10, got \"x\"", ConfigError);
  CHECK_THROWS_WITH_AS(f.integer("missing", 0, 10), "c.json: missing field 'missing'", ConfigError);
  CHECK(f.integer_or("missing", 3, 0, 10) == 3);
  CHECK(f.number("f", 0, 10) == 7.0);
  CHECK_THROWS_WITH_AS(f.number("b", 0, 10), "c.json: field 'b' must be a number in [0, 10], got true", ConfigError);
  CHECK_THROWS_WITH_AS(f.boolean("i"), "c.json: field 'i' must be true or false, got 7", ConfigError);
  CHECK_THROWS_WITH_AS(f.string("o"), "c.json: field 'o' must be a string, got an object", ConfigError);
  CHECK_THROWS_WITH_AS(f.object("o").integer("n", 0, 9), "c.json: field 'o.n' must be an integer in 0..9, got 1.5", ConfigError);
  CHECK(f.element("l", 0).integer("k", 0, 1) == 1);
  CHECK_THROWS_WITH_AS(f.element("l", 1), "c.json: field 'l[1]' must be a JSON object, got 3", ConfigError);
}

TEST_CASE("config.json: integer fields refuse floats, sizes and the parameter count are bounded, floats are finite") {
  auto err = [](const std::function<void(nlohmann::json&)>& change) {
    auto j = nlohmann::json::parse(v5_config);
    change(j);
    try {
      model::config_from_json(j, "m/config.json");
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string f = "m/config.json: ";
  CHECK(err([](auto& j) { j["hidden_size"] = 32.5; }) == f + "field 'hidden_size' must be an integer in 1..1048576, got 32.5");
  CHECK(err([](auto& j) { j["hidden_size"] = 32.0; }) == f + "field 'hidden_size' must be an integer in 1..1048576, got 32.0");
  CHECK(err([](auto& j) { j["vocab_size"] = 1000000000000; }) == f + "field 'vocab_size' must be an integer in 1..16777216, got 1000000000000");
  CHECK(err([](auto& j) { j["num_hidden_layers"] = -2; }) == f + "field 'num_hidden_layers' must be an integer in 1..16384, got -2");
  CHECK(err([](auto& j) { j["head_dim"] = 1 << 20; }) == f + "field 'head_dim' must be an integer in 1..16384, got 1048576");
  CHECK(err([](auto& j) { j["tie_word_embeddings"] = 1; }) == f + "field 'tie_word_embeddings' must be true or false, got 1");
  CHECK(err([](auto& j) { j["rms_norm_eps"] = 0; }) == f + "rms_norm_eps must be positive and finite, got 0");
  CHECK(err([](auto& j) { j["rope_parameters"]["factor"] = "8"; }) ==
        f + "field 'rope_parameters.factor' must be a number in [0, 1e+12], got \"8\"");
  CHECK(err([](auto& j) { j["rope_parameters"] = 3; }) == f + "field 'rope_parameters' must be a JSON object, got 3");
  // Each size within its limit, the products not: refused before any count is multiplied out in int64.
  CHECK(err([](auto& j) {
          j["hidden_size"] = 1 << 20, j["intermediate_size"] = 1 << 22, j["num_hidden_layers"] = 1 << 14;
          j["num_attention_heads"] = 1 << 14, j["num_key_value_heads"] = 1 << 14, j["head_dim"] = 64;
        }).find("parameters (16384 layers of ") != std::string::npos);
  CHECK_THROWS_WITH_AS(model::preset("llama3-debug", 20000), "preset llama3-debug: num_hidden_layers must lie in 1..16384, got 20000",
                       ConfigError);
  auto moe = nlohmann::json::parse(v5_config);
  moe["model_type"] = "mixtral", moe["num_local_experts"] = 4, moe["num_experts_per_tok"] = 2.0;
  CHECK_THROWS_WITH_AS(model::config_from_json(moe, "x.json"), "x.json: field 'num_experts_per_tok' must be an integer in 1..16384, got 2.0",
                       ConfigError);
}

TEST_CASE("adapter_config.json: every field checked, the file and key named; a file where the directory belongs") {
  const auto dir = test::temp_dir("peft");
  const auto write = [&](nlohmann::json j) { write_text(dir / "adapter_config.json", j.dump()); };
  const nlohmann::json good = {{"peft_type", "LORA"}, {"r", 8}, {"lora_alpha", 16}, {"target_modules", {"q_proj"}}};
  const auto err = [&] {
    try {
      io::read_peft_adapter(dir);
    } catch (const IoError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const auto f = (dir / "adapter_config.json").string() + ": ";
  auto j = good;
  j["r"] = 8.5;
  write(j);
  CHECK(err() == f + "field 'r' must be an integer in 1..65536, got 8.5");
  j = good, j["lora_alpha"] = "16";
  write(j);
  CHECK(err() == f + "field 'lora_alpha' must be a number in [0, 1.79769e+308], got \"16\"");
  j = good, j["target_modules"] = {1};
  write(j);
  CHECK(err() == f + "target_modules holds 1, expected module names");
  j = good, j.erase("peft_type");
  write(j);
  CHECK(err() == f + "missing field 'peft_type'");
  // a MoE's target_parameters: the experts' fused projections and the router, laid out as PEFT's ParamWrapper
  j = good, j["target_parameters"] = "experts.down_proj";
  write(j);
  CHECK(err() == f + "target_parameters \"experts.down_proj\" is not a list");
  j = good, j["target_parameters"] = {"mlp.experts.down_proj", "experts.w2"};
  write(j);
  CHECK(err().find("target parameter \"experts.w2\" is not one of experts.gate_up_proj, experts.down_proj, gate.weight") !=
        std::string::npos);
  j = good, j["target_parameters"] = {"mlp.experts.down_proj"};
  write(j);
  io::save_safetensors(dir / "adapter_model.safetensors",
                       {{"base_model.model.model.layers.0.mlp.experts.lora_A.weight", at::zeros({12, 4})}});
  CHECK(err().find("lora_A.weight' has shape [12, 4]: an experts' lora_A needs [E r, in] with r = 8") != std::string::npos);
  io::save_safetensors(dir / "adapter_model.safetensors",
                       {{"base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight", at::zeros({16, 4})}});
  CHECK(err().find("is not a PEFT LoRA key") != std::string::npos);  // base_layer: two expert parameters targeted
  io::save_safetensors(dir / "adapter_model.safetensors",
                       {{"base_model.model.model.layers.0.mlp.experts.lora_B.weight", at::arange(2 * 16.0).view({2, 16})}});
  const auto b = io::read_peft_adapter(dir).tensors.at("layers.0.mlp.experts.down_proj_lora.lora_B.weight");  // [E, out, r]
  CHECK(b.sizes() == at::IntArrayRef({2, 2, 8}));
  CHECK(b[1][0][3].item<double>() == 3 * 2 + 1);  // expert e's rank j is PEFT's column j E + e
  CHECK(at::equal(io::to_peft("layers.0.mlp.experts.down_proj_lora.lora_B.weight", b), at::arange(2 * 16.0).view({2, 16})));
  compat::remove_all(dir / "adapter_model.safetensors");
  write_text(dir / "file", "x");
  CHECK_THROWS_WITH_AS(io::read_peft_adapter(dir / "file"), doctest::Contains("file: not a directory (expected a PEFT adapter directory"), IoError);
  compat::remove_all(dir);
}
