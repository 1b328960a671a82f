// Data tests (torch-free): the byte-level alphabet, BPE on small tokenizer.json files written here (merges by
// rank, leftmost first, pieces, ignore_merges, added tokens), the errors that name what is unsupported, Alpaca
// prompts and loss masks, EOS between documents, document readers and their errors, shard files and the mask reader.
// Parity with Hugging Face tokenizers on the real Llama 3 tokenizer is tests/data/check_tokenizer.py.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "shardlm/data/documents.hpp"
#include "shardlm/data/shards.hpp"
#include "shardlm/data/tokenizer.hpp"

using namespace shardlm;
using namespace shardlm::data;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& tag) {
  static std::mt19937_64 rng(std::random_device{}());
  auto dir = fs::temp_directory_path() / ("shardlm-test-" + tag + "-" + std::to_string(rng()));
  fs::create_directories(dir);
  return dir;
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A tokenizer.json: ids 0..255 are the bytes in byte order, then `extra` tokens (byte-level strings) from 256 on.
json tiny_tokenizer(const std::vector<std::string>& extra, const std::vector<std::string>& merges,
                    bool ignore_merges = false) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_level_encode(std::string(1, char(b)))] = b;
  for (size_t i = 0; i < extra.size(); ++i) vocab[extra[i]] = 256 + i;
  json pre = {{"type", "Sequence"},
              {"pretokenizers",
               {{{"type", "Split"}, {"pattern", {{"Regex", R"( ?\p{L}+|\s+(?!\S)|\s+|[^\s\p{L}]+)"}}},
                 {"behavior", "Isolated"}, {"invert", false}},
                {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  return {{"version", "1.0"},
          {"added_tokens", json::array()},
          {"normalizer", nullptr},
          {"pre_tokenizer", pre},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", {{"type", "BPE"}, {"ignore_merges", ignore_merges}, {"vocab", vocab}, {"merges", merges}}}};
}

uint32_t byte(char c) { return static_cast<unsigned char>(c); }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("the byte-level alphabet is GPT-2's: printable bytes as themselves, the rest from U+0100 in byte order") {
  const auto& t = byte_to_unicode();
  CHECK(std::set<char32_t>(t.begin(), t.end()).size() == 256);
  CHECK(t['A'] == U'A');
  CHECK(t['~'] == U'~');
  CHECK(t[0xE9] == U'é');
  CHECK(t[0x00] == 0x100);
  CHECK(t[' '] == 0x120);   // Ġ
  CHECK(t['\n'] == 0x10A);  // Ċ
  CHECK(t[0x7F] == 0x121);
  CHECK(t[0xAD] == 0x143);  // the soft hyphen, the last unprintable byte
  CHECK(byte_level_encode(" hi\n") == "Ġhi\xC4\x8A");
  std::string all;
  for (int b = 0; b < 256; ++b) all += char(b);
  CHECK(byte_level_decode(byte_level_encode(all)) == all);
  CHECK_FALSE(byte_level_decode("a\xE2\x82\xAC").has_value());  // € is not in the alphabet
}

TEST_CASE("BPE merges by rank, lowest first, leftmost among equals, within pre-tokenizer pieces") {
  SUBCASE("rank decides which pair merges first") {
    const auto bc_first = Tokenizer::from_json(tiny_tokenizer({"bc", "ab"}, {"b c", "a b"}), "t.json");
    CHECK(bc_first.encode("abc") == std::vector<uint32_t>{byte('a'), 256});
    const auto ab_first = Tokenizer::from_json(tiny_tokenizer({"bc", "ab"}, {"a b", "b c"}), "t.json");
    CHECK(ab_first.encode("abc") == std::vector<uint32_t>{257, byte('c')});
  }
  SUBCASE("equal pairs merge from the left, and merges build on merges") {
    const auto t = Tokenizer::from_json(tiny_tokenizer({"aa", "aaaa"}, {"a a", "aa aa"}), "t.json");
    CHECK(t.encode("aaa") == std::vector<uint32_t>{256, byte('a')});
    CHECK(t.encode("aaaaa") == std::vector<uint32_t>{257, byte('a')});
    CHECK(t.encode("aaaaaaa") == std::vector<uint32_t>{257, 256, byte('a')});
  }
  SUBCASE("no merge crosses a piece boundary") {
    // "b Ġ" has the best rank, but "ab ab" splits into "ab" and " ab": b and the space never meet.
    const auto t = Tokenizer::from_json(tiny_tokenizer({"bĠ", "ab"}, {"b Ġ", "a b"}), "t.json");
    CHECK(t.encode("ab ab") == std::vector<uint32_t>{257, byte(' '), 257});
    CHECK(t.encode("b ") == std::vector<uint32_t>{byte('b'), byte(' ')});
    CHECK(t.decode(t.encode("ab ab")) == "ab ab");
  }
  SUBCASE("merges in the [\"a\", \"b\"] form") {
    auto j = tiny_tokenizer({"ab"}, {});
    j["model"]["merges"] = json::array({json::array({"a", "b"})});
    CHECK(Tokenizer::from_json(j, "t.json").encode("cab") == std::vector<uint32_t>{byte('c'), 256});
  }
}

TEST_CASE("ignore_merges: a piece that is a vocabulary token is that token, even where no merge reaches it") {
  const std::vector<std::string> extra = {"xy", "xyz"};  // no merge makes "xyz"
  const std::vector<std::string> merges = {"x y"};
  CHECK(Tokenizer::from_json(tiny_tokenizer(extra, merges, true), "t.json").encode("xyz") == std::vector<uint32_t>{257});
  CHECK(Tokenizer::from_json(tiny_tokenizer(extra, merges, false), "t.json").encode("xyz") ==
        std::vector<uint32_t>{256, byte('z')});
}

TEST_CASE("added tokens in the text are matched leftmost-longest and decode to their content") {
  auto j = tiny_tokenizer({"ab"}, {"a b"});
  j["added_tokens"] = {{{"id", 300}, {"content", "<|end|>"}, {"special", true}, {"normalized", false}},
                       {{"id", 301}, {"content", "<|e"}, {"special", true}, {"normalized", false}},
                       {{"id", 302}, {"content", "ab!"}, {"special", false}, {"normalized", true}},
                       {{"id", 303}, {"content", "x<|"}, {"special", false}, {"normalized", true}}};
  const auto t = Tokenizer::from_json(j, "t.json");
  // "x<|" starts further left, but tokens with normalized false are matched first (tokenizers does the same).
  CHECK(t.encode("x<|end|>ab") == std::vector<uint32_t>{byte('x'), 300, 256});
  CHECK(t.encode("x<|ab") == std::vector<uint32_t>{303, 256});
  CHECK(t.encode("<|e<|end|>") == std::vector<uint32_t>{301, 300});
  CHECK(t.encode("<|en") == std::vector<uint32_t>{301, byte('n')});
  CHECK(t.encode("ab!ab") == std::vector<uint32_t>{302, 256});
  CHECK(t.decode(t.encode("x<|end|>ab!")) == "x<|end|>ab!");
  CHECK(t.token_to_id("<|end|>") == 300u);
  CHECK(t.token_to_id("ab") == 256u);
  CHECK_FALSE(t.token_to_id("<|nope|>").has_value());
  CHECK(t.vocab_size() == 304);
  const std::vector<uint32_t> gap = {280};  // below vocab_size, but neither a vocabulary nor an added token
  CHECK(error_of([&] { t.decode(gap); }) == "token id 280 is not in the vocabulary of t.json");
}

TEST_CASE("unsupported or broken tokenizer.json files are refused with the field named") {
  const auto message = [](json j) { return error_of([&] { Tokenizer::from_json(j, "tok.json"); }); };
  auto j = tiny_tokenizer({"ab"}, {"a b"});
  auto bad = j;
  bad["model"]["type"] = "WordPiece";
  CHECK(message(bad) == "tok.json: model.type 'WordPiece' is not supported: shardlm reads byte-level BPE tokenizers");
  bad = j;
  bad["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Whitespace"}};
  CHECK(message(bad) == "tok.json: pre_tokenizer.pretokenizers[0]: pre-tokenizer type 'Whitespace' is not supported "
                        "(supported: Sequence, Split, ByteLevel)");
  bad = j;
  bad["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "x"}}}, {"behavior", "Isolated"}};
  CHECK(message(bad) == "tok.json: pre_tokenizer has no ByteLevel step: only byte-level BPE is supported");
  bad = j;
  bad["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  CHECK(message(bad).find("tok.json: pre_tokenizer.pretokenizers[0]: the pattern '(unclosed' does not compile") == 0);
  bad = j;
  bad["normalizer"] = {{"type", "NFC"}};
  CHECK(message(bad) == "tok.json: normalizer 'NFC' is not supported (byte-level BPE tokenizers have none)");
  bad = j;
  bad["model"]["merges"] = {"a q"};
  CHECK(message(bad) == "tok.json: model.merges[0]: 'aq' is not in the vocabulary");
  bad["model"]["merges"] = {"a b", "abc"};
  CHECK(message(bad) == "tok.json: model.merges[1] 'abc' is not two tokens separated by one space");
  bad = j;
  bad["model"]["vocab"].erase(byte_level_encode("\n"));
  CHECK(message(bad) == "tok.json: model.vocab has no token for byte 10 ('Ċ'): byte-level BPE needs all 256");
  bad = j;
  bad["model"]["vocab"]["a€"] = 400;
  CHECK(message(bad) == "tok.json: model.vocab token 'a€' is not in the byte-level alphabet");
  bad = j;
  bad["model"]["vocab"][""] = 400;
  CHECK(message(bad) == "tok.json: model.vocab has an empty token (id 400)");
  bad = j;
  bad["added_tokens"] = {{{"id", 300}, {"content", "<x>"}, {"lstrip", true}}};
  CHECK(message(bad) == "tok.json: added_tokens[0] ('<x>'): lstrip is not supported");
  bad = j;
  bad["model"]["vocab"] = "not an object";
  CHECK(message(bad).find("tok.json: ") == 0);
  CHECK(error_of([] { Tokenizer::from_file("/no/such/tokenizer.json"); }) == "/no/such/tokenizer.json: cannot open: No such file or directory");

  const auto t = Tokenizer::from_json(j, "tok.json");
  CHECK(error_of([&] { t.encode("ok \xC3("); }) == "text is not valid UTF-8 at byte 3");
  CHECK(error_of([&] { t.encode("\xED\xA0\x80"); }) == "text is not valid UTF-8 at byte 0");  // a surrogate
  const std::vector<uint32_t> unknown = {byte('a'), 999};
  CHECK(error_of([&] { t.decode(unknown); }) == "token id 999 is not in the vocabulary of tok.json");
}

TEST_CASE("Alpaca prompts, loss masks and EOS between documents") {
  CHECK(alpaca_prompt("Add.", "2 3") ==
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 3\n\n### "
        "Response:\n");
  CHECK(alpaca_prompt("Hi.", "") ==
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHi.\n\n### Response:\n");

  auto j = tiny_tokenizer({"ab"}, {"a b"});
  j["added_tokens"] = {{{"id", 300}, {"content", "<s>"}, {"normalized", false}},
                       {{"id", 301}, {"content", "</s>"}, {"normalized", false}}};
  const auto t = Tokenizer::from_json(j, "t.json");
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  append_document(t, {"", "ab"}, {301, std::nullopt}, tokens, mask);
  append_document(t, {"ab ", "c"}, {301, 300}, tokens, mask);
  append_document(t, {"", "a"}, {301, 300}, tokens, mask);
  CHECK(tokens == std::vector<uint32_t>{256, 301, 300, 256, byte(' '), byte('c'), 301, 300, byte('a'), 301});
  CHECK(mask == std::vector<uint8_t>{1, 1, 0, 0, 0, 1, 1, 0, 1, 1});
}

TEST_CASE("documents from text, JSONL and Alpaca files, and errors naming the file, line and field") {
  const auto dir = temp_dir("docs");
  const auto read = [](const fs::path& p, DocumentFormat f) {
    std::vector<std::string> out;
    read_documents(p, f, [&](const Document& d, const std::string& where) { out.push_back(d.prompt + "|" + d.response + "@" + where); });
    return out;
  };
  write_file(dir / "a.txt", "whole\nfile\n");
  CHECK(read(dir / "a.txt", DocumentFormat::Text) == std::vector<std::string>{"|whole\nfile\n@" + (dir / "a.txt").string()});
  write_file(dir / "a.jsonl", "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 7}\n");
  const auto jsonl = (dir / "a.jsonl").string();
  CHECK(read(dir / "a.jsonl", DocumentFormat::Jsonl) == std::vector<std::string>{"|one@" + jsonl + ":1", "|two@" + jsonl + ":3"});
  write_file(dir / "a.json", R"([{"instruction": "I", "output": "O"}, {"instruction": "J", "input": "K", "output": "P"}])");
  const auto docs = read(dir / "a.json", DocumentFormat::Alpaca);
  REQUIRE(docs.size() == 2);
  CHECK(docs[0] == alpaca_prompt("I", "") + "|O@" + (dir / "a.json").string() + ": record 1");
  CHECK(docs[1] == alpaca_prompt("J", "K") + "|P@" + (dir / "a.json").string() + ": record 2");

  const auto error = [&](const std::string& text, DocumentFormat f) {
    write_file(dir / "bad.jsonl", text);
    return error_of([&] { read(dir / "bad.jsonl", f); });
  };
  const auto bad = (dir / "bad.jsonl").string();
  CHECK(error("{\"text\": \"ok\"}\n{\"text\": \n", DocumentFormat::Jsonl).find(bad + ":2: malformed JSON") == 0);
  CHECK(error("{\"text\": \"ok\"}\n{\"txt\": \"x\"}\n", DocumentFormat::Jsonl) == bad + ":2: no \"text\" field");
  CHECK(error("{\"text\": 5}\n", DocumentFormat::Jsonl) == bad + ":1: \"text\" is not a string");
  CHECK(error("[\"text\"]\n", DocumentFormat::Jsonl) == bad + ":1: expected a JSON object, got array");
  CHECK(error("{\"output\": \"o\"}\n", DocumentFormat::Alpaca) == bad + ":1: no \"instruction\" field");
  CHECK(error("{\"instruction\": \"i\", \"input\": \"x\"}\n", DocumentFormat::Alpaca) == bad + ":1: no \"output\" field");
  CHECK(error("[{\"instruction\": \"i\", \"output\": \"o\"}, {\"instruction\": \"i\"}]", DocumentFormat::Alpaca) ==
        bad + ": record 2: no \"output\" field");
  CHECK(error_of([&] { read(dir / "none.jsonl", DocumentFormat::Jsonl); }) == (dir / "none.jsonl").string() + ": cannot open: No such file or directory");

  CHECK(document_format("auto", "x.txt") == DocumentFormat::Text);
  CHECK(document_format("auto", "x.jsonl") == DocumentFormat::Jsonl);
  CHECK(document_format("auto", "x.json") == DocumentFormat::Alpaca);
  CHECK(document_format("alpaca", "x.jsonl") == DocumentFormat::Alpaca);
  CHECK(error_of([] { document_format("auto", "x.csv"); }).find("x.csv: cannot tell the format from the extension '.csv'") == 0);
  CHECK(error_of([] { document_format("xml", "x.txt"); }) == "--format 'xml' is not one of auto, text, jsonl, alpaca");
  fs::remove_all(dir);
}

TEST_CASE("shards: little-endian uint32 tokens with a uint8 mask next to them, one file or numbered") {
  const auto dir = temp_dir("shards");
  const std::vector<uint32_t> tokens = {1, 0x01020304, 128001, 7, 8};
  const std::vector<uint8_t> mask = {0, 1, 1, 0, 1};
  ShardWriter one(dir / "all", 0);
  one.write(std::span(tokens).first(2), std::span(mask).first(2));
  one.write(std::span(tokens).subspan(2), std::span(mask).subspan(2));
  CHECK(one.finish() == std::vector<fs::path>{dir / "all.bin"});
  std::ifstream in(dir / "all.bin", std::ios::binary);
  const std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(raw.size() == 20);
  CHECK(raw.substr(4, 4) == std::string("\x04\x03\x02\x01", 4));
  const auto m = LossMask::open(dir / "all.bin");
  CHECK(m.read(0, m.size()) == mask);
  CHECK(m[1]);
  CHECK_FALSE(m[3]);

  ShardWriter numbered(dir / "part", 2);
  numbered.write(tokens, mask);
  const auto files = numbered.finish();
  CHECK(files == std::vector<fs::path>{dir / "part-00000.bin", dir / "part-00001.bin", dir / "part-00002.bin"});
  CHECK(fs::file_size(dir / "part-00002.bin") == 4);
  CHECK(LossMask::open(dir / "part-00001.bin").size() == 2);

  write_file(dir / "all.mask", std::string("\x01\x01\x00\x01", 4));
  CHECK(error_of([&] { LossMask::open(dir / "all.bin"); }) ==
        (dir / "all.mask").string() + ": 4 mask entries for 5 tokens in " + (dir / "all.bin").string());
  write_file(dir / "all.mask", std::string("\x01\x01\x00\x01\x02", 5));
  CHECK(error_of([&] { LossMask::open(dir / "all.bin"); }) == (dir / "all.mask").string() + ": entry 4 is 2, not 0 or 1");
  fs::remove(dir / "all.mask");
  CHECK(error_of([&] { LossMask::open(dir / "all.bin"); }).find((dir / "all.mask").string() + ": cannot open") == 0);
  fs::remove_all(dir);
}

TEST_CASE("tokenizer.json: ids bounded by the tokens it defines, nesting and size bounded, each field named; documents too") {
  const auto message = [](json j) { return error_of([&] { Tokenizer::from_json(j, "tok.json"); }); };
  const auto j = tiny_tokenizer({"ab"}, {"a b"});  // 257 tokens: ids must lie below 257 + 65536
  auto bad = j;
  bad["added_tokens"] = {{{"content", "<x>"}, {"id", 2147483647}}};  // a table of 2^31 tokens (64 GB) before
  CHECK(message(bad) == "tok.json: added_tokens[0].id = 2147483647 is not a valid id: expected an integer in 0..65793 "
                        "(the number of tokens in the file, plus 65536)");
  bad = j;
  bad["model"]["vocab"]["ab"] = 256.5;
  CHECK(message(bad) == "tok.json: model.vocab['ab'] = 256.5 is not a valid id: expected an integer in 0..65792 "
                        "(the number of tokens in the file, plus 65536)");
  bad = j;
  bad["model"]["ignore_merges"] = "yes";
  CHECK(message(bad) == "tok.json: field 'model.ignore_merges' must be true or false, got \"yes\"");
  bad = j;
  bad["model"]["merges"] = "a b";
  CHECK(message(bad) == "tok.json: field 'model.merges' must be a list, got \"a b\"");
  bad = j;
  bad["added_tokens"] = {{{"content", 5}, {"id", 300}}};
  CHECK(message(bad) == "tok.json: field 'added_tokens[0].content' must be a string, got 5");
  const auto dir = temp_dir("tokenizer_limits");
  write_file(dir / "deep.json", std::string(100000, '[') + std::string(100000, ']'));
  CHECK(error_of([&] { Tokenizer::from_file(dir / "deep.json"); }) ==
        (dir / "deep.json").string() + ": JSON nested more than 64 levels deep (at byte 64)");
  fs::create_directories(dir / "tokenizer.json");
  CHECK(error_of([&] { Tokenizer::from_file(dir / "tokenizer.json"); }) ==
        (dir / "tokenizer.json").string() + ": is a directory, expected a JSON file");
  // Document files for shardlm_tokenize: records as deep as any record is, and a file where one belongs.
  write_file(dir / "deep.jsonl", "{\"text\": \"a\"}\n" + std::string(1000, '[') + "\n");
  const auto none = [](const Document&, const std::string&) {};
  CHECK(error_of([&] { read_documents(dir / "deep.jsonl", DocumentFormat::Jsonl, none); }) ==
        (dir / "deep.jsonl").string() + ":2: JSON nested more than 64 levels deep (at byte 64)");
  CHECK(error_of([&] { read_documents(dir / "tokenizer.json", DocumentFormat::Jsonl, none); }) ==
        (dir / "tokenizer.json").string() + ": is a directory, expected a document file (.txt, .jsonl or .json)");
  fs::remove_all(dir);
}
