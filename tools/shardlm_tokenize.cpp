// shardlm_tokenize --tokenizer tokenizer.json --encode-jsonl FILE     one JSON string a line -> one JSON id array a line
// shardlm_tokenize --tokenizer tokenizer.json --decode-jsonl FILE     one JSON id array a line -> one JSON string a line
// shardlm_tokenize --tokenizer tokenizer.json --output PREFIX [--format auto|text|jsonl|alpaca] [--eos TOKEN]
//                  [--add-bos | --bos TOKEN] [--shard-tokens N] FILE...
//   writes token shards (PREFIX.bin + PREFIX.mask, see data/shards.hpp): every document framed as [BOS] ... EOS.
// No LibTorch: builds in seconds (see docs/data.md).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/json.hpp"
#include "shardlm/data/documents.hpp"
#include "shardlm/data/shards.hpp"
#include "shardlm/data/tokenizer.hpp"

namespace {

namespace fs = std::filesystem;
namespace data = shardlm::data;
using shardlm::ConfigError;
using shardlm::fail;
using shardlm::IoError;
using nlohmann::json;

constexpr const char* kProgram = "shardlm_tokenize";

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Runs line(text, where) for each line of FILE ("-": stdin).
template <class F>
void for_each_line(const std::string& file, F&& line) {
  std::ifstream in;
  if (file != "-") {
    in.open(file, std::ios::binary);
    if (!in) fail<IoError>(file, ": cannot open");
  }
  std::istream& stream = file == "-" ? std::cin : in;
  std::string text;
  for (size_t number = 1; std::getline(stream, text); ++number) line(text, (file == "-" ? "stdin" : file) + ":" + std::to_string(number));
}

int encode_jsonl(const data::Tokenizer& tokenizer, const std::string& file) {
  const auto start = std::chrono::steady_clock::now();
  size_t lines = 0, bytes = 0, tokens = 0;
  std::string out;
  std::vector<uint32_t> ids;
  for_each_line(file, [&](const std::string& text, const std::string& where) {
    const auto value = shardlm::parse_json(text, where);
    if (!value.is_string()) fail<IoError>(where, ": expected a JSON string, got ", value.type_name());
    const auto& s = value.get_ref<const std::string&>();
    ids.clear();
    tokenizer.encode(s, ids);
    out += '[';
    for (size_t i = 0; i < ids.size(); ++i) {
      if (i) out += ',';
      out += std::to_string(ids[i]);
    }
    out += "]\n";
    if (out.size() > (1u << 20)) {
      std::fwrite(out.data(), 1, out.size(), stdout);
      out.clear();
    }
    ++lines, bytes += s.size(), tokens += ids.size();
  });
  std::fwrite(out.data(), 1, out.size(), stdout);
  const auto s = seconds_since(start);
  std::fprintf(stderr, "%s: encoded %zu strings, %zu bytes -> %zu tokens in %.3f s (%.1f MB/s)\n", kProgram, lines,
               bytes, tokens, s, bytes / 1e6 / std::max(s, 1e-9));
  return 0;
}

int decode_jsonl(const data::Tokenizer& tokenizer, const std::string& file) {
  std::vector<uint32_t> ids;
  for_each_line(file, [&](const std::string& text, const std::string& where) {
    const auto value = shardlm::parse_json(text, where);
    if (!value.is_array()) fail<IoError>(where, ": expected a JSON array of token ids, got ", value.type_name());
    ids.clear();
    for (const auto& id : value) {
      if (!id.is_number_unsigned() || id.get<uint64_t>() > UINT32_MAX)
        fail<IoError>(where, ": ", id.dump(), " is not a token id");
      ids.push_back(id.get<uint32_t>());
    }
    try {
      // Bytes that are not UTF-8 (ids ending inside a character) are written as U+FFFD.
      std::cout << json(tokenizer.decode(ids)).dump(-1, ' ', false, json::error_handler_t::replace) << '\n';
    } catch (const shardlm::Error& e) {
      fail<IoError>(where, ": ", e.what());
    }
  });
  return 0;
}

// --eos / --bos name a token; otherwise tokenizer_config.json next to tokenizer.json does ("eos_token" is a string
// or {"content": ...}).
uint32_t special_token(const data::Tokenizer& tokenizer, const fs::path& tokenizer_path, const cxxopts::ParseResult& args,
                       const std::string& flag, const std::string& config_key) {
  std::string token;
  if (args.count(flag)) {
    token = args[flag].as<std::string>();
  } else {
    const auto config_path = tokenizer_path.parent_path() / "tokenizer_config.json";
    if (!fs::exists(config_path))
      fail<ConfigError>("--", flag, " not given and no ", config_path.string(), " to read ", config_key,
                        " from: pass --", flag, " TOKEN");
    const auto config = shardlm::read_json(config_path);
    const auto it = config.find(config_key);
    if (it != config.end() && it->is_object()) token = it->value("content", "");
    else if (it != config.end() && it->is_string()) token = it->get<std::string>();
    if (token.empty()) fail<ConfigError>(config_path.string(), ": no \"", config_key, "\": pass --", flag, " TOKEN");
  }
  const auto id = tokenizer.token_to_id(token);
  if (!id) fail<ConfigError>("--", flag, " '", token, "' is not a token of ", tokenizer.name());
  return *id;
}

int write_shards(const data::Tokenizer& tokenizer, const fs::path& tokenizer_path, const cxxopts::ParseResult& args) {
  if (!args.count("inputs")) fail<ConfigError>("--output needs input files (see --help)");
  const auto inputs = args["inputs"].as<std::vector<std::string>>();
  const auto format_flag = args["format"].as<std::string>();
  data::DocumentTokens frame{special_token(tokenizer, tokenizer_path, args, "eos", "eos_token"), std::nullopt};
  if (args.count("bos") || args["add-bos"].as<bool>())
    frame.bos = special_token(tokenizer, tokenizer_path, args, "bos", "bos_token");
  std::vector<data::DocumentFormat> formats;
  for (const auto& input : inputs) formats.push_back(data::document_format(format_flag, input));  // all checked first

  const auto start = std::chrono::steady_clock::now();
  data::ShardWriter writer(args["output"].as<std::string>(), args["shard-tokens"].as<int64_t>());
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  size_t documents = 0, bytes = 0, total = 0, counted = 0;
  // Documents are gathered up to 2^20 tokens per write (a write per short document was measurably slower).
  const auto flush = [&] {
    total += tokens.size(), counted += static_cast<size_t>(std::count(mask.begin(), mask.end(), 1));
    writer.write(tokens, mask);
    tokens.clear(), mask.clear();
  };
  for (size_t i = 0; i < inputs.size(); ++i) {
    data::read_documents(inputs[i], formats[i], [&](const data::Document& doc, const std::string& where) {
      try {
        data::append_document(tokenizer, doc, frame, tokens, mask);
      } catch (const IoError& e) {  // text that is not UTF-8
        fail<IoError>(where, ": ", e.what());
      }
      ++documents, bytes += doc.prompt.size() + doc.response.size();
      if (tokens.size() >= (1u << 20)) flush();
    });
  }
  flush();
  const auto files = writer.finish();
  const auto s = seconds_since(start);
  std::fprintf(stderr, "%s: %zu documents, %zu bytes -> %zu tokens (%zu in the loss) in %zu shard(s) %s%s, %.2f s (%.1f MB/s)\n",
               kProgram, documents, bytes, total, counted, files.size(), files.front().string().c_str(),
               files.size() > 1 ? " ..." : "", s, bytes / 1e6 / std::max(s, 1e-9));
  return 0;
}

int run(int argc, char** argv) {
  cxxopts::Options opts(kProgram, "Llama 3 (byte-level BPE) tokenization from a Hugging Face tokenizer.json");
  opts.custom_help("--tokenizer tokenizer.json (--encode-jsonl FILE | --decode-jsonl FILE | --output PREFIX FILE...)");
  opts.positional_help("");
  opts.add_options()("tokenizer", "Hugging Face tokenizer.json", cxxopts::value<std::string>())(
      "encode-jsonl", "encode one JSON string per line of FILE ('-': stdin) to one JSON array of ids per line",
      cxxopts::value<std::string>())(
      "decode-jsonl", "decode one JSON array of ids per line of FILE ('-': stdin) to one JSON string per line",
      cxxopts::value<std::string>())(
      "output", "write token shards PREFIX.bin + PREFIX.mask from the input files", cxxopts::value<std::string>())(
      "format", "input format: auto (.txt text, .jsonl JSONL, .json Alpaca), text, jsonl or alpaca",
      cxxopts::value<std::string>()->default_value("auto"))(
      "eos", "end-of-document token (default: eos_token of tokenizer_config.json next to the tokenizer)",
      cxxopts::value<std::string>())(
      "add-bos", "start every document with the BOS token (bos_token of tokenizer_config.json)")(
      "bos", "start every document with this token", cxxopts::value<std::string>())(
      "shard-tokens", "tokens per shard: PREFIX-00000.bin, ...; 0: one file",
      cxxopts::value<int64_t>()->default_value("0"))(
      "inputs", "input files", cxxopts::value<std::vector<std::string>>())("h,help", "this help");
  opts.parse_positional({"inputs"});
  const auto args = opts.parse(argc, argv);
  if (args.count("help")) {
    std::cout << opts.help() << '\n';
    return 0;
  }
  if (!args.count("tokenizer")) fail<ConfigError>("--tokenizer is required (see --help)");
  const int modes = int(args.count("encode-jsonl")) + int(args.count("decode-jsonl")) + int(args.count("output"));
  if (modes != 1) fail<ConfigError>("give exactly one of --encode-jsonl, --decode-jsonl, --output (see --help)");
  const fs::path tokenizer_path = args["tokenizer"].as<std::string>();
  const auto tokenizer = data::Tokenizer::from_file(tokenizer_path);
  if (args.count("encode-jsonl")) return encode_jsonl(tokenizer, args["encode-jsonl"].as<std::string>());
  if (args.count("decode-jsonl")) return decode_jsonl(tokenizer, args["decode-jsonl"].as<std::string>());
  return write_shards(tokenizer, tokenizer_path, args);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const shardlm::InternalError& e) {
    std::cerr << kProgram << ": " << e.what() << " (please report this)\n";
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << kProgram << ": error: " << e.what() << " (see --help)\n";
  } catch (const std::exception& e) {
    std::cerr << kProgram << ": error: " << e.what() << '\n';
  }
  return 1;
}
