#pragma once
// Training documents from raw text, JSONL and Alpaca instruction data, and their tokens with a loss mask.
//   text:   a file is one document.
//   jsonl:  one {"text": "..."} object per line (blank lines are skipped).
//   alpaca: records {"instruction", "input" (optional), "output"}, as a JSON array (Stanford Alpaca's
//           alpaca_data.json) or one per line; the prompt is the Alpaca template and is masked out of the loss.
// A document becomes [BOS] prompt response EOS: BOS (optional) and the prompt with mask 0, the response and EOS
// with mask 1 (the model learns to stop). Prompt and response are tokenized separately, so the boundary between
// them is a token boundary and the mask is exact.
// Torch-free, like the tokenizer.
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "shardlm/core/errors.hpp"
#include "shardlm/core/json.hpp"
#include "shardlm/data/tokenizer.hpp"

namespace shardlm::data {

/// A prompt (conditioning, not learned: mask 0) and the text to learn (mask 1). Plain text has no prompt.
struct Document {
  std::string prompt;
  std::string response;
};

/// Stanford Alpaca's prompt templates: one for records with an input, one without.
inline std::string alpaca_prompt(std::string_view instruction, std::string_view input) {
  std::string p;
  if (input.empty()) {
    p = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n";
    p += instruction;
  } else {
    p = "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n";
    p += instruction;
    p += "\n\n### Input:\n";
    p += input;
  }
  p += "\n\n### Response:\n";
  return p;
}

enum class DocumentFormat { Text, Jsonl, Alpaca };

/// `--format` value -> format; "auto" decides by extension: .txt text, .jsonl JSONL, .json Alpaca.
inline DocumentFormat document_format(std::string_view flag, const std::filesystem::path& file) {
  if (flag == "text") return DocumentFormat::Text;
  if (flag == "jsonl") return DocumentFormat::Jsonl;
  if (flag == "alpaca") return DocumentFormat::Alpaca;
  if (flag != "auto") fail<ConfigError>("--format '", flag, "' is not one of auto, text, jsonl, alpaca");
  const auto ext = file.extension();
  if (ext == ".txt") return DocumentFormat::Text;
  if (ext == ".jsonl") return DocumentFormat::Jsonl;
  if (ext == ".json") return DocumentFormat::Alpaca;
  fail<ConfigError>(file.string(), ": cannot tell the format from the extension '", ext.string(),
                    "' (.txt, .jsonl, .json): pass --format text|jsonl|alpaca");
}

namespace detail {

inline std::string string_field(const nlohmann::json& record, const char* field, const std::string& where,
                                bool required) {
  const auto it = record.find(field);
  if (it == record.end() || it->is_null()) {
    if (required) fail<IoError>(where, ": no \"", field, "\" field");
    return {};
  }
  if (!it->is_string()) fail<IoError>(where, ": \"", field, "\" is not a string");
  return it->get<std::string>();
}

inline Document record_document(const nlohmann::json& record, DocumentFormat format, const std::string& where) {
  if (!record.is_object()) fail<IoError>(where, ": expected a JSON object, got ", record.type_name());
  if (format == DocumentFormat::Jsonl) return {{}, string_field(record, "text", where, true)};
  const auto instruction = string_field(record, "instruction", where, true);
  const auto input = string_field(record, "input", where, false);
  return {alpaca_prompt(instruction, input), string_field(record, "output", where, true)};
}

}  // namespace detail

/// Calls on_document(const Document&, const std::string& where) for each document of `path`, in order; `where`
/// (FILE or FILE:LINE or FILE: record N) is what errors name.
template <class F>
void read_documents(const std::filesystem::path& path, DocumentFormat format, F&& on_document) {
  const auto name = path.string();
  regular_file_size(path, "a document file (.txt, .jsonl or .json)");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail<IoError>(name, ": cannot open");
  // Data files are as large as they come; what a record may not be is deeper than any record is (core/json.hpp).
  constexpr JsonLimits records{~uint64_t{0}, 64};
  if (format == DocumentFormat::Text) {
    on_document(Document{{}, std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>())}, name);
    return;
  }
  const auto first = (in >> std::ws).peek();
  if (format == DocumentFormat::Alpaca && first == '[') {  // one JSON array of records
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto all = parse_json_limited(text, name, records);
    for (size_t i = 0; i < all.size(); ++i) {
      const auto where = name + ": record " + std::to_string(i + 1);
      on_document(detail::record_document(all[i], format, where), where);
    }
    return;
  }
  in.seekg(0);
  std::string line;
  for (size_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto where = name + ":" + std::to_string(number);
    on_document(detail::record_document(parse_json_limited(line, where, records), format, where), where);
  }
}

/// Token ids that frame every document.
struct DocumentTokens {
  uint32_t eos;
  std::optional<uint32_t> bos;
};

/// Appends [BOS] prompt response EOS to `tokens` and their loss mask (see the top of this file) to `mask`.
inline void append_document(const Tokenizer& tokenizer, const Document& doc, const DocumentTokens& frame,
                            std::vector<uint32_t>& tokens, std::vector<uint8_t>& mask) {
  SHARDLM_ASSERT(tokens.size() == mask.size(), "a mask entry for every token");
  if (frame.bos) tokens.push_back(*frame.bos);
  tokenizer.encode(doc.prompt, tokens);
  mask.resize(tokens.size(), 0);
  tokenizer.encode(doc.response, tokens);
  tokens.push_back(frame.eos);
  mask.resize(tokens.size(), 1);
}

}  // namespace shardlm::data
